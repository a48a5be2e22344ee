"""Tests for batch.infer.prompt against the InternVL chat format, written out here independently of the module."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from batch.infer.prompt import PromptMedia, build_prompt, user_content
from batch.model.tiny_tokenizer import build_tokenizer

TOKENS_PER_TILE = 256  # InternVL3: (448 / 14 / 2) ** 2 tokens per 448x448 tile after pixel shuffle
SYSTEM = "You are a helpful assistant."
QUESTION = "Please describe the image in detail."

# The InternVL3 system message (conversation template "internvl2_5").
INTERNVL3_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


def reference_image(tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> str:
    """What InternVL's chat() puts in place of one `<image>`."""
    return "<img>" + "<IMG_CONTEXT>" * (tiles * tokens_per_tile) + "</img>"


def reference_question(question: str, kind: str, tiles: list[int]) -> str:
    """The question with `<image>` markers, as InternVL's README builds it, before the markers are expanded."""
    if not tiles:
        return question
    if kind == "video":
        return "".join([f"Frame{i + 1}: <image>\n" for i in range(len(tiles))]) + question
    if len(tiles) == 1:
        return "<image>\n" + question
    return "".join([f"Image-{i + 1}: <image>\n" for i in range(len(tiles))]) + question


def reference_prompt(
    question: str, kind: str, tiles: list[int], system: str | None, tokens_per_tile: int = TOKENS_PER_TILE
) -> str:
    query = reference_question(question, kind, tiles)
    for n in tiles:
        query = query.replace("<image>", reference_image(n, tokens_per_tile), 1)
    assert "<image>" not in query
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"


CASES = [
    pytest.param("image", [1], id="one-image-1-tile"),
    pytest.param("image", [7], id="one-image-7-tiles"),
    pytest.param("image", [1, 3], id="two-images"),
    pytest.param("image", [13, 1, 5], id="three-images"),
    pytest.param("video", [1], id="one-frame"),
    pytest.param("video", [1] * 8, id="eight-frames"),
    pytest.param("video", [2, 1], id="frames-with-tiles"),
]


# --- text ---------------------------------------------------------------------------------------------------


def test_prompts_carry_the_internvl3_system_message_unless_told_otherwise() -> None:
    media = PromptMedia("image", (2,))
    assert build_prompt(QUESTION, media, TOKENS_PER_TILE) == reference_prompt(QUESTION, "image", [2], INTERNVL3_SYSTEM)
    assert build_prompt(QUESTION, media, TOKENS_PER_TILE, system=None) == reference_prompt(QUESTION, "image", [2], None)


def test_text_only_exact() -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPlease describe the image in detail.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert build_prompt(QUESTION, None, TOKENS_PER_TILE, system=SYSTEM) == expected


def test_one_image_exact() -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 512 + "</img>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert build_prompt("What is this?", PromptMedia("image", (2,)), 256, system=SYSTEM) == expected


