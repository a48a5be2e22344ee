"""Several answers decoded together: the same answers as alone, rows that join and leave, packed caches, and the
worker answering a folder job with model.batch rows in flight."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from format2 import write_format2
from spool_env import SpoolEnv

from batch.errors import ModelFolderError, VlbatchError
from batch.infer.batching import DecodeBatch, Finished, batch_limit
from batch.infer.generate import Timings, decode_one_token, prefill
from batch.infer.kvcache import AnswerCache, KVCache, RowCache
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.onnx_backend import OnnxBackend
from batch.infer.settings import GenerationSettings
from batch.model.export.manifest import MANIFEST
from batch.service.worker.worker import Worker

QUESTIONS = [
    "Hi",
    "Describe the sea, the mountains and the long road between them, slowly and in detail. " * 4,  # > one chunk
    "What?",
    "Tell me about this photo.",
    "A",
    "Write a short poem about rain.",
    "ok " * 60,
    "Why is the sky blue?",
    "Count to ten.",
]


@pytest.fixture(scope="module")
def pipeline(tiny_onnx):
    p = Pipeline.open(tiny_onnx)
    yield p
    p.close()


@pytest.fixture(scope="module")
def requests(pipeline, media_dir) -> list[Request]:
    images = sorted(media_dir.glob("*.png"))[:3]
    out = [pipeline.prepare(q) for q in QUESTIONS]
    out[3] = pipeline.prepare(QUESTIONS[3], images[:1])  # rows with image tokens, of other lengths
    out[5] = pipeline.prepare(QUESTIONS[5], images[1:3])
    return out


def answer_all(pipeline: Pipeline, requests: list[tuple[Request, GenerationSettings]], rows: int) -> list:
    """Answer every request with up to `rows` in flight; results in the order of `requests`."""
    batch = DecodeBatch(pipeline, rows)
    out: list = [None] * len(requests)

    def take(done: list[Finished]) -> None:
        for item in done:
            out[item.tag] = item.result if item.result is not None else item.error

    for index, (request, settings) in enumerate(requests):
        while batch.full:
            take(batch.step())
        try:
            take(batch.add(request, settings, index))
        except VlbatchError as exc:
            out[index] = exc
    while len(batch):
        take(batch.step())
    return [item for item in out if item is not None]


def settings_for(i: int, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=3 + 5 * i, **kw)  # rows that end at different steps


@pytest.fixture(scope="module")
def stopping(pipeline, requests):
    """A stop token that ends two of the answers early (one a free-running answer's 4th token)."""
    free = pipeline.answer(requests[6], GenerationSettings(max_new_tokens=8, ignore_eos=True)).token_ids
    return frozenset(pipeline.stop_ids | {free[3]})


def rows_seen(monkeypatch, backend) -> list[int]:
    """Records how many rows each batched decode step carried."""
    seen: list[int] = []
    original = backend.decode_rows_layers

    def spy(hidden, positions, mask, cache):
        seen.append(hidden.shape[0])
        return original(hidden, positions, mask, cache)

    monkeypatch.setattr(backend, "decode_rows_layers", spy)
    return seen


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
def test_greedy_answers_in_a_batch_equal_the_same_answers_alone(pipeline, requests, stopping, monkeypatch, rows):
    monkeypatch.setattr(pipeline, "stop_ids", stopping)
    work = [(r, settings_for(i)) for i, r in enumerate(requests)]
    alone = [pipeline.answer(r, s) for r, s in work]
    assert {a.finish_reason for a in alone} == {"stop", "length"}
    assert len({len(a.token_ids) for a in alone}) >= 5
    seen = rows_seen(monkeypatch, pipeline.backend)
    together = answer_all(pipeline, work, rows)
    for a, b in zip(alone, together, strict=True):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert b.prompt_tokens == a.prompt_tokens and b.tiles == a.tiles
        assert b.timings.decode_tokens == a.timings.decode_tokens
    if rows == 1:
        assert seen == []  # one row decodes in the answer's own cache, as Pipeline.answer does
    else:
        joined = sum(a.timings.decode_tokens > 0 for a in alone)  # the others end at their first token
        assert max(seen) == min(rows, joined)  # the batch really was full
        assert len(seen) < sum(a.timings.decode_tokens for a in alone)  # fewer steps than tokens


def test_sampled_answers_keep_their_own_seed_and_settings(pipeline, requests):
    work = [
        (r, settings_for(i, temperature=0.9 - 0.1 * i, top_k=20 * (i % 3), top_p=0.8 + 0.02 * i, seed=i))
        for i, r in enumerate(requests[:6])
    ]
    alone = [pipeline.answer(r, s).token_ids for r, s in work]
    assert [a.token_ids for a in answer_all(pipeline, work, 4)] == alone


def test_batched_logits_match_each_row_alone(pipeline, requests):
    backend = pipeline.backend
    cache = backend.new_row_cache(4)
    own, tokens = [], []
    for request in requests[:4]:
        embeds = pipeline.prompt_embeds(request, Timings())
        single = backend.new_cache()
        token = int(np.argmax(backend.logits(prefill(backend, embeds, single))))
        alone_cache = backend.new_cache()
        prefill(backend, embeds, alone_cache)
        cache.add(single)
        own.append(alone_cache)
        tokens.append(token)
    for _ in range(3):
        x = np.asarray(pipeline.embeddings[tokens], dtype=np.float32)[:, None]
        positions, mask = cache.prepare_step()
        for layer in range(backend.num_layers):
            x = backend.decode_rows(layer, x, positions, mask, cache)
        cache.advance()
        together = backend.logits_rows(x)
        for row, (token, c) in enumerate(zip(tokens, own, strict=True)):
            alone = decode_one_token(backend, pipeline.embeddings[token][None, None].astype(np.float32), c)
            np.testing.assert_allclose(together[row], alone, rtol=1e-4, atol=1e-4)
        tokens = [int(np.argmax(row)) for row in together]


def test_a_row_cache_packs_rows_and_grows_by_steps():
    cache = RowCache(num_layers=2, rows=3, kv_dim=4, capacity=200)
    for n, fill in ((5, 1.0), (70, 2.0), (3, 3.0)):
        single = KVCache(2, 200, 4)
        single.k[1][0, :n] = fill
        single.length = n
        cache.add(single)
    assert cache.count == 3 and cache.width == 128  # the longest row's 70 + 1, in steps of 64
    assert cache.lengths.tolist() == [5, 70, 3]
    cache.remove(0)  # the last row moves into the freed one
    assert cache.count == 2 and cache.lengths[:2].tolist() == [3, 70]
    assert (cache.k[1][0, :3] == 3.0).all() and (cache.k[1][1, :70] == 2.0).all()
    positions, mask = cache.prepare_step()
    assert positions.tolist() == [3, 70] and mask.shape == (2, 1, 129)
    assert (mask[0, 0, :3] == 0).all() and (mask[0, 0, 3:128] < 0).all() and mask[0, 0, 128] == 0
    assert (mask[1, 0, :70] == 0).all() and (mask[1, 0, 70:128] < 0).all()
    full = KVCache(2, 200, 4)
    full.length = 199
    cache.add(full)
    assert cache.width == 200  # capped at the capacity
    with pytest.raises(IndexError, match="all 3 rows"):
        cache.add(full)


@pytest.mark.parametrize("heads", [None, 2])
def test_widening_keeps_every_rows_positions_where_they_were_and_zeros_the_rest(heads):
    """Widening moves rows apart inside their store, or into a new store once it is full: every row's positions
    keep their values, and every position past a row's length reads zero, at every width on the way."""
    rng = np.random.default_rng(7)
    cache = RowCache(num_layers=2, rows=3, kv_dim=4, capacity=1000, dtype=np.float16, heads=heads)
    lengths = [5, 30, 70]
    for n in lengths:  # three answers' prompts, each its own values
        single = AnswerCache(2, 2, 2, 1000, np.float16) if heads else KVCache(2, 1000, 4, np.float16)
        if heads:
            single.reserve(n)
        for layer in range(2):
            single.k[layer][0, ..., :n, :] = rng.standard_normal(single.k[layer][0, ..., :n, :].shape)
            single.v[layer][0, ..., :n, :] = rng.standard_normal(single.v[layer][0, ..., :n, :].shape)
        single.length = n
        cache.add(single)
    cache.remove(1)  # the last row moves into its place; its own place is free again, its values still there
    del lengths[1]
    expected = [[(layer[r, ..., : lengths[r], :].copy()) for layer in cache.k + cache.v] for r in range(2)]
    stores = list(cache._stores)
    widths = []
    for _ in range(900):  # the rows grow one position per step, past several widths, new stores and the capacity
        cache.prepare_step()
        cache.advance()
        widths.append(cache.width)
    assert sorted(set(widths)) == [*range(128, 1000, 64), 1000]  # in steps of 64, then the capacity
    assert all(new is not old for new, old in zip(cache._stores, stores, strict=True))  # replaced on the way
    for r in range(2):
        for buffer, before in zip(cache.k + cache.v, expected[r], strict=True):
            np.testing.assert_array_equal(buffer[r, ..., : lengths[r], :], before)
            assert not buffer[r, ..., lengths[r] :, :].any()  # never written: zero, not another row's values
    assert not any(buffer[2].any() for buffer in cache.k + cache.v)  # the free row: zero, as a new row expects


def test_a_freed_row_reads_zero_after_the_rows_widen_in_place():
    cache = RowCache(num_layers=1, rows=3, kv_dim=4, capacity=1000)
    for n, fill in ((10, 1.0), (20, 2.0), (150, 3.0)):
        single = KVCache(1, 1000, 4)
        single.k[0][0, :n] = single.v[0][0, :n] = fill
        single.length = n
        cache.add(single)
    store = cache._stores[0]
    cache.remove(0)  # the last row moves into the first place; the freed place keeps its values until widened
    while cache.width < 256:
        cache.prepare_step()
        cache.advance()
    assert cache._stores[0] is store  # widened in place
    assert (cache.k[0][0, :150] == 3.0).all() and (cache.k[0][1, :20] == 2.0).all()
    assert not cache.k[0][0, 150:].any() and not cache.k[0][1, 20:].any() and not cache.k[0][2].any()


def test_an_export_of_format_2_still_loads_and_answers_as_its_format_3_export_does(
    tiny_hf, tiny_onnx_fp32_cache, tmp_path
):
    old = Pipeline.open(write_format2(tiny_hf, tiny_onnx_fp32_cache, tmp_path / "old"))
    new = Pipeline.open(tiny_onnx_fp32_cache)
    try:
        assert (old.backend.format_version, old.backend.head_major, new.backend.head_major) == (2, False, True)
        assert old.backend.max_rows == new.backend.max_rows > 1
        questions = ["Hi", "Describe a quiet harbour at dawn. " * 12, "Name three colours."]  # one of 3 chunks
        work = [(old.prepare(q), GenerationSettings(max_new_tokens=10, ignore_eos=True)) for q in questions]
        assert max(len(r.ids) for r, _ in work) > 2 * old.backend.chunk_len
        for rows in (1, 3):
            theirs = [a.token_ids for a in answer_all(old, work, rows)]
            assert theirs == [a.token_ids for a in answer_all(new, work, rows)]
    finally:
        old.close()
        new.close()


def test_an_export_of_format_1_still_loads_and_decodes_one_answer_at_a_time(tiny_hf, tiny_onnx_fp32_cache, tmp_path):
    old = write_format2(tiny_hf, tiny_onnx_fp32_cache, tmp_path / "old", version=1)
    manifest = json.loads((old / MANIFEST).read_text())
    p = Pipeline.open(old)
    try:
        assert p.backend.max_rows == 1 and DecodeBatch(p, 4).rows == 1
        assert "format 1" in batch_limit(p.backend) and "vlbatch export HF_DIR OUT_DIR" in batch_limit(p.backend)
        request = p.prepare("Hi")
        assert answer_all(p, [(request, GenerationSettings(max_new_tokens=4))], 4)[0].token_ids
    finally:
        p.close()
    (old / MANIFEST).unlink()
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ModelFolderError, match="format 99, newer than this vlbatch reads.*upgrade vlbatch"):
        OnnxBackend(old)


