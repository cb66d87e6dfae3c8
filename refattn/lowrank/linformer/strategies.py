"""Hypothesis strategies of Linformer problems: its conformance cases' structures (projections E and F, padding,
causal, sliced projections) with fresh random arrays.

Drawn by :func:`refattn.strategies.case_problems`: a case (shrinking toward the first, the simplest) with its
arrays made again from a drawn seed. Sizes do not shrink below the case's.
"""

from ...strategies import case_strategy

problems = case_strategy("linformer")
