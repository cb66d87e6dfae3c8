"""Low-rank attention (spec/low_rank.md): the generic U·W form, Linformer,
Nyströmformer, Performer (FAVOR+), and how far each is from the best rank-r
approximation of the softmax matrix (:mod:`refattn.lowrank.distance`)."""

from . import generic, linformer, nystrom, performer
from .generic import lowrank_attention, lowrank_attention_vjp
from .linformer import linformer_attention, linformer_attention_vjp
from .nystrom import nystrom_attention, nystrom_attention_vjp
from .performer import orthogonal_features, performer_attention, performer_attention_vjp

__all__ = ["lowrank_attention", "lowrank_attention_vjp", "linformer_attention", "linformer_attention_vjp", "nystrom_attention", "nystrom_attention_vjp",
           "performer_attention", "performer_attention_vjp", "orthogonal_features"]
