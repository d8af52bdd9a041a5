"""Hypothesis profiles: ``ci`` (the default, what ``make test`` runs) is derandomized, so a commit
passes or fails the same way every time; ``fuzz`` (``make fuzz``: HYPOTHESIS_PROFILE=fuzz, or
pytest's ``--hypothesis-profile=fuzz``) draws random seeds and 20 times the examples, for hunting
bugs. A failure found by fuzzing is kept as an explicit ``@example`` next to its test.

Tests size themselves with ``examples(n)``: n under ``ci``, 20 n under ``fuzz``. A per-test
``@settings(...)`` inherits everything it does not name (derandomize above all) from the loaded
profile: conftest.py loads it before any test module is imported.
"""

from __future__ import annotations

import os

from hypothesis import settings

BASE_EXAMPLES = 100

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          max_examples=BASE_EXAMPLES, print_blob=True)
settings.register_profile("fuzz", derandomize=False, deadline=None,
                          max_examples=20 * BASE_EXAMPLES, print_blob=True)


def load() -> None:
    """Load the profile HYPOTHESIS_PROFILE names (``ci`` when unset)."""
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))  # noqa: SIM112


def examples(n: int) -> int:
    """How many examples a test that asks for n runs under the loaded profile."""
    return max(1, n * settings.default.max_examples // BASE_EXAMPLES)
