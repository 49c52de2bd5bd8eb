"""The ``backend`` fixture: each contract test runs once on the twin and once, marked
``integration``, on the real broker of the session (``kafka_bootstrap``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.backends import KafkaBackend, RealBackend, TwinBackend


@pytest.fixture(params=["twin", pytest.param("real", marks=pytest.mark.integration)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[KafkaBackend]:
    chosen: KafkaBackend
    if request.param == "twin":
        chosen = TwinBackend()
    else:
        chosen = RealBackend(request.getfixturevalue("kafka_bootstrap"))
    try:
        yield chosen
    finally:
        await chosen.close()
