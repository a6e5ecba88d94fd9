"""Shared pieces of the fuzz tests: the example budget and a strategy that damages valid bytes.

Budgets are sized so that every fuzz test together stays within the CI time budget of `make test`;
`MERMED_FUZZ_EXAMPLES=N` (what `make fuzz` sets) gives every fuzz test N examples instead. The
seed is fixed in CI by the hypothesis profile of conftest.py.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES_ENV = "MERMED_FUZZ_EXAMPLES"


def budget(ci_examples: int, slow_inputs: bool = False) -> settings:
    """Settings with `ci_examples` examples, or $MERMED_FUZZ_EXAMPLES of them for a long run.

    slow_inputs: the inputs are files that take a while to build (DICOM, NIfTI); hypothesis would
    otherwise fail the test as too slow to generate data for.
    """
    return settings(max_examples=int(os.environ.get(FUZZ_EXAMPLES_ENV) or ci_examples),
                    suppress_health_check=[HealthCheck.too_slow] if slow_inputs else [])


@st.composite
def damaged(draw: st.DrawFn, original: bytes, max_edits: int = 3) -> bytes:
    """`original` after 1..max_edits edits of the kinds storage and transfer produce: bit flips,
    overwritten bytes, truncation, inserted, deleted and duplicated ranges."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "duplicate")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)
