import os
import sys
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: no telemetry calls to huggingface.co from tests.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from hub_server import local_hub  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="session")
def _first_cos():
    """On this machine's torch CPU build the first float32 `cos` of a process now and then returns values up to
    1.5e-4 off for arguments in the hundreds, while every later call agrees with float64 to 1e-5: a model's first
    forward then has slightly wrong rotary tables, and a test comparing it tightly with a reference fails by chance.
    The session takes that first call here."""
    import torch

    torch.cos(torch.arange(4096, dtype=torch.float32))


@pytest.fixture(autouse=True, scope="session")
def _shapes_cache(tmp_path_factory):
    """The built-in task's splits are cached under a temporary folder for the session (subprocesses included), not
    in the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PROXYV_CACHE", str(tmp_path_factory.mktemp("proxyv-cache")))
    yield
    patch.undo()
