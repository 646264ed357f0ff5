"""Put the repository root on ``sys.path`` so tests import ``hw``, ``sim`` and ``compiler``
without ``pip install -e .``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--fuzz-n", type=int, default=0, help="programs for the random-config RTL fuzz test")
    parser.addoption("--fuzz-seed", type=int, default=1, help="seed of the RTL fuzz test")
