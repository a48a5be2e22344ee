"""Transparent huge pages for the model's weights: glibc's malloc asked to back its large blocks with 2 MB pages.

Decoding streams every weight (about 0.9 GB for InternVL3-2B in int4) from memory once per token. In 4 KB pages
that walk misses the CPU's TLB every few KB; in 2 MB pages it hardly does, and one decode step of the real-shape
int4 model runs 5-7% faster (bench/decode_rounds.py, 2-core Zen 4). onnxruntime allocates its weights with
malloc, and where the kernel gives huge pages only to memory that asks for them (transparent_hugepage
`madvise`, the default of Ubuntu and others), glibc asks for them only when its `glibc.malloc.hugetlb=1` tunable
is set, which it reads once, at process start. So the `vlbatch` commands that load a model start themselves again,
once, with that tunable added to GLIBC_TUNABLES (same process id, arguments and streams). Nothing happens where
the kernel gives huge pages to every process anyway (`always`) or to none (`never`), on a libc other than glibc
2.35 or later, when the tunable is set already, or with VLBATCH_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
OFF_SWITCH = "VLBATCH_HUGE_PAGES"


def thp_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never), None where it has none to tell."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def _glibc_has_tunable() -> bool:
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def wanted(environ: Mapping[str, str], mode: str | None) -> bool:
    """Whether a process with this environment, under this THP mode, should ask glibc for huge pages."""
    if environ.get(OFF_SWITCH, "").strip().lower() in ("0", "no", "off", "false"):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # set already: by us before the restart, or by the user
    return sys.platform == "linux" and mode == "madvise" and _glibc_has_tunable()


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the huge page tunable added to whatever GLIBC_TUNABLES holds."""
    tunables = [part for part in environ.get("GLIBC_TUNABLES", "").split(":") if part]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment to start a model-loading process with (a benchmark's worker): the tunable added if wanted."""
    return with_tunable(environ) if wanted(environ, thp_mode()) else dict(environ)


def restart_with_huge_pages() -> None:
    """Start this process again (exec: the same process id, arguments and open streams) with the tunable set,
    where it is wanted; returns without doing anything otherwise. Call it before any thread or model exists."""
    if not wanted(os.environ, thp_mode()) or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))
    except OSError:  # an interpreter that cannot be started again as it was: run on in 4 KB pages
        return
