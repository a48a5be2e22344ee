"""The int8 arithmetic of an export holds on a CPU without AVX-512 or VNNI, not only on the one that exported it.

onnxruntime picks its kernels from cpuid and has no setting to choose them, so the AVX2-only path runs here under
`qemu-x86_64 -cpu EPYC-Milan` (AMD Zen 3: AVX2, no AVX-512, no VNNI), Debian's qemu-user, which `.ci/run`
installs. There onnxruntime's u8 x s8 kernels sum pairs of products in 16 bits, which saturates; every session
asks for its exact u8 x u8 kernels on such CPUs (batch/model/ort_options.py).
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

import pytest

from batch.model.export.exporter import export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from avx2_path import cosine  # noqa: E402
from avx2_path import run as first_logits  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
        reason="needs an x86-64 machine with qemu-x86_64 (apt-get install qemu-user)",
    ),
]


def test_int8_vit_and_prompt_layers_give_the_same_logits_on_an_avx2_only_cpu(tiny_hf, tiny_onnx, tmp_path):
    int8 = tmp_path / "int8"
    export(tiny_hf, int8, vit_weights="int8", prefill_weights="int8")  # decode layers fp32: only int8 arithmetic
    fp32, _ = first_logits(tiny_onnx, tmp_path / "fp32.npy", None, timeout=600)
    native, _ = first_logits(int8, tmp_path / "native.npy", None, timeout=600)
    emulated, seen = first_logits(int8, tmp_path / "emulated.npy", "EPYC-Milan", timeout=600)
    assert "AVX2" in seen and "AVX512F" not in seen  # the emulated CPU is the AVX2-only one
    assert cosine(native, fp32) > 0.995
    # the u8 x s8 kernels gave 0.967 here (saturated pairs); the exact ones give the native figure
    assert cosine(emulated, fp32) > 0.995 and cosine(emulated, native) > 0.999
