"""What makes two answers interchangeable (the cache key), and the row a generation result becomes."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from batch.infer.generate import GenerationResult, Timings
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.store.records import ANSWER_MS, DECODE_SHARE_MS, DECODE_TOKENS, answer_row, cache_key

MEDIA = ["a" * 64]


def key(generation: GenerationSettings | None = None, media: MediaSettings | None = None, **kwargs) -> str:
    args = {"media_sha256": MEDIA, "prompt": "Describe.", "model_id": "m@1"} | kwargs
    return cache_key(generation=generation or GenerationSettings(), media=media or MediaSettings(), **args)


def _other_value(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if value is None:
        return 7
    return {"auto": "pyav"}.get(value, value)


@pytest.mark.parametrize("cls", [GenerationSettings, MediaSettings])
def test_every_setting_that_can_change_an_answer_is_in_the_key(cls):
    """A new settings field takes part in the key unless it is declared operational: keys cannot go stale."""
    base = cls()
    for f in dataclasses.fields(cls):
        changed = dataclasses.replace(base, **{f.name: _other_value(getattr(base, f.name))})
        assert getattr(changed, f.name) != getattr(base, f.name), f"no other value tried for {f.name}"
        kwargs = {"generation": changed} if cls is GenerationSettings else {"media": changed}
        if f.metadata.get("shapes_answer", True):
            assert key(**kwargs) != key(), f"{cls.__name__}.{f.name} is not part of the cache key"
        else:
            assert key(**kwargs) == key(), f"{cls.__name__}.{f.name} is operational but changes the key"


def test_the_key_follows_media_text_model_and_versions(monkeypatch):
    assert key() == key()
    assert key(media_sha256=["b" * 64]) != key()
    assert key(prompt="Describe!") != key()
    assert key(model_id="m@2") != key()
    assert key(system="You are terse.") != key()
    assert key(generation=GenerationSettings(temperature=0)) == key(generation=GenerationSettings(temperature=0.0))
    before = key()
    monkeypatch.setattr("batch.service.store.records.TEMPLATE_VERSION", 2)
    assert key() != before
    monkeypatch.undo()
    monkeypatch.setattr("batch.service.store.records.PREPROCESS_VERSION", 2)
    assert key() != before


def test_a_result_row_fills_every_answer_column():
    timings = Timings(preprocess_ms=1, vit_ms=2, prefill_ms=3, ttft_ms=6, decode_ms=10, decode_tokens=4)
    result = GenerationResult("Hi there", [1, 2, 3, 4, 5], 40, 0, "stop", timings, tiles=0)
    row = answer_row(result, "onnxruntime")
    assert row["answer"] == "Hi there" and row["output_tokens"] == 5 and row["tokens_per_s"] == 400.0
    assert row["backend"] == "onnxruntime" and row["ttft_ms"] == 6


@pytest.mark.parametrize(
    "timings, share_ms",
    [
        (Timings(preprocess_ms=40, vit_ms=200, prefill_ms=300, ttft_ms=545, decode_ms=600, decode_tokens=12), 600),
        # 12 steps of 50 ms, each shared by 4 answers on average: the worker spent a quarter of them on this one
        (Timings(5, 20, 30, 60, decode_ms=600, decode_tokens=12, decode_rows=4.0), 150),
        (Timings(5, 20, 30, 60), 0),  # the first token ended it: no decode step
    ],
)
def test_the_sql_over_a_stored_row_reads_its_timings_as_the_model_measured_them(timings, share_ms):
    row = answer_row(GenerationResult("Hi", [1] * (timings.decode_tokens + 1), 40, 0, "length", timings), "cpu")
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE results ({', '.join(row)})")
    conn.execute(f"INSERT INTO results VALUES ({', '.join('?' * len(row))})", list(row.values()))
    share, tokens, total = conn.execute(
        f"SELECT {DECODE_SHARE_MS}, {DECODE_TOKENS}, {ANSWER_MS} FROM results"
    ).fetchone()
    assert share == pytest.approx(timings.decode_share_ms) == share_ms
    assert tokens == pytest.approx(timings.decode_tokens)  # all but the first token, which the prefill made
    assert total == timings.ttft_ms + timings.decode_ms  # ttft_ms holds the preparation: added once


def test_only_faults_of_the_machine_are_waited_out():
    import errno
    import sqlite3

    from batch.service.faults import is_corrupt_database, is_passing

    assert is_passing(sqlite3.OperationalError("database is locked"))
    assert is_passing(sqlite3.OperationalError("database or disk is full"))
    assert is_passing(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_passing(sqlite3.OperationalError("table runs has no column named mode"))  # a bug, not a fault
    assert not is_passing(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_corrupt_database(sqlite3.DatabaseError("database disk image is malformed"))
    assert not is_passing(OSError(errno.ENOENT, "gone"))
