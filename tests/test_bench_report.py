"""The benchmark cannot hide a failed peer: it shows FAILED with the cause in words, prints no ratio against
it and exits 1 unless --allow-missing-peers; causes come from real processes (signals, exits, time-outs).
The llama.cpp peers' inputs fit every preset: prompt ids within the vocabulary, the GGUF vocabulary the model's
own tokenizer (so mtmd's <img> and </img> are its special tokens). Decode is compared at each case's context:
llama.cpp decodes after a prompt as long as each case's, and the table sets the figures of equal length side
by side."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from peer_llamacpp import decode_token, gguf_vocabulary, prompt_tokens  # noqa: E402
from peers import PeerOutcome, failure_cause, run_peer  # noqa: E402
from run_bench import (  # noqa: E402
    case_prompt_tokens,
    comparison,
    decode_at_contexts,
    decode_context_table,
    photo_table,
    ratio_export,
)

from batch.model.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer  # noqa: E402
from batch.model.tinymodel import make_model  # noqa: E402


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "peer.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_peer_killed_by_sigill_is_named_as_a_missing_cpu_feature(tmp_path: Path) -> None:
    command = _script(tmp_path, "import os, signal\nprint('{}')\nos.kill(os.getpid(), signal.SIGILL)\n")
    outcome = run_peer("crash", command, timeout_s=60)
    assert not outcome.ok and outcome.figures is None
    assert outcome.failure == (
        "SIGILL: illegal instruction, the library was built for a CPU feature this machine lacks"
    )


def test_the_error_line_wins_over_noise_printed_after_it(tmp_path: Path) -> None:
    command = _script(
        tmp_path,
        """
        import sys
        try:
            raise RuntimeError("quantize failed")
        except RuntimeError:
            import traceback; traceback.print_exc()
        print("quant size = 1010.63 MiB", file=sys.stderr)
        sys.exit(1)
        """,
    )
    outcome = run_peer("noisy", command, timeout_s=60)
    assert outcome.failure == "exit status 1: RuntimeError: quantize failed"


def test_a_missing_package_names_it_and_how_to_install(tmp_path: Path) -> None:
    command = _script(tmp_path, "import vlbatch_no_such_package\n")
    outcome = run_peer("absent", command, timeout_s=60, install_hint="pip install it")
    assert outcome.failure == "missing package vlbatch_no_such_package (pip install it)"


def test_a_peer_past_its_time_limit_is_stopped_and_says_so(tmp_path: Path) -> None:
    command = _script(tmp_path, "import time\ntime.sleep(60)\n")
    outcome = run_peer("slow", command, timeout_s=1)
    assert outcome.failure is not None and outcome.failure.startswith("timed out after 1 s")


def test_output_that_is_not_a_result_is_a_failure(tmp_path: Path) -> None:
    outcome = run_peer("chatty", _script(tmp_path, "print('done')\n"), timeout_s=60)
    assert outcome.failure == "printed no result (its last line of output is not a JSON object)"
    good = run_peer("good", _script(tmp_path, "print('warming up')\nprint('{\"tok_s\": 3.5}')\n"), timeout_s=60)
    assert good.ok and good.figures == {"tok_s": 3.5}


def test_a_signal_without_a_known_cause_is_still_named() -> None:
    assert failure_cause(-15, "") == "SIGTERM: ended by a signal"
    assert failure_cause(2, "") == "exit status 2: no message"


def test_the_llama_cpp_prompt_stays_within_a_small_vocabulary_and_is_unchanged_on_a_real_one() -> None:
    small = prompt_tokens(400, 1024) + [decode_token(i, 1024) for i in range(200)]
    assert min(small) >= 0 and max(small) < 1024 - len(SPECIAL_TOKENS)  # below the special tokens at the top
    assert prompt_tokens(3) == [1000, 1007, 1014]  # the ids of the published real-shape figures
    assert prompt_tokens(400, 151_674) == [1000 + (i * 7) % 5000 for i in range(400)]
    assert [decode_token(i) for i in range(3)] == [2000, 2001, 2002]


def test_the_gguf_vocabulary_is_the_tokenizer_s_own_with_its_special_tokens_at_their_ids(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, vocab_size=300)
    tokenizer = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types, merges, pre, specials = gguf_vocabulary(tmp_path, vocab_size=304)  # 4 rows past it, as real
    assert len(tokens) == len(types) == 304 and pre == "gpt-2"
    for added in tokenizer["added_tokens"]:
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == 3  # control
    assert {"<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>"} <= set(specials)
    assert tokens[300:] == ["[PAD300]", "[PAD301]", "[PAD302]", "[PAD303]"] and set(types[300:]) == {5}
    assert all(tokens[i] == t for t, i in tokenizer["model"]["vocab"].items())
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    with pytest.raises(ValueError, match="past the embedding"):
        gguf_vocabulary(tmp_path, vocab_size=200)


def _photos(per_hour: float, tiles: int) -> dict[str, object]:
    stages = {"preparation_s": 0.1, "vit_s": 1.0, "prefill_s": 0.5, "decode_s": 2.0}
    return {"photos_per_hour": per_hour, "seconds_per_photo": 3600 / per_hour, "tiles_per_photo": [tiles] * 2, **stages}


def test_the_photo_case_shows_both_sides_every_round_and_the_median_ratio() -> None:
    ours, theirs = [_photos(1000, 1), _photos(1100, 1), _photos(900, 1)], [_photos(500, 1)] * 3
    ratios = [2.0, 2.2, 1.8]
    case = {"photos": 2, "max_tiles": 1, "caption_tokens": 64, "weights": "int4", "vlbatch": ours, "mtmd": theirs}
    case |= {"ratios": ratios, "median_ratio": 2.0}
    outcome = PeerOutcome("mtmd", {**theirs[-1], "quant": "Q4_0", "cpu_variant": "zen4"})
    lines = photo_table(case, outcome)
    assert any(line.startswith("vlbatch int4 (worker)") and line.endswith("1000") for line in lines)
    assert any(line.startswith("llama.cpp mtmd Q4_0 (zen4)") and line.endswith("500") for line in lines)
    assert "round 2: vlbatch 1100 photos/h, llama.cpp mtmd 500 photos/h, x2.20" in lines
    assert lines[-1] == "vlbatch int4 / llama.cpp mtmd photos/h: median x2.00 (rounds from x1.80 to x2.20)"
    failed = photo_table({**case, "vlbatch": ours[:1], "mtmd": {"failed": "SIGILL"}}, PeerOutcome("mtmd", None, "x"))
    assert failed[-1].split() == ["llama.cpp", "mtmd", "FAILED", "x"]
    assert not any("median" in line for line in failed)


CASE_TOKENS = {"0 images": 128, "1 image": 400, "4 images": 1206, "video 8 frames": 2273}
SIGILL = "SIGILL: illegal instruction, the library was built for a CPU feature this machine lacks"


def _export(decode: list[float]) -> dict[str, object]:
    """An export's figures as bench_export reports them, reduced to what the decode tables read."""
    cases = {
        name: {"prompt_tokens": n, "decode_tok_s": speed, "prefill_ms": 1000.0, "ttft_ms": 2000.0}
        for (name, n), speed in zip(CASE_TOKENS.items(), decode, strict=True)
    }
    return {"cases": cases, "prefill_tok_s": 400.0, "vit_ms_per_tile": 1800.0}


