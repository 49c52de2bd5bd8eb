"""Shared integration-test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from destination.devtools.sandbox import Sandbox, SandboxConfig, running_sandbox
from tests.integration import harness


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """A test that fails half-way must not leave its worker or sandbox running."""
    yield
    harness.reap()


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """The config of the ``sandbox`` fixture. Override this fixture in a test module (or
    use ``@pytest.mark.parametrize("sandbox_config", [SandboxConfig(...)])``) to change
    it. The default keeps the real rate limit but shortens the batch delay."""
    return SandboxConfig(batch_delay=0.05, seed=0)


@pytest.fixture
async def sandbox(sandbox_config: SandboxConfig) -> AsyncIterator[Sandbox]:
    """A Gist sandbox served on a free local port for one test: ``sandbox.url``,
    API key ``sandbox.config.api_keys`` (``sandbox-key`` by default), ``sandbox.store``."""
    async with running_sandbox(sandbox_config) as running:
        yield running
