import importlib.util
import os
import sys
from pathlib import Path

import pytest

from proxyv_convert.threads import usable_cores  # imports no torch: the thread settings below come first

# Before anything imports huggingface_hub: no telemetry calls to huggingface.co from tests.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


# A parallel run (pytest-xdist, `-n auto`: one worker per usable core) shares the cores among its workers: each
# worker, and every process a test starts, computes with its share of threads (set here, before anything imports
# torch). Torch's default, one thread per core in every process, oversubscribes the cores, and its waiting threads
# then slow every test several times.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    threads = str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from hub_server import local_hub  # noqa: E402,F401


def installed(package: str) -> bool:
    """Whether `package` is installed. tests/ is on sys.path, where a test folder of the same name passes for a
    namespace package (one without an origin)."""
    spec = importlib.util.find_spec(package)
    return spec is not None and spec.origin is not None


def pytest_ignore_collect(collection_path, config):
    # tests/vllm and tests/lmms_eval need vLLM and lmms-eval, which live in environments of their own (see their
    # conftest.py); CI runs them there.
    for package in ("vllm", "lmms_eval"):
        if collection_path == TESTS / package and not installed(package):
            return True
    return None


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: `-n auto` starts one worker per usable core
def pytest_xdist_auto_num_workers(config):
    return usable_cores()


def pytest_collection_modifyitems(config, items):
    """The longest tests first: a parallel run hands them out at once instead of ending with one of them alone."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


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