def _bench_report() -> dict[str, Any]:
    return {
        "weights": ["int4+int8", "int4", "fp32"],
        "int4+int8": _export([28.0, 26.0, 22.0, 18.0]),
        "int4": _export([27.0, 25.0, 21.0, 17.0]),
        "fp32": _export([4.9, 4.7, 4.4, 4.0]),
    }


def _llama(decode: dict[int, float], last: float) -> dict[str, float]:
    """A quantization's figures as bench/peer_llamacpp.py prints them: per prompt length, then the last's again."""
    out = {f"prefill_{n}_tok_s": 80.0 + n / 100 for n in decode}
    out |= {f"decode_after_{n}_tok_s": speed for n, speed in decode.items()}
    out |= {f"decode_after_{n}_ms_per_token": 1e3 / speed for n, speed in decode.items()}
    return out | {"decode_tok_s": last, "decode_ms_per_token": 1e3 / last}


def _llama_outcome() -> PeerOutcome:
    q4 = _llama({128: 30.0, 400: 25.0, 1206: 20.0, 2273: 17.0}, last=17.0)
    q8 = _llama({128: 17.0, 400: 16.0, 1206: 14.0}, last=14.0)  # no run after the video's length
    return PeerOutcome(
        "llamacpp", {"cpu_variant": "zen4", "cpu_variant_scores": {"zen4": 1984}, "Q4_0": q4, "Q8_0": q8}
    )


