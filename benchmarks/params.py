"""The benchmark's GPT-like parameter set and a fixed pool of gradients.

Shapes (d=256, 4 blocks, vocab 4096), PyTorch ``nn.Linear.weight`` layout ``[out, in]``::

    embed.weight                [4096, 256]
    blocks.{i}.attn.qkv.weight  [768, 256]
    blocks.{i}.attn.proj.weight [256, 256]
    blocks.{i}.mlp.fc.weight    [1024, 256]
    blocks.{i}.mlp.proj.weight  [256, 1024]
    blocks.{i}.norm1.weight     [256]
    blocks.{i}.norm2.weight     [256]
    norm.weight                 [256]
    head.weight                 [4096, 256]

Every optimizer gets its own copy of the same initial parameters; the gradients come from one
shared pool (a few random tensors per parameter, made once) and are copied into each copy's
``.grad`` before a step, outside the timed region, so every optimizer sees the same gradients
and none of them can disturb the pool (some update ``.grad`` in place).

A second set, ``"many"`` (:func:`many_shapes`), has the tensors of a real model of small width:
GPT-2's layout with biases and position embeddings, d=32, 48 blocks, vocab 512: 581 tensors of
at most 16,384 elements each. Its kernels are nearly free, so a step's time is the host's
work (Python, dispatch, launches), which is what a GPU step of such a model waits on.
"""

from __future__ import annotations

import torch

D_MODEL = 256
N_LAYERS = 4
VOCAB = 4096
# the many-small-tensors set: a GPT-2-shaped model of small width and many blocks
MANY_D = 32
MANY_LAYERS = 48
PARAM_SETS = ("gpt", "many")


def gpt_shapes(d: int = D_MODEL, layers: int = N_LAYERS, vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameter set, in model order."""
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    for i in range(layers):
        out += [
            (f"blocks.{i}.attn.qkv.weight", (3 * d, d)),
            (f"blocks.{i}.attn.proj.weight", (d, d)),
            (f"blocks.{i}.mlp.fc.weight", (4 * d, d)),
            (f"blocks.{i}.mlp.proj.weight", (d, 4 * d)),
            (f"blocks.{i}.norm1.weight", (d,)),
            (f"blocks.{i}.norm2.weight", (d,)),
        ]
    out += [("norm.weight", (d,)), ("head.weight", (vocab, d))]
    return out


def many_shapes(d: int = MANY_D, layers: int = MANY_LAYERS) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2's tensors (every linear layer and layer norm with its bias, learned positions) at
    width ``d``, vocab 16 d and 8 d positions, in model order: 12 tensors a block, 12 layers + 5."""
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (16 * d, d)), ("pos_embed.weight", (8 * d, d))]
    for i in range(layers):
        b = f"blocks.{i}"
        out += [
            (f"{b}.norm1.weight", (d,)),
            (f"{b}.norm1.bias", (d,)),
            (f"{b}.attn.qkv.weight", (3 * d, d)),
            (f"{b}.attn.qkv.bias", (3 * d,)),
            (f"{b}.attn.proj.weight", (d, d)),
            (f"{b}.attn.proj.bias", (d,)),
            (f"{b}.norm2.weight", (d,)),
            (f"{b}.norm2.bias", (d,)),
            (f"{b}.mlp.fc.weight", (4 * d, d)),
            (f"{b}.mlp.fc.bias", (4 * d,)),
            (f"{b}.mlp.proj.weight", (d, 4 * d)),
            (f"{b}.mlp.proj.bias", (d,)),
        ]
    out += [("norm.weight", (d,)), ("norm.bias", (d,)), ("head.weight", (16 * d, d))]
    return out


def is_hidden_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """2-D weights of the blocks (what Muon is meant for; torch.optim.Muon takes only 2-D)."""
    return len(shape) == 2 and name.startswith("blocks.")


def select(subset: str, d: int | None = None, params: str = "gpt") -> list[tuple[str, tuple[int, ...]]]:
    """``"all"`` or ``"hidden"`` (hidden 2-D matrices only) of parameter set ``params`` (``"gpt"``:
    :func:`gpt_shapes`, ``"many"``: :func:`many_shapes`), of width ``d`` (vocab 16 d; default
    each set's own width)."""
    if params == "gpt":
        shapes = gpt_shapes(d or D_MODEL, N_LAYERS, VOCAB * (d or D_MODEL) // D_MODEL)
    elif params == "many":
        shapes = many_shapes(d or MANY_D)
    else:
        raise ValueError(f"unknown parameter set {params!r}")
    if subset == "all":
        return shapes
    if subset == "hidden":
        return [(n, s) for n, s in shapes if is_hidden_matrix(n, s)]
    raise ValueError(f"unknown subset {subset!r}")


class GradPool:
    """``pool`` random gradients per parameter, made once from a fixed seed and shared by everyone,
    on ``device``, for ``select(subset, d, params)``."""

    def __init__(
        self,
        subset: str = "all",
        pool: int = 4,
        seed: int = 0,
        device: str = "cpu",
        d: int | None = None,
        params: str = "gpt",
    ) -> None:
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
        self.shapes = select(subset, d, params)
        self.device = torch.device(device)
        self.init = {n: (torch.randn(s, generator=gen) * 0.02).to(self.device) for n, s in self.shapes}
        self.grads = [{n: torch.randn(s, generator=gen).to(self.device) for n, s in self.shapes} for _ in range(pool)]

    def make_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """A fresh copy of the initial parameters, each with a ``.grad`` buffer."""
        out = []
        for n, _ in self.shapes:
            p = torch.nn.Parameter(self.init[n].clone())
            p.grad = torch.zeros_like(p)
            out.append((n, p))
        return out

    def load(self, named: list[tuple[str, torch.nn.Parameter]], k: int) -> None:
        """Copy gradient ``k`` (mod the pool size) into the parameters' ``.grad`` (untimed)."""
        grads = self.grads[k % len(self.grads)]
        for n, p in named:
            if p.grad is None:  # an optimizer may drop .grad after its step
                p.grad = grads[n].clone()
            else:
                p.grad.copy_(grads[n])

    def attach(self, named: list[tuple[str, torch.nn.Parameter]], k: int) -> None:
        """Point ``.grad`` at pool gradient ``k`` without copying (for profiles, where a copy
        would show up among the step's ops; only for optimizers that leave ``.grad`` alone)."""
        grads = self.grads[k % len(self.grads)]
        for n, p in named:
            p.grad = grads[n]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.init.values())
