"""The named errors vlbatch raises for problems a user can act on."""

from __future__ import annotations


class VlbatchError(Exception):
    """Base class: an expected problem, reported to the user without a traceback."""


class ModelFolderError(VlbatchError):
    """A model folder is missing files, has unsupported weights or an inconsistent config."""


class MediaError(VlbatchError):
    """A media file is missing, unreadable, corrupt or of an unsupported kind."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class PromptTooLongError(VlbatchError):
    """The prompt (text plus image tokens) does not fit the model's prefill capacity."""


class BackendError(VlbatchError):
    """The chosen runtime cannot run this model folder (wrong backend, missing runtime package)."""


class PassingFault(VlbatchError):
    """A fault that passes by waiting, not the input's: a model server down, busy, too slow or cut off mid-answer.

    The worker waits it out as it waits out a full disk (the job goes back, and the units it answered stay)."""
