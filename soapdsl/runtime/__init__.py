"""Runtime: the torch optimizer that executes a Plan."""
