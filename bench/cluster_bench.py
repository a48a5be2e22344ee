"""Cluster benchmark: one spool of one-image caption jobs drained by `vlbatch run` and by `vlbatch run --ray local`.

    python bench/cluster_bench.py [--model models/tiny-onnx] [--jobs 40] [--max-new-tokens 64]
                                  [--configs single-t1,single-t2,ray-1x1,ray-2x1] [--layout jobs|one-job]
                                  [--max-tiles 1] [--repeat 1] [--json FILE]

Every configuration drains its own fresh copy of the spool (its own inbox and database: nothing is reused) holding
the same N distinct synthetic 640x480 JPEGs, with `generation.ignore_eos: true` so every answer is exactly
max_new_tokens long. Configurations: `single-tT` is the single-process worker (`vlbatch run`, model.threads T);
`ray-AxC` is the Ray head (`vlbatch run --ray local`) with cluster.actors A and cluster.cpus_per_actor C (C threads
per actor; with one actor, cluster.in_flight_per_actor 1, so that nothing overlaps the per-unit cost measured;
per actor). single-t1 is the baseline and always runs. `--layout jobs` (the default) writes N one-image jobs;
`--layout one-job` writes one job of N images (mode each), so the head can keep units in flight on every actor.

Figures per run (wall clocks: the process's, the log's `ts`, the results' `created_utc` commit times):
- total s: the whole `vlbatch run` process, start-up and model load included.
- load s: process start to the model being ready (event model.loaded; for Ray the last cluster.actor_ready).
- steady ms/unit: the commit interval once loaded: commits after "ready", the first `conc` skipped
  (they started before the window), span / units; `conc` is how many units are answered at once (1 for the
  single worker; the number of actors for Ray, whose head runs several jobs at once).
  answers/hour (steady) = 3.6e6 / steady ms/unit.
- own ms: what the answerer itself measured per unit: ttft_ms + its share of decode_ms from the results (ttft_ms
  already holds preprocess_ms: media decode in the decoding child, tiling, tokenizing, then ViT and prefill; a
  decode step shared by answers decoded together counts once: decode_ms / decode_rows, batch/infer/timings.py).

Per-unit overhead (method): each answerer (the single worker, or an actor) spends `own ms` per unit; a server
that kept it busy with nothing else would commit one unit every own/conc ms. The rest,
    gap = conc x steady ms/unit - own ms,
is per-unit time spent outside the model: for the single worker, the head's per-job work (claim, parse, hash,
database writes, moving the job file); for Ray, the same plus Ray's own cost (task submission, argument and
result serialization, the object store, scheduling the actor's call, the head's ray.wait/get). The overhead Ray
adds per unit is gap(ray run) - gap(single worker at the same threads per answerer): the head's per-job work
cancels out, and so does any change of the model's own speed (that shows in own ms, reported beside it).
The end-to-end difference per unit, conc x steady ms/unit(ray) - steady ms/unit(single), is printed too; with
--repeat N the configurations run N times in turn and the overhead uses the medians. Use the jobs layout for the
Ray figure: there no path reads ahead (a job's next unit is decoded during the current one only within a job),
whereas in one job the single worker's read-ahead hides its preprocessing and an actor's does not, so the one-job
difference also holds that lost overlap.

The closing calculation (not a measurement) turns the published AX650N per-board figures into photos/hour for
1 and 4 boards, adding the Ray overhead measured here.

Exit status 1 when any run failed, answered a different number of files than it was given, or produced answers of
another length than max_new_tokens. A small shared machine gives numbers that mean little while other work runs:
before each run the script waits (up to --wait-quiet s) until no other Ray cluster (raylet, gcs_server) runs and
the machine is idle; during the run it records the load average, any other Ray cluster, and the CPU other processes
used (per process from /proc, in cores averaged over the run: "other"); a run with another cluster or more
than --max-other cores of other work is run again (up to --retries times), and the table shows what it ran under.
Each Ray run gets its own RAY_TMPDIR (and no RAY_ADDRESS), so that `--ray local` cannot join a cluster another
user's `ray start` announced in /tmp/ray/ray_current_cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import synthetic_image  # noqa: E402

PROMPT = "Write a one-sentence caption for this photo."
BASELINE = "single-t1"
CONFIGS = ("single-t1", "single-t2", "ray-1x1", "ray-2x1")
RAY_PROCESSES = ("raylet", "gcs_server")

# Published AX650N (w8a16) figures of the upstream InternVL3-2B.axera demo: ../shared/reference/axera.md,
# section "Published timings on AX650N". One image at max_tiles 1 = one 448 tile = 256 image tokens; with the
# chat template and a short question the prompt is under 384 tokens, i.e. three 128-token prefill chunks: the
# table's one-image row.
AX_VIT_MS_PER_TILE = 364.87  # ViT, one 448 tile
AX_PREFILL_MS_384 = 862.29  # prefill / TTFT of the one-image prompt (384 tokens, 3 chunks of 128)
AX_PREFILL_TOKENS = 384
AX_DECODE_TOK_S = 11.50  # decode, 86.97 ms/token (2.686 ms x 28 layers + 11.455 ms post)
AX_DECODE_MS_PER_TOKEN = 86.97


def vlbatch() -> list[str]:
    script = Path(sys.executable).parent / "vlbatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batch"]


# one run --------------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    ray: bool
    threads: int  # onnxruntime threads of the single worker, or of each actor (cpus_per_actor)
    actors: int = 0

    @classmethod
    def parse(cls, name: str) -> Spec:
        single = re.fullmatch(r"single-t(\d+)", name)
        if single:
            return cls(name, False, int(single.group(1)))
        ray = re.fullmatch(r"ray-(\d+)x(\d+)", name)
        if ray:
            return cls(name, True, int(ray.group(2)), int(ray.group(1)))
        raise argparse.ArgumentTypeError(f"unknown configuration {name!r}: single-tT or ray-AxC")


@dataclass
class Run:
    name: str
    rc: int
    jobs: int
    units: int
    answers: int = 0
    failed_units: int = 0
    jobs_done: int = 0
    tokens_ok: bool = True
    total_s: float = 0.0
    load_s: float | None = None
    drain_s: float | None = None
    conc: int = 1
    steady_units: int = 0
    steady_ms_per_unit: float | None = None
    answers_per_hour_steady: float | None = None
    answers_per_hour_total: float | None = None
    own_ms_mean: float | None = None  # every answer
    own_ms_steady: float | None = None  # the answers inside the steady-state window (the gap's)
    ttft_ms_mean: float | None = None
    ttft_ms_median: float | None = None
    decode_ms_mean: float | None = None
    decode_ms_median: float | None = None
    preprocess_ms_mean: float | None = None
    vit_ms_mean: float | None = None
    prefill_ms_mean: float | None = None
    prompt_tokens: int | None = None
    decode_tok_s: float | None = None
    gap_ms: float | None = None
    job_ms_median: float | None = None
    actor_answers: dict[str, int] = field(default_factory=dict)
    load_before: float = 0.0
    load_max: float = 0.0
    other_cores: float = 0.0  # CPU used by anything but this run, in cores averaged over the run
    foreign_ray: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repeat: int = 1

    @property
    def label(self) -> str:
        return self.name if self.repeat == 1 else f"{self.name}#{self.repeat}"


def write_spool(root: Path, images: list[Path], spec: Spec, args: argparse.Namespace) -> Path:
    """A fresh spool folder for one run: config.yaml and the inbox; returns the config path."""
    inbox = root / "jobs" / "inbox"
    inbox.mkdir(parents=True)
    media_root = images[0].parent
    lines = [
        "model:",
        f"  dir: {args.model.resolve()}",
        f"  threads: {spec.threads}",
        "generation:",
        f"  max_new_tokens: {args.max_new_tokens}",
        "  ignore_eos: true",
        "media:",
        f"  max_tiles: {args.max_tiles}",
        "spool:",
        "  dir: jobs",
        "  database: vlbatch.db",
        f"  media_roots: [{media_root}]",
        "  settle_seconds: 0",
    ]
    if spec.ray:
        lines += ["cluster:", f"  actors: {spec.actors}", f"  cpus_per_actor: {spec.threads}"]
        # one actor, one unit in flight: the head runs one job at a time and nothing overlaps Ray's own cost, which
        # the gap method below then isolates; with more actors, the default (2 per actor) for throughput
        lines += ["  in_flight_per_actor: 1"] if spec.actors == 1 else []
    config = root / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    if args.layout == "jobs":
        for i, image in enumerate(images):
            (inbox / f"job{i:04d}.yaml").write_text(f"prompt: {PROMPT}\ninputs: {image}\n")
    else:
        listed = "".join(f"  - {image}\n" for image in images)
        (inbox / "all.yaml").write_text(f"prompt: {PROMPT}\nmode: each\ninputs:\n{listed}")
    return config


def processes() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (name, parent pid, start time, CPU ticks used so far) of every process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            found[int(entry.name)] = (name, int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12]))
    return found


def ray_processes() -> dict[int, str]:
    """pid -> name of every Ray daemon process on this machine."""
    return {pid: p[0] for pid, p in processes().items() if p[0] in RAY_PROCESSES}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores together), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK  # less idle and iowait


TICK = os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, max_busy: float) -> bool:
    """Until no Ray cluster runs here and the machine is idle (True), or `limit_s` passed (False)."""
    deadline = time.monotonic() + limit_s
    said = False
    while True:
        others = ray_processes()
        busy = busy_cpu_s()
        time.sleep(2)
        cores = (busy_cpu_s() - busy) / 2
        if not others and cores <= max_busy:
            return True
        if time.monotonic() > deadline:
            return False
        if not said:
            what = f"another Ray cluster ({', '.join(sorted(set(others.values())))})" if others else "other work"
            print(f"  waiting: {what} runs here, {cores:.2f} cores busy", file=sys.stderr)
            said = True
        time.sleep(3)


class Monitor(threading.Thread):
    """While a run lasts: the 1-minute load average, the CPU time used by processes that are not the run's (ours:
    this script and every descendant of the run's process, Ray's daemons and actors included), and Ray daemons that
    are not ours. Processes are sampled every 0.5 s, so one that starts and ends between samples is missed."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.load_max = os.getloadavg()[0]
        self.foreign: set[str] = set()
        self.own = False  # a raylet of our own run's cluster was seen
        self.ours: set[tuple[int, int]] = set()  # (pid, start time): a pid may be reused
        self.first: dict[tuple[int, int], int] = {}  # CPU ticks when first seen (0 for one started during the run)
        self.last: dict[tuple[int, int], int] = {}
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        procs = processes()
        parents = {pid: p[1] for pid, p in procs.items()}
        for pid, (name, _, started, ticks) in procs.items():
            key = (pid, started)
            if key not in self.ours:
                chain, at = set(), pid
                while at > 1 and at not in chain:
                    chain.add(at)
                    at = parents.get(at, 1)
                if self.pid in chain or os.getpid() in chain:
                    self.ours.add(key)
            self.first.setdefault(key, ticks if initial else 0)
            self.last[key] = ticks
            if name in RAY_PROCESSES:
                if key in self.ours:
                    self.own = self.own or name == "raylet"
                else:
                    self.foreign.add(f"{name}:{pid}")

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.load_max = max(self.load_max, os.getloadavg()[0])
            self._sample()
        self._sample()

    def other_cpu_s(self) -> float:
        return sum(self.last[k] - self.first[k] for k in self.last if k not in self.ours) / TICK


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def read_log(path: Path) -> list[tuple[float, str, str]]:
    """(time, event, line) of each logfmt event line."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        ts = re.match(r"ts=(\S+)", line)
        ev = re.search(r" event=(\S+)", line)
        if ts and ev:
            events.append((_ts(ts.group(1)), ev.group(1), line))
    return events


def run_one(spec: Spec, images: list[Path], root: Path, args: argparse.Namespace) -> Run:
    config = write_spool(root, images, spec, args)
    log_path = root / "vlbatch.log"
    command = [*vlbatch(), "--config", str(config), "run"] + (["--ray", "local"] if spec.ray else [])
    # never join another cluster: ray.init(address=None) would take RAY_ADDRESS, or the address another user's
    # `ray start` left in $RAY_TMPDIR/ray/ray_current_cluster (/tmp/ray/...), so this run gets a Ray folder of its own
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(root.parent)
    jobs = len(images) if args.layout == "jobs" else 1
    if not wait_quiet(args.wait_quiet, args.max_other):
        print(
            f"  {spec.name}: the machine is still busy after {args.wait_quiet:g} s; measuring anyway", file=sys.stderr
        )
    load_before = os.getloadavg()[0]
    started_wall = time.time()
    started = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=root)
        monitor = Monitor(proc.pid)
        monitor.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait()
            rc = rc or 124
        monitor.stop.set()
        monitor.join()
    run = Run(spec.name, rc, jobs, len(images), total_s=time.perf_counter() - started)
    run.other_cores = monitor.other_cpu_s() / run.total_s
    run.load_before, run.load_max, run.foreign_ray = load_before, monitor.load_max, sorted(monitor.foreign)
    if spec.ray and not monitor.own:
        run.problems.append("no Ray cluster of its own was seen: it may have joined another one")
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        run.problems.append(f"exit status {rc}: " + " | ".join(tail))
    measure(run, spec, root, log_path, started_wall, args)
    return run


def _own_ms(row: sqlite3.Row) -> float:
    """An answer's own time: its TTFT (preparation, ViT, prefill) and its share of the decode steps it took part in."""
    return row["ttft_ms"] + row["decode_ms"] / max(row["decode_rows"] or 1.0, 1.0)