def test_llama_cpp_is_given_the_prompt_length_of_every_case_once() -> None:
    report = _bench_report()
    assert case_prompt_tokens(report) == [128, 400, 1206, 2273]
    report["int4+int8"]["cases"]["4 images"]["prompt_tokens"] = 400
    assert case_prompt_tokens(report) == [128, 400, 2273]


def test_decode_at_each_case_context_sets_every_export_beside_llama_cpp_at_the_same_length() -> None:
    table = decode_at_contexts(_bench_report(), _llama_outcome(), decode_tokens=64)
    assert json.loads(json.dumps(table)) == table  # the JSON report's decode_at_contexts
    assert table["columns"] == [
        "vlbatch int4+int8",
        "vlbatch int4",
        "vlbatch fp32",
        "llama.cpp Q4_0",
        "llama.cpp Q8_0",
    ]
    assert table["ratio"] == {"of": "vlbatch int4", "over": "llama.cpp Q4_0"}
    assert table["decode_tokens"] == 64 and table["llamacpp_cpu_variant"] == "zen4"
    assert "llamacpp_failed" not in table
    assert [(r["case"], r["prompt_tokens"]) for r in table["rows"]] == list(CASE_TOKENS.items())
    video = table["rows"][3]
    assert video["decode_tok_s"] == {
        "vlbatch int4+int8": 18.0,
        "vlbatch int4": 17.0,
        "vlbatch fp32": 4.0,
        "llama.cpp Q4_0": 17.0,
        "llama.cpp Q8_0": None,  # llama.cpp did not decode after a prompt of this length
    }
    assert [r["ratio"] for r in table["rows"]] == pytest.approx([27 / 30, 25 / 25, 21 / 20, 17 / 17])

    lines = decode_context_table(table)
    assert (
        lines[0]
        == "decode tokens/s at each case's context (64 tokens decoded after each prompt; llama.cpp's CPU variant zen4)"
    )
    assert lines[1].split() == [
        "case", "tokens", "vlbatch", "int4+int8", "vlbatch", "int4", "vlbatch", "fp32",
        "llama.cpp", "Q4_0", "llama.cpp", "Q8_0", "int4", "/", "Q4_0",
    ]  # fmt: skip
    assert lines[2].split() == ["0", "images", "128", "28.00", "27.00", "4.90", "30.00", "17.00", "x0.90"]
    assert lines[5].split() == ["video", "8", "frames", "2273", "18.00", "17.00", "4.00", "17.00", "-", "x1.00"]
    assert len(lines) == 6


def test_decode_at_each_case_context_shows_a_failed_llama_cpp_and_no_ratio() -> None:
    table = decode_at_contexts(_bench_report(), PeerOutcome("llamacpp", None, SIGILL), decode_tokens=64)
    assert table["llamacpp_failed"] == SIGILL and table["ratio"] is None
    assert table["columns"] == ["vlbatch int4+int8", "vlbatch int4", "vlbatch fp32"]
    assert all(r["ratio"] is None for r in table["rows"])
    lines = decode_context_table(table)
    assert lines[1].split()[-1] == "llama.cpp" and "/" not in lines[1]
    assert lines[3].split() == ["1", "image", "400", "26.00", "25.00", "4.70", "FAILED"]
    assert lines[-1] == f"llama.cpp FAILED: {SIGILL}; no ratio against it"
    assert not any(re.search(r" x[0-9]", line) for line in lines)
    # without the llama.cpp peer: vlbatch's exports alone, nothing failed, no ratio
    alone = decode_at_contexts(_bench_report(), None, decode_tokens=64)
    assert alone["ratio"] is None and "llamacpp_failed" not in alone and len(alone["columns"]) == 3
    assert decode_context_table(alone)[2].split() == ["0", "images", "128", "28.00", "27.00", "4.90"]


