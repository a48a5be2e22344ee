"""Tests for the streaming detokenizer: chunks never split a character and add up to the full decode."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from transformers import AutoTokenizer

from batch.infer.detokenize import IncrementalDetokenizer
from batch.model.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer

TEXTS = [
    "你是书生·万象，英文名是InternVL。",
    "A cat 🐱 on a sofa 🛋️ with a flag 🇯🇵 and a thumbs up 👍🏽.",
    "图片中有一只狗坐在草地上。天空很蓝 🌅",
    "日本語のテキストと한국어 mixed with English.",
    "plain ascii only",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny_tok")
    build_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def byte_token_ids(tok) -> list[int]:
    """Token id of each single byte 0..255, using GPT-2's byte-to-character table of ByteLevel BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    ids = tok.convert_tokens_to_ids([chars[b] for b in range(256)])
    assert [tok.decode([i]).encode("utf-8") for i in ids[:128]] == [bytes([b]) for b in range(128)]
    return ids


def stream(tok, ids: Sequence[int], skip_special_tokens: bool = True) -> list[str]:
    """All chunks from add() for each id, then flush(), checking .text along the way."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    chunks = []
    for token_id in ids:
        chunks.append(detok.add(token_id))
        assert detok.text == "".join(chunks)
    chunks.append(detok.flush())
    assert detok.text == "".join(chunks)
    return chunks


def test_fixture_splits_characters(tok) -> None:
    # At least one character must span several tokens, or the tests below would pass trivially.
    split_chars = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.decode([i]) for i in ids]
        split_chars += sum("\ufffd" in piece for piece in pieces)
    assert split_chars > 0


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_text_streams_exactly(tok, text: str, skip: bool) -> None:
    ids = tok.encode("<|im_start|>assistant\n" + text + "<|im_end|>", add_special_tokens=False)
    chunks = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert chunks[-1] == "", "nothing should be left for flush() after complete characters"


def test_emits_promptly(tok) -> None:
    ids = tok.encode("书", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["书"]
    assert detok.flush() == ""


def test_incomplete_character_at_end_is_flushed(tok) -> None:
    ids = tok.encode("ok 📷", add_special_tokens=False)[:-1]
    chunks = stream(tok, ids)
    assert "\ufffd" not in "".join(chunks[:-1])
    assert chunks[-1].endswith("\ufffd")
    assert "".join(chunks) == tok.decode(ids)


@pytest.mark.parametrize("seed", range(40))
def test_random_ids_match_full_decode(tok, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_vocab = len(tok)
    byte_ids = byte_token_ids(tok)
    special_ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    # Mostly single-byte tokens, which make invalid and incomplete UTF-8 likely, plus specials and merges.
    pools = [byte_ids, special_ids, list(range(n_vocab))]
    pool_ids = rng.choice(3, size=int(rng.integers(1, 200)), p=[0.6, 0.1, 0.3])
    ids = [int(rng.choice(pools[p])) for p in pool_ids]
    for skip in (True, False):
        full = tok.decode(ids, skip_special_tokens=skip)
        chunks = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == full


@pytest.mark.parametrize("seed", range(20))
def test_random_valid_text_never_emits_replacement(tok, seed: int) -> None:
    rng = np.random.default_rng(seed)
    alphabet = list("abc 书生万象中文图片天空📷🐱👍🏽🇯🇵éü\n") + ["<img>", "<IMG_CONTEXT>", "<|im_end|>"]
    text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 120))))
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "\ufffd" not in full
        chunks = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == full
        assert not any("\ufffd" in chunk for chunk in chunks)


class CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode() call gets."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_garbage_run_keeps_window_short(tok) -> None:
    # A broken model emitting lone continuation bytes ends every window in U+FFFD; the window must stay short.
    byte_ids = byte_token_ids(tok)
    ids = [byte_ids[0x80]] * 300 + tok.encode("书生", add_special_tokens=False) + [byte_ids[0xE4]]
    counting = CountingDecoder(tok)
    chunks = stream(counting, ids)
    assert "".join(chunks) == tok.decode(ids) == "\ufffd" * 300 + "书生\ufffd"
    assert max(counting.lengths) <= 20
    assert len(counting.lengths) < 20 * len(ids)
    assert "书" in "".join(chunks[:-1]) and chunks[-1] == "\ufffd"


def test_per_token_cost_is_bounded(tok) -> None:
    text = "你是书生·万象 📷 A dog is sitting on the beach at sunset. " * 40
    ids = tok.encode(text, add_special_tokens=False)
    counting = CountingDecoder(tok)
    assert "".join(stream(counting, ids)) == text
    assert max(counting.lengths) <= 12
    assert len(counting.lengths) <= 2 * len(ids) + 1
