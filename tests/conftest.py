import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """No test may reach huggingface.co: tests that need a Hub use the loopback server."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
