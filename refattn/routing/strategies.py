"""Hypothesis strategies of Routing Transformer problems: its conformance cases' structures for every preset
(shared-QK, causal, padding, memory key/values, unrouted tokens) with fresh designed problems
(refattn/routing/problems.py), whose nearest-centroid and top-k decisions keep a margin of at least
MIN_RELATIVE_MARGIN of |r| |mu| for any seed: enough for bfloat16.

Drawn by :func:`refattn.strategies.case_problems`: a case (shrinking toward the first, the simplest) with its
arrays made again from a drawn seed. Sizes do not shrink below the case's.
"""

from ..strategies import case_strategy

problems = case_strategy("routing")
