"""Test-wide settings: no test sees the installed code model unless it asks for it.

The code model installed by ``./puter.sh setup`` lives in the user's model
cache; a test that started a kernel or a chat client without a backend would
otherwise think with it (slowly, and differently from the cassettes). Tests
marked ``real_model`` get the real cache (fixture ``real_model_dir``).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

# Tests press Ctrl-C in the programs they start. A test run started in the
# background (`cmd &`) inherits SIGINT ignored, and so would every program it
# starts; a handler here becomes the default again in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from batos_uvm.model_fetch import cache_dir

REAL_MODEL_DIR = cache_dir()  # read before any test changes the environment


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_model: uses the code model installed by ./puter.sh setup"
    )


@pytest.fixture(scope="session")
def _empty_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-installed-models")


@pytest.fixture(autouse=True)
def _hide_installed_models(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _empty_model_dir: Path
) -> None:
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv("BATOS_MODEL_DIR", str(_empty_model_dir))


@pytest.fixture
def real_model_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BATOS_MODEL_DIR", str(REAL_MODEL_DIR))
    return REAL_MODEL_DIR
