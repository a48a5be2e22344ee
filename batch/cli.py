"""The `vlbatch` command line: ask, export, make-model, the spool's commands (submit, run, watch, estimate, ...).

Exit codes: 0 done, 1 a problem with the input or the model (message on stderr), 2 bad usage or a bad config
(one line naming the file or variable, the key and the problem; checked before any work starts), or a database
that a newer vlbatch migrated (upgrade this one), 3 `run` gave up on faults of the machine (full disk, locked
database), or the database needs migrations while workers of an older vlbatch still run, 4 the database is damaged.
`--config FILE` is accepted before the command or after it (`vlbatch results --config c.yaml`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from batch.config import Config, ConfigError, check_config, find_config, load_config
from batch.errors import VlbatchError
from batch.huge_pages import restart_with_huge_pages
from batch.infer.generate import GenerationResult
from batch.service import logs
from batch.service.spool.states import JobState

_log = logging.getLogger("batch.cli")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INFRASTRUCTURE, EXIT_CORRUPT_DATABASE = 0, 1, 2, 3, 4


_CONFIG_HELP = (
    "Config file (default: $VLBATCH_CONFIG, else ./config.yaml, else ~/.config/vlbatch/config.yaml, "
    "else /etc/vlbatch/config.yaml)."
)
_MODEL_COMMANDS = ("run", "watch", "ask", "estimate")  # they load or price a model: model.dir must be a folder
_NO_SPOOL_COMMANDS = ("ask",)  # the others use the spool or the database: its folders are checked
# they read the database: logged at info by default, so their first line (event=config) says which one
_DATABASE_COMMANDS = ("run", "watch", "status", "results", "gallery", "serve", "estimate", "submit", "db")


class _Group(click.Group):
    """Turns the errors vlbatch expects into one line on stderr and an exit code; gives every command --config."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _give_config_option(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VlbatchError as exc:
            click.echo(f"vlbatch: error: {exc}", err=True)
            ctx.exit(_exit_code(exc))


def _exit_code(exc: VlbatchError) -> int:
    """2 for a bad config (like bad usage) or a database of a newer vlbatch (upgrade this one: restarting cannot fix
    either), 3 for faults of the machine or workers of an older vlbatch still running (the next start migrates),
    4 for a damaged database, else 1."""
    from batch.service.faults import DatabaseCorrupt, InfrastructureError
    from batch.service.store.store import DatabaseTooNew, OlderWorkersRunning

    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    codes = {
        InfrastructureError: EXIT_INFRASTRUCTURE,
        DatabaseCorrupt: EXIT_CORRUPT_DATABASE,
        DatabaseTooNew: EXIT_USAGE,
        OlderWorkersRunning: EXIT_INFRASTRUCTURE,
    }
    return codes.get(type(exc), EXIT_FAILED)


def _give_config_option(cmd: click.Command) -> None:
    """--config on the command, and on each subcommand of a group (`vlbatch db size --config c.yaml`)."""
    if not any(param.name == "config_path" for param in cmd.params):
        cmd.params.append(_config_option_after_the_command())
    for sub in getattr(cmd, "commands", {}).values():
        _give_config_option(sub)


def _config_option_after_the_command() -> click.Option:
    """`vlbatch COMMAND --config FILE`: the same setting as `vlbatch --config FILE COMMAND`."""
    return click.Option(
        ["--config", "config_path"],
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember_config_path,
        help=_CONFIG_HELP,
    )


def _remember_config_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """Keeps a --config given after the command where the one before it goes: the root context's obj."""
    if value is None:
        return
    root = ctx.find_root()
    if root.obj is not None and Path(root.obj) != value:
        raise click.BadParameter(f"{value} differs from --config {root.obj} given before the command", ctx, param)
    root.obj = ctx.obj = value


def _config_path(ctx: click.Context) -> Path | None:
    """The --config file, given before or after the command (None: search for one)."""
    return ctx.find_root().obj


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help=_CONFIG_HELP)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log detail on stderr (default: info for run, watch and the commands that read the database: status, "
    "results, gallery, serve, estimate, submit, db; warning otherwise).",
)
@click.version_option(package_name="vlbatch")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None) -> None:
    """Answers and captions for photos and videos with InternVL3, on the Axera NPU or any CPU.

    Drop job files into the spool inbox and run `vlbatch watch` (or `vlbatch run` from cron); every
    answer and its timings land in SQLite. `vlbatch ask` answers one question directly.
    """
    if _started_as_command and ctx.invoked_subcommand in _MODEL_COMMANDS:
        restart_with_huge_pages()  # once, before any model or thread: see batch/huge_pages.py
    reads_database = ctx.invoked_subcommand in _DATABASE_COMMANDS
    logs.setup(log_level or ("info" if reads_database else "warning"))
    ctx.obj = config_path


