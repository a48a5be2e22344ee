"""The shared generation ladder on the tiny model: chunk counts, stop rules, capacity and timings."""

from __future__ import annotations

import numpy as np
import pytest

from batch.errors import PromptTooLongError
from batch.infer.generate import Timings, num_chunks
from batch.infer.pipeline import Pipeline, Request
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.infer.vit_cache import VitCache
from batch.model.attention_mask import MASKED, chunk_mask, decode_mask, prefill_mask
from batch.model.export.exporter import export


@pytest.fixture(scope="module")
def pipeline(tiny_onnx):
    p = Pipeline.open(tiny_onnx)
    yield p
    p.close()


def ids(n: int, seed: int = 0) -> Request:
    return Request(np.random.default_rng(seed).integers(0, 1000, n), None, None, 0.0)


@pytest.mark.parametrize(("n", "chunks"), [(1, 1), (127, 1), (128, 1), (129, 2), (256, 2), (257, 3)])
def test_chunk_count_is_ceil_with_no_empty_chunk(pipeline, monkeypatch, n, chunks):
    assert num_chunks(n, 128) == chunks
    starts: list[tuple[int, int]] = []
    original = pipeline.backend.prefill_layers

    def spy(hidden, start, cache):
        starts.append((start, hidden.shape[1]))
        return original(hidden, start, cache)

    monkeypatch.setattr(pipeline.backend, "prefill_layers", spy)
    list(pipeline.steps(ids(n), GenerationSettings(max_new_tokens=1), Timings()))
    assert [s for s, _ in starts] == [128 * c for c in range(chunks)]
    assert sum(length for _, length in starts) == n and all(length > 0 for _, length in starts)


def test_masks():
    m = prefill_mask(start=128, n=2, rows=4, cols=132)[0]
    assert (m[0, :129] == 0).all() and (m[0, 129:] == MASKED).all()
    assert (m[3, :132] == 0).all()  # padding rows stay causal and finite
    d = decode_mask(pos=3, cols=8)[0, 0]
    assert d.tolist() == [0, 0, 0, MASKED, MASKED, MASKED, MASKED, 0]
    # format 3: a history 6 wide of which 3 positions are filled, then a chunk of 2
    c = chunk_mask(start=3, n=2, width=6)[0]
    assert c.tolist() == [[0, 0, 0, MASKED, MASKED, MASKED, 0, MASKED], [0, 0, 0, MASKED, MASKED, MASKED, 0, 0]]


def test_stops_at_end_of_turn_and_leaves_it_out(pipeline):
    request = pipeline.prepare("Say something.")
    free = [s.token for s in pipeline.steps(request, GenerationSettings(max_new_tokens=12, ignore_eos=True), Timings())]
    stop = free[4]
    first = free.index(stop)
    original = pipeline.stop_ids
    pipeline.stop_ids = frozenset({stop})
    try:
        result = pipeline.ask("Say something.", settings=GenerationSettings(max_new_tokens=12))
    finally:
        pipeline.stop_ids = original
    assert result.finish_reason == "stop"
    assert result.token_ids == free[:first]


def test_max_new_tokens_and_timings(pipeline, media_dir):
    result = pipeline.ask("Describe.", [media_dir / "photo.jpg"], GenerationSettings(max_new_tokens=7, ignore_eos=True))
    t = result.timings
    assert result.finish_reason == "length" and result.output_tokens == 7
    assert t.decode_tokens == 6 and t.decode_ms > 0 and t.tokens_per_s > 0
    assert t.vit_ms > 0 and t.prefill_ms > 0 and t.preprocess_ms > 0
    assert t.ttft_ms >= t.prefill_ms + t.vit_ms
    assert t.prompt_tokens == result.prompt_tokens


def test_generation_stops_when_the_cache_is_full(tiny_hf, tmp_path):
    export(tiny_hf, tmp_path, kv_capacity=200)
    small = Pipeline.open(tmp_path)
    result = small.ask("Hi", settings=GenerationSettings(max_new_tokens=500, ignore_eos=True))
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.output_tokens - 1 == 200  # the last token is never fed back
    with pytest.raises(PromptTooLongError, match=r"prompt is \d+ tokens but this model prefills at most 199; shorten"):
        small.prepare("word " * 250)
    small.close()


def test_a_second_question_about_the_same_image_skips_the_vit(pipeline, media_dir, monkeypatch):
    monkeypatch.setattr(pipeline, "vit_cache", VitCache())  # earlier tests used the same images
    calls = []
    original = pipeline.backend.vit
    monkeypatch.setattr(pipeline.backend, "vit", lambda pixels: calls.append(len(pixels)) or original(pixels))
    settings = GenerationSettings(max_new_tokens=4)
    first = pipeline.ask("What is this?", [media_dir / "wide.png"], settings)
    again = pipeline.ask("And the colours?", [media_dir / "wide.png"], settings)
    other = pipeline.ask("What is this?", [media_dir / "photo.jpg"], settings)
    one_tile = MediaSettings(max_tiles=1)
    smaller = pipeline.ask("What is this?", [media_dir / "wide.png"], settings, media_settings=one_tile)
    assert calls == [4, other.tiles, 1]  # the repeat reused the first result; new pixels or fewer tiles did not
    assert again.timings.vit_ms < first.timings.vit_ms and smaller.tiles == 1
