import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "mmdet"


def _require(path):
    if not path.exists():
        if os.environ.get("CI"):  # CI always has shared/: a skip there would hide a broken set-up
            pytest.fail(f"{path} not found, but CI must provide ../shared beside the repository root.")
        pytest.skip(
            f"{path} not found: these tests need the project's shared data "
            "(../shared beside the repository root), which CI provides."
        )
    return path


@pytest.fixture
def shared_dir():
    return _require(SHARED)


@pytest.fixture
def fixtures_dir():
    return _require(FIXTURES)