def test_the_worker_answers_a_folder_job_with_rows_in_flight_as_it_would_one_by_one(tiny_onnx, tmp_path, monkeypatch):
    answers = {}
    for rows in (1, 3):
        (tmp_path / f"rows{rows}").mkdir()
        env = SpoolEnv(tmp_path / f"rows{rows}", tiny_onnx)
        env.write_config()
        for i in range(7):
            env.image(f"p/{i}.png", seed=i, size=(160 + 40 * i, 120))
        env.image("p/broken.png", seed=9).write_bytes(b"not an image")
        env.drop("caps.yaml", "prompt: Caption.\ninputs: ../../media/p/\nmax_new_tokens: 20\n")
        config = env.config()
        w = Worker.from_config(replace(config, model=replace(config.model, batch=rows)))
        seen = rows_seen(monkeypatch, w.pipeline.backend)
        try:
            (outcome,) = w.drain()
        finally:
            w.close()
        assert outcome.state == "failed"  # the broken file, alone
        got = {
            Path(json.loads(r["media_paths"])[0]).name: (
                r["answer"],
                r["error"] and r["error"].replace(str(env.root), "ROOT"),
                r["output_tokens"],
            )
            for r in env.db().query("select * from results")
        }
        assert len(got) == 8 and got["broken.png"][0] is None and "broken.png" in got["broken.png"][1]
        answers[rows] = got
        job = env.job("caps")
        assert job["inflight"] is None and (job["answered"], job["failed_media"]) == (7, 1)
        timing = (
            env.db()
            .execute("select min(decode_ms), min(ttft_ms), min(tokens_per_s) from results where answer is not null")
            .fetchone()
        )
        assert all(v > 0 for v in timing)
        shared = env.db().execute("select max(decode_rows) from results where answer is not null").fetchone()[0]
        assert shared == 1.0 if rows == 1 else 1.0 < shared <= rows  # answers that really shared their steps
        assert (max(seen) if seen else 1) == rows
    assert answers[1] == answers[3]


