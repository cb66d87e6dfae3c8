"""Hypothesis profiles: CI runs a bounded, derandomized set; `slow` fuzzes harder.

Select with HYPOTHESIS_PROFILE=ci|dev|slow (default ci). Long-sequence checks
carry the `slow` marker and are excluded from the default run.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=100, **_common)
settings.register_profile("slow", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