_started_as_command = False  # set by command(): main() called in-process (tests, scripts) never restarts


def command() -> None:
    """The `vlbatch` command and `python -m batch`: main(), whose model commands may restart once for huge pages."""
    global _started_as_command
    _started_as_command = True
    main()


def _config(ctx: click.Context) -> Config:
    """The configuration in effect, checked before any work; its first log line says which file and database.

    A value that is wrong, or a folder that is not there (model, spool, database, media roots), is a ConfigError
    of one line and exit code 2, before a database, a spool folder or a model is touched.
    """
    config = load_config(find_config(_config_path(ctx)))
    command = ctx.info_name
    needs_spool = command not in _NO_SPOOL_COMMANDS
    check_config(_with_model_flags(ctx, config), needs_model=command in _MODEL_COMMANDS, needs_spool=needs_spool)
    source = str(config.source) if config.source else "(defaults)"
    logs.event(_log, "config", command=ctx.info_name, config=source, database=config.spool.database)
    return config


def _with_model_flags(ctx: click.Context, config: Config) -> Config:
    """The config with the command's --model and --hf-dir put over it (as they will be), for the checks."""
    flags = {"dir": ("model_dir", "--model"), "hf_dir": ("hf_dir", "--hf-dir")}
    given = {key: (ctx.params[name], flag) for key, (name, flag) in flags.items() if ctx.params.get(name) is not None}
    if not given:
        return config
    model = replace(config.model, **{key: value for key, (value, _) in given.items()})
    origins = {**config.origins, **{f"model.{key}": flag for key, (_, flag) in given.items()}}
    return replace(config, model=model, origins=origins)


