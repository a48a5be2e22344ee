"""The install is split by role (pyproject extras) and stays quiet when optional packages are absent.

Runtime machines have no torch (and the NPU board no onnx): the checks that need a package to be missing run in a
fresh interpreter with ``sys.modules[name] = None``, which makes ``import name`` fail and ``find_spec`` report it
absent, as on a machine without it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADVICE_VARIABLES = ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")


def _run(code: str, ci: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ADVICE_VARIABLES and k != "CI"}
    if ci is not None:
        env["CI"] = ci  # transformers lets its records propagate to the root logger under CI
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


# ---------------------------------------------------------------------------------------------- quiet without torch


@pytest.mark.parametrize("ci", [None, "true"])
def test_tokenizer_loads_without_a_word_on_stderr_when_torch_is_absent(tiny_hf: Path, ci: str | None):
    code = (
        "import os, sys\n"
        "sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from batch.infer.pipeline import load_tokenizer\n"
        f"tokenizer = load_tokenizer(Path({str(tiny_hf)!r}))\n"
        "print(len(tokenizer.encode('a dog is sitting on a wooden table')) > 0)\n"
        "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))\n"
    )
    done = _run(code, ci)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # the variable was set for the import only: later transformers advice (and vlbatch's logs) still get through
    assert done.stdout.split() == ["True", "None"]


def test_the_advice_it_silences_is_there_without_the_guard(tiny_hf: Path):
    """The control: the same load through transformers directly does print the no-torch advisory."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained({str(tiny_hf)!r})\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" in done.stderr or "None of PyTorch" in done.stderr


def test_vlbatch_logs_still_reach_stderr_after_the_tokenizer_load(tiny_hf: Path):
    code = (
        "import logging, sys\n"
        "sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from batch.infer.pipeline import load_tokenizer\n"
        f"load_tokenizer(Path({str(tiny_hf)!r}))\n"
        "logging.getLogger('batch.infer.pipeline').warning('still heard')\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "still heard"


# ----------------------------------------------------------------------------------------- export without the extra


def test_export_without_onnx_names_the_extra_in_one_line(tiny_hf: Path, tmp_path: Path):
    code = (
        "import sys\n"
        "sys.modules['onnx'] = None\n"
        "from batch.cli import main\n"
        f"main(['export', {str(tiny_hf)!r}, {str(tmp_path / 'out')!r}], prog_name='vlbatch')\n"
    )
    done = _run(code)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "vlbatch: error: `vlbatch export` needs the export extra: pip install 'vlbatch[export]'"
    ]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- extras by role


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for stop in "<>=!~[ ":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def test_extras_follow_the_roles():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    base = _names(project["dependencies"])
    assert not base & {"onnx", "onnx-ir", "onnxruntime", "torch", "av", "decord", "sympy"}
    assert _names(extras["cpu"]) == {"onnxruntime"}  # the runtime alone: no exporter packages
    assert _names(extras["export"]) == {"onnx", "onnx-ir", "onnxruntime"}
    assert _names(extras["video"]) == {"av", "decord"}
    assert _names(extras["serve"]) == {"datasette", "pygal"}
    assert _names(extras["ray"]) == {"ray"}
    # the demo: export the tiny model and answer photos and a clip on the CPU, then the gallery; nothing more
    assert extras["demo"] == ["vlbatch[cpu,export,video,serve]"]
    assert _names(extras["docs"]) == {"mkdocs"}
    assert {"vlbatch[demo,ray,docs]", "vlbatch[raw]", "torch==2.13.0"} <= set(extras["dev"])


def _imported_top_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("extra", "modules", "home"),
    [("serve", ("datasette", "pygal", "uvicorn"), "service/web"), ("ray", ("ray",), "service/cluster")],
)
def test_each_optional_extra_is_imported_by_its_own_package_alone(extra, modules, home):
    """A machine without the extra (a board without Datasette or Ray) imports and runs everything else."""
    package = REPO / "batch"
    for path in sorted(package.rglob("*.py")):
        found = {m for m in _imported_top_modules(path) if m.split(".")[0] in modules}
        if found:
            assert path.parent == package / home, (extra, path, found)


def test_only_the_exporter_imports_the_export_extra():
    """onnx and onnx_ir (and onnxruntime's quantizer) are imported by batch/model/export alone."""
    package = REPO / "batch"
    for path in sorted(package.rglob("*.py")):
        imported = _imported_top_modules(path)
        export_only = {
            m for m in imported if m.split(".")[0] in ("onnx", "onnx_ir") or m.startswith("onnxruntime.quantization")
        }
        if export_only:
            assert path.parent == package / "model" / "export", (path, export_only)
