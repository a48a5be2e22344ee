"""A temporary vlbatch installation for worker tests: config.yaml, spool, database and media in one folder."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from synthetic import synthetic_image

from batch.config import Config, load_config


@dataclass
class SpoolEnv:
    root: Path
    model: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    spool_root: Path | None = None  # where jobs/ is, when not under root
    database: Path | None = None  # the database, when not root/vlbatch.db

    @property
    def jobs(self) -> Path:
        return self.spool_root or self.root / "jobs"

    @property
    def inbox(self) -> Path:
        return self.jobs / "inbox"

    @property
    def media(self) -> Path:
        return self.root / "media"

    @property
    def db_path(self) -> Path:
        return self.database or self.root / "vlbatch.db"

    def write_config(
        self,
        lease: float = 2.0,
        settle: float = 0.2,
        rescan: float = 1.0,
        media: dict | None = None,
        database: Path | str = "vlbatch.db",
        spool_dir: Path | str = "jobs",
        model: dict | None = None,
        **spool: object,
    ) -> None:
        """config.yaml for this folder; `media`, `model` and `**spool` add settings to those sections."""
        extra_spool = "".join(f"  {key}: {value}\n" for key, value in spool.items())
        media_lines = "".join(f"  {key}: {value}\n" for key, value in (media or {}).items())
        model_lines = "".join(f"  {key}: {value}\n" for key, value in (model or {}).items())
        self.config_path.write_text(
            f"model:\n  dir: {self.model}\n{model_lines}"
            "generation:\n  max_new_tokens: 12\n"
            + (f"media:\n{media_lines}" if media_lines else "")
            + f"spool:\n  dir: {spool_dir}\n  database: {database}\n  media_roots: [media]\n"
            f"  lease_seconds: {lease}\n  settle_seconds: {settle}\n  rescan_seconds: {rescan}\n" + extra_spool
        )
        self.media.mkdir(parents=True, exist_ok=True)  # a media root must exist (the config is checked at start)

    def config(self) -> Config:
        return load_config(self.config_path)

    def image(self, name: str, seed: int = 0, size: tuple[int, int] = (160, 120)) -> Path:
        path = self.media / name
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(*size, seed=seed).save(path)
        return path

    def drop(self, name: str, text: str, when: float | None = None) -> Path:
        """Write a job into the inbox as a finished file (written under a temp name, then renamed)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        if when is not None:
            os.utime(tmp, (when, when))
        os.rename(tmp, self.inbox / name)
        return self.inbox / name

    def db(self) -> sqlite_utils.Database:
        return sqlite_utils.Database(self.db_path)

    def results(self) -> list[dict]:
        """Every `results` row, oldest first; none before the worker has made its database."""
        if not self.db_path.exists():
            return []
        try:
            return list(self.db().query("select * from results order by id"))
        except sqlite3.OperationalError:  # tables not created yet
            return []

    def job(self, job_id: str) -> dict | None:
        if not self.db_path.exists():
            return None
        try:
            rows = list(self.db().query("select * from jobs where id = ?", [job_id]))
        except sqlite3.OperationalError:  # tables not created yet
            return None
        return rows[0] if rows else None

    def cli(self, *args: str) -> list[str]:
        script = Path(sys.executable).parent / "vlbatch"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "batch"]
        return [*command, "--config", str(self.config_path), *args]

    def spawn(self, *args: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A vlbatch process; with `log`, its stderr goes to that file (a long run never fills a pipe)."""
        if log is None:
            return subprocess.Popen(self.cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        with open(log, "a") as err:
            return subprocess.Popen(self.cli(*args), stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
