"""The package's floors, lowest first: the shared base (errors, the YAML loader, huge pages, the cache folders),
model/, infer/, the configuration, service/, the command line; and the NPU path free of CPU-only packages.

A floor may import the floors below it, never those above. Each check runs in a fresh interpreter, so what one import
pulls in cannot hide behind another test's imports.
"""

from __future__ import annotations

import importlib.util
import json
import pkgutil
import subprocess
import sys

import pytest

import batch

pytestmark = pytest.mark.slow

# every module of the package is in exactly one floor, by its dotted prefix
FLOORS = {
    "base": ("batch.errors", "batch.strict_yaml", "batch.huge_pages", "batch.cache_home"),
    "model": ("batch.model",),
    "infer": ("batch.infer",),
    "config": ("batch.config",),
    "service": ("batch.service",),
    "cli": ("batch.cli", "batch.cli_control", "batch.cli_db", "batch.__main__"),
}
ORDER = list(FLOORS)


def _floor_of(module: str) -> str | None:
    for floor, prefixes in FLOORS.items():
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return floor
    return None


def _modules(floor: str) -> list[str]:
    names = []
    for prefix in FLOORS[floor]:
        names.append(prefix)
        where = importlib.util.find_spec(prefix).submodule_search_locations  # found, not imported
        if where:  # a package: all of it
            names += [info.name for info in pkgutil.walk_packages(where, prefix=prefix + ".")]
    return [name for name in names if not name.endswith("__main__")]  # a script: importing it runs the CLI


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


@pytest.mark.parametrize("floor", ORDER)
def test_no_floor_imports_the_floors_above_it(floor: str):
    # every module of the floor, exporter and axengine backend included (onnx is installed in the test venv)
    loaded = _loaded_after(_modules(floor))
    above = set(ORDER[ORDER.index(floor) + 1 :])
    offenders = sorted(m for m in loaded if _floor_of(m) in above)
    assert not offenders, f"the {floor} floor pulls in {offenders}"


def test_every_module_belongs_to_a_floor():
    every = ["batch." + info.name for info in pkgutil.walk_packages(batch.__path__, prefix="")]
    assert [m for m in every if _floor_of(m) is None] == []
    assert len(_modules("service")) > 20  # the walk sees sub-packages' modules


def test_settings_import_without_the_generation_code():
    loaded = _loaded_after(["batch.config", "batch.infer.settings"])
    heavy = {"batch.infer.generate", "batch.infer.pipeline", "batch.infer.media", "batch.infer.runtime.base"}
    assert not loaded & heavy


def test_the_spool_does_not_read_job_files():
    assert "batch.service.spool.jobfile" not in _loaded_after(["batch.service.spool.spool"])


def test_the_npu_path_imports_without_the_cpu_runtime():
    """Boards have axengine but neither onnx nor onnxruntime (the cpu extra): nothing on the path may need them."""
    imports = [
        "batch.cli",
        "batch.infer.pipeline",
        "batch.service.worker.worker",
        "batch.infer.runtime.axengine_backend",
    ]
    loaded = _loaded_after(imports, blocked=("onnx", "onnxruntime", "torch"))
    assert "batch.infer.runtime.axengine_backend" in loaded
