"""The settings that config.yaml, job files and generation share: plain frozen dataclasses, no model code.

Importing this module pulls in nothing but the standard library, so the config and job-file readers stay light.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, fields
from typing import Any

DECODERS = ("decord", "pyav")
OPERATIONAL = {"shapes_answer": False}  # field metadata: a setting that cannot change what an answer says
MAX_TILES_LIMIT = 40  # InternVL never uses more tiles per image; the grid search grows with the cube of it
VIDEO_FRAMES_LIMIT = 64


def check_sampling(temperature: float, top_k: int, top_p: float) -> int:
    """Check the sampling arguments; return top_k as a plain int."""
    if math.isnan(temperature):
        raise ValueError("temperature must be a number, got NaN")
    if math.isinf(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    try:
        k = operator.index(top_k)
    except TypeError:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}") from None
    if k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    return k


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick tokens and when to stop; temperature 0 is greedy, top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 256  # the most tokens an answer may have
    temperature: float = 0.0  # 0 = greedy (the most likely token each step); above 0 samples
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # sample among the most likely tokens holding this much probability; 1 = off
    seed: int | None = None  # set for reproducible sampling; null = a fresh seed each answer
    ignore_eos: bool = False  # true: always generate max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))  # 0 and 0.0 are one setting (cache keys)
        check_sampling(self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class MediaSettings:
    """How media becomes tiles: tile side, tile budget per image, thumbnail, frames sampled per video."""

    image_size: int = 448  # the side of a tile in pixels, as the model was trained (448 for InternVL3)
    max_tiles: int = 12  # tiles per image (at most 40); lowered when a prompt would not fit the prefill
    use_thumbnail: bool = True  # add a whole-image tile when an image is cut into several
    video_frames: int = 8  # frames sampled per video (at most 64), one tile each
    video_decoder: str = "auto"  # auto (decord, else PyAV) | decord | pyav
    # limits on the decoding, not on what an answer says: left out of cache keys (see answer_settings)
    max_image_pixels: int = field(default=64_000_000, metadata=OPERATIONAL)  # larger images are refused undecoded
    decode_timeout_seconds: float = field(default=60.0, metadata=OPERATIONAL)  # per unit, in the decoding child
    decode_memory_mb: int = field(default=3072, metadata=OPERATIONAL)  # the child's address-space cap (0 = none)

    def __post_init__(self) -> None:
        for name in ("image_size", "max_tiles", "video_frames", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"media setting `{name}` must be a positive integer, got {value!r}")
        for name, limit in (("max_tiles", MAX_TILES_LIMIT), ("video_frames", VIDEO_FRAMES_LIMIT)):
            if getattr(self, name) > limit:
                raise ValueError(f"media setting `{name}` must be at most {limit}, got {getattr(self, name)}")
        timeout = self.decode_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"media setting `decode_timeout_seconds` must be a positive number, got {timeout!r}")
        memory = self.decode_memory_mb
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ValueError(f"media setting `decode_memory_mb` must be a whole number >= 0, got {memory!r}")
        if not isinstance(self.use_thumbnail, bool):
            raise ValueError(f"media setting `use_thumbnail` must be true or false, got {self.use_thumbnail!r}")
        if self.video_decoder not in ("auto", *DECODERS):
            raise ValueError(f"media setting `video_decoder` must be auto, {' or '.join(DECODERS)}")

    @property
    def decoder(self) -> str | None:
        """The decoder to force, or None to pick automatically."""
        return None if self.video_decoder == "auto" else self.video_decoder


def answer_settings(*settings: GenerationSettings | MediaSettings) -> dict[str, dict[str, Any]]:
    """Every field of the given settings that can change an answer, by section: what cache keys are made of.

    Fields are read from the dataclasses, so a new setting takes part unless it is marked OPERATIONAL.
    """
    return {
        type(s).__name__: {f.name: getattr(s, f.name) for f in fields(s) if f.metadata.get("shapes_answer", True)}
        for s in settings
    }
