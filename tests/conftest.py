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
    parser.addoption("--slow-formal", action="store_true", default=False,
                     help="also run the slow formal proofs (controller BMC; `make formal`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow_formal: a formal proof of minutes; runs with --slow-formal (make formal)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow-formal"):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow formal proof: run with --slow-formal (make formal)")
    for item in items:
        if "slow_formal" in item.keywords:
            item.add_marker(skip)
