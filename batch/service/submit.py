"""`vlbatch submit`: check a job file and place it in the inbox atomically, with its media paths made absolute."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from batch.config import Config
from batch.service.jobfile import JobRejected, parse_job
from batch.service.spool import Spool, free_path


def submit_job(path: Path, config: Config) -> Path:
    """Validate `path` as the worker will, then rename it into the inbox; returns its inbox path."""
    path = Path(path)
    roots = list(config.spool.media_roots)
    parse_job(path, allowed_roots=roots, generation=config.generation, media=config.media)  # readable errors first
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    inputs = data.get("inputs")
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    folder = path.resolve().parent
    data["inputs"] = [entry if os.path.isabs(entry) else str(folder / entry) for entry in entries]
    if "id" not in data:
        data["id"] = path.stem

    spool = Spool(config.spool.dir).ensure()
    tmp = spool.inbox / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        parse_job(tmp, allowed_roots=roots, generation=config.generation, media=config.media, base_dir=spool.inbox)
    except JobRejected as exc:
        tmp.unlink()
        raise JobRejected(path, f"{exc.reason} (the worker reads media only under spool.media_roots)") from None
    target = free_path(spool.inbox, path.name)
    os.rename(tmp, target)
    return target
