"""BigBird block-sparse attention (ITC and ETC), the executable specification.

Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", section 2
and appendix D: the sequence is cut into blocks of ``block_size`` tokens;
with ``nb`` blocks, ITC (``extra_global_tokens = 0``) is

* (1) global blocks (ITC, internal transformer construction): query blocks
  0 and ``nb - 1`` attend to every key, and every query block attends to key
  blocks 0 and ``nb - 1``;
* (2) sliding blocks: query block ``t`` attends to key blocks ``t - 1, t, t + 1``;
* (3) random blocks: query block ``t`` (``1 <= t <= nb - 2``) attends to the
  ``r`` key blocks ``random_blocks[h, t - 1, :]``, given explicitly (the
  oracle never draws them);
* (4) canonical: the union of (1)-(3), each key once, then softmax.

ETC (extended transformer construction, section 2 "global tokens",
``extra_global_tokens = g > 0``): the first ``g`` rows of q, k, v are extra
global tokens (their own inputs, no tokens of the sequence), the other
``N - g = nb * block_size`` rows the sequence;

* (5) the paper's ``B``: ``B[i, :] = B[:, i] = 1`` for ``i < g`` (the extra
  tokens attend to every token and every token attends to them) and
  ``B[g + i, g + j] = A[i, j]``, ``A`` the sliding blocks (2) and the random
  blocks (3) of every sequence block ``t`` (``random_blocks[h, t, :]``,
  ``0 <= t < nb``): ETC has no global blocks (1) among the sequence.

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
from ..pattern import SelfAttentionInputs, self_attention_qkv

#: preset -> (count_repeated_blocks, short_sequence_full, random_blocks_avoid_pattern)
PRESETS = {None: (False, False, False), "hf": (True, True, False), "hf_train": (True, True, True)}
PRESET_PARAMETERS = ("count_repeated_blocks", "short_sequence_full", "random_blocks_avoid_pattern")


def bigbird_attention(
    q, k, v, *,
    block_size, random_blocks=None, extra_global_tokens=0, preset=None, count_repeated_blocks=FROM_PRESET,
    short_sequence_full=FROM_PRESET, random_blocks_avoid_pattern=FROM_PRESET,
    scale=None, precision=None, backend="reference") -> Result:
    """BigBird block-sparse attention (ITC or ETC): global, sliding and given random blocks.

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
    v : ndarray (B, Hkv, N, Dv)
        ``N - extra_global_tokens`` a positive multiple of ``block_size``.
    block_size : int >= 1
    random_blocks : int ndarray (Hq, nb - 2, r) (ITC) or (Hq, nb, r) (ETC), optional
        Key blocks each query block ``t`` attends to, in ``[0, nb)`` (blocks
        of the sequence): ITC, middle block ``t`` reads row ``t - 1``; ETC,
        every block ``t`` reads row ``t``. None means ``r = 0``. HF in eval
        mode uses all zeros.
    extra_global_tokens : int >= 0
        ``g``: 0 is ITC; ``g > 0`` is ETC, the first ``g`` tokens of q, k, v
        being extra global tokens (HF has no ETC: only ``preset=None``).
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

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) (ETC: the extra global tokens' rows first) and ``lse`` (B, Hq, N) (the log-sum-exp of the
        weighted logits: a block counted m times contributes ``m exp(s)``).
    """
    return registry.call_forward("bigbird", locals())


bigbird_attention_vjp = registry.vjp_function(
    bigbird_attention, "bigbird", grads="""    ``q``, ``k``, ``v``, shapes of the inputs.""",
)


@dataclass(frozen=True)
class BigBirdInputs(SelfAttentionInputs):
    """Checked arguments of :func:`bigbird_attention`."""

    block_size: int
    random_blocks: np.ndarray  # (Hq, len(random_query_blocks), r) int64
    extra_global_tokens: int
    count_repeated_blocks: bool
    short_sequence_full: bool
    random_blocks_avoid_pattern: bool
    scale: float

    @property
    def num_blocks(self) -> int:
        """``nb``: blocks of the sequence (the extra global tokens excluded)."""
        return (self.shape.q_len - self.extra_global_tokens) // self.block_size

    @property
    def random_query_blocks(self) -> np.ndarray:
        """The query blocks with random blocks, in ``random_blocks`` row order: ITC ``1 ... nb - 2``, ETC all."""
        return random_query_blocks(self.num_blocks, self.extra_global_tokens)

    @property
    def global_blocks(self) -> tuple[int, ...]:
        """The sequence's global blocks (1): ITC ``0, nb - 1``; ETC none."""
        return () if self.extra_global_tokens else (0, self.num_blocks - 1)

    @property
    def full_attention(self) -> bool:
        """Whether the short-sequence rule applies: ``N <= (5 + 2 r) * block_size``."""
        r = self.random_blocks.shape[2]
        return self.short_sequence_full and self.shape.q_len <= (5 + 2 * r) * self.block_size


