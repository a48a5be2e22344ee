"""The InternVL chat template: system turn, one user turn with image/frame placeholders, assistant turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# raise when the text built here changes: stored answers made with another template are not reused
TEMPLATE_VERSION = 1

MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class PromptMedia:
    """What the prompt must make room for: the tile count of each image, or of each video frame."""

    kind: MediaKind
    tiles: tuple[int, ...]  # one entry per image, or per frame (1 tile each) for a video


def image_placeholder(tiles: int, tokens_per_tile: int) -> str:
    return IMG_START + IMG_CONTEXT * (tiles * tokens_per_tile) + IMG_END


def user_content(question: str, media: PromptMedia | None, tokens_per_tile: int) -> str:
    """Images before the question, as InternVL's chat(): `Image-k:` labels for several, `Framek:` for video."""
    if media is None or not media.tiles:
        return question
    holders = [image_placeholder(n, tokens_per_tile) for n in media.tiles]
    if media.kind == "video":
        prefix = "".join(f"Frame{i}: {h}\n" for i, h in enumerate(holders, 1))
    elif len(holders) == 1:
        prefix = holders[0] + "\n"
    else:
        prefix = "".join(f"Image-{i}: {h}\n" for i, h in enumerate(holders, 1))
    return prefix + question


def build_prompt(
    question: str, media: PromptMedia | None, tokens_per_tile: int, system: str | None = DEFAULT_SYSTEM
) -> str:
    """The full ChatML text up to and including the assistant turn's opening."""
    parts = []
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    parts.append(f"{IM_START}user\n{user_content(question, media, tokens_per_tile)}{IM_END}\n")
    parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
