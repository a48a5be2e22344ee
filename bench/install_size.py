"""Disk size of a vlbatch install per set of extras: a fresh venv each, `pip install PROJECT[extras]`, du -s.

    python bench/install_size.py                      # this checkout: base, cpu, cpu+video, cpu+export+video
    python bench/install_size.py --extras cpu,video --project /path/to/an/older/checkout

Each venv is made under a temporary folder outside the project and removed afterwards (--keep keeps them); the
project is copied there first (pyproject.toml, README.md, batch/), so the build leaves nothing in the checkout.
The sizes include pip itself (about 15 MB), the same in every row.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETS = ("", "cpu", "cpu,video", "cpu,export,video")


def site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"no site-packages under {env}")
    return found[0]


def size_of(folder: Path) -> int:
    """Bytes on disk (du -s --block-size=1), which is what `du -sh` rounds."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(folder)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def copy_project(project: Path, root: Path) -> Path:
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(project / name, source / name)
    shutil.copytree(project / "batch", source / "batch", ignore=shutil.ignore_patterns("__pycache__"))
    return source


def measure(project: Path, extras: str, root: Path) -> tuple[int, list[str]]:
    env = root / (extras.replace(",", "+") or "base")
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    target = f"{project}[{extras}]" if extras else str(project)
    done = subprocess.run([str(env / "bin" / "pip"), "install", "--quiet", target], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip install {target} failed:\n{done.stdout}{done.stderr}")
    listed = subprocess.run(
        [str(env / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True, check=True
    )
    return size_of(site_packages(env)), listed.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=REPO, help="the checkout to install (default: this one)")
    parser.add_argument("--extras", nargs="*", default=list(DEFAULT_SETS), help="comma-separated extra sets")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (their folder is printed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlbatch-size-"))
    try:
        project = copy_project(args.project.resolve(), root)
        print(f"{'extras':<20} {'site-packages':>14}  packages")
        for extras in args.extras:
            size, packages = measure(project, extras, root)
            label = f"[{extras}]" if extras else "(base)"
            print(f"{label:<20} {size / 2**20:>11.0f} MiB  {len(packages)}", flush=True)
    finally:
        if args.keep:
            print(f"venvs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
