"""The cost model behind estimates and the planning table: prefill by chunk, fitted from timings."""

from __future__ import annotations

import math

import pytest

from batch.service.reports.planning import (
    AX650N_PREFILL_MS,
    CPU_REFERENCE_RATES,
    Rates,
    ax650n_rates,
    bench_key,
    fit_prefill,
    rates_from_bench,
    rates_from_results,
    reference_rates,
)


def test_a_prompt_costs_each_chunk_plus_its_growing_history() -> None:
    rates = Rates(100.0, 50.0, 10.0, 20.0, "hand")
    # 3 chunks of 128: 50 + 60 + 70
    assert rates.prefill_ms(384) == pytest.approx(180.0)
    unit = rates.unit(tiles=7, prompt_tokens=384, output_tokens=64)
    assert (unit.vit_ms, unit.prefill_ms, unit.decode_ms) == (700.0, pytest.approx(180.0), 63 * 20.0)
    assert unit.vit_prefill_ms == pytest.approx(880.0) and unit.total_ms == pytest.approx(880.0 + 1260.0)


def test_the_npu_pays_whole_chunks_and_the_cpu_what_is_there() -> None:
    cpu = Rates(0, 64.0, 0, 0, "cpu")
    npu = Rates(0, 64.0, 0, 0, "npu", whole_chunks=True)
    assert cpu.prefill_ms(192) == pytest.approx(96.0)
    assert npu.prefill_ms(192) == pytest.approx(128.0)


def test_the_fit_recovers_known_rates_and_never_a_negative_growth() -> None:
    samples = [(x, 80.0 * x + 6.0 * x * (x - 1) / 2) for x in (1, 2.5, 7, 13)]
    first, growth = fit_prefill(samples)
    assert (first, growth) == (pytest.approx(80.0), pytest.approx(6.0))
    # one prompt length: the growth cannot be told apart, so it is 0 and the per-chunk cost carries it all
    assert fit_prefill([(3, 300.0), (3, 330.0)]) == (pytest.approx(105.0), 0.0)
    # timings that fall per chunk as prompts grow (a warm cache, say) do not make a negative growth
    first, growth = fit_prefill([(1, 100.0), (4, 300.0), (8, 500.0)])
    assert growth == 0.0 and first > 0
    with pytest.raises(ValueError):
        fit_prefill([])


def test_the_published_ax650n_timings_are_fitted_closely_and_marked_computed() -> None:
    rates = ax650n_rates()
    assert not rates.measured and "published" in rates.source
    for chunks, published in AX650N_PREFILL_MS.items():
        assert rates.prefill_ms(chunks * 128) == pytest.approx(published, rel=0.075)
    assert rates.unit(1, 384, 1).vit_prefill_ms == pytest.approx(364.87 + 862.29, rel=0.03)
    assert reference_rates("axengine", None) == rates


def test_rates_from_stored_answers() -> None:
    rows = [
        {"tiles": 1, "vit_ms": 400.0, "prompt_tokens": 384, "prefill_ms": 3 * 90.0, "output_tokens": 11,
         "decode_ms": 500.0},
        {"tiles": 7, "vit_ms": 2800.0, "prompt_tokens": 1920, "prefill_ms": 15 * 90.0, "output_tokens": 31,
         "decode_ms": 1500.0},
        {"tiles": 0, "vit_ms": 0.0, "prompt_tokens": 128, "prefill_ms": 90.0, "output_tokens": 1, "decode_ms": 0.0},
    ]  # fmt: skip
    rates = rates_from_results(rows, "this worker")
    assert rates is not None and rates.measured and rates.source == "this worker"
    assert rates.vit_ms_per_tile == pytest.approx(400.0)
    assert rates.decode_ms_per_token == pytest.approx(2000.0 / 40)
    assert rates.prefill_first_chunk_ms == pytest.approx(90.0) and rates.prefill_growth_ms == pytest.approx(0, abs=1e-6)
    assert rates_from_results([], "nothing") is None


def test_rates_from_a_benchmark_report() -> None:
    def case(tokens: int, ms: float, decode: float) -> dict[str, float]:
        return {"prompt_tokens": tokens, "prefill_ms": ms, "decode_ms_per_token": decode}

    x = [1, 3, 9, 17]
    report = {
        "machine": {"cpu": "Test CPU", "threads": 2},
        "model": "real-shape",
        "int4": {
            "vit_ms_per_tile": 4300.0,
            "cases": {f"c{n}": case(n * 128, 1000.0 * n + 40.0 * n * (n - 1) / 2, 45.0 + n) for n in x},
        },
    }
    rates = rates_from_bench(report, "int4")
    assert rates.vit_ms_per_tile == 4300.0 and "Test CPU" in rates.source and "int4" in rates.source
    assert (rates.prefill_first_chunk_ms, rates.prefill_growth_ms) == (pytest.approx(1000.0), pytest.approx(40.0))
    assert rates.decode_ms_per_token == pytest.approx(45.0 + (3 + 9) / 2)
    with pytest.raises(ValueError, match="fp32"):
        rates_from_bench(report, "fp32")
    assert math.isfinite(rates.unit(13, 3400, 64).total_ms)


def test_the_built_in_cpu_figures_are_measured_and_name_their_machine() -> None:
    for weights in ("int4", "fp32"):
        rates = reference_rates("onnxruntime", weights)
        assert rates is not None and rates.measured and "AMD EPYC" in rates.source and weights in rates.source
    assert reference_rates("onnxruntime", "int8") is None  # no run to take them from


def test_an_int8_vit_export_gets_the_int8_vit_figure() -> None:
    fp32_vit = reference_rates("onnxruntime", "int4")
    int8_vit = reference_rates("onnxruntime", "int4", "int8")
    assert fp32_vit is not None and int8_vit is not None
    assert int8_vit.vit_ms_per_tile < fp32_vit.vit_ms_per_tile / 2 and "int8 ViT" in int8_vit.source
    assert int8_vit.decode_ms_per_token == fp32_vit.decode_ms_per_token  # the language model is the same


def test_int8_prompt_layers_get_their_prefill_figures_and_both_int8_options_their_own_run() -> None:
    int4 = reference_rates("onnxruntime", "int4")
    prompts = reference_rates("onnxruntime", "int4", "fp32", "int8")
    both = reference_rates("onnxruntime", "int4", "int8", "int8")
    assert int4 is not None and prompts is not None and both is not None
    assert prompts.prefill_first_chunk_ms < int4.prefill_first_chunk_ms and "int8 prompt layers" in prompts.source
    assert prompts.vit_ms_per_tile == int4.vit_ms_per_tile and prompts.decode_ms_per_token == int4.decode_ms_per_token
    assert both == CPU_REFERENCE_RATES[bench_key("int4", "int8", "int8")] and "int4+int8" in both.source
    fp32_prompts = reference_rates("onnxruntime", "fp32", "fp32", "int8")  # int8 prompt layers beside fp32 ones
    assert fp32_prompts is not None and fp32_prompts.prefill_first_chunk_ms == prompts.prefill_first_chunk_ms