def measure(run: Run, spec: Spec, root: Path, log_path: Path, started_wall: float, args: argparse.Namespace) -> None:
    db_path = root / "vlbatch.db"
    if not db_path.exists():
        run.problems.append("no database written")
        return
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM results ORDER BY created_utc, id").fetchall()
    answered = [r for r in rows if r["error"] is None and r["answer"] is not None]
    run.answers = len(answered)
    run.failed_units = len(rows) - len(answered)
    run.jobs_done = db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    if spec.ray:
        run.actor_answers = {r["id"]: r["answers"] for r in db.execute("SELECT id, answers FROM actors ORDER BY id")}
    db.close()
    if run.answers != run.units:
        run.problems.append(f"{run.answers} answers for {run.units} files ({run.failed_units} failed)")
    if run.jobs_done != run.jobs:
        run.problems.append(f"{run.jobs_done} of {run.jobs} jobs done")
    lengths = {r["output_tokens"] for r in answered}
    if lengths and lengths != {args.max_new_tokens}:
        run.tokens_ok = False
        run.problems.append(f"answer lengths {sorted(lengths)}, not {args.max_new_tokens} (ignore_eos)")
    if not answered:
        return
    run.answers_per_hour_total = run.answers / run.total_s * 3600

    events = read_log(log_path)
    ready_events = [t for t, name, _ in events if name in ("model.loaded", "cluster.actor_ready")]
    commits = [_ts(r["created_utc"]) for r in answered]
    if spec.ray and len(ready_events) < spec.actors:
        run.problems.append(f"only {len(ready_events)} of {spec.actors} actors became ready")
    ready = max(ready_events) if ready_events else commits[0]
    run.load_s = ready - started_wall
    run.drain_s = commits[-1] - ready
    run.conc = spec.actors if spec.ray else 1  # the head runs one job per unit the pool holds
    window = [(t, r) for t, r in zip(commits, answered, strict=True) if t >= ready][run.conc - 1 :]
    if len(window) >= 2:
        span_ms = (window[-1][0] - window[0][0]) * 1e3
        run.steady_units = len(window) - 1
        run.steady_ms_per_unit = span_ms / run.steady_units
        run.answers_per_hour_steady = 3.6e6 / run.steady_ms_per_unit
        own = [_own_ms(r) for _, r in window[1:]]  # the units committed inside the span
        run.own_ms_steady = statistics.fmean(own)
        run.gap_ms = run.conc * run.steady_ms_per_unit - run.own_ms_steady
    else:
        run.problems.append("too few answers after the model loaded for a steady-state figure")

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in answered)

    run.own_ms_mean = statistics.fmean(_own_ms(r) for r in answered)
    run.ttft_ms_mean, run.ttft_ms_median = mean("ttft_ms"), statistics.median(r["ttft_ms"] for r in answered)
    run.decode_ms_mean, run.decode_ms_median = mean("decode_ms"), statistics.median(r["decode_ms"] for r in answered)
    run.preprocess_ms_mean = mean("preprocess_ms")
    run.vit_ms_mean, run.prefill_ms_mean = mean("vit_ms"), mean("prefill_ms")
    run.prompt_tokens = answered[0]["prompt_tokens"]
    run.decode_tok_s = mean("tokens_per_s")
    done = [re.search(r" ms=(\S+)", line) for _, name, line in events if name == "job.done"]
    job_ms = [float(m.group(1)) for m in done if m]
    if job_ms and args.layout == "jobs":
        run.job_ms_median = statistics.median(job_ms)


