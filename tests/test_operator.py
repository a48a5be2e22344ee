"""The operator's view: which config and database a command uses, status with progress and run history, result
filters, per-answer log lines, and read-only commands that never create a database."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv

from batch.cli import main
from batch.service.reports.reports import status_report
from batch.service.store.store import Store


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    return e


def cli(env: SpoolEnv | None, *args: str, code: int = 0):
    prefix = ["--config", str(env.config_path)] if env else []
    result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


@pytest.fixture
def answered(env: SpoolEnv) -> SpoolEnv:
    """Two jobs answered by `vlbatch run`: one tagged, one not."""
    env.image("q/cat.png", 3)
    env.image("q/dog.png", 4)
    env.drop("pets.yaml", "prompt: Caption.\ninputs: ../../media/q/\ntags: {project: pets, year: 2026}\n")
    env.drop("plain.yaml", "prompt: Other.\ninputs: ../../media/q/cat.png\ntags: [misc]\n")
    run = cli(env, "run")
    env.run_log = run.stderr
    return env


def test_read_only_commands_never_create_a_database(tmp_path: Path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for command in (["status"], ["results"], ["status", "--json"]):
        result = cli(None, *command, code=1)
        assert "no database at" in result.stderr and "vlbatch.db" in result.stderr and "defaults" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_every_command_logs_its_config_and_database_first(answered: SpoolEnv):
    first = answered.run_log.splitlines()[0]
    assert "event=config" in first and f"config={answered.config_path}" in first
    assert f"database={answered.db_path}" in first


def test_one_log_line_per_answer(answered: SpoolEnv):
    lines = [line for line in answered.run_log.splitlines() if "event=answer.done" in line]
    assert len(lines) == 3
    pattern = r"job=\S+ file=\S+\.png node=\S+ ttft_ms=[\d.]+ tokens=\d+ tok_s=[\d.]+"
    assert all(re.search(pattern, line) for line in lines)


def test_status_shows_each_running_job_with_progress_and_eta(answered: SpoolEnv):
    store = Store(answered.db_path)
    run_id, _ = store.start_job("long", {"source": "long.yaml", "claim": "c--long.yaml", "media_count": 4}, "host:42")
    store.db["job_results"].insert_all(
        {"job_id": "long", "run_id": run_id, "result_id": 1, "reused": 1, "media_paths": f'["/m/{i}.png"]'}
        for i in range(3)
    )
    started = datetime.fromisoformat(store.job("long")["started_utc"])
    beat = (started + timedelta(seconds=28)).isoformat(timespec="milliseconds")
    store.db["workers"].insert(  # its worker beat 2 s ago: it is alive and on the job
        {"id": "host:42", "command": "run", "state": "busy", "job_id": "long", "heartbeat_seconds": 5.0}
        | {"started_utc": beat, "heartbeat_utc": beat}
    )
    store.close()
    answered.drop("waiting.yaml", "prompt: Later.\ninputs: ../../media/q/cat.png\n")
    report = status_report(answered.config(), now=started + timedelta(seconds=30))
    (running,) = report["running"]
    assert (running["job"], running["worker"], running["done"], running["total"]) == ("long", "host:42", 3, 4)
    assert running["state"] == "running" and running["elapsed_s"] == 30.0 and running["eta_s"] == 10.0
    assert report["queue"] == 1 and report["config"] == str(answered.config_path)
    assert report["throughput"]["1h"]["answers"] == 3 and report["throughput"]["1h"]["answers_per_hour"] == 3.0
    text = cli(answered, "status").stdout
    assert "running long (run" in text and "3/4 answered" in text and "host:42" in text
    assert json.loads(cli(answered, "status", "--json").stdout)["running"][0]["total"] == 4


def test_status_job_shows_every_run_of_a_job(answered: SpoolEnv):
    answered.drop("plain.yaml", "prompt: Other.\ninputs: ../../media/q/cat.png\ntags: [misc]\n")
    cli(answered, "run")
    runs = json.loads(cli(answered, "status", "--job", "plain", "--json").stdout)
    assert [r["state"] for r in runs] == ["done", "done"] and runs[0]["id"] > runs[1]["id"]
    assert (runs[0]["answered"], runs[0]["reused"]) == (0, 1)  # the second run reused the first one's answer
    assert cli(answered, "status", "--job", "plain").stdout.count("run ") == 2
    assert "no job with id" in cli(answered, "status", "--job", "nope", code=1).stderr
    run_rows = json.loads(cli(answered, "results", "--run", str(runs[1]["id"]), "--format", "json").stdout)
    assert len(run_rows) == 1 and run_rows[0]["run_id"] == runs[1]["id"]


def test_result_filters(answered: SpoolEnv):
    def ids(*args: str) -> list[str]:
        return [r["job_id"] for r in json.loads(cli(answered, "results", "--format", "json", *args).stdout)]

    assert sorted(ids()) == ["pets", "pets", "plain"]
    assert ids("--tag", "project=pets") == ["pets", "pets"]
    assert ids("--tag", "project=cats") == []
    assert ids("--tag", "misc") == ["plain"] and ids("--tag", "year=2026") == ["pets", "pets"]
    assert len(ids("-n", "1")) == 1
    assert len(ids("--since", "2h")) == 3 and ids("--until", "2h") == []
    # an offset is a real instant: one hour ahead of UTC, the rows just written are an hour "earlier"
    local = (datetime.now(timezone.utc) + timedelta(hours=1, minutes=-5)).strftime("%Y-%m-%dT%H:%M+01:00")
    assert len(ids("--since", local)) == 3
    for bad in ("foo", "2h30", "2026-13-01"):
        result = CliRunner().invoke(main, ["--config", str(answered.config_path), "results", "--since", bad])
        assert result.exit_code == 2 and "since" in result.stderr


def test_json_results_carry_nested_values_not_strings(answered: SpoolEnv):
    rows = json.loads(cli(answered, "results", "--format", "json", "--job", "pets").stdout)
    assert rows[0]["tags"] == {"project": "pets", "year": 2026}
    assert isinstance(rows[0]["media_paths"], list) and isinstance(rows[0]["settings"], dict)
    line = json.loads(cli(answered, "results", "--format", "jsonl", "--job", "plain").stdout.splitlines()[0])
    assert line["tags"] == ["misc"] and Path(line["media_paths"][0]).name == "cat.png"


def test_an_openai_batch_file_round_trips_through_the_spool(env: SpoolEnv):
    import base64
    import io

    from PIL import Image

    photo = env.image("batch/photo.png", 6)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def request(custom_id: str, content: object, **body: object) -> str:
        messages = [{"role": "user", "content": content}]
        return json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": messages} | body,
            }
        )

    lines = [
        request("haiku", "Write a haiku about the sea.", max_tokens=8),
        request(
            "photo",
            [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": str(photo)}}],
        ),
        request(
            "inline",
            [{"type": "text", "text": "Colour?"}, {"type": "image_url", "image_url": {"url": data_uri}}],
            seed=3,
        ),
    ]
    requests = env.root / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    assert "submitted 3 requests" in cli(env, "submit", "--openai-batch", str(requests)).stdout
    cli(env, "run")
    out = [json.loads(line) for line in cli(env, "results", "--format", "openai-batch").stdout.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["haiku", "inline", "photo"]
    for o in out:
        body = o["response"]["body"]
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    haiku = next(o for o in out if o["custom_id"] == "haiku")["response"]["body"]
    assert haiku["usage"]["completion_tokens"] <= 8

    bad = env.root / "bad.jsonl"
    bad.write_text(
        lines[0] + "\n" + request("web", [{"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]) + "\n"
    )
    before = sorted(p.name for p in env.inbox.iterdir())
    result = cli(env, "submit", "--openai-batch", str(bad), code=1)
    assert "bad.jsonl line 2" in result.stderr
    assert sorted(p.name for p in env.inbox.iterdir()) == before
