"""The compatibility gallery: real libraries verified against refattn's vectors.

::

    python examples/gallery.py            # run every entry, write docs/compatibility.md
    python examples/gallery.py --check    # run them, exit 1 if the result differs from the committed table

Each entry is an adapter in this folder, run by :func:`refattn.verify` on the
published suite. The table gives, per library and version, the cases passed,
partial (an output not returned), unsupported (the library cannot express
the case) and failed; below it every case that did not pass is listed with
its flags, and every flag that explains a failure with the line of the
library's own source that causes it (:data:`EXPLANATIONS`). A failure whose
flags have no explanation makes the run fail: the gallery explains every non-pass.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from refattn.conformance.verify import load_callable, verify

HERE = Path(__file__).resolve().parent
TABLE = HERE.parent / "docs" / "compatibility.md"


@dataclass(frozen=True)
class Entry:
    library: str  # distribution name, for its version
    what: str  # the function verified
    impl: str  # FILE.py:NAME, relative to examples/
    mechanism: str
    dtype: str
    grad: bool
    layout: str = "bhnd"


ENTRIES = (
    Entry("torch", "torch.nn.functional.scaled_dot_product_attention", "torch_sdpa.py:sdpa", "dense", "float32", True),
    Entry("torch", "torch.nn.functional.scaled_dot_product_attention", "torch_sdpa.py:sdpa", "dense", "float64", True),
    Entry("jax", "jax.nn.dot_product_attention (out, lse)", "jax_dot_product_attention.py:attention", "dense", "float32",
          False, "bnhd"),
    Entry("jax", "jax.nn.dot_product_attention (out, lse)", "jax_dot_product_attention.py:attention", "dense", "float64",
          False, "bnhd"),
    Entry("jax", "jax.nn.dot_product_attention (out only), gradients", "jax_dot_product_attention.py:attention_out",
          "dense", "float32", True, "bnhd"),
)  # fmt: skip

#: (library, flag) -> why a case with that flag does not pass, citing the library's source.
EXPLANATIONS = {
    ("jax", "CAUSAL_ALIGNMENT"): "is_causal aligns top-left: `_get_causal_mask` is `jnp.tril(jnp.ones((T, S)))` "
    "(jax/_src/nn/functions.py, `_get_causal_mask`), so with Nq != Nk the bottom-right cases differ.",
    ("jax", "SLIDING_WINDOW"): "local_window_size is measured from top-left indices: `_get_window_mask` compares "
    "`query_pos` and `key_pos` directly (jax/_src/nn/functions.py), so windows with Nq != Nk differ.",
    ("jax", "WINDOW_WIDER_THAN_SEQUENCE"): "as SLIDING_WINDOW and CAUSAL_ALIGNMENT: the window and causal bound are "
    "aligned top-left.",
    ("jax", "FULLY_MASKED_ROW"): "masked logits become `_get_large_negative` = -0.7 * finfo.max, not -inf "
    "(jax/_src/nn/functions.py, `_apply_masks`): a row with no key averages every value instead of giving 0, "
    "and its lse is finite.",
    ("jax", "PADDING_MASK"): "padded queries are fully masked rows: see FULLY_MASKED_ROW.",
    ("jax", "MASK_COMBINATION"): "the case combines a mask with a bottom-right causal bound or a window: see "
    "CAUSAL_ALIGNMENT and SLIDING_WINDOW.",
    ("jax", "LARGE_LOGITS"): "the softmax is computed in float32 whatever the input dtype (`padded_logits.astype("
    "np.float32)`, jax/_src/nn/functions.py, `_dot_product_attention_core`): float64 inputs get float32 accuracy.",
    ("jax", "FLOAT64"): "the softmax is computed in float32 whatever the input dtype (`padded_logits.astype("
    "np.float32)`, jax/_src/nn/functions.py, `_dot_product_attention_core`): float64 inputs get float32 accuracy.",
    ("jax", "SINGLE_TOKEN"): "decoding cases use a bottom-right causal bound: see CAUSAL_ALIGNMENT.",
}


def run_entry(entry: Entry):
    impl = load_callable(str(HERE / entry.impl))
    return verify(impl, mechanism=entry.mechanism, dtype=entry.dtype, layout=entry.layout, grad=entry.grad,
                  name=entry.impl)  # fmt: skip


def explain(entry: Entry, case) -> str:
    """The explanations of one non-passing case, by its flags (and the dtype: FLOAT64), or "" if none."""
    keys = [*case.flags, *(["FLOAT64"] if entry.dtype == "float64" else [])]
    found = [f"{flag}: {EXPLANATIONS[(entry.library, flag)]}" for flag in keys if (entry.library, flag) in EXPLANATIONS]
    return found[0] if found else ""


def table() -> tuple[str, list[str]]:
    """The gallery's markdown, and the failures it cannot explain."""
    rows, details, unexplained = [], [], []
    for entry in ENTRIES:
        report = run_entry(entry)
        counts = report.counts()
        version = importlib.metadata.version(entry.library)
        failed = counts["fail"] + counts["error"] + counts["timeout"]
        rows.append(f"| {entry.library} {version} | {entry.what} | {entry.mechanism} | {entry.dtype} | "
                    f"{'yes' if entry.grad else 'no'} | {counts['pass']} | {counts['partial']} | "
                    f"{counts['unsupported']} | {failed} |")  # fmt: skip
        lines = []
        for case in report.cases:
            if case.status == "pass":
                continue
            if case.status == "unsupported":
                why = f"unsupported: {case.message}"
            elif case.status == "partial":
                why = f"partial: not returned {', '.join(case.missing)}"
            else:
                why = explain(entry, case)
                if not why:
                    unexplained.append(f"{entry.library} {entry.dtype}: {case.id} ({case.first_stage})")
                    why = "UNEXPLAINED"
                why = f"{case.status} at {case.first_stage}: {why}"
            lines.append(f"- `{case.id}` ({', '.join(case.flags)}): {why}")
        if lines:
            details += [f"### {entry.library} {version}: {entry.what}, {entry.dtype}{', gradients' if entry.grad else ''}",
                        "", *lines, ""]  # fmt: skip
    text = "\n".join([
        "# Compatibility gallery",
        "",
        "Real libraries verified against refattn's conformance vectors, produced by `python examples/gallery.py`",
        "from a real run (CI reruns it and fails when a result differs from this table). Adapters: `examples/`.",
        "",
        "| library | function | mechanism | dtype | gradients | passed | partial | unsupported | failed |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Every case that did not pass, and why",
        "",
        *details,
    ])
    return text.rstrip("\n") + "\n", unexplained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the result differs from the committed table")
    args = parser.parse_args(argv)
    text, unexplained = table()
    for line in unexplained:
        print(f"unexplained failure: {line}", file=sys.stderr)
    if args.check:
        same = TABLE.is_file() and TABLE.read_text(encoding="utf-8") == text
        print(f"{TABLE}: {'matches the run' if same else 'differs from the run'}")
        return 0 if same and not unexplained else 1
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(text, encoding="utf-8")
    print(f"wrote {TABLE}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
