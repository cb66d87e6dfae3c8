"""Hierarchical attention (spec/hierarchical.md): H-Transformer-1D's hierarchical matrix
(:mod:`refattn.hierarchical.h1d`) and multi-level attention with an aggregation G
(:mod:`refattn.hierarchical.multilevel`)."""

from . import h1d, multilevel
from .h1d import h1d_attention, h1d_attention_vjp
from .multilevel import multilevel_attention, multilevel_attention_vjp

__all__ = ["h1d_attention", "h1d_attention_vjp", "multilevel_attention", "multilevel_attention_vjp"]