def test_a_scheduler_answers_callers_in_many_threads_together(pipeline, requests, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from batch.infer.batching import BatchScheduler

    work = [(r, settings_for(i)) for i, r in enumerate(requests)]
    alone = [pipeline.answer(r, s).token_ids for r, s in work]
    seen = rows_seen(monkeypatch, pipeline.backend)
    scheduler = BatchScheduler(pipeline, 4)
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda w: scheduler.answer(*w).token_ids, work))
    assert together == alone and max(seen) == 4
    # an alone request waits for the batch to empty and runs with nothing beside it; later ones wait for it
    steps: list[tuple[bool, int]] = []
    step = scheduler.batch.step

    def spy_step():
        steps.append((scheduler._alone, len(scheduler.batch)))
        return step()

    monkeypatch.setattr(scheduler.batch, "step", spy_step)
    lone = 2
    with ThreadPoolExecutor(len(work)) as pool:
        futures = [pool.submit(scheduler.answer, r, s, i == lone) for i, (r, s) in enumerate(work)]
        results = [f.result() for f in futures]
    assert [r.token_ids for r in results] == alone
    assert [n for is_alone, n in steps if is_alone] == [1] * results[lone].timings.decode_tokens
    assert max(n for is_alone, n in steps if not is_alone) > 1


def test_a_failed_request_fails_alone_and_the_scheduler_goes_on(pipeline, requests):
    from batch.infer.batching import BatchScheduler

    scheduler = BatchScheduler(pipeline, 3)
    bad = Request(np.array([10**9]), None, None, 0.0)  # a token id past the embedding table
    with pytest.raises(Exception, match="model failed|index"):
        scheduler.answer(bad, GenerationSettings(max_new_tokens=4))
    good = scheduler.answer(requests[0], GenerationSettings(max_new_tokens=4))
    assert good.token_ids == pipeline.answer(requests[0], GenerationSettings(max_new_tokens=4)).token_ids
