"""Shared fixtures: the tiny random InternVL model (both layouts), its ONNX export, and synthetic media."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from format2 import write_format2
from synthetic import write_media

from batch.infer.runtime import native_attention
from batch.model.export.exporter import export
from batch.model.tinymodel import convert_to_native, make_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MEDIA = REPO.parent / "shared" / "media"
DOUBLES = REPO / "tests" / "doubles"


@pytest.fixture(scope="session")
def fused_attention_root(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The fused attention library built once for the whole run (its header fetched once), in a folder of its own;
    None where it cannot be built here (no compiler, no network for the header, not x86-64 Linux)."""
    import platform

    if platform.machine() != "x86_64":
        return None
    root = tmp_path_factory.mktemp("fused-attention")
    try:
        native_attention.build(root)
    except native_attention.NativeUnavailable:
        return None
    return root


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused_attention_root: Path | None) -> Path:
    """Every test runs in its own temp folder with no VLBATCH_* variable from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("VLBATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # no config file of the machine's or the user's is found by accident
    monkeypatch.setattr("batch.config.SYSTEM_CONFIG", tmp_path / "no-system-config.yaml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg-config"))
    # nor a preview or calibration cached by an earlier run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    # except the fused attention library, built once for the run (each test would fetch and compile it again);
    # where it cannot be built, no test tries
    if fused_attention_root is not None:
        monkeypatch.setenv(native_attention.CACHE_VARIABLE, str(fused_attention_root))
    else:
        monkeypatch.setenv(native_attention.SWITCH, "0")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the original InternVL layout."""
    return make_model(tmp_path_factory.mktemp("tiny_hf"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_native(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in the transformers-native layout."""
    return convert_to_native(tiny_hf, tmp_path_factory.mktemp("tiny_native"))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_onnx")
    export(tiny_hf, out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_fp32_cache(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with a float32 K/V history (the default is fp16)."""
    out = tmp_path_factory.mktemp("tiny_onnx_fp32_cache")
    export(tiny_hf, out, kv_cache="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_onnx_npu(tiny_hf: Path, tiny_onnx_fp32_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with decoder layers of the NPU files' contract (format 2's: a token-major history and
    `indices`), from which the axengine double's model folders are built."""
    return write_format2(tiny_hf, tiny_onnx_fp32_cache, tmp_path_factory.mktemp("tiny_onnx_npu") / "export")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic images of several shapes and an 8+-frame video."""
    shapes = [
        ("square.png", (448, 448), 1),
        ("wide.png", (1344, 448), 2),
        ("tall.jpg", (300, 700), 3),
        ("small.png", (200, 150), 4),
        ("photo.jpg", (640, 480), 5),
    ]
    return write_media(tmp_path_factory.mktemp("media"), shapes)


@pytest.fixture(scope="session")
def results_env(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    """A spool folder whose database the real worker filled: see tests/web_env.py. Read it, never change it."""
    from web_env import make_results

    return make_results(tmp_path_factory.mktemp("results"), tiny_onnx)


@pytest.fixture
def record(request: pytest.FixtureRequest, record_property):
    """Prints and records an oracle comparison's max |logit diff| (shown with -s, kept in JUnit XML)."""

    def _record(diff: float, prompt_tokens: int) -> None:
        record_property("max_logit_diff", diff)
        print(f"\n{request.node.name}: {prompt_tokens} prompt tokens, max |logit diff| {diff:.3e}")

    return _record


@pytest.fixture
def axengine(monkeypatch: pytest.MonkeyPatch):
    """The axengine test double (tests/doubles/axengine: pyaxengine over an emulated NPU) imported as `axengine` for
    one test, with its run and session logs and its memory counters cleared."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    monkeypatch.delitem(sys.modules, "axengine", raising=False)
    import axengine

    axengine.calls.clear()
    axengine.sessions.clear()
    axengine.memory.reset()
    yield axengine
    sys.modules.pop("axengine", None)
