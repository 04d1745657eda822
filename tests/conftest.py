"""Fixtures shared by several test files."""

import jax
import pytest

# Imported before any test module starts JAX (blackjax's import does), so the tests see the CPU
# devices the package asks for, one per core, as a user's program that imports it first does.
import cryojax_mw  # noqa: F401


class TraceCounter:
    """Counts jaxpr traces (each new compilation starts with one) while active."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, _duration, **_):
        if self.active and name == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *_):
        self.active = False


@pytest.fixture(scope="session")
def trace_counter():
    """One listener for the whole session (JAX offers no way to remove one)."""
    return TraceCounter()