def random_query_blocks(num_blocks: int, extra_global_tokens: int) -> np.ndarray:
    """ITC: the middle blocks ``1 ... nb - 2``; ETC: every block ``0 ... nb - 1``."""
    return np.arange(num_blocks) if extra_global_tokens else np.arange(1, max(num_blocks - 1, 1))


def check_bigbird_inputs(q, k, v, *, block_size, random_blocks, extra_global_tokens, preset, count_repeated_blocks,
                         short_sequence_full, random_blocks_avoid_pattern, scale) -> BigBirdInputs:  # fmt: skip
    """Check every argument of ``bigbird_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = self_attention_qkv(q, k, v)
    if preset not in PRESETS:
        raise SpecError("preset", f"one of {list(PRESETS)}", checks.summary(preset))
    given = dict(zip(PRESET_PARAMETERS, (count_repeated_blocks, short_sequence_full, random_blocks_avoid_pattern)))
    chosen = {name: checks.flag(value, name) if value is not FROM_PRESET else default
              for (name, value), default in zip(given.items(), PRESETS[preset])}  # fmt: skip
    extra = _check_extra_global_tokens(extra_global_tokens, preset, chosen["short_sequence_full"], shape.q_len)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise SpecError("block_size", "an int >= 1", checks.summary(block_size))
    n = shape.q_len - extra  # tokens of the sequence
    if n % block_size:
        raise SpecError("block_size", f"a divisor of N - extra_global_tokens = {n} (BigBird takes whole blocks)",
                        checks.summary(block_size))  # fmt: skip
    num_blocks = n // int(block_size)
    rows = len(random_query_blocks(num_blocks, extra))
    if random_blocks is None:
        random_blocks = np.zeros((shape.q_heads, rows, 0), dtype=np.int64)
    random_blocks = _check_random_blocks(random_blocks, shape.q_heads, num_blocks, extra,
                                         chosen["random_blocks_avoid_pattern"])  # fmt: skip
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    return BigBirdInputs(q, k, v, shape, int(block_size), random_blocks, extra, chosen["count_repeated_blocks"],
                         chosen["short_sequence_full"], chosen["random_blocks_avoid_pattern"], scale)  # fmt: skip


def _check_extra_global_tokens(extra_global_tokens, preset, short_sequence_full: bool, n: int) -> int:
    """ETC's ``g``: an int in ``[0, N)``; with ``g > 0`` no HF preset and no short-sequence rule (HF has no ETC)."""
    extra = checks.integer(extra_global_tokens, "extra_global_tokens", minimum=0)
    if extra >= n:
        raise SpecError("extra_global_tokens", f"fewer than N = {n} tokens (ETC needs a sequence)", str(extra))
    if extra and preset is not None:
        raise SpecError("preset", "None with extra_global_tokens > 0 (HF implements ITC only)", checks.summary(preset))
    if extra and short_sequence_full:
        raise SpecError("short_sequence_full", "False with extra_global_tokens > 0 (an HF rule; HF has no ETC)",
                        "True")  # fmt: skip
    return extra


