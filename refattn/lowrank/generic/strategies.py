"""Hypothesis strategies of Generic low-rank attention problems (U W^T V): its conformance cases' structures with
fresh random factors.

Drawn by :func:`refattn.strategies.case_problems`: a case (shrinking toward the first, the simplest) with its
arrays made again from a drawn seed. Sizes do not shrink below the case's.
"""

from ...strategies import case_strategy

problems = case_strategy("lowrank")