def test_the_ratio_is_the_int4_export_s_else_int4_int8_s_else_the_first() -> None:
    assert ratio_export(["int4+int8", "int4", "fp32"]) == "int4"
    assert ratio_export(["fp32", "int4+int8"]) == "int4+int8"
    assert ratio_export(["fp32", "int8"]) == "fp32"
    report = {"weights": ["fp32"], "fp32": _export([4.9, 4.7, 4.4, 4.0])}
    table = decode_at_contexts(report, _llama_outcome(), decode_tokens=64)
    assert table["ratio"] == {"of": "vlbatch fp32", "over": "llama.cpp Q4_0"}
    assert decode_context_table(table)[1].split()[-3:] == ["fp32", "/", "Q4_0"]


def test_the_comparison_takes_llama_cpp_s_figures_at_the_one_image_prompt_s_length() -> None:
    lines = comparison(_bench_report(), {"llamacpp": _llama_outcome()})
    rows = [line.split() for line in lines]
    assert ["llama.cpp", "Q4_0", "(zen4)", "decode", "tok/s", "25.00"] in rows  # after 400 tokens, not 2273
    assert ["llama.cpp", "Q4_0", "(zen4)", "prefill", "tok/s", "84.00"] in rows
    assert "vlbatch int4+int8 vs llama.cpp Q4_0 (zen4): decode tok/s x1.04" in lines  # 26 / 25
    # the figures of a peer run without that length: its decode after its last prompt and its 400-token prefill
    old = {"Q4_0": {"prefill_128_tok_s": 50.0, "prefill_400_tok_s": 80.0, "decode_tok_s": 20.0}}
    lines = comparison({**_bench_report(), "weights": ["int4+int8"]}, {"llamacpp": PeerOutcome("llamacpp", old)})
    assert "vlbatch int4+int8 vs llama.cpp Q4_0: decode tok/s x1.30" in lines
    assert "vlbatch int4+int8 vs llama.cpp Q4_0: prefill tok/s x5.00" in lines


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_the_llama_cpp_peer_decodes_after_every_prompt_length(tmp_path: Path) -> None:
    hf = make_model(tmp_path / "hf", preset="tiny")
    command = [sys.executable, str(REPO / "bench" / "peer_llamacpp.py"), str(hf), str(tmp_path / "gguf")]
    command += ["--threads", "1", "--quants", "Q4_0", "--prompt-tokens", "64", "300", "64", "--decode-tokens", "3"]
    outcome = run_peer("llamacpp", command, timeout_s=300)
    assert outcome.figures is not None, outcome.failure
    q4 = outcome.figures["Q4_0"]
    assert set(q4) == {
        "load_s",
        *(f"prefill_{n}_tok_s" for n in (64, 300)),
        *(f"decode_after_{n}_{unit}" for n in (64, 300) for unit in ("tok_s", "ms_per_token")),
        "decode_tok_s",
        "decode_ms_per_token",
    }
    for n in (64, 300):
        assert q4[f"decode_after_{n}_tok_s"] * q4[f"decode_after_{n}_ms_per_token"] == pytest.approx(1e3)
    assert q4["decode_tok_s"] == q4["decode_after_300_tok_s"]  # the last length's, as before


