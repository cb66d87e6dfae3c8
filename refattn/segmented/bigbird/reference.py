"""BigBird block-sparse attention (ITC), the executable specification.

Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", section 2
and appendix D: the sequence is cut into blocks of ``block_size`` tokens;
with ``nb`` blocks,

* (1) global blocks (ITC, internal transformer construction): query blocks
  0 and ``nb - 1`` attend to every key, and every query block attends to key
  blocks 0 and ``nb - 1``;
* (2) sliding blocks: query block ``t`` attends to key blocks ``t - 1, t, t + 1``;
* (3) random blocks: query block ``t`` (``1 <= t <= nb - 2``) attends to the
  ``r`` key blocks ``random_blocks[h, t - 1, :]``, given explicitly (the
  oracle never draws them);
* (4) canonical: the union of (1)-(3), each key once, then softmax.

HF transformers' ``BigBirdBlockSparseAttention`` (the ``"hf"`` presets)
differs in ways the parameters name (spec/segmented.md, "BigBird"):
``count_repeated_blocks``: the random blocks are gathered as extra columns,
so a block listed k times (or listed and also sliding/global) is weighted
k + 1 times -- in eval mode HF's random indices are all zero
(``_bigbird_block_rand_mask``: ``if not self.training: return rand_attn``),
which weights key block 0 ``1 + r`` times for every middle query block;
``short_sequence_full``: ``BigBirdModel.forward`` switches to full attention
when ``N <= (5 + 2 r) * block_size``; ``random_blocks_avoid_pattern``:
training-mode draws never pick a sliding or global block.

A block weighted ``m`` times is the same as a logit bias ``log m`` on its
keys: the reference passes that bias to dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp
from ..pattern import SelfAttentionOutputs, self_attention_qkv

#: preset -> (count_repeated_blocks, short_sequence_full, random_blocks_avoid_pattern)
PRESETS = {None: (False, False, False), "hf": (True, True, False), "hf_train": (True, True, True)}
PRESET_PARAMETERS = ("count_repeated_blocks", "short_sequence_full", "random_blocks_avoid_pattern")


def bigbird_attention(
    q,
    k,
    v,
    *,
    block_size,
    random_blocks=None,
    preset=None,
    count_repeated_blocks=FROM_PRESET,
    short_sequence_full=FROM_PRESET,
    random_blocks_avoid_pattern=FROM_PRESET,
    scale=None,
    precision=None,
    backend="reference",
) -> Result:
    """BigBird ITC block-sparse attention: global, sliding and given random blocks.

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
    v : ndarray (B, Hkv, N, Dv)
        ``N`` a multiple of ``block_size``.
    block_size : int >= 1
    random_blocks : int ndarray (Hq, nb - 2, r), optional
        Key blocks each middle query block ``t`` (row ``t - 1``) attends to,
        in ``[0, nb)``; None means ``r = 0``. HF in eval mode uses all zeros.
    preset : {None, "hf", "hf_train"}
        None: the paper's union. ``"hf"``: HF eval mode's counting and
        short-sequence rule; ``"hf_train"``: also HF's training-mode draw rule.
    count_repeated_blocks : bool
        Weight a key block by the number of times it is listed (HF) rather than once.
    short_sequence_full : bool
        Full attention when ``N <= (5 + 2 r) * block_size`` (HF ``BigBirdModel``).
    random_blocks_avoid_pattern : bool
        Reject random blocks that are sliding or global blocks of their query block.
    scale : float > 0, optional
        Default ``1 / sqrt(D)``.
    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics
    backend : {"reference", "numba"}

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) and ``lse`` (B, Hq, N) (the log-sum-exp of the
        weighted logits: a block counted m times contributes ``m exp(s)``).
    """
    return registry.call_forward("bigbird", locals())


bigbird_attention_vjp = registry.vjp_function(
    bigbird_attention,
    "bigbird",
    grads="""    ``q``, ``k``, ``v``, shapes of the inputs.""",
)


@dataclass(frozen=True)
class BigBirdInputs(SelfAttentionOutputs):
    """Checked arguments of :func:`bigbird_attention`."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: checks.AttentionShape
    block_size: int
    random_blocks: np.ndarray  # (Hq, max(nb - 2, 0), r) int64
    count_repeated_blocks: bool
    short_sequence_full: bool
    scale: float

    @property
    def num_blocks(self) -> int:
        return self.shape.q_len // self.block_size

    @property
    def full_attention(self) -> bool:
        """Whether the short-sequence rule applies: ``N <= (5 + 2 r) * block_size``."""
        r = self.random_blocks.shape[2]
        return self.short_sequence_full and self.shape.q_len <= (5 + 2 * r) * self.block_size


