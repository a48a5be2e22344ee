"""The dimensions of an InternVL model (vision tower, projector, language model), parsed from config data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"
    qkv_bias: bool = True
    qk_normalization: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def kv_dim(self) -> int:
        """Width of one layer's K (or V) row: all KV heads side by side."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelSpec:
    vision: VisionSpec
    text: TextSpec
    downsample_ratio: float = 0.5
    image_token_id: int = -1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def image_tokens_per_tile(self) -> int:
        """LLM tokens one 448 tile becomes after pixel shuffle (256 for InternVL3)."""
        side = int(self.vision.grid * self.downsample_ratio)
        return side * side

    @property
    def projector_input(self) -> int:
        return self.vision.hidden_size * int(round(1 / self.downsample_ratio)) ** 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        rest = {k: v for k, v in data.items() if k not in ("vision", "text")}
        return cls(vision=VisionSpec(**data["vision"]), text=TextSpec(**data["text"]), **rest)
