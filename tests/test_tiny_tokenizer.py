"""Tests for the tiny deterministic BPE tokenizer used as a fixture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from batch.model.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer

TEXTS = [
    "A dog is sitting on the beach at sunset.",
    "你是书生·万象，英文名是InternVL。",
    "Emoji 📷🐶👍🏽🇯🇵 and mixed 中文 text\n\twith  spaces   and newlines\n\n",
    "Ünïcödé: café, naïve, e\u0301 (combining), Ω≈ç√, 日本語のテキスト, 한국어, عربى",
    "Numbers 12345.678 and symbols <>{}[]|\\/~`!@#$%^&*()_+-=",
    " leading space and trailing space ",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_config_values(tok, tok_dir: Path) -> None:
    assert tok.is_fast
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok.model_max_length == 8192
    assert len(tok) == 1024
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_special_tokens_layout(tok) -> None:
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        assert tok.decode([token_id]) == token
        assert tok.decode([token_id], skip_special_tokens=True) == ""
    assert tok.eos_token_id == ids[SPECIAL_TOKENS.index("<|im_end|>")]
    assert tok.pad_token_id == ids[SPECIAL_TOKENS.index("<|endoftext|>")]


def test_image_placeholder_is_four_ids(tok) -> None:
    ids = tok.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False)
    assert ids == tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "</img>"])


def test_chatml_prompt_round_trips(tok) -> None:
    prompt = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n请描述这张图片。<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\n请描述这张图片。\nassistant\n"


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tok, tok_dir: Path, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # transformers must not change the backend's encoding (no extra normalizer or pre-tokenizer).
    assert ids == Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text).ids


def test_multibyte_characters_are_split(tok) -> None:
    # Some CJK characters and emoji must span several tokens, or streaming tests would prove nothing.
    for text in ("书生·万象", "📷"):
        assert len(tok.encode(text, add_special_tokens=False)) > len(text)


def test_build_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_tokenizer(tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - start
    build_tokenizer(tmp_path / "b", seed=3)
    build_tokenizer(tmp_path / "c", seed=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() != (tmp_path / "c" / "tokenizer.json").read_bytes()
    assert elapsed < 2.0


def test_other_vocab_size(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, vocab_size=512)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("</box>") == 511


def test_too_small_vocab_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.slow
def test_the_real_shape_tokenizer_has_internvl3s_size_and_decodes_every_id_to_text(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from batch.model.tinymodel import PRESETS, TOKENIZER_VOCAB

    size = TOKENIZER_VOCAB["real-shape"]
    build_tokenizer(tmp_path / "big", vocab_size=size, seed=0)
    build_tokenizer(tmp_path / "small", vocab_size=1024, seed=0)
    big = AutoTokenizer.from_pretrained(tmp_path / "big")
    small = AutoTokenizer.from_pretrained(tmp_path / "small")
    assert len(big) == size <= PRESETS["real-shape"].text.vocab_size
    assert big.convert_ids_to_tokens(size - 1) == "</box>" and big.convert_ids_to_tokens(size - 12) == "<|endoftext|>"
    text = "The image shows a dog sitting on the beach at sunset."
    assert big.encode(text, add_special_tokens=False) == small.encode(text, add_special_tokens=False)  # as trained
    assert all(big.decode([i]) for i in range(2000, size - 12, 997))  # made-up merges are text too
