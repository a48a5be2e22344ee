"""The fault suite's spool: a temporary vlbatch folder on the tiny model (tools in faultkit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from spool_env import SpoolEnv


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    e.inbox.mkdir(parents=True)
    return e
