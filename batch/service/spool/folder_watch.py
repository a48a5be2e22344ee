"""The media folders `vlbatch watch` follows for its standing jobs, and what to do when it cannot follow one.

Each folder is watched recursively through watchdog (inotify on Linux); an event on a media file records its
path for the next targeted pass of the jobs it concerns, and an event on a folder (one moved in, say) asks for
a full pass. Events only make vlbatch look sooner: the worker's periodic full passes find whatever was missed,
so a lost or doubled event changes nothing. A folder that cannot be watched (inotify's per-user limit of
watches reached: ENOSPC, or of instances: EMFILE) is left to those full passes, said once in the log, never a
crash or a silent gap; so is a folder whose watcher thread died later (a subfolder made after the limit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from batch.service.faults import describe
from batch.service.logs import event

log = logging.getLogger("batch.service.spool.folder_watch")

# what a file's bytes may have changed with; opened and closed-without-writing events are our own reads
_CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})


class FolderWatch:
    """Recursive watches on a changing set of folders; `changed` collects the files events named."""

    def __init__(self, observer: Any, wake: threading.Event) -> None:
        self.observer = observer
        self.wake = wake
        self._watches: dict[Path, Any] = {}  # folder -> watchdog's ObservedWatch
        self.polled: set[Path] = set()  # folders left to the periodic full passes
        self._lock = threading.Lock()
        self._changed: set[Path] = set()
        self._full = False
        self._handler = _Handler(self._note)

    def _note(self, path: Path | None) -> None:
        with self._lock:
            if path is None:
                self._full = True
            else:
                self._changed.add(path)
        self.wake.set()

    def take(self) -> tuple[set[Path], bool]:
        """The files named by events since the last call, and whether a folder event asks for a full pass."""
        with self._lock:
            changed, full = self._changed, self._full
            self._changed, self._full = set(), False
        return changed, full

    def put_back(self, changed: set[Path], full: bool) -> None:
        """Files (and a full pass) taken but not handled yet: kept for the next turn."""
        with self._lock:
            self._changed |= changed
            self._full = self._full or full

    def counts(self) -> dict[str, int]:
        """How many folders are watched, and how many are left to the rescans."""
        return {"watched": len(self._watches), "polled": len(self.polled)}

    def follow(self, folders: Iterable[Path]) -> None:
        """Watch exactly these folders (recursively) from now on: new ones are added, dropped ones removed."""
        wanted = {Path(f) for f in folders}
        for folder in list(self._watches):
            if folder not in wanted:
                self.observer.unschedule(self._watches.pop(folder))
        self.polled &= wanted
        for folder in sorted(wanted - set(self._watches) - self.polled):
            if not folder.is_dir():
                continue  # not there yet (an unmounted share): the job's full passes say so
            try:
                self._watches[folder] = self.observer.schedule(self._handler, str(folder), recursive=True)
            except OSError as exc:
                self._fall_back(folder, f"cannot watch it ({describe(exc)})")
        self._check_alive()

    def _check_alive(self) -> None:
        """A watcher thread that died (a subfolder made past the watch limit) leaves its folder to polling."""
        emitters = {emitter.watch: emitter for emitter in getattr(self.observer, "emitters", ())}
        for folder, watch in list(self._watches.items()):
            emitter = emitters.get(watch)
            if emitter is not None and not emitter.is_alive():
                self._watches.pop(folder)
                try:
                    self.observer.unschedule(watch)
                except Exception:  # the dead emitter may be half-removed already
                    pass
                self._fall_back(folder, "its watcher stopped")

    def _fall_back(self, folder: Path, why: str) -> None:
        self.polled.add(folder)
        event(
            log,
            "watch.polling",
            logging.WARNING,
            folder=folder,
            reason=f"{why}; new files there are found by the rescans (spool.rescan_seconds) instead; "
            "raise fs.inotify.max_user_watches to watch it",
        )


class _Handler:
    """watchdog's handler protocol (dispatch) without its base class: every change of a file or folder."""

    def __init__(self, note: Callable[[Path | None], None]) -> None:
        self.note = note

    def dispatch(self, ev: Any) -> None:
        if ev.event_type not in _CHANGES:
            return
        if ev.is_directory:
            if ev.event_type != "modified":  # a folder made, moved or removed: its files sent no events
                self.note(None)
            return
        for name in (ev.src_path, getattr(ev, "dest_path", "")):
            if name:
                self.note(Path(name if isinstance(name, str) else name.decode(errors="surrogateescape")))
