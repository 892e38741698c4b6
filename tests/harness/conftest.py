"""Fixtures of the benchmark harness tests."""

import pytest

from benchmarks import common


@pytest.fixture(autouse=True)
def no_wait_for_a_quiet_machine(monkeypatch):
    """The harness tests time nothing that is reported: they do not wait
    for the load average to fall (`common.wait_for_quiet`), in process or
    in the child processes they start (which inherit the environment)."""
    monkeypatch.setenv(common.QUIET_TIMEOUT_ENV, "0")