def _check_random_blocks(random_blocks, heads: int, num_blocks: int, extra: int, avoid_pattern: bool) -> np.ndarray:
    query_blocks = random_query_blocks(num_blocks, extra)
    rows, shape = len(query_blocks), "(Hq, nb, r)" if extra else "(Hq, nb - 2, r)"
    if not isinstance(random_blocks, np.ndarray) or random_blocks.dtype.kind not in "iu" or random_blocks.ndim != 3 \
            or random_blocks.shape[:2] != (heads, rows):  # fmt: skip
        raise SpecError("random_blocks", f"an int array {shape} = ({heads}, {rows}, r)",
                        checks.summary(random_blocks))  # fmt: skip
    random_blocks = random_blocks.astype(np.int64)
    if random_blocks.size and (random_blocks.min() < 0 or random_blocks.max() >= num_blocks):
        raise SpecError("random_blocks", f"block indices in [0, {num_blocks})",
                        f"values {random_blocks.min()} to {random_blocks.max()}")  # fmt: skip
    if avoid_pattern and random_blocks.size:
        t = query_blocks[None, :, None]  # query block of each row
        taken = np.abs(random_blocks - t) <= 1
        if not extra:
            taken |= (random_blocks == 0) | (random_blocks == num_blocks - 1)
        if np.any(taken):
            h, row, e = (int(i) for i in np.argwhere(taken)[0])
            raise SpecError("random_blocks", "no sliding or global block of the query block (random_blocks_avoid_pattern)",
                            f"block {random_blocks[h, row, e]} for query block {query_blocks[row]}, head {h}")  # fmt: skip
    return random_blocks


# --------------------------------------------------------------------------
# The pattern (steps 1-5): how many times each query block lists each key block.
# --------------------------------------------------------------------------


def block_multiplicity(x: BigBirdInputs) -> np.ndarray:
    """(Hq, nb, nb) int: how many times query block t of the sequence lists key block s.

    Global query blocks list every key block once. Any other block lists its
    sliding and global blocks once (as a set) and each random entry once more;
    without ``count_repeated_blocks`` every listed block counts once.
    """
    nb, heads, glob = x.num_blocks, x.shape.q_heads, list(x.global_blocks)
    if x.full_attention:
        return np.ones((heads, nb, nb), dtype=np.int64)
    blocks = np.arange(nb)
    fixed = (np.abs(blocks[:, None] - blocks[None, :]) <= 1) | np.isin(blocks[None, :], glob)  # (2) and (1)
    fixed[glob, :] = True  # (1) global query blocks
    counts = np.broadcast_to(fixed, (heads, nb, nb)).astype(np.int64)
    for row, t in enumerate(x.random_query_blocks):  # (3) random blocks, one more listing per entry
        for h in range(heads):
            np.add.at(counts[h, t], x.random_blocks[h, row], 1)
    return counts if x.count_repeated_blocks else np.minimum(counts, 1)


def token_pattern(x: BigBirdInputs) -> tuple[np.ndarray, np.ndarray | None]:
    """(4)-(5) The (1, Hq, N, N) mask of listed keys, and the bias ``log m`` when blocks are counted repeatedly.

    ETC: the sequence's counts sit at rows and columns ``g ...``; the first
    ``g`` rows and columns (the extra global tokens) are 1.
    """
    g = x.extra_global_tokens
    sequence = np.repeat(np.repeat(block_multiplicity(x), x.block_size, axis=1), x.block_size, axis=2)
    counts = np.pad(sequence, ((0, 0), (g, 0), (g, 0)), constant_values=1)[None]
    with np.errstate(divide="ignore"):
        bias = np.log(np.maximum(counts, 1)).astype(np.float64) if x.count_repeated_blocks else None
    return counts > 0, bias


def forward(x: BigBirdInputs, num: Numerics) -> Result:
    """Steps (1)-(5) in precision ``num``: dense attention over the listed keys."""
    allowed, bias = token_pattern(x)
    return dense_attention(num.load(x.q), num.load(x.k), num.load(x.v), mask=allowed, bias=bias, scale=x.scale,
                           precision=num)  # fmt: skip


def vjp(x: BigBirdInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """(5')-(1'): dense attention's VJP over the same pattern (the count bias is not an input)."""
    allowed, bias = token_pattern(x)
    grads = dense_attention_vjp(cotangents.dout, num.load(x.q), num.load(x.k), num.load(x.v), dlse=cotangents.dlse,
                                mask=allowed, bias=bias, scale=x.scale, precision=num)  # fmt: skip
    return Grads({name: grads[name] for name in ("q", "k", "v")})
