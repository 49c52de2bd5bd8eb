"""How tests share the machine when the suite runs in parallel (pytest-xdist, ``-n auto``
in pyproject's addopts; the worker count is chosen in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

ONE_AT_A_TIME = pytest.mark.xdist_group("measured-rates")
"""For tests that measure what reaches Gist in a window, or wait on a scraper's clock:
they run one after the other on one worker (and first: the group is the suite's longest
unit of work), so two of them never load the machine together. The rest of the suite
still runs beside them."""