def check_bigbird_inputs(q, k, v, *, block_size, random_blocks, preset, count_repeated_blocks, short_sequence_full,
                         random_blocks_avoid_pattern, scale) -> BigBirdInputs:  # fmt: skip
    """Check every argument of ``bigbird_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = self_attention_qkv(q, k, v)
    if preset not in PRESETS:
        raise SpecError("preset", f"one of {list(PRESETS)}", checks.summary(preset))
    given = dict(zip(PRESET_PARAMETERS, (count_repeated_blocks, short_sequence_full, random_blocks_avoid_pattern)))
    chosen = {name: checks.flag(value, name) if value is not FROM_PRESET else default
              for (name, value), default in zip(given.items(), PRESETS[preset])}  # fmt: skip
    n = shape.q_len
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise SpecError("block_size", "an int >= 1", checks.summary(block_size))
    if n % block_size:
        raise SpecError("block_size", f"a divisor of N = {n} (BigBird takes whole blocks)", checks.summary(block_size))
    num_blocks = n // int(block_size)
    middle = max(num_blocks - 2, 0)
    if random_blocks is None:
        random_blocks = np.zeros((shape.q_heads, middle, 0), dtype=np.int64)
    random_blocks = _check_random_blocks(random_blocks, shape.q_heads, middle, num_blocks,
                                         chosen["random_blocks_avoid_pattern"])  # fmt: skip
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    return BigBirdInputs(q, k, v, shape, int(block_size), random_blocks, chosen["count_repeated_blocks"],
                         chosen["short_sequence_full"], scale)  # fmt: skip


def _check_random_blocks(random_blocks, heads: int, middle: int, num_blocks: int, avoid_pattern: bool) -> np.ndarray:
    if not isinstance(random_blocks, np.ndarray) or random_blocks.dtype.kind not in "iu" or random_blocks.ndim != 3 \
            or random_blocks.shape[:2] != (heads, middle):  # fmt: skip
        raise SpecError("random_blocks", f"an int array (Hq, nb - 2, r) = ({heads}, {middle}, r)",
                        checks.summary(random_blocks))  # fmt: skip
    random_blocks = random_blocks.astype(np.int64)
    if random_blocks.size and (random_blocks.min() < 0 or random_blocks.max() >= num_blocks):
        raise SpecError("random_blocks", f"block indices in [0, {num_blocks})",
                        f"values {random_blocks.min()} to {random_blocks.max()}")  # fmt: skip
    if avoid_pattern and random_blocks.size:
        t = np.arange(1, middle + 1)[None, :, None]  # query block of each row
        taken = (np.abs(random_blocks - t) <= 1) | (random_blocks == 0) | (random_blocks == num_blocks - 1)
        if np.any(taken):
            h, row, e = (int(i) for i in np.argwhere(taken)[0])
            raise SpecError("random_blocks", "no sliding or global block of the query block (random_blocks_avoid_pattern)",
                            f"block {random_blocks[h, row, e]} for query block {row + 1}, head {h}")  # fmt: skip
    return random_blocks


# --------------------------------------------------------------------------
# The pattern (steps 1-4): how many times each query block lists each key block.
# --------------------------------------------------------------------------


def block_multiplicity(x: BigBirdInputs) -> np.ndarray:
    """(Hq, nb, nb) int: how many times query block t lists key block s.

    Global query blocks list every key block once. A middle block lists its
    sliding and global blocks once (as a set) and each random entry once more;
    without ``count_repeated_blocks`` every listed block counts once.
    """
    nb, heads = x.num_blocks, x.shape.q_heads
    if x.full_attention:
        return np.ones((heads, nb, nb), dtype=np.int64)
    blocks = np.arange(nb)
    fixed = (np.abs(blocks[:, None] - blocks[None, :]) <= 1) | np.isin(blocks[None, :], [0, nb - 1])  # (2) and (1)
    fixed[[0, nb - 1], :] = True  # (1) global query blocks
    counts = np.broadcast_to(fixed, (heads, nb, nb)).astype(np.int64)
    for t in range(1, nb - 1):  # (3) random blocks, one more listing per entry
        for h in range(heads):
            np.add.at(counts[h, t], x.random_blocks[h, t - 1], 1)
    return counts if x.count_repeated_blocks else np.minimum(counts, 1)


def token_pattern(x: BigBirdInputs) -> tuple[np.ndarray, np.ndarray | None]:
    """(4) The (1, Hq, N, N) mask of listed keys, and the bias ``log m`` when blocks are counted repeatedly."""
    counts = np.repeat(np.repeat(block_multiplicity(x), x.block_size, axis=1), x.block_size, axis=2)[None]
    with np.errstate(divide="ignore"):
        bias = np.log(np.maximum(counts, 1)).astype(np.float64) if x.count_repeated_blocks else None
    return counts > 0, bias


def forward(x: BigBirdInputs, num: Numerics) -> Result:
    """Steps (1)-(4) in precision ``num``: dense attention over the listed keys."""
    allowed, bias = token_pattern(x)
    return dense_attention(num.load(x.q), num.load(x.k), num.load(x.v), mask=allowed, bias=bias, scale=x.scale,
                           precision=num)  # fmt: skip


def vjp(x: BigBirdInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """(4')-(1'): dense attention's VJP over the same pattern (the count bias is not an input)."""
    allowed, bias = token_pattern(x)
    grads = dense_attention_vjp(cotangents.dout, num.load(x.q), num.load(x.k), num.load(x.v), dlse=cotangents.dlse,
                                mask=allowed, bias=bias, scale=x.scale, precision=num)  # fmt: skip
    return Grads({name: grads[name] for name in ("q", "k", "v")})
