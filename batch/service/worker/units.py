"""A unit as a worker sends it to an answerer that is not its own loaded model (Ray actors, a model server), and
the answer that comes back: the pieces `pooled.py`'s loop and the answerers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch.infer.generate import GenerationResult
from batch.infer.settings import GenerationSettings, MediaSettings


@dataclass(frozen=True)
class UnitTask:
    """One unit for an answerer: the question, and the files as paths or as (name, bytes) pairs.

    The head builds it with its own paths; the pool maps them through cluster.path_map when it sends the unit to
    an actor that reads the media itself, or reads them into `files` for one that gets bytes."""

    prompt: str
    paths: tuple[str, ...]
    files: tuple[tuple[str, bytes], ...] | None  # set when the node does not mount the media
    generation: GenerationSettings
    media: MediaSettings
    alone: bool = False  # answered with no other unit beside it (its actor died while it was in flight)


@dataclass(frozen=True)
class UnitAnswer:
    """The answerer's reply: a result, or the reason the unit failed (media, prompt too long...)."""

    result: GenerationResult | None
    error: str | None
    node: str
    backend: str
    error_class: str = "actor_error"  # the kind of failure (results.error_class), as records.failure_class names it


@dataclass(frozen=True)
class Done:
    tag: Any  # what the caller needs back with the answer
    answer: UnitAnswer
    actor: str  # who answered: the actor's name (the `actors` table id), or the server
