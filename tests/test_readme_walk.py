"""The README's quick start and its three stories, run as written, in order, in a copy of the project.

The copy holds what a fresh clone's quick start reads (Makefile, pyproject.toml, config.yaml, the example jobs, the
synthetic media writer), with `.venv` pointing at this test run's own environment. `make demo` is told that the
venv is installed (`make -o .venv/installed-demo`), so the test never reinstalls the environment it runs in;
every other command is the README's own text. `vlbatch` and `sqlite-utils` are found on PATH, as after
`. .venv/bin/activate`. A command that keeps running (`vlbatch watch`, `vlbatch serve`) runs in the background as
in a second terminal, and is stopped with Ctrl-C (SIGINT) at the end of its story, as the README says.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
STORIES = (
    "Quick start",
    "A worker that watches a folder",
    "Cron: caption what is new, every night",
    "Finding the answers",
)
LONG_RUNNING = ("vlbatch watch", "vlbatch serve")
COPIED = ("Makefile", "pyproject.toml", "config.yaml", "jobs/examples", "tests/synthetic.py")


def readme_commands() -> dict[str, list[str]]:
    """Each story's shell commands in order: its ```sh blocks split into commands (a heredoc stays whole), and
    the command part of its ```cron lines."""
    stories: dict[str, list[str]] = {}
    section = None
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```sh") or line.startswith("```cron"):
            kind = line[3:].strip()
            block = []
            i += 1
            while not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            if section in STORIES:
                stories.setdefault(section, []).extend(_commands(block, kind))
        i += 1
    return stories


def _commands(block: list[str], kind: str) -> list[str]:
    commands: list[str] = []
    j = 0
    while j < len(block):
        line = block[j]
        if kind == "cron":
            commands.append(line.split(None, 5)[5])  # minute hour day month weekday COMMAND
            j += 1
            continue
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            end = block.index(heredoc.group(1), j + 1)
            commands.append("\n".join(block[j : end + 1]))
            j = end + 1
            continue
        commands.append(line)
        j += 1
    return commands


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "vlbatch"
    root.mkdir()
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)  # the mtime too: make compares it with the venv's stamps
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return root


def _spool_idle(root: Path, timeout: float = 180.0) -> None:
    """Until no job file waits in the inbox or runs in work/: what a person waits for before the next command."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [p for folder in ("inbox", "work") for p in (root / "jobs" / folder).glob("*.yaml")]
        if not busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"the spool did not empty in {timeout:.0f} s: {busy}")


def _port(command: str) -> int:
    match = re.search(r"--port[ =](\d+)", command)
    return int(match.group(1)) if match else 8001


def _serving(port: int, process: subprocess.Popen, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"vlbatch serve exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert response.status == 200
                return response.read()
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing answered on port {port} within {timeout:.0f} s")


def _stop(process: subprocess.Popen, command: str) -> None:
    assert process.poll() is None, f"`{command}` ended before its story did (exit {process.returncode})"
    process.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        assert process.wait(timeout=60) == 0, f"`{command}` exited {process.returncode} on Ctrl-C"
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"`{command}` did not stop within 60 s of Ctrl-C") from None


def test_the_readme_has_the_stories_it_is_walked_by():
    stories = readme_commands()
    assert list(stories) == list(STORIES)
    assert stories["Quick start"][0] == "make demo"
    assert any(c.startswith("vlbatch watch") for c in stories["A worker that watches a folder"])
    assert any("vlbatch run" in c for c in stories["Cron: caption what is new, every night"])


def test_the_quick_start_and_every_story_run_as_written(project: Path, tmp_path: Path):
    env = _environment(tmp_path / "home")
    outputs: dict[str, str] = {}
    for story, commands in readme_commands().items():
        background: list[tuple[subprocess.Popen, str]] = []
        for command in commands:
            if any(running.startswith("vlbatch watch") for _, running in background):
                _spool_idle(project)
            if command.startswith(LONG_RUNNING):
                process = subprocess.Popen(["bash", "-c", command], cwd=project, env=env, start_new_session=True)
                background.append((process, command))
                if command.startswith("vlbatch serve"):
                    outputs[command] = _serving(_port(command), process).decode(errors="replace")
                continue
            script = command.replace("/srv/vlbatch", str(project)) if story.startswith("Cron") else command
            if script == "make demo":
                script = "make -o .venv/installed-demo demo"
            done = subprocess.run(
                ["bash", "-c", "set -eo pipefail\n" + script],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"{story}: `{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            outputs[command] = done.stdout
        for process, command in background:
            _stop(process, command)

    # what each story promises came true
    assert outputs["make demo"] and (project / "jobs/gallery/index.html").is_file()
    asked = next(out for cmd, out in outputs.items() if cmd.startswith(".venv/bin/vlbatch ask"))
    assert asked.strip()
    answered = next(out for cmd, out in outputs.items() if cmd.startswith("vlbatch results --job question"))
    media = sorted(p.name for p in (project / "jobs/media").iterdir() if p.suffix != ".txt")  # not the sidecars
    assert all(name in answered for name in media), (media, answered)
    assert (project / "jobs/standing/caption-photos.yaml").is_file()
    assert (project / "vlbatch.log").is_file()  # the cron line's own log
    csv = (project / "answers.csv").read_text().splitlines()
    assert csv[0].startswith("id,") and len(csv) > len(media)
    assert "vlbatch" in next(out for cmd, out in outputs.items() if cmd.startswith("vlbatch serve"))
