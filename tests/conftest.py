import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub: no telemetry calls to huggingface.co from tests.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from hub_server import local_hub  # noqa: E402,F401
