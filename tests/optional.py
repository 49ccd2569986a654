"""Optional test dependencies: a skip for outside users, a failure in CI.

CI installs the `dev` and `convert` extras (`.ci/run`), so a missing module
there is a broken set-up that a skip would hide, as `conftest._require` does
for the shared data.
"""

import importlib
import os

import pytest


def import_or_skip(name, install):
    """The module `name`; skips (outside CI) or fails (CI) naming `install` if it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, but CI installs it ({install}).")
        pytest.skip(f"{name} is not installed ({install}).")
