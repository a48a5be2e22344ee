"""`vlbatch submit`: check a job file and place it in the inbox atomically, with its media paths made absolute."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from batch import strict_yaml
from batch.config import Config
from batch.errors import VlbatchError
from batch.service.atomic_write import write_atomic
from batch.service.spool.jobfile import Job, JobRejected, parse_job
from batch.service.spool.spool import Spool, free_path
from batch.service.spool.standing import StandingFolder


class SubmitError(VlbatchError):
    """A checked job file could not be placed in the inbox (no space, no permission, ...)."""


def submit_job(path: Path, config: Config, standing: bool = False, priority: int | None = None) -> Path:
    """Validate `path` as the worker will, then write it into the inbox atomically; returns its inbox path.

    With `standing`, into spool/standing/ instead, where it stays and runs on every pass; a standing job of the
    same file name is replaced (that is how one is edited). `priority` is written as the job's `priority` key
    (replacing one the file has).

    JobRejected for a job the worker would refuse; SubmitError when the inbox cannot be created or written. Either
    way nothing is left in the inbox: the job is written under a hidden `.tmp` name the worker ignores, checked
    there and only then renamed to its final name.
    """
    path = Path(path)
    roots = list(config.spool.media_roots)
    settings = {"generation": config.generation, "media": config.media, "standing": standing}
    parse_job(path, allowed_roots=roots, **settings)  # readable errors first
    data = _with_absolute_inputs(path)
    if priority is not None:
        data["priority"] = priority
    text = strict_yaml.dump_exact(data)
    spool = _ensure_spool(config, path)
    folder = StandingFolder(spool.root).ensure().dir if standing else spool.inbox

    def check(tmp: Path) -> None:
        try:
            parse_job(tmp, allowed_roots=roots, base_dir=folder, **settings)
        except JobRejected as exc:
            raise JobRejected(path, f"{exc.reason} (the worker reads media only under spool.media_roots)") from None

    target = folder / path.name if standing else free_path(spool.inbox, path.name)
    try:
        write_atomic(target, text, check=check)
    except OSError as exc:
        raise SubmitError(f"{target}: cannot write the job into the inbox ({exc.strerror or exc})") from None
    return target


def check_job(path: Path, config: Config) -> Job:
    """The job as a worker will read it once submitted, without submitting it: relative inputs resolved against
    the job file's own folder (as submit_job does), media allowed only under spool.media_roots or the inbox.

    JobRejected for a job that submit_job or the worker would refuse.
    """
    path = Path(path)
    job = parse_job(
        path, allowed_roots=list(config.spool.media_roots), generation=config.generation, media=config.media
    )
    roots = [Path(os.path.realpath(root)) for root in (*config.spool.media_roots, Spool(config.spool.dir).inbox)]
    outside = [media for media in job.media if not any(media.is_relative_to(root) for root in roots)]
    if outside:
        raise JobRejected(
            path,
            f"input {outside[0]} is outside the allowed media folders ({', '.join(map(str, roots))}) "
            "(the worker reads media only under spool.media_roots)",
        )
    return job


def submit_openai_batch(path: Path, config: Config, priority: int | None = None) -> list[Path]:
    """Every request of an OpenAI Batch file as a job in the inbox (the whole file is checked first).

    Image paths must lie under spool.media_roots; images sent as data: URIs are kept in the first media root,
    under `openai-batch/<file name>/`, where the worker may read them.
    """
    from batch.service.spool.openai_batch import requests_to_jobs

    path = Path(path)
    spool = _ensure_spool(config, path)
    roots = list(config.spool.media_roots)
    media_dir = roots[0] / "openai-batch" / path.stem if roots else None
    with tempfile.TemporaryDirectory(dir=spool.root, prefix=".openai-batch-") as staging:
        jobs = requests_to_jobs(path, Path(staging), roots, media_dir=media_dir)
        return [submit_job(job, config, priority=priority) for job in jobs]


def _with_absolute_inputs(path: Path) -> dict[str, Any]:
    """The job's mapping with relative inputs resolved against its own folder and an id (its stem) if it had none."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    inputs = data.get("inputs")
    if inputs:  # a text-only job has none
        entries = [inputs] if isinstance(inputs, str) else list(inputs)
        folder = path.resolve().parent
        data["inputs"] = [entry if os.path.isabs(entry) else str(folder / entry) for entry in entries]
    if "id" not in data:
        data["id"] = path.stem
    return data


def _ensure_spool(config: Config, path: Path) -> Spool:
    """The spool with its folders created; SubmitError (naming the job and the folder) if they cannot be."""
    try:
        return Spool(config.spool.dir).ensure()
    except OSError as exc:
        where = exc.filename or config.spool.dir
        raise SubmitError(f"{path}: cannot create the spool folder {where} ({exc.strerror or exc})") from None
