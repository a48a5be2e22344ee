"""The `vlbatch` command line: ask, export, make-model.

Exit codes: 0 done, 1 a problem with the input, the model or the config (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from batch.config import Config, find_config, load_config
from batch.errors import VlbatchError
from batch.generate import GenerationResult

log = logging.getLogger("batch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _Group(click.Group):
    """Turns the errors vlbatch expects into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VlbatchError as exc:
            click.echo(f"vlbatch: error: {exc}", err=True)
            ctx.exit(EXIT_FAILED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $VLBATCH_CONFIG, else ./config.yaml if present).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
)
@click.version_option(package_name="vlbatch")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """Answers and captions for photos and videos with InternVL3, on the Axera NPU or any CPU."""
    _setup_logging(log_level)
    ctx.obj = config_path


def _config(ctx: click.Context) -> Config:
    return load_config(find_config(ctx.obj))


@main.command()
@click.option("-p", "--prompt", required=True, help="The question or instruction.")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Model folder (overrides config.yaml).")
@click.option("--hf-dir", type=click.Path(path_type=Path), help="HF folder (config, tokenizer) for axmodels.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "axengine"]), help="Runtime (default: auto).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Stop after this many tokens.")
@click.option("--temperature", type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample from the k best tokens (0 = off).")
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), help="Nucleus sampling (1 = off).")
@click.option("--seed", type=int, help="Seed for sampling; the same seed gives the same answer.")
@click.option("--max-tiles", type=click.IntRange(min=1), help="Most 448 tiles per image (lowered to fit).")
@click.option("--video-frames", type=click.IntRange(min=1), help="Frames sampled from a video.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of streaming text.")
@click.pass_context
def ask(
    ctx: click.Context,
    prompt: str,
    files: tuple[Path, ...],
    model_dir: Path | None,
    hf_dir: Path | None,
    backend: str | None,
    threads: int | None,
    as_json: bool,
    **overrides: Any,
) -> None:
    """Answer PROMPT about FILES (images, or one video; none for text only).

    The answer streams to stdout; the timing table goes to stderr.
    """
    from batch.pipeline import Pipeline

    config = _config(ctx)
    model = config.model
    model_dir = model_dir or model.dir
    if model_dir is None:
        raise click.UsageError("no model: pass --model DIR or set model.dir in config.yaml")
    generation = replace(
        config.generation,
        **{k: v for k, v in overrides.items() if v is not None and k in config.generation.__dataclass_fields__},
    )
    media = replace(
        config.media,
        **{k: v for k, v in overrides.items() if v is not None and k in config.media.__dataclass_fields__},
    )
    pipeline = Pipeline.open(
        model_dir,
        backend=backend or model.backend,
        hf_dir=hf_dir or model.hf_dir,
        threads=threads or model.threads,
        media=media,
    )
    try:
        stream = None if as_json else _echo_stream
        result = pipeline.ask(prompt, files, generation, on_text=stream)
    finally:
        pipeline.close()
    if as_json:
        click.echo(json.dumps(result_dict(result), ensure_ascii=False, indent=2))
    else:
        _echo_stream("\n")
        click.echo(timing_table(result), err=True)


def _echo_stream(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


def result_dict(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "image_tokens": result.image_tokens,
        "output_tokens": result.output_tokens,
        "tiles": result.tiles,
        "timings": result.timings.to_dict(),
    }


def timing_table(result: GenerationResult) -> str:
    t = result.timings
    rows = [
        ("preprocess", f"{t.preprocess_ms:10.1f} ms", f"{result.tiles} tiles"),
        ("vit", f"{t.vit_ms:10.1f} ms", f"{result.image_tokens} image tokens"),
        ("prefill", f"{t.prefill_ms:10.1f} ms", f"{result.prompt_tokens} prompt tokens"),
        ("ttft", f"{t.ttft_ms:10.1f} ms", "request start to first token"),
        ("decode", f"{t.decode_ms:10.1f} ms", f"{t.decode_tokens} tokens, {t.tokens_per_s:.2f} tok/s"),
    ]
    lines = [f"{'stage':<10} {'time':>13}  detail", "-" * 50]
    lines += [f"{name:<10} {value:>13}  {detail}" for name, value, detail in rows]
    lines.append(f"finish: {result.finish_reason}, {result.output_tokens} output tokens")
    return "\n".join(lines)


@main.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kv-capacity", default=4096, show_default=True, type=click.IntRange(min=2), help="Positions held.")
@click.option("--chunk", default=128, show_default=True, type=click.IntRange(min=1), help="Prefill chunk length.")
def export(hf_dir: Path, out_dir: Path, kv_capacity: int, chunk: int) -> None:
    """Export a Hugging Face InternVL folder (HF_DIR) into ONNX graphs for the CPU runtime (OUT_DIR)."""
    from tqdm import tqdm

    from batch.checkpoint import read_config
    from batch.export.exporter import export as run_export

    _, _, spec = read_config(hf_dir)
    with tqdm(total=spec.text.num_layers + 3, unit="graph", desc="export", file=sys.stderr) as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            if step != "vit":
                bar.update()

        manifest = run_export(hf_dir, out_dir, kv_capacity=kv_capacity, chunk=chunk, progress=progress)
        bar.update()
    click.echo(f"exported to {manifest.parent}")


@main.command("make-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "real-shape"]), default="tiny", show_default=True)
@click.option("--layout", type=click.Choice(["internvl", "transformers"]), default="internvl", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def make_model(out_dir: Path, preset: str, layout: str, seed: int) -> None:
    """Write a random-weight InternVL-architecture model folder (for tests, the demo and benchmarks)."""
    from batch.tinymodel import make_model as build

    build(out_dir, preset=preset, seed=seed, layout=layout)
    click.echo(f"wrote {preset} model to {out_dir}")