# overhead and the AX650N calculation -----------------------------------------------------------------------------
def _median(runs: list[Run], key: str) -> float | None:
    values = [getattr(run, key) for run in runs if getattr(run, key) is not None]
    return statistics.median(values) if values else None


def overheads(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """Per Ray configuration: Ray's added per-unit overhead against the single worker at the same threads per
    answerer (medians over the repeats)."""
    out = []
    for name, repeats in runs.items():
        spec = Spec.parse(name)
        base = runs.get(f"single-t{spec.threads}")
        if not spec.ray or base is None:
            continue
        gap, base_gap = _median(repeats, "gap_ms"), _median(base, "gap_ms")
        unit, base_unit = _median(repeats, "steady_ms_per_unit"), _median(base, "steady_ms_per_unit")
        if gap is None or base_gap is None or unit is None or base_unit is None:
            continue
        out.append(
            {
                "run": name,
                "against": base[0].name,
                "repeats": len(repeats),
                "gap_ms": gap,
                "baseline_gap_ms": base_gap,
                "ray_overhead_ms": gap - base_gap,
                "ray_overhead_each_ms": [r.gap_ms - base_gap for r in repeats if r.gap_ms is not None],
                "own_ms": _median(repeats, "own_ms_steady"),
                "baseline_own_ms": _median(base, "own_ms_steady"),
                "end_to_end_ms": repeats[0].conc * unit - base_unit,
            }
        )
    return out


def axera_estimate(ray_overhead_ms: float, tokens: int = 64) -> dict[str, Any]:
    """A calculation, not a measurement: one-image caption (max_tiles 1, `tokens` output tokens) per AX650N board.

    The first output token comes out of the prefill; the other tokens - 1 are decode steps (as in
    batch/infer/generate.py). The board's own CPU work before the ViT (JPEG decode, resize, normalize) is not
    in the published figures and is left out. The head keeps every board busy (one job per unit the pool holds),
    so 4 boards answer 4 photos at once.
    """
    decode_ms = (tokens - 1) * AX_DECODE_MS_PER_TOKEN
    board_ms = AX_VIT_MS_PER_TILE + AX_PREFILL_MS_384 + decode_ms
    unit_ms = board_ms + ray_overhead_ms
    per_board_h = 3.6e6 / unit_ms
    return {
        "vit_ms": AX_VIT_MS_PER_TILE,
        "prefill_ms": AX_PREFILL_MS_384,
        "prefill_tok_s": AX_PREFILL_TOKENS / AX_PREFILL_MS_384 * 1e3,
        "decode_steps": tokens - 1,
        "decode_ms": decode_ms,
        "board_ms": board_ms,
        "ray_overhead_ms": ray_overhead_ms,
        "unit_ms": unit_ms,
        "photos_per_hour_1_board": per_board_h,
        "photos_per_hour_4_boards": 4 * per_board_h,
    }


def print_axera(estimate: dict[str, Any], source: str, tokens: int) -> None:
    e = estimate
    print(f"\nAX650N cluster: CALCULATED from published per-board figures, not measured (one-image caption, {tokens}")
    print("tokens, max_tiles 1; constants from shared/reference/axera.md, 'Published timings on AX650N'):")
    print(f"  ViT, one 448 tile                       {e['vit_ms']:9.1f} ms")
    print(f"  prefill, 384-token one-image prompt     {e['prefill_ms']:9.1f} ms  ({e['prefill_tok_s']:.0f} tok/s)")
    print("    (256 image tokens + template, system prompt, question: 3 chunks of 128 with the real tokenizer; the")
    print("    test models here use a small tokenizer, so their prompt_tokens do not carry over)")
    steps = f"decode, {e['decode_steps']:.0f} steps x {AX_DECODE_MS_PER_TOKEN} ms"
    print(f"  {steps:<39} {e['decode_ms']:9.1f} ms  ({AX_DECODE_TOK_S} tok/s)")
    print(f"  = board time per photo                  {e['board_ms']:9.1f} ms")
    print(f"  + Ray overhead per unit (measured, {source}) {e['ray_overhead_ms']:7.1f} ms")
    print(f"  = per photo per board                   {e['unit_ms']:9.1f} ms")
    print(f"  1 board:  {e['photos_per_hour_1_board']:7.0f} photos/hour")
    print(f"  4 boards: {e['photos_per_hour_4_boards']:7.0f} photos/hour  (4 units in flight, one per board)")
    print("  Left out: the board CPU's own preprocessing (JPEG decode, resize) before the ViT, and model load.")


# report -----------------------------------------------------------------------------------------------------------
def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(runs: dict[str, list[Run]]) -> None:
    base_rate = _median(runs[BASELINE], "answers_per_hour_steady")
    every = [run for repeats in runs.values() for run in repeats]
    header = (
        f"{'config':<12} {'rc':>3} {'answers':>8} {'total s':>8} {'load s':>7} {'drain s':>8} {'ms/unit':>8} "
        f"{'ans/h':>8} {'ans/h tot':>9} {'x base':>6} {'ttft ms':>15} {'decode ms':>10} {'own ms':>8} "
        f"{'gap ms':>7} {'load avg':>9} {'other':>5}"
    )
    print(header)
    print("-" * len(header))
    for run in every:
        ratio = run.answers_per_hour_steady / base_rate if run.answers_per_hour_steady and base_rate else None
        ttft = f"{_f(run.ttft_ms_mean, '.1f')}/{_f(run.ttft_ms_median, '.1f')}"
        print(
            f"{run.label:<12} {run.rc:>3} {f'{run.answers}/{run.units}':>8} {run.total_s:8.1f} "
            f"{_f(run.load_s, '7.1f'):>7} {_f(run.drain_s, '8.1f'):>8} {_f(run.steady_ms_per_unit, '8.1f'):>8} "
            f"{_f(run.answers_per_hour_steady, '8.0f'):>8} {_f(run.answers_per_hour_total, '9.0f'):>9} "
            f"{_f(ratio, '6.2f'):>6} {ttft:>15} {_f(run.decode_ms_mean, '10.1f'):>10} "
            f"{_f(run.own_ms_steady, '8.1f'):>8} {_f(run.gap_ms, '7.1f'):>7} "
            f"{run.load_before:4.2f}/{run.load_max:4.2f} {run.other_cores:5.2f}"
        )
    print(
        "ms/unit, ans/h: steady state after the model loaded (commit interval); ans/h tot: over the whole process;\n"
        "x base: steady ans/h against single-t1 (median of its runs); ttft: mean/median of all answers;\n"
        "own: ttft+decode as the answerer measured it (steady window); gap: conc x ms/unit - own;\n"
        "load avg: 1-min before/max during the run; other: cores used by other processes during the run"
    )
    for run in every:
        extra = []
        if run.actor_answers:
            extra.append("answers per actor " + ", ".join(str(n) for n in run.actor_answers.values()))
        if run.job_ms_median is not None:
            extra.append(f"job.done median {run.job_ms_median:.1f} ms")
        if run.preprocess_ms_mean is not None:
            extra.append(
                f"preprocess {run.preprocess_ms_mean:.1f} / vit {run.vit_ms_mean:.1f} / prefill "
                f"{run.prefill_ms_mean:.1f} ms, {run.prompt_tokens} prompt tokens, {run.decode_tok_s:.1f} tok/s"
            )
        if run.foreign_ray:
            extra.append(f"ANOTHER RAY CLUSTER RAN DURING THIS RUN: {', '.join(run.foreign_ray)}")
        print(f"  {run.label}: conc {run.conc}; " + "; ".join(extra))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-onnx")
    parser.add_argument("--jobs", type=int, default=40, help="photos (one job each, or one job of all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list; {BASELINE} always runs")
    parser.add_argument("--layout", choices=("jobs", "one-job"), default="jobs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--wait-quiet", type=float, default=600, help="wait this long for another Ray cluster")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.15,
        help="most cores other processes may use during a run (averaged) before it is run again",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="run a configuration again when other work (a Ray cluster) ran with it"
    )
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration this many times, in turn")
    parser.add_argument("--axera-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    specs = [Spec.parse(n) for n in dict.fromkeys([BASELINE, *names])]
    if args.jobs < 3:
        parser.error("--jobs must be at least 3 for a steady-state figure")

    runs: dict[str, list[Run]] = {spec.name: [] for spec in specs}
    # a short folder: Ray's socket paths (at most 107 characters) lie under it
    with tempfile.TemporaryDirectory(prefix="cb-", dir="/tmp", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        media = work / "media"
        media.mkdir()
        images = []
        for i in range(args.jobs):
            images.append(media / f"{i:04d}.jpg")
            synthetic_image(640, 480, seed=1000 + i).save(images[-1], quality=90)
        print(
            f"{args.jobs} photos (640x480 JPEG, max_tiles {args.max_tiles}), {args.max_new_tokens} tokens each "
            f"(ignore_eos), layout {args.layout}, model {args.model.name}; {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}"
        )
        for repeat in range(1, args.repeat + 1):
            for spec in specs:
                for attempt in range(args.retries + 1):
                    print(f"running {spec.name} ({repeat}/{args.repeat}) ...", file=sys.stderr)
                    run = run_one(spec, images, work / f"{spec.name}-{repeat}-{attempt}", args)
                    run.repeat = repeat
                    print(f"  {run.label}: {run.total_s:.1f} s, rc {run.rc}", file=sys.stderr)
                    if not run.foreign_ray and run.other_cores <= args.max_other:
                        break
                    print(
                        f"  other work ran during it ({run.other_cores:.2f} cores; Ray: "
                        f"{', '.join(run.foreign_ray) or 'none'})",
                        file=sys.stderr,
                    )
                runs[spec.name].append(run)

    print()
    print_table(runs)
    over = overheads(runs)
    if over:
        print("\nRay's per-unit overhead: gap(ray) - gap(single worker, same threads per answerer), medians of runs")
        for o in over:
            each = ", ".join(f"{v:.1f}" for v in o["ray_overhead_each_ms"]) if o["repeats"] > 1 else ""
            print(
                f"  {o['run']:<8} vs {o['against']}: {o['ray_overhead_ms']:7.1f} ms per unit"
                + (f" (each run: {each})" if each else "")
                + "  (gaps "
                f"{o['gap_ms']:.1f} vs {o['baseline_gap_ms']:.1f} ms; own {o['own_ms']:.1f} vs "
                f"{o['baseline_own_ms']:.1f} ms; end to end {o['end_to_end_ms']:+.1f} ms per unit)"
            )
    if over and args.layout == "one-job":
        print(
            "  note: in one job the single worker decodes the next photo while the model runs (read-ahead: its\n"
            "  preprocess is off the critical path, hence a gap below zero); an actor does not, so these figures\n"
            "  include that lost overlap. --layout jobs (one unit per job: no read-ahead anywhere) isolates Ray."
        )
    # the Ray overhead for the calculation: only the 1-actor run isolates it (one unit in flight, nothing
    # overlapped); with two actors the jobs run side by side and the head's own work hides in the overlap
    chosen = next((o for o in over if o["run"] == "ray-1x1"), None)
    overhead, source = (chosen["ray_overhead_ms"], "ray-1x1") if chosen else (0.0, "not measured: add ray-1x1")
    estimate = axera_estimate(overhead, args.axera_tokens)
    print_axera(estimate, source, args.axera_tokens)

    problems = [f"{run.label}: {p}" for repeats in runs.values() for run in repeats for p in run.problems]
    if args.json:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "runs": [asdict(run) for repeats in runs.values() for run in repeats],
            "ray_overhead": over,
            "axera_estimate": estimate,
            "problems": problems,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
