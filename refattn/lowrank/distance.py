"""Distance from the optimum: how far a low-rank mechanism's attention matrix is
from the best rank-r approximation of the exact softmax matrix (spec/low_rank.md,
"Distance from optimal"), a diagnostic beside ``attention_diagnostics``.

For the exact (row-stochastic) matrix P and a mechanism's implied matrix Â of
rank at most r, both formed explicitly (small N only), the Eckart–Young–Mirsky
theorem gives the floors

    min_{rank X <= r} ‖P − X‖_F = (Σ_{i>r} σ_i²)^½,   min_{rank X <= r} ‖P − X‖₂ = σ_{r+1},

so ``ratio = ‖P − Â‖_F / floor >= 1``. The SVD optimum is neither stochastic
nor non-negative, so a ratio of 1 is unattainable by any attention; the
ratio compares mechanisms at a rank, it is not a gap to close. Also reported:
the largest row-sum error ``max_i |Σ_j Â_ij − 1|`` and the most negative
entry (Nyström's Â can have negative entries).

Run ``python -m refattn.lowrank.distance`` for the table of every mechanism
against rank on the two input families (``--plot FILE`` also draws ratio
against rank, with matplotlib).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..core.errors import SpecError

#: The table's columns.
COLUMNS = ("frobenius", "frobenius_floor", "ratio", "spectral", "spectral_floor", "spectral_ratio",
           "max_row_sum_error", "min_entry")  # fmt: skip


def distance_from_optimal(exact: np.ndarray, implied: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """Distances of ``implied`` from ``exact`` and the Eckart–Young floors at ``rank``, per matrix.

    Parameters
    ----------
    exact : ndarray (..., Nq, Nk)
        The exact attention matrices P.
    implied : ndarray (..., Nq, Nk)
        The mechanism's matrices Â, of rank at most ``rank``.
    rank : int >= 1

    Returns
    -------
    dict of ndarray (...)
        The :data:`COLUMNS`; a ratio is ``inf`` where its floor is 0 and Â ≠ P, 1 where both are 0.
    """
    exact, implied = np.asarray(exact, np.float64), np.asarray(implied, np.float64)
    if exact.shape != implied.shape or exact.ndim < 2:
        raise SpecError("implied", f"the shape of exact {exact.shape} (..., Nq, Nk)", f"shape {implied.shape}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise SpecError("rank", "an int >= 1", repr(rank))
    sigma = np.linalg.svd(exact, compute_uv=False)  # (..., min(Nq, Nk)), descending
    tail = sigma[..., rank:]
    error = exact - implied
    found = dict(
        frobenius=np.linalg.norm(error, axis=(-2, -1)),
        frobenius_floor=np.sqrt(np.sum(tail**2, axis=-1)),
        spectral=np.linalg.norm(error, ord=2, axis=(-2, -1)),
        spectral_floor=tail[..., 0] if tail.shape[-1] else np.zeros(sigma.shape[:-1]),
        max_row_sum_error=np.max(np.abs(implied.sum(axis=-1) - 1.0), axis=-1),
        min_entry=implied.min(axis=(-2, -1)),
    )
    for name, floor in (("ratio", "frobenius_floor"), ("spectral_ratio", "spectral_floor")):
        distance = found["frobenius" if name == "ratio" else "spectral"]
        with np.errstate(divide="ignore", invalid="ignore"):
            found[name] = np.where(found[floor] > 0, distance / found[floor], np.where(distance > 0, np.inf, 1.0))
    return {name: found[name] for name in COLUMNS}


# --------------------------------------------------------------------------
# The table: every mechanism against rank on an input family.
# --------------------------------------------------------------------------


def problem(family: str, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (1, 1, n, d): ``"gaussian"`` (standard normal) or ``"dilution"`` (one relevant key, key 0, far above the rest)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, n, d)) for _ in range(3))
    if family == "dilution":
        k[..., 0, :] = 3.0 * q.mean(axis=2)[0, 0] / max(np.linalg.norm(q.mean(axis=2)), 1e-12) * np.sqrt(d)
    elif family != "gaussian":
        raise SpecError("family", "'gaussian' or 'dilution'", repr(family))
    return q, k, v


def implied_matrices(q, k, v, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Each mechanism's Â at ``rank`` (landmarks, projection rows or features) for one problem."""
    from .linformer.reference import implied_attention as linformer_matrix
    from .nystrom.reference import implied_attention as nystrom_matrix
    from .performer.reference import implied_attention as performer_matrix
    from .performer.reference import orthogonal_features

    rng = np.random.default_rng(seed)
    n, d = q.shape[2], q.shape[3]
    matrices = {}
    e = rng.standard_normal((rank, n)) / np.sqrt(rank)
    matrices["linformer"] = linformer_matrix(q, k, v, e=e)
    if n % rank == 0:
        matrices["nystrom"] = nystrom_matrix(q, k, v, num_landmarks=rank)
    matrices["performer"] = performer_matrix(q, k, v, omega=orthogonal_features(rng, rank, d))
    return matrices


def table(family: str = "gaussian", n: int = 48, d: int = 16, ranks=(2, 4, 8, 12, 16, 24), seed: int = 0) -> list[dict]:
    """One row per (mechanism, rank): the :data:`COLUMNS` of :func:`distance_from_optimal`."""
    q, k, v = problem(family, n, d, seed)
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d)
    exact = np.exp(logits - logits.max(axis=-1, keepdims=True))
    exact /= exact.sum(axis=-1, keepdims=True)
    rows = []
    for rank in ranks:
        for mechanism, implied in implied_matrices(q, k, v, rank, seed).items():
            found = distance_from_optimal(exact, implied, rank)
            rows.append({"family": family, "mechanism": mechanism, "rank": rank,
                         **{name: float(value.reshape(-1)[0]) for name, value in found.items()}})  # fmt: skip
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn low-rank``."""
    parser.add_argument("--family", choices=("gaussian", "dilution"), nargs="+", default=["gaussian", "dilution"])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--plot", metavar="FILE", help="also draw ratio against rank (needs matplotlib)")


def main(argv=None) -> int:
    """``refattn low-rank`` on its own (``python -m refattn.lowrank.distance``)."""
    parser = argparse.ArgumentParser(prog="refattn low-rank", description="distance of low-rank attention from optimal")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Print the table (and draw the figure) for parsed arguments; the exit status."""
    rows = [row for family in args.family for row in table(family, args.n, args.d)]
    print(f"{'family':9} {'mechanism':10} {'rank':>4} " + " ".join(f"{c:>17}" for c in COLUMNS))
    for row in rows:
        print(f"{row['family']:9} {row['mechanism']:10} {row['rank']:>4} " + " ".join(f"{row[c]:17.4g}" for c in COLUMNS))
    if args.plot:
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(args.family), figsize=(5 * len(args.family), 4), squeeze=False)
        for axis, family in zip(axes[0], args.family):
            for mechanism in sorted({r["mechanism"] for r in rows}):
                mine = [r for r in rows if r["family"] == family and r["mechanism"] == mechanism]
                axis.plot([r["rank"] for r in mine], [r["ratio"] for r in mine], marker="o", label=mechanism)
            axis.set(title=family, xlabel="rank", ylabel="‖P − Â‖_F / Eckart–Young floor", yscale="log")
            axis.legend()
        figure.savefig(args.plot, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