def _provider_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """--providers A,B: the axengine provider names in order (None when not given)."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise click.BadParameter(f"expected NAME[,NAME], got {value!r}", ctx=ctx, param=param)
    return names


@main.command()
@click.option("-p", "--prompt", required=True, help="The question or instruction.")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Model folder (overrides config.yaml).")
@click.option("--hf-dir", type=click.Path(path_type=Path), help="HF folder (config, tokenizer) for axmodels.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "axengine", "openai"]),
    help="Runtime (default: model.backend); openai: the server at model.url.",
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option(
    "--providers", callback=_provider_list, metavar="NAME[,NAME]", help="axengine providers (model.providers)."
)
@click.option("--device-id", type=click.IntRange(min=0), help="axengine device, e.g. an AXCL card (model.device_id).")
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
    providers: tuple[str, ...] | None,
    device_id: int | None,
    as_json: bool,
    **overrides: Any,
) -> None:
    """Answer PROMPT about FILES (images, or one video; none for text only).

    The answer streams to stdout; the timing table goes to stderr.
    """
    from batch.infer.pipeline import Pipeline

    config = _config(ctx)
    model = config.model
    local = model_dir is not None  # --model: a local folder answers, whatever model.backend says
    model_dir = model_dir or model.dir
    if model_dir is None and model.backend != "openai":
        raise click.UsageError("no model: pass --model DIR or set model.dir in config.yaml")
    generation = replace(
        config.generation,
        **{k: v for k, v in overrides.items() if v is not None and k in config.generation.__dataclass_fields__},
    )
    media = replace(
        config.media,
        **{k: v for k, v in overrides.items() if v is not None and k in config.media.__dataclass_fields__},
    )
    if (backend or model.backend) == "openai" and not local:
        result = _ask_server(config, prompt, files, generation, media, as_json)
        return _print_answer(result, as_json)
    pipeline = Pipeline.open(
        model_dir,
        backend=backend or model.backend,
        hf_dir=hf_dir or model.hf_dir,
        threads=threads or model.threads,
        media=media,
        providers=model.providers if providers is None else providers,
        device_id=model.device_id if device_id is None else device_id,
        npu_io=model.npu_io,
    )
    try:
        stream = None if as_json else _echo_stream
        result = pipeline.ask(prompt, files, generation, on_text=stream)
    finally:
        pipeline.close()
    _print_answer(result, as_json)


def _ask_server(
    config: Config, prompt: str, files: tuple[Path, ...], generation: Any, media: Any, as_json: bool
) -> GenerationResult:
    """`vlbatch ask` with model.backend openai: the configured server answers, streamed as it comes."""
    from batch.errors import PassingFault
    from batch.infer.decode import InProcessDecoder
    from batch.service.worker.server import server_model

    if not config.model.url:
        raise click.UsageError("--backend openai needs model.url, the server's address (or VLBATCH_MODEL_URL)")
    server = server_model(config, InProcessDecoder())  # one question at the terminal, as the local `ask` decodes
    try:
        return server.answer(prompt, files, generation, media, on_text=None if as_json else _echo_stream)
    except PassingFault as exc:
        raise VlbatchError(str(exc)) from None


def _print_answer(result: GenerationResult, as_json: bool) -> None:
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
@click.option(
    "--weights",
    type=click.Choice(["fp32", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="Weight-only quantization of the language model (onnxruntime MatMulNBits).",
)
@click.option(
    "--vit-weights",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="int8: the ViT quantized (about 2.2x faster per tile), kept only if its features stay within cosine "
    "0.99 of fp32's on check tiles; the manifest records the cosine.",
)
@click.option(
    "--prefill-weights",
    type=click.Choice(["same", "int8"]),
    default="same",
    show_default=True,
    help="int8: prompts run through a second set of layers with int8 arithmetic (about 1.6x faster prefill "
    "than int4, 1.3 GB more memory for a 2B model), kept only if each layer's update of a check prompt stays "
    "within cosine 0.99 of fp32's; decode steps keep --weights.",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["fp16", "fp32"]),
    default="fp16",
    show_default=True,
    help="The K/V history's dtype: fp16 reads half the bytes per decode step at long contexts; fp32 keeps the "
    "logits within 1e-3 of transformers' (the oracle tests' export).",
)
def export(
    hf_dir: Path,
    out_dir: Path,
    kv_capacity: int,
    chunk: int,
    weights: str,
    vit_weights: str,
    prefill_weights: str,
    kv_cache: str,
) -> None:
    """Export a Hugging Face InternVL folder (HF_DIR) into ONNX graphs for the CPU runtime (OUT_DIR)."""
    from tqdm import tqdm

    from batch.model.checkpoint import read_config
    from batch.model.export.exporter import export as run_export

    _, _, spec = read_config(hf_dir)
    with tqdm(total=spec.text.num_layers + 3, unit="graph", desc="export", file=sys.stderr) as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            if step != "vit":
                bar.update()

        manifest = run_export(
            hf_dir,
            out_dir,
            kv_capacity=kv_capacity,
            chunk=chunk,
            progress=progress,
            weights=weights,
            vit_weights=vit_weights,
            prefill_weights=prefill_weights,
            kv_cache=kv_cache,
        )
        bar.update()
    click.echo(f"exported to {manifest.parent}")


@main.command("make-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "tiny-tied", "real-shape"]), default="tiny", show_default=True)
@click.option("--layout", type=click.Choice(["internvl", "transformers"]), default="internvl", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def make_model(out_dir: Path, preset: str, layout: str, seed: int) -> None:
    """Write a random-weight InternVL-architecture model folder (for tests, the demo and benchmarks)."""
    from batch.model.tinymodel import make_model as build

    build(out_dir, preset=preset, seed=seed, layout=layout)
    click.echo(f"wrote {preset} model to {out_dir}")


# the spool ---------------------------------------------------------------------------------------
def _worker_config(ctx: click.Context, **model_flags: Any) -> Config:
    """The configuration with the model settings given on the command line (None: not given) put over it."""
    config = _config(ctx)
    given = {key: value for key, value in model_flags.items() if value is not None}
    return replace(config, model=replace(config.model, **given)) if given else config


def _open_worker(
    ctx: click.Context,
    model_dir: Path | None,
    threads: int | None,
    force: bool,
    retry_failed: bool = False,
    providers: tuple[str, ...] | None = None,
    device_id: int | None = None,
    ray_address: str | None = None,
    wait_for_older_workers: bool = False,
) -> Any:
    """The worker over the configured spool and database; a database that cannot be opened is exit 3 or 4.

    With `ray_address` (the --ray flag: "" for the configured or automatic address), a Ray head instead.
    With `wait_for_older_workers` (watch), while the database needs migrations and workers of an older vlbatch
    still use it, it waits for them to stop (said once per change in who runs), then migrates and starts: a
    unit restarted after an upgrade while other units still run the old version waits for them, instead of
    exiting and being restarted over and over. A stop signal meanwhile ends it at once: it holds nothing yet.
    """
    from batch.service.store.store import OlderWorkersRunning

    config = _worker_config(ctx, dir=model_dir, threads=threads, providers=providers, device_id=device_id)
    said = None
    while True:
        try:
            return _open_worker_once(config, force, retry_failed, ray_address)
        except OlderWorkersRunning as exc:
            if not wait_for_older_workers:
                raise
            names = sorted(worker.name for worker in exc.workers)
            if names != said:
                logs.event(_log, "database.upgrade_waiting", logging.WARNING, reason=str(exc))
                said = names
            time.sleep(config.spool.heartbeat_seconds)


def _open_worker_once(config: Config, force: bool, retry_failed: bool, ray_address: str | None) -> Any:
    import sqlite3

    from batch.service.faults import DatabaseCorrupt, InfrastructureError, describe, is_corrupt_database, is_passing
    from batch.service.worker.worker import Worker

    try:
        if config.model.backend == "openai":
            if ray_address is not None:
                raise VlbatchError(
                    "--ray with model.backend openai: the model server answers several requests at once itself; "
                    "run one worker and set model.concurrency to the server's parallel slots"
                )
            from batch.service.worker.server import ServerWorker

            return ServerWorker.from_config(config, force=force, retry_failed=retry_failed)
        if ray_address is None:
            return Worker.from_config(config, force=force, retry_failed=retry_failed)
        try:
            from batch.service.cluster.worker import RayWorker
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] == "ray":
                raise VlbatchError("--ray needs the ray extra: pip install 'vlbatch[ray]'") from None
            raise
        address = ray_address or config.cluster.ray_address or "auto"
        return RayWorker.from_config(config, force=force, address=address, retry_failed=retry_failed)
    except (sqlite3.DatabaseError, OSError) as exc:
        if not (is_passing(exc, spool=True) or is_corrupt_database(exc)):  # the spool's and database's own files
            raise
        where = f"{config.spool.database}: cannot open the database ({describe(exc)})"
        if is_corrupt_database(exc):
            raise DatabaseCorrupt(f"{where}; restore it from a backup or move it aside") from exc
        raise InfrastructureError(where) from exc


_MODEL_OPTIONS = [  # which model, on which device: shared by the commands that run a worker and by estimate
    click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Model folder (overrides config.yaml)."),
    click.option(
        "--providers",
        callback=_provider_list,
        metavar="NAME[,NAME]",
        help="axengine execution providers, e.g. AXCLRTExecutionProvider (model.providers).",
    ),
    click.option(
        "--device-id", type=click.IntRange(min=0), help="axengine device: one AXCL card per worker (model.device_id)."
    ),
]
_FORCE_OPTION = click.option("--force", is_flag=True, help="Answer again even where the same answer is already stored.")

_WORKER_OPTIONS = [
    _MODEL_OPTIONS[0],
    click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime (model.threads)."),
    *_MODEL_OPTIONS[1:],
    _FORCE_OPTION,
    click.option(
        "--retry-failed",
        is_flag=True,
        help="Try again the files that failed before with the same content and settings (else they are skipped "
        "and not reported again).",
    ),
    click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="",
        default=None,
        metavar="[ADDRESS]",
        help="Send units to Ray actors on a cluster: ADDRESS (host:6379, auto, local) or cluster.ray_address.",
    ),
]


def _all(options: list[Any]) -> Any:
    """One decorator for several click options, in the order given (as --help lists them)."""

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_worker_options = _all(_WORKER_OPTIONS)


@main.command()
@_worker_options
@click.pass_context
def watch(ctx: click.Context, **options: Any) -> None:
    """Run jobs as they are dropped into the inbox, until SIGINT/SIGTERM.

    The first signal finishes the current job and exits 0; a second hands it back to the inbox at once.
    With every worker slot of the spool taken (spool.max_workers), it waits for one.
    """
    worker = _open_worker(ctx, wait_for_older_workers=True, **options)
    worker.install_signal_handlers()
    try:
        worker.start_heartbeat("watch")  # listed by status while it waits for a slot too
        if worker.take_slot(wait=True) and not worker.stop_requested:
            worker.watch()
    finally:
        worker.close()


@main.command()
@_worker_options
@click.pass_context
def run(ctx: click.Context, **options: Any) -> None:
    """Run every job in the inbox once, then one pass of every standing job, then exit (for cron).

    A standing job (a job file in the spool's standing/ folder) stays there and answers only its files that
    are new or changed since its last pass. Files that failed before with the same content and settings are
    not tried again (--retry-failed tries them).

    \b
    Exit codes (for cron: mail on anything but 0):
      0  every job finished (a job cancelled with `vlbatch cancel` too), or the only failures are files
         that failed the same way before (or every worker slot was taken: spool.max_workers, so an
         overlapping cron run leaves at once)
      1  a problem met for the first time: a file failing, a job failing or rejected
      2  bad usage or a bad config (nothing started), or a database a newer vlbatch migrated
      3  gave up on faults of the machine (full disk, locked database) after spool.give_up_seconds, or the
         database needs migrations and workers of an older vlbatch still run (it migrates once they stop)
      4  the database is damaged
    """
    worker = _open_worker(ctx, **options)
    worker.install_signal_handlers()
    try:
        outcomes = worker.drain() if worker.take_slot(wait=False) else []
    finally:
        worker.close()
    bad = [o for o in outcomes if o.state in (JobState.FAILED, JobState.REJECTED)]
    new = [o for o in bad if o.new_problems]
    done = sum(o.state == JobState.DONE for o in outcomes)
    cancelled = sum(o.state == JobState.CANCELLED for o in outcomes)  # an operator's choice: not a failure
    back = len(outcomes) - done - len(bad) - cancelled  # handed back to the inbox (stop signals), or taken over
    click.echo(
        f"{len(outcomes)} jobs: {done} done, {len(bad)} failed or rejected ({len(new)} with problems not met before)"
        + (f", {cancelled} cancelled" if cancelled else "")
        + (f", {back} handed back" if back else ""),
        err=True,
    )
    for outcome in bad:
        known = "" if outcome.new_problems else " (known: failed the same way before)"
        click.echo(f"  {outcome.job_id}: {outcome.state}{known}: {(outcome.reason or '').splitlines()[0]}", err=True)
    if new:
        ctx.exit(EXIT_FAILED)


@main.command()
@click.argument("job_files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_all(_MODEL_OPTIONS)
@click.option("--hf-dir", type=click.Path(path_type=Path), help="HF folder (config, tokenizer) for axmodels.")
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime (model.threads), as the worker's."
)
@_FORCE_OPTION
@click.option(
    "--calibrate",
    is_flag=True,
    help="Load the model and time it on this machine first (a synthetic tile and prompts: seconds to a minute), "
    "keep the figures for later estimates, and price the jobs with them.",
)
@click.option(
    "--rates",
    "rates_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Speed figures from a `bench/run_bench.py --json` report (what `make bench` writes to bench.json).",
)
@click.option(
    "--weights",
    type=click.Choice(["int4", "int8", "fp32"]),
    help="Which export's figures of the --rates report (default: the model folder's weights, else fp32).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: each job's figures, totals, rates.")
@click.pass_context
def estimate(
    ctx: click.Context,
    job_files: tuple[Path, ...],
    model_dir: Path | None,
    providers: tuple[str, ...] | None,
    device_id: int | None,
    hf_dir: Path | None,
    threads: int | None,
    force: bool,
    calibrate: bool,
    rates_file: Path | None,
    weights: str | None,
    as_json: bool,
) -> None:
    """How long JOB_FILES will take one worker, counted before they run.

    Each job is read as the worker will read it; its units are counted (already answered ones are reused and
    cost no model time; unreadable files and prompts too long are counted apart), images' sizes read from their
    headers, tiles and prompt tokens counted as the pipeline counts them. The time comes from --rates, else
    from this model's answers stored in the database, else from its calibration on this machine (--calibrate,
    kept in $XDG_CACHE_HOME/vlbatch/calibration, by default ~/.cache/vlbatch/calibration), else from the
    built-in figures, which hold only for InternVL3-2B's shape; the report says which, and whether they were
    measured or computed. With none of them it gives the counts without times and offers --calibrate (exit 0).
    Only --calibrate runs the model; the database is never written.

    \b
    Example:
      vlbatch estimate jobs/examples/*.yaml
      vlbatch estimate --calibrate jobs/examples/*.yaml
      vlbatch estimate --rates bench.json --weights int4 --json holiday.yaml
    """
    from batch.service.reports import estimate as planner

    if calibrate and rates_file is not None:
        raise click.UsageError("--calibrate and --rates are two sources of figures: give one")
    config = _worker_config(
        ctx, dir=model_dir, hf_dir=hf_dir, threads=threads, providers=providers, device_id=device_id
    )
    if config.model.backend == "openai" and model_dir is None:
        raise VlbatchError(
            "estimate prices a model's stages on this machine (ViT, prefill, decode), and a model server's speed "
            "is its own: run a few files through it and read their timings (`vlbatch results --last-run`), or "
            "pass --model to price a local model"
        )
    result = planner.estimate(
        config, job_files, force=force, rates_file=rates_file, weights=weights, calibrate_now=calibrate
    )
    if result.calibration_note:
        click.echo(f"vlbatch: {result.calibration_note}", err=True)
    for rejected in result.rejected:
        click.echo(f"vlbatch: error: {rejected}", err=True)
    if as_json:
        click.echo(json.dumps(planner.estimate_dict(result), indent=2, ensure_ascii=False))
    elif result.jobs:
        click.echo(planner.format_estimate(result))
    if result.rejected:
        ctx.exit(EXIT_FAILED)


@main.command()
@click.argument("job_files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--openai-batch",
    "batch_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An OpenAI Batch API request file (JSONL): one job per request line, named by its custom_id.",
)
@click.option(
    "--standing",
    is_flag=True,
    help="Make them standing jobs (spool/standing/): kept, run on every pass, answering only new or changed "
    "files; one of the same name is replaced.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print what was submitted as JSON: {"submitted": [{"source", "target", "standing"}, ...]} (also when a '
    "later file is refused: the ones before it were submitted).",
)
@click.option(
    "--priority",
    type=click.IntRange(-1000, 1000),
    help="Write this `priority` into each job (higher is taken first from the inbox; default: the file's, else 0).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    job_files: tuple[Path, ...],
    batch_file: Path | None,
    standing: bool,
    as_json: bool,
    priority: int | None,
) -> None:
    """Check JOB_FILES (or the requests of an OpenAI Batch file) and put them into the inbox atomically.

    Relative media paths are resolved against each job file's own folder. A batch file is checked whole
    first: a bad line is reported with its number and nothing is submitted.
    """
    from batch.service.spool.submit import submit_job

    if not job_files and batch_file is None:
        raise click.UsageError("give job files, or --openai-batch FILE")
    if standing and batch_file is not None:
        raise click.UsageError("--standing takes job files, not --openai-batch")
    config = _config(ctx)
    done: list[dict[str, Any]] = []
    try:
        for path in job_files:
            target = submit_job(path, config, standing=standing, priority=priority)
            done.append({"source": str(path), "target": str(target), "standing": standing})
            if not as_json:
                click.echo(f"submitted {path} as {'standing job ' if standing else ''}{target.name}")
        if batch_file is not None:
            from batch.service.spool.submit import submit_openai_batch

            targets = submit_openai_batch(batch_file, config, priority=priority)
            done += [{"source": str(batch_file), "target": str(target), "standing": False} for target in targets]
            if not as_json:
                click.echo(f"submitted {len(targets)} requests of {batch_file} as jobs")
    finally:
        if as_json:
            click.echo(json.dumps({"submitted": done}, indent=2, ensure_ascii=False))


@main.command()
@click.option("--job", "job_id", help="The history of this job id: every run with its state and counts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, job_id: str | None, as_json: bool) -> None:
    """The spool, running jobs (worker, progress, ETA), throughput and recent failures.

    Reads the database of the configuration in use and never creates one.
    """
    from batch.service.reports import reports

    config = _config(ctx)
    if job_id is not None:
        runs = reports.job_history(config, job_id)
        click.echo(json.dumps(runs, indent=2) if as_json else reports.format_history(runs), nl=as_json)
        return
    report = reports.status_report(config)
    click.echo(json.dumps(report, indent=2) if as_json else reports.format_status(report), nl=as_json)


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--since/--until: ISO 8601 (offsets allowed) or an age such as 2h or 3d, as a stored UTC time."""
    if value is None:
        return None
    from datetime import datetime, timezone

    from batch.service.store.timefilter import parse_when, to_utc_iso

    try:
        return to_utc_iso(parse_when(value, datetime.now(timezone.utc)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _stored_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--file: a path or glob as the database stores paths (the real absolute path, paths.encode_path)."""
    if value is None:
        return None
    import os

    from batch.service.store.paths import encode_path

    if not value.strip() or "\0" in value:
        raise click.BadParameter(f"{value!r} is not a path", ctx=ctx, param=param)
    real = os.path.realpath(value)
    if os.path.isdir(real):  # a folder: every file under it (its own name's glob characters taken literally)
        return "".join(f"[{c}]" if c in "*?[" else c for c in encode_path(real)) + "/*"
    return encode_path(real)


def _yes_or_any(ctx: click.Context, param: click.Parameter, value: bool) -> bool | None:
    """A flag that narrows (True) or leaves alone (None), as ResultFilter.failed takes it."""
    return True if value else None


_FILTER_OPTIONS = [  # ResultFilter's fields: which answers `results` and `gallery` show
    click.option(
        "--job",
        help="Only this job's answers, each with the job's own files (its latest run, unless --run, --last-run or "
        "--file say otherwise).",
    ),
    click.option(
        "--run",
        type=click.IntRange(min=1),
        help="Everything this run linked: answered, reused and failed files (and, of a standing job, files it found "
        "gone). Run ids: vlbatch status --job ID.",
    ),
    click.option(
        "--last-run",
        is_flag=True,
        help="Everything each job's latest run linked, reused answers included; of a standing job, what its latest "
        "pass changed (without it: the answer each of its files has now).",
    ),
    click.option(
        "--file",
        callback=_stored_path,
        metavar="PATH",
        help="Every answer for this file, from every run of every job (not only the latest), newest first. A path "
        "(relative to the current folder), a folder (every file under it) or a quoted glob ('/srv/photos/*.jpg'; "
        "* matches / too).",
    ),
    click.option(
        "--since",
        callback=_when,
        help="Answers made at or after this time (created_utc; a reused answer keeps the time it was made): "
        "ISO 8601 (2026-11-01, 2026-11-01T10:00+01:00; no offset = UTC) or an age (90s, 15m, 2h, 3d, 1w).",
    ),
    click.option("--until", callback=_when, help="Answers made before this time: the same forms as --since."),
    click.option("--tag", help="Only jobs with this tag: a value of a tag list or mapping key, or key=value."),
    click.option(
        "-s",
        "--search",
        metavar="WORDS",
        help="Answers or prompts holding every one of these words as written (a part of a word counts; ASCII "
        "letters in any case; n4.jpg, don't, C++, AND and text without spaces work).",
    ),
    click.option(
        "--fts",
        metavar="QUERY",
        help='A raw SQLite FTS5 query over answers and prompts: OR, NOT, NEAR(), prefix*, "phrases".',
    ),
    click.option(
        "--failed",
        is_flag=True,
        callback=_yes_or_any,
        help="Only the files that got no answer, with the reasons.",
    ),
]


def _checked_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """The filter options, refused when two of them contradict each other."""
    if filters.get("run") is not None and filters.get("last_run"):
        raise click.UsageError("--run and --last-run each name the run to show: give one of them")
    since, until = filters.get("since"), filters.get("until")
    if since is not None and until is not None and since >= until:
        raise click.UsageError(f"--since ({since}) is not before --until ({until}): no answer can match")
    return filters


_filter_options = _all(_FILTER_OPTIONS)


@main.command()
@_filter_options
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(min=0),
    help="At most this many rows; 0 = all. Default: 100 for the table (stderr says how many it left out), every "
    "matching row for json, jsonl, csv and openai-batch.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "jsonl", "csv", "openai-batch"]),
    help="table (default), json (one array), jsonl (one object a line), csv, or openai-batch: OpenAI Batch API "
    "output lines, one per answer, custom_id as docs/jobs.md's 'OpenAI Batch files' says.",
)
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@click.pass_context
def results(ctx: click.Context, fmt: str | None, as_json: bool, limit: int | None, **filters: Any) -> None:
    """Stored answers with their timings, newest first: each with the files of the job that owns it.

    Without --run, --last-run or --file: each job's latest run (of a standing job, the answer each of its files
    has now). Each row is one answer as a run linked it, the newest link first: id (the answer), job_id, run_id,
    link_id, media_paths (that job's own files), answer or error, timings, created_utc (when the answer was
    made), linked_utc (when the run linked it: later for a reused answer), reused (1: an earlier answer with the
    same file bytes, prompt, settings and model), change (gone: a standing job found the file gone). JSON formats
    give media_paths, media_sha256, settings and tags as values. Rows are written as they are read, so any
    number exports in little memory. Reads the database of the configuration in use and never creates one.

    \b
    Examples:
      vlbatch results --since 24h                      answers made in the last day
      vlbatch results --file photos/beach.jpg          every answer for one file
      vlbatch results --failed --last-run              what failed in each job's latest run, and why
      vlbatch results --format csv > answers.csv       every matching answer, however many
    """
    from batch.service.reports import reports
    from batch.service.store.result_filter import ResultFilter

    if as_json and fmt not in (None, "json"):
        raise click.UsageError(f"--json is --format json: it cannot go with --format {fmt}")
    fmt = "json" if as_json else fmt or "table"
    flt = ResultFilter(**_checked_filters(filters))
    config = _config(ctx)
    try:
        exported = reports.export_results(config, flt, fmt, reports.row_limit(fmt, limit), sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        _quiet_stdout()
        return
    if exported.matching is not None and exported.matching > exported.written:
        click.echo(
            f"vlbatch: the newest {exported.written} of {exported.matching} answers shown, "
            f"{exported.matching - exported.written} left out; -n 0 shows them all",
            err=True,
        )


def _quiet_stdout() -> None:
    """After a closed pipe: stdout goes nowhere, so that flushing it at exit raises nothing more."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer)
        pass
    finally:
        os.close(devnull)


_thumbnail_cache_option = click.option(
    "--thumbnail-cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for preview images (default: $XDG_CACHE_HOME/vlbatch/thumbnails).",
)


def _thumbnail_cache(value: Path | None) -> Path:
    from batch.service.web.thumbnails import default_cache_dir

    return value or default_cache_dir()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all networks).")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@_thumbnail_cache_option
@click.option(
    "--allow-sql-on-network",
    is_flag=True,
    help="Keep arbitrary SQL (the SQL box, ?sql=) on when --host is not a loopback address (off there by default).",
)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, thumbnail_cache: Path | None, allow_sql_on_network: bool) -> None:
    """Browse the results in a web browser: Datasette over the database, read-only, with a gallery and charts.

    Pages: / (tables, facets, full-text search, canned queries), /-/gallery (each file's preview beside its
    answer), /-/charts. Previews are made only for files recorded in the database that lie under
    spool.media_roots. Listening on any address but loopback turns arbitrary SQL off (canned queries stay)
    unless --allow-sql-on-network. Needs the serve extra: pip install 'vlbatch[serve]'.
    """
    app = _web_module("app")
    config = _config(ctx)
    sock = app.bind(host, port)
    loopback = app.is_loopback(sock)
    try:
        datasette = app.build(config, _thumbnail_cache(thumbnail_cache), allow_sql=loopback or allow_sql_on_network)
    except BaseException:
        sock.close()
        raise
    click.echo(f"vlbatch: serving {config.spool.database} read-only at {app.url_of(sock)} (Ctrl-C stops)", err=True)
    if not loopback:
        click.echo(
            f"vlbatch: arbitrary SQL is ON for anyone who can reach {app.url_of(sock)} (--allow-sql-on-network)"
            if allow_sql_on_network
            else "vlbatch: not a loopback address: arbitrary SQL is off (tables and canned queries only); "
            "--allow-sql-on-network turns it on",
            err=True,
        )
    app.serve(datasette, sock)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@_filter_options
@click.option("--per-page", default=100, show_default=True, type=click.IntRange(min=1, max=1000))
@_thumbnail_cache_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print what was written as JSON: results, pages, previews, index path."
)
@click.pass_context
def gallery(
    ctx: click.Context, out_dir: Path, per_page: int, thumbnail_cache: Path | None, as_json: bool, **filters: Any
) -> None:
    """Write the results as static web pages into OUT_DIR: index.html, more pages, previews beside them.

    The folder needs no server and no network (open index.html, or copy the folder anywhere); writing it again
    replaces the pages and keeps previews that are still current. A cron job can write the answers made by
    the night's run after each drain: vlbatch run; vlbatch gallery --since 24h /srv/www/last-night
    """
    static = _web_module("static_gallery")
    filters = _checked_filters(filters)
    written = static.write_gallery(_config(ctx), out_dir, filters, per_page, _thumbnail_cache(thumbnail_cache))
    if as_json:
        shown = {"index": str(written.index), "results": written.results, "pages": written.pages}
        click.echo(json.dumps({**shown, "previews": written.previews, "seconds": round(written.seconds, 3)}))
    else:
        click.echo(f"vlbatch: {written.results} results on {written.pages} pages: {written.index}", err=True)


def _web_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"batch.service.web.{name}")
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("datasette", "pygal", "uvicorn", "jinja2", "markupsafe"):
            raise VlbatchError(
                f"this command needs the serve extra ({exc.name} is missing): pip install 'vlbatch[serve]'"
            ) from None
        raise


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective configuration (file, environment and defaults combined) as YAML.

    Then checks the folders it names as the spool's commands do: a problem is one line on stderr and exit code 2.
    """
    import yaml

    path = find_config(_config_path(ctx))
    config = load_config(path)
    click.echo(f"# from {path or 'built-in defaults'}")
    click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
    check_config(config, needs_model=False)


from batch.cli_db import db  # noqa: E402 - the `db` group (backup, prune, vacuum, size) imports this module's helpers

main.add_command(db)

from batch.cli_control import CONTROL_COMMANDS  # noqa: E402 - cancel, pause, resume: they use this module's _config

for _command in CONTROL_COMMANDS:
    main.add_command(_command)
