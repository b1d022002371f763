"""The session's bounded runner for crafted files (see ``bounds.py`` and ``worker.py``)."""

import pytest

from .bounds import Bounded


@pytest.fixture(scope="session")
def bounded(tmp_path_factory):
    runner = Bounded(tmp_path_factory.mktemp("crafted"))
    yield runner
    runner.close()
