"""The model commands' restart with glibc's huge page tunable (batch/huge_pages.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from batch import huge_pages
from batch.config import unknown_env_variables
from batch.huge_pages import TUNABLE, thp_mode, wanted, with_tunable


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never", "always"),
        ("always madvise [never]", "never"),
    ],
)
def test_the_kernel_mode_is_the_bracketed_word(tmp_path: Path, text: str, mode: str):
    (tmp_path / "enabled").write_text(text)
    assert thp_mode(tmp_path / "enabled") == mode
    assert thp_mode(tmp_path / "absent") is None


def test_huge_pages_are_asked_for_only_where_the_kernel_waits_to_be_asked(monkeypatch):
    monkeypatch.setattr(huge_pages, "_glibc_has_tunable", lambda: True)
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    assert wanted({}, "madvise")
    assert not wanted({}, "always") and not wanted({}, "never") and not wanted({}, None)
    assert not wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise")  # the user's own choice stands
    assert not wanted({"VLBATCH_HUGE_PAGES": "0"}, "madvise")
    monkeypatch.setattr(huge_pages, "_glibc_has_tunable", lambda: False)
    assert not wanted({}, "madvise")


def test_the_tunable_joins_the_ones_already_set():
    assert with_tunable({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    joined = with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert joined == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.skipif(not (sys.platform == "linux" and huge_pages._glibc_has_tunable()), reason="needs glibc >= 2.35")
def test_a_restart_keeps_the_process_and_its_arguments_and_happens_once():
    script = (
        "import os, sys; import batch.huge_pages as h; h.thp_mode = lambda: 'madvise'; "
        "print(os.getpid(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES'), flush=True); "
        "h.restart_with_huge_pages()"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "VLBATCH_HUGE_PAGES")}
    out = subprocess.run(
        [sys.executable, "-c", script, "one", "two words"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.split(" ", 1)[0] == second.split(" ", 1)[0]  # the same process
    assert first.endswith("['one', 'two words'] None")
    assert second.endswith(f"['one', 'two words'] {TUNABLE}")


def test_the_switch_is_a_variable_vlbatch_knows():
    assert unknown_env_variables({"VLBATCH_HUGE_PAGES": "0", "VLBATCH_HUGE_PAGE": "0"}) == ["VLBATCH_HUGE_PAGE"]
