"""The fault runs share one tiny model per session (built in seconds, read-only)."""

import pytest

from loraplex.faults.harness import write_tiny_model


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("fault_model"))