@pytest.fixture(scope="module")
def crashing_llama_cpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama_cpp package that dies of SIGILL on import, as a build for a CPU feature this machine lacks does."""
    root = tmp_path_factory.mktemp("sigill")
    (root / "llama_cpp").mkdir()
    (root / "llama_cpp" / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    return root


@pytest.fixture(scope="module")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_models")


def _run_bench(models: Path, shim: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}
    env["PYTHONPATH"] = str(shim)
    command = [sys.executable, str(REPO / "bench" / "run_bench.py"), "--preset", "tiny", "--models", str(models)]
    command += ["--weights", "fp32", "--peers", "llamacpp", "mtmd", "--threads", "1", "--decode-tokens", "2"]
    command += ["--caption-tokens", "4", "--photo-tiles", "6", "1", "--photos", "2", "--photo-rounds", "1"]
    command += ["--json", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_run_bench_shows_a_crashed_peer_as_failed_and_exits_1(
    bench_models: Path, crashing_llama_cpp: Path, tmp_path: Path
) -> None:
    proc = _run_bench(bench_models, crashing_llama_cpp, tmp_path / "bench.json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    cause = "SIGILL: illegal instruction, the library was built for a CPU feature this machine lacks"
    failed_rows = [line for line in proc.stdout.splitlines() if line.startswith("llama.cpp") and "FAILED" in line]
    assert failed_rows and cause in failed_rows[0]
    assert not re.search(r"vs llama\.cpp.* x[0-9]", proc.stdout)  # no ratio against a side that gave no figures
    assert "vlbatch fp32 vs llama.cpp: no ratio, the peer FAILED" in proc.stdout
    assert "vlbatch fp32 vs llama.cpp mtmd: no ratio, the peer FAILED" in proc.stdout
    assert "FAILED peers: llamacpp, mtmd" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["peers"] == {"llamacpp": {"failed": cause}, "mtmd": {"failed": cause}}
    # the photo case's vlbatch side ran through the worker (max_tiles 1: one tile a photo, 4 tokens each)
    worker = report["photo_case"]["vlbatch"]
    assert len(worker) == 1 and worker[0]["tiles_per_photo"] == [1, 1] and worker[0]["output_tokens"] == 8
    assert report["photo_case"]["mtmd"] == {"failed": cause}
    # the planning cases ran, measured and computed
    assert set(report["fp32"]["photos"]) == {"photo max_tiles 6", "photo max_tiles 1"}
    assert report["fp32"]["photos"]["photo max_tiles 6"]["tiles"] == 7  # 4:3 at max 6: a 3x2 grid and the thumbnail
    assert report["fp32"]["photos"]["photo max_tiles 1"]["tiles"] == 1
    # decode at each case's context: the cases' own prompt lengths, llama.cpp FAILED and no ratio
    contexts = report["decode_at_contexts"]
    cases = report["fp32"]["cases"]
    assert [(r["case"], r["prompt_tokens"]) for r in contexts["rows"]] == [
        (name, r["prompt_tokens"]) for name, r in cases.items()
    ]
    assert [r["decode_tok_s"] for r in contexts["rows"]] == [
        {"vlbatch fp32": r["decode_tok_s"]} for r in cases.values()
    ]
    assert contexts["llamacpp_failed"] == cause and contexts["ratio"] is None
    assert f"llama.cpp FAILED: {cause}; no ratio against it" in proc.stdout
    assert set(report["ax650n_photos"]) == {"chunk_128", "chunk_128_2048"}
    assert report["ax650n_photos"]["chunk_128_2048"]["photo max_tiles 6"]["tiles"] == 7  # 1944 tokens fit 2176
    assert report["ax650n_photos"]["chunk_128"]["photo max_tiles 6"]["tiles"] == 1  # lowered to fit 1152


@pytest.mark.slow
def test_allow_missing_peers_still_shows_the_failure_but_exits_0(
    bench_models: Path, crashing_llama_cpp: Path, tmp_path: Path
) -> None:
    proc = _run_bench(bench_models, crashing_llama_cpp, tmp_path / "bench.json", "--allow-missing-peers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("llama.cpp") and "FAILED" in line for line in proc.stdout.splitlines())