def test_default_system_used() -> None:
    prompt = build_prompt(QUESTION, None, TOKENS_PER_TILE)
    assert prompt == reference_prompt(QUESTION, "image", [], INTERNVL3_SYSTEM)
    assert prompt.startswith(f"<|im_start|>system\n{INTERNVL3_SYSTEM}<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("system", [None, ""])
def test_no_system_turn(system: str | None) -> None:
    prompt = build_prompt(QUESTION, PromptMedia("image", (1,)), TOKENS_PER_TILE, system=system)
    assert prompt == reference_prompt(QUESTION, "image", [1], None)
    assert prompt.startswith("<|im_start|>user\n")
    assert "system" not in prompt
    assert prompt.count("<|im_start|>") == 2


@pytest.mark.parametrize("media", [None, PromptMedia("image", ()), PromptMedia("video", ())])
def test_text_only(media: PromptMedia | None) -> None:
    assert build_prompt(QUESTION, media, TOKENS_PER_TILE, system=SYSTEM) == reference_prompt(
        QUESTION, "image", [], SYSTEM
    )
    assert user_content(QUESTION, media, TOKENS_PER_TILE) == QUESTION


@pytest.mark.parametrize(("kind", "tiles"), CASES)
@pytest.mark.parametrize("system", [SYSTEM, INTERNVL3_SYSTEM, None], ids=["system", "default-system", "no-system"])
def test_matches_reference(kind: str, tiles: list[int], system: str | None) -> None:
    media = PromptMedia(kind, tuple(tiles))
    assert build_prompt(QUESTION, media, TOKENS_PER_TILE, system=system) == reference_prompt(
        QUESTION, kind, tiles, system
    )


@pytest.mark.parametrize("tokens_per_tile", [1, 4, 64])
def test_other_tokens_per_tile(tokens_per_tile: int) -> None:
    media = PromptMedia("image", (2, 5))
    expected = reference_prompt(QUESTION, "image", [2, 5], SYSTEM, tokens_per_tile)
    assert build_prompt(QUESTION, media, tokens_per_tile, system=SYSTEM) == expected


def test_multi_image_labels() -> None:
    content = user_content("Compare them.", PromptMedia("image", (1, 2, 1)), 1)
    assert content == (
        "Image-1: <img><IMG_CONTEXT></img>\n"
        "Image-2: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Image-3: <img><IMG_CONTEXT></img>\n"
        "Compare them."
    )


def test_video_frame_labels() -> None:
    content = user_content("What happens?", PromptMedia("video", (1, 1, 1)), 2)
    holder = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    assert content == f"Frame1: {holder}\nFrame2: {holder}\nFrame3: {holder}\nWhat happens?"
    # Frames count from 1 and have no dash; single images get no label at all.
    assert "Frame0" not in content and "Frame-" not in content
    assert user_content("Q", PromptMedia("image", (1,)), 2) == f"{holder}\nQ"
    assert user_content("Q", PromptMedia("video", (1,)), 2) == f"Frame1: {holder}\nQ"


def test_question_kept_verbatim() -> None:
    question = "  Multi-line\n question with <angle> brackets, 中文 and trailing spaces  "
    media = PromptMedia("image", (1,))
    prompt = build_prompt(question, media, TOKENS_PER_TILE, system=SYSTEM)
    assert prompt == reference_prompt(question, "image", [1], SYSTEM)
    assert prompt.endswith(f"</img>\n{question}<|im_end|>\n<|im_start|>assistant\n")


# --- tokenization with the tiny tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    out: Path = tmp_path_factory.mktemp("prompt_tok")
    build_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize(("kind", "tiles"), CASES)
@pytest.mark.parametrize("system", [INTERNVL3_SYSTEM, None], ids=["default-system", "no-system"])
def test_special_tokens_never_split(tok, kind: str, tiles: list[int], system: str | None) -> None:
    prompt = build_prompt(QUESTION, PromptMedia(kind, tuple(tiles)), TOKENS_PER_TILE, system=system)
    ids = tok.encode(prompt, add_special_tokens=False)
    img, img_end, context, im_start, im_end = tok.convert_tokens_to_ids(
        ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"]
    )
    assert ids.count(context) == sum(tiles) * TOKENS_PER_TILE
    assert ids.count(img) == len(tiles)
    assert ids.count(img_end) == len(tiles)
    turns = 3 if system else 2
    assert ids.count(im_start) == turns
    assert ids.count(im_end) == turns - 1
    # Each image is one contiguous run: <img>, its own tile count of context ids, </img>.
    starts = [i for i, t in enumerate(ids) if t == img]
    for start, n in zip(starts, tiles, strict=True):
        end = start + 1 + n * TOKENS_PER_TILE
        assert ids[start + 1 : end] == [context] * (n * TOKENS_PER_TILE)
        assert ids[end] == img_end
    assert tok.decode(ids) == prompt
    # The question and the labels are ordinary text, with no special ids.
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith(f"{QUESTION}\nassistant\n")
    label = "Frame" if kind == "video" else "Image-"
    if kind == "video" or len(tiles) > 1:
        assert [f"{label}{i}: " in text for i in range(1, len(tiles) + 1)] == [True] * len(tiles)


def test_placeholders_are_one_token_each(tok) -> None:
    media = PromptMedia("image", (3, 1))
    with_media = tok.encode(build_prompt("Q", media, TOKENS_PER_TILE, system=None), add_special_tokens=False)
    special = set(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    assert sum(t in special for t in with_media) == (3 + 1) * TOKENS_PER_TILE + 2 * 2
