"""vlbatch's folders under the user's cache: $XDG_CACHE_HOME/vlbatch/<name>, by default ~/.cache/vlbatch/<name>."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home(name: str) -> Path:
    """$XDG_CACHE_HOME/vlbatch/`name` (~/.cache/vlbatch/`name` where XDG_CACHE_HOME is unset or empty)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlbatch" / name
