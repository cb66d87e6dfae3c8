"""Conformance cases for the Compressive Transformer: runs long enough to evict and compress, with every
f_c, a given initial state, and rates that a stride-1 compression would get wrong."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case, normal
from ..flags import quote

FLAGS = quote("STREAM_STATE", "COMPRESSION_STRIDE", "MOST_USED_SELECTION", "GRADIENT_THROUGH_MEMORY",
              "MEMORY_MASK_OFF_BY_ONE")  # fmt: skip


def _conv(taps: int):
    return {"conv_weight_k": normal(lambda d: (d.d, d.d, taps), 0.4),
            "conv_weight_v": normal(lambda d: (d.dv or d.d, d.dv or d.d, taps), 0.4)}  # fmt: skip


def _state(memory: int, compressed: int):
    shape = lambda n, v=False: lambda d: (d.b, d.hkv, n, (d.dv or d.d) if v else d.d)  # noqa: E731
    return {"memory_k": normal(shape(memory)), "memory_v": normal(shape(memory, True)),
            "compressed_k": normal(shape(compressed)), "compressed_v": normal(shape(compressed, True))}  # fmt: skip


def _case(name, description, flags, dims, extra=None, **params) -> Case:
    return make_case("compressive", name, description, flags, draw(dims, extra or {}), params=params)


def cases() -> list[Case]:
    return [
        _case("mean_pool", "Mean pooling, rate 2: memory 4, compressed 3, segments of 4 over 16 tokens.",
              ("COMPRESSION_STRIDE", "GRADIENT_THROUGH_MEMORY"), Dims(1, 2, 2, 16, 16, 8), segment_len=4,
              mem_len=4, compressed_len=3, rate=2, compression="mean_pool"),
        _case("max_pool", "Max pooling, rate 2, GQA 4:2: memory 4, compressed 3, segments of 4 over 16.",
              ("COMPRESSION_STRIDE", "GQA_HEAD_MAP"), Dims(1, 4, 2, 16, 16, 8), segment_len=4, mem_len=4,
              compressed_len=3, rate=2, compression="max_pool"),
        _case("conv", "Convolution kernel = stride = 3: memory 3, compressed 2, segments of 3 over 12, Dv=5.",
              ("COMPRESSION_STRIDE",), Dims(1, 2, 1, 12, 12, 6, 5), _conv(3), segment_len=3, mem_len=3,
              compressed_len=2, rate=3, compression="conv"),
        _case("dilated_conv", "Dilated convolution, rate 4, dilation 2 (taps 0 and 2 of each run).",
              ("COMPRESSION_STRIDE",), Dims(1, 2, 2, 12, 12, 6), _conv(2), segment_len=4, mem_len=4,
              compressed_len=2, rate=4, compression="dilated_conv", dilation=2),
        _case("most_used", "Most-used, rate 2: half of each evicted block, by accumulated attention.",
              ("MOST_USED_SELECTION",), Dims(1, 2, 1, 12, 12, 8), segment_len=4, mem_len=4, compressed_len=4,
              rate=2, compression="most_used"),
        _case("state_in_out", "From a full memory of 4 and a compressed memory of 2: segments of 2 over 6, rate 2.",
              ("STREAM_STATE", "MEMORY_MASK_OFF_BY_ONE"), Dims(2, 2, 2, 6, 6, 8), _state(4, 2), segment_len=2,
              mem_len=4, compressed_len=3, rate=2, compression="mean_pool"),
    ]  # fmt: skip
