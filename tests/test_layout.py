"""The package's three floors: model/ below infer/ below service/, and the NPU path free of CPU-only packages.

Each check runs in a fresh interpreter, so what one import pulls in cannot hide behind another test's imports.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import batch

pytestmark = pytest.mark.slow

FLOORS = ("model", "infer", "service")
# a floor may import those below it, never those above
FORBIDDEN = {"model": ("infer", "service"), "infer": ("service",), "service": ()}


def _modules(floor: str) -> list[str]:
    package = Path(batch.__file__).parent / floor
    return [f"batch.{floor}"] + [
        f"batch.{floor}.{info.name}" for info in pkgutil.walk_packages([str(package)], prefix="") if info.name
    ]


def _loaded_after(imports: list[str], blocked: tuple[str, ...] = ()) -> set[str]:
    """The batch.* modules loaded by a fresh interpreter after importing `imports` (with `blocked` unimportable)."""
    code = (
        "import json, sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        f"for name in {imports!r}: __import__(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('batch'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("floor", FLOORS)
def test_no_floor_imports_the_floors_above_it(floor: str):
    # every module of the floor, exporter and axengine backend included (onnx is installed in the test venv)
    loaded = _loaded_after(_modules(floor))
    for above in FORBIDDEN[floor]:
        offenders = sorted(m for m in loaded if m.startswith(f"batch.{above}"))
        assert not offenders, f"batch.{floor} pulls in {offenders}"


def test_every_module_belongs_to_a_floor_or_the_top():
    top = {info.name for info in pkgutil.iter_modules(batch.__path__)}
    assert top == {"__main__", "cli", "cli_control", "cli_db", "config", "errors", *FLOORS}


def test_settings_import_without_the_generation_code():
    loaded = _loaded_after(["batch.config", "batch.infer.settings"])
    heavy = {"batch.infer.generate", "batch.infer.pipeline", "batch.infer.media", "batch.infer.runtime.base"}
    assert not loaded & heavy


def test_the_spool_does_not_read_job_files():
    assert "batch.service.jobfile" not in _loaded_after(["batch.service.spool"])


def test_the_npu_path_imports_without_the_cpu_runtime():
    """Boards have axengine but neither onnx nor onnxruntime (the cpu extra): nothing on the path may need them."""
    imports = ["batch.cli", "batch.infer.pipeline", "batch.service.worker", "batch.infer.runtime.axengine_backend"]
    loaded = _loaded_after(imports, blocked=("onnx", "onnxruntime", "torch"))
    assert "batch.infer.runtime.axengine_backend" in loaded
