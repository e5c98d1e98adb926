"""Structured outputs: grammars (xgrammar) that restrict which tokens a sequence may sample next."""

from minipaged.structured_output.manager import StructuredOutputManager, build_grammar

__all__ = ["StructuredOutputManager", "build_grammar"]
