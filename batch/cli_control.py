"""The operator's commands: `vlbatch cancel`, `vlbatch pause` and `vlbatch resume` (see
batch/service/worker/control.py).

Registered on the `vlbatch` group at the end of batch/cli.py; each reads the configuration as every command does.
"""

from __future__ import annotations

import json
from typing import Any

import click

from batch.errors import VlbatchError


def _config(ctx: click.Context) -> Any:
    from batch.cli import _config as checked_config  # the group's own check of the config (exit 2 when bad)

    return checked_config(ctx)


@click.command()
@click.argument("job_ids", metavar="JOB [JOB...]", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print what was done with each job as JSON.")
@click.pass_context
def cancel(ctx: click.Context, job_ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel jobs by id (or by their file's name in the inbox).

    A queued job moves to the spool's cancelled/ folder at once, with a reason file and a cancelled run. A
    running job is ended by its worker before its next file, or within half a second of a long answer, which
    is then dropped; the answers already recorded stay, and its file moves to cancelled/. A standing job's
    current pass ends cancelled; the standing job stays (remove its file to stop it for good). Exit 1 when a
    job is unknown or already finished.
    """
    from batch.service.worker.control import cancel_jobs

    done = cancel_jobs(_config(ctx), list(job_ids))
    if as_json:
        click.echo(json.dumps(done, indent=2, ensure_ascii=False))
    for item in done:
        if not item["ok"]:
            click.echo(f"vlbatch: error: {item['message']}", err=True)
        elif not as_json:
            click.echo(f"{item['action']} {item['job']}: {item['message']}")
    if not all(item["ok"] for item in done):
        ctx.exit(1)


_WORKERS = click.argument("workers", metavar="[WORKER...]", nargs=-1)


@click.command()
@_WORKERS
@click.option("--wait", is_flag=True, help="Wait until the workers say they are paused (each ends its current file).")
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="With --wait: give up (exit 1) after this many seconds.",
)
@click.pass_context
def pause(ctx: click.Context, workers: tuple[str, ...], wait: bool, timeout: float) -> None:
    """Pause workers (host:pid, as `vlbatch status` lists them; none named: every live worker of this database).

    Each takes the request at its next heartbeat (spool.heartbeat_seconds), finishes the file it is answering
    and takes nothing new (no job, no file, no standing pass) until `vlbatch resume`; it keeps its model loaded
    and its job's claim, so no other worker takes that job over. A stop signal to a paused worker hands its job
    back to the inbox and ends it.
    """
    from batch.service.worker.control import PAUSE, ask_workers, wait_until_paused

    config = _config(ctx)
    asked = ask_workers(config, PAUSE, list(workers))
    _echo_asked(PAUSE, asked)
    if not wait:
        return
    late = wait_until_paused(config, [item["worker"] for item in asked], timeout)
    if late:
        raise VlbatchError(f"not paused after {timeout:g} s: {', '.join(late)}")
    click.echo(f"paused: {', '.join(item['worker'] for item in asked)}")


@click.command()
@_WORKERS
@click.pass_context
def resume(ctx: click.Context, workers: tuple[str, ...]) -> None:
    """Resume paused workers (host:pid; none named: every live worker of this database).

    Each takes the request at its next heartbeat and goes on where it stopped, with the model it kept loaded.
    """
    from batch.service.worker.control import RESUME, ask_workers

    _echo_asked(RESUME, ask_workers(_config(ctx), RESUME, list(workers)))


def _echo_asked(request: str, asked: list[dict[str, Any]]) -> None:
    for item in asked:
        doing = f", on {item['job']}" if item["job"] else ""
        click.echo(f"asked {item['worker']} ({item['command']}, {item['state']}{doing}) to {request}")


CONTROL_COMMANDS = (cancel, pause, resume)
