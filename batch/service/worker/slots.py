"""Worker slots: at most `spool.max_workers` processes hold the model for one spool at once.

A `*/10` cron line whose run takes 25 minutes would otherwise start two more runs, each loading the model again
(NPU memory a board does not have). Each slot is a lock file under `<spool>/.slots/<model>/`, held with
`flock` for as long as the process lives: the kernel releases it when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path


class WorkerSlots:
    """The slots of one spool and model; `take()` holds one of them until `release()` or the process ends."""

    def __init__(self, spool_root: Path, model_id: str, count: int) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.split("@")[0])[:40]
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:12]
        self.folder = Path(spool_root) / ".slots" / f"{safe}-{digest}"
        self.count = count
        self.held: int | None = None
        self._fd: int | None = None

    def take(self) -> bool:
        """Hold a free slot now; False when all of them are held by other processes."""
        if self._fd is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        for n in range(self.count):
            fd = os.open(self.folder / f"{n}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd, self.held = fd, n
            return True
        return False

    def wait(self, stop: Callable[[], bool], interval: float = 1.0) -> bool:
        """Take a slot as soon as one is free; False when `stop()` turns true first."""
        while not stop():
            if self.take():
                return True
            time.sleep(interval)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = self.held = None
