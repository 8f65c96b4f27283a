"""Shared by the `real_model` tests: the cache folder and the extra-install skip (the GGUF fixture is in conftest)."""

import importlib.util
import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("PI_PEFT_CACHE", Path.home() / ".cache" / "pi_peft"))


def require(module: str, install: str) -> None:
    """Skip the test with the install command when ``module`` is absent."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs `{install}` (module {module!r} is not installed)")
