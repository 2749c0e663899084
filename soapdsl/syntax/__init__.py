"""Syntax layer: grammar loading, parser, AST nodes and the canonical printer."""

from soapdsl.syntax.ast import Module
from soapdsl.syntax.formatter import format_module
from soapdsl.syntax.parser import parse, parse_file

__all__ = ["Module", "parse", "parse_file", "format_module"]
