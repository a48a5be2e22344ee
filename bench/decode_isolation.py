"""What decoding media in a child process costs, per one-image answer at real shape, and what a bomb costs.

    python bench/decode_isolation.py [--model models/real-shape-int4] [--repeat 5]
    python bench/decode_isolation.py --bomb [--model models/tiny-onnx]

1. Prepares the same 12-Mpx photo (the first image of ../shared/media when present, else a synthetic 4032x3024
   JPEG) with the in-process decoder and with the isolated one (warm child), and answers it once at real
   shape (64 tokens), so the overhead is printed in ms and as a share of one answer.
2. --bomb instead runs `vlbatch run` on a job holding a 169 Mpx PNG and polls the peak RSS (VmHWM) of the worker
   and of its decoding child: with the default pixel limit, and with the limit raised so the bomb is decoded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import synthetic_image  # noqa: E402

from batch.infer.decode import IsolatedDecoder  # noqa: E402
from batch.infer.pipeline import Pipeline  # noqa: E402
from batch.infer.settings import GenerationSettings, MediaSettings  # noqa: E402


def photo(folder: Path) -> Path:
    shared = sorted((REPO.parent / "shared" / "media").glob("image_*.jpg"))
    if shared:
        return shared[0]
    path = folder / "photo.jpg"
    synthetic_image(4032, 3024, seed=1).save(path, quality=90)
    return path


def prepare_ms(pipeline: Pipeline, image: Path, repeat: int) -> list[float]:
    pipeline.prepare("Describe the image.", [image])  # warm: imports, the child's start
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        pipeline.prepare("Describe the image.", [image])
        times.append((time.perf_counter() - started) * 1e3)
    return times


def isolation(model: Path, repeat: int, threads: int, max_tiles: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = photo(Path(tmp))
        pipeline = Pipeline.open(model, threads=threads, media=MediaSettings(max_tiles=max_tiles))
        local = prepare_ms(pipeline, image, repeat)
        request = pipeline.prepare("Describe the image.", [image])
        started = time.perf_counter()
        pipeline.answer(request, GenerationSettings(max_new_tokens=64, ignore_eos=True))
        answer_ms = (time.perf_counter() - started) * 1e3 + statistics.median(local)
        pipeline.decoder = IsolatedDecoder()
        isolated = prepare_ms(pipeline, image, repeat)
        pipeline.close()
    extra = statistics.median(isolated) - statistics.median(local)
    tiles = request.pixels.shape[0]
    print(f"image {image.name}, {tiles} tiles; model {model.name}, {threads} threads")
    print(f"prepare in process   {statistics.median(local):8.1f} ms (median of {repeat})")
    print(f"prepare in the child {statistics.median(isolated):8.1f} ms")
    print(f"one-image answer     {answer_ms:8.0f} ms (prepare + ViT + prefill + 64 tokens)")
    print(f"isolation overhead   {extra:8.1f} ms = {100 * extra / answer_ms:.3f}% of one answer")


def peak_rss(config: Path, job: Path) -> tuple[float, float]:
    """Peak RSS in MB of the worker and of its decoding child during one `vlbatch run`."""
    script = Path(sys.executable).parent / "vlbatch"
    proc = subprocess.Popen([str(script), "--config", str(config), "submit", str(job)], stderr=subprocess.DEVNULL)
    proc.wait()
    proc = subprocess.Popen([str(script), "--config", str(config), "run"], stderr=subprocess.DEVNULL)
    worker = child = 0.0
    while proc.poll() is None:
        worker = max(worker, _hwm(proc.pid))
        for pid in _children(proc.pid):
            child = max(child, _hwm(pid))
        time.sleep(0.02)
    return worker, child


def _hwm(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def bomb(model: Path) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "media").mkdir()
        Image.new("RGB", (13000, 13000), (40, 90, 160)).save(root / "media" / "bomb.png")  # 169 Mpx
        synthetic_image(640, 480, seed=2).save(root / "media" / "photo.jpg")
        job = root / "bomb.yaml"
        job.write_text("prompt: Describe.\ninputs: [media/bomb.png, media/photo.jpg]\nmax_new_tokens: 8\n")
        model = model.resolve()
        for limit in (64_000_000, 200_000_000):
            config = root / "config.yaml"
            config.write_text(
                f"model:\n  dir: {model}\nmedia:\n  max_image_pixels: {limit}\n"
                "spool:\n  dir: jobs\n  media_roots: [media]\n"
            )
            worker, child = peak_rss(config, job)
            print(
                f"169 Mpx image, max_image_pixels {limit / 1e6:.0f} Mpx: worker {worker:.0f} MB, decoder {child:.0f} MB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "real-shape-int4")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tiles", type=int, default=12, help="tiles per image (12: InternVL's default)")
    parser.add_argument("--bomb", action="store_true", help="measure the peak RSS with a 169 Mpx image instead")
    args = parser.parse_args()
    if args.bomb:
        bomb(args.model)
    else:
        isolation(args.model, args.repeat, args.threads, args.max_tiles)


if __name__ == "__main__":
    main()
