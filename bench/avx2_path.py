"""onnxruntime's AVX2-only kernels on an AVX-512 machine: the same first-token logits, checked under emulation.

    python bench/avx2_path.py MODEL_DIR [--reference FP32_EXPORT] [--cpu EPYC-Milan]

onnxruntime chooses its kernels (MLAS) from the CPU's cpuid when it loads and has no setting to choose them, so
a CPU without AVX-512 runs code that an AVX-512 machine never runs: int8 dot products without VNNI, which can
saturate (u8 x s8 pairs summed in 16 bits), and other int4 kernels. This script runs one prompt (a fixed photo
and question) through MODEL_DIR natively and under `qemu-x86_64 -cpu EPYC-Milan` (Debian's qemu-user; AMD Zen 3:
AVX2 and FMA, no AVX-512, no VNNI), shows the SIMD features each run saw, and prints the cosine of the two
first-token logits, and of each against an fp32 export run natively (--reference). Emulation is 20-100x slower:
use the tiny model, or a real-shape export with patience. Times under emulation mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Describe this photo."


def logits(model_dir: Path, out: Path) -> None:
    """The first-token logits for the fixed prompt, and the SIMD features this process's CPU reports."""
    sys.path.insert(0, str(REPO / "tests"))
    from numpy._core._multiarray_umath import __cpu_features__ as features
    from synthetic import synthetic_image

    from batch.infer.generate import Timings
    from batch.infer.pipeline import Pipeline
    from batch.infer.settings import GenerationSettings

    image = out.with_suffix(".png")
    synthetic_image(640, 480, seed=11).save(image)
    pipeline = Pipeline.open(model_dir, threads=2)
    request = pipeline.prepare(QUESTION, [image])
    step = next(iter(pipeline.steps(request, GenerationSettings(max_new_tokens=1), Timings())))
    pipeline.close()
    np.save(out, step.logits)
    seen = [name for name in ("AVX2", "FMA3", "AVX512F", "AVX512_ICL", "AVX512VNNI", "AVXVNNI") if features.get(name)]
    out.with_suffix(".json").write_text(json.dumps(seen))


def run(model_dir: Path, out: Path, emulate: str | None, timeout: float = 3600) -> tuple[np.ndarray, list[str]]:
    """The first-token logits of `model_dir` from a child process (under `qemu-x86_64 -cpu EMULATE` if given),
    and the SIMD features the child's CPU reported."""
    command = [sys.executable, __file__, "--logits-to", str(out), str(model_dir)]
    if emulate:
        command = ["qemu-x86_64", "-cpu", emulate, *command]
    subprocess.run(command, check=True, cwd=REPO, timeout=timeout)
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--reference", type=Path, help="an fp32 export of the same model, run natively")
    parser.add_argument("--cpu", default="EPYC-Milan", help="qemu's CPU model (default: EPYC-Milan, AVX2 only)")
    parser.add_argument("--logits-to", type=Path, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.logits_to:
        logits(args.model_dir, args.logits_to)
        return 0
    if shutil.which("qemu-x86_64") is None:
        sys.exit("qemu-x86_64 is missing: apt-get install qemu-user")
    with tempfile.TemporaryDirectory() as tmp:
        native, native_features = run(args.model_dir, Path(tmp) / "native.npy", None)
        emulated, emulated_features = run(args.model_dir, Path(tmp) / "emulated.npy", args.cpu)
        reference = run(args.reference, Path(tmp) / "reference.npy", None)[0] if args.reference else None
    print(f"model {args.model_dir}")
    print(f"native:          {' '.join(native_features)}")
    print(f"qemu -cpu {args.cpu}: {' '.join(emulated_features)}")
    print(
        f"native vs emulated logits: cosine {cosine(native, emulated):.6f}, argmax {native.argmax()} / "
        f"{emulated.argmax()}"
    )
    if reference is not None:
        print(
            f"against fp32 ({args.reference}): native {cosine(native, reference):.4f}, "
            f"emulated {cosine(emulated, reference):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
