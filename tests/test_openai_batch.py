"""OpenAI Batch request files to job files, result rows to output lines; text-only jobs."""

from __future__ import annotations

import base64
import calendar
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch.config import Config, SpoolConfig
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.jobfile import MAX_TOGETHER, Job, JobRejected, parse_job
from batch.service.spool.openai_batch import (
    MAX_DATA_URI_BYTES,
    BatchFileRejected,
    requests_to_jobs,
    result_lines,
)
from batch.service.spool.submit import submit_job

MODEL = "OpenGVLab/InternVL3-1B"


# ---------------------------------------------------------------------------------------------------------------
# helpers


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, fmt)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def request(custom_id: str, content: Any, **body: Any) -> dict[str, Any]:
    """One request line in the published format."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body},
    }


def write_requests(path: Path, lines: list[Any]) -> Path:
    """A JSONL file: dicts as JSON, strings written as they are (bad or blank lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def parse(path: Path, roots: list[Path]) -> Job:
    return parse_job(path, allowed_roots=roots, generation=GenerationSettings(), media=MediaSettings())


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """An allowed media folder with three images, a video and a text file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes("JPEG"))
    (folder / "b.png").write_bytes(image_bytes())
    (folder / "c.png").write_bytes(image_bytes(color=(1, 2, 3)))
    (folder / "clip.mp4").write_bytes(b"not really a video")
    (folder / "notes.txt").write_text("hi")
    return folder


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"


@pytest.fixture
def roots(photos: Path, staging: Path) -> list[Path]:
    return [photos, staging]


def convert(tmp_path: Path, lines: list[Any], roots: list[Path], staging: Path, **kwargs: Any) -> list[Path]:
    return requests_to_jobs(write_requests(tmp_path / "requests.jsonl", lines), staging, roots, **kwargs)


def problems(tmp_path: Path, lines: list[Any], roots: list[Path], staging: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(BatchFileRejected) as info:
        convert(tmp_path, lines, roots, staging, **kwargs)
    assert str(info.value).startswith(f"{tmp_path / 'requests.jsonl'}: ")
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def job_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_to_jobs_parse_job_accepts(tmp_path: Path, photos: Path, staging: Path, roots: list[Path]) -> None:
    png = image_bytes(color=(250, 0, 0))
    lines = [
        request(
            "request-1",
            [text("What is in this image?"), image(str(photos / "a.jpg"))],
            max_tokens=64,
            temperature=0,
            top_p=1,
            seed=1,
        ),
        request("request-2", [image((photos / "b.png").as_uri()), text("Describe it.")], max_completion_tokens=32),
        request("request-3", [text("Caption this."), image(data_uri(png))], temperature=0.7, top_p=0.9),
        request(
            "request-4",
            [text("Compare the two images."), image(str(photos / "a.jpg")), text("Which is brighter?")]
            + [image((photos / "c.png").as_uri())],
        ),
        request("request 5", "Write a haiku about the sea.", seed=3, top_k=40),
        "",  # a blank line is skipped
    ]
    paths = convert(tmp_path, lines, roots, staging)

    assert [p.name for p in paths] == [f"request-{n}.yaml" for n in range(1, 5)] + ["request_5.yaml"]
    assert all(p.parent == staging for p in paths)
    assert sorted(p.name for p in staging.iterdir()) == sorted([*(p.name for p in paths), "media"])  # no leftovers
    jobs = [parse(p, roots) for p in paths]
    a, b, c = (photos / name for name in ("a.jpg", "b.png", "c.png"))

    assert jobs[0].id == "request-1"
    assert jobs[0].prompt == "What is in this image?"
    assert jobs[0].media == (a,) and jobs[0].mode == "each"
    assert jobs[0].units() == [(a,)]
    assert jobs[0].generation == GenerationSettings(max_new_tokens=64, temperature=0, top_p=1, seed=1)
    assert jobs[0].tags == {"openai_custom_id": "request-1", "openai_batch": "requests.jsonl"}

    assert jobs[1].media == (b,) and jobs[1].prompt == "Describe it."
    assert jobs[1].generation == GenerationSettings(max_new_tokens=32)

    saved = staging / "media" / f"{hashlib.sha256(png).hexdigest()}.png"
    assert jobs[2].media == (saved.resolve(),)
    assert saved.read_bytes() == png
    assert jobs[2].generation == GenerationSettings(temperature=0.7, top_p=0.9)

    assert jobs[3].mode == "together"
    assert set(jobs[3].media) == {a, c}
    assert len(jobs[3].units()) == 1 and set(jobs[3].units()[0]) == {a, c}
    assert jobs[3].prompt == "Compare the two images.\nWhich is brighter?"

    assert jobs[4].id == "request 5" and jobs[4].prompt == "Write a haiku about the sea."
    assert jobs[4].media == () and jobs[4].inputs == ()
    assert jobs[4].units() == [()]
    assert jobs[4].generation == GenerationSettings(seed=3, top_k=40)
    assert jobs[4].tags["openai_custom_id"] == "request 5"

    written = yaml.safe_load(paths[3].read_text(encoding="utf-8"))
    assert list(written) == ["id", "prompt", "inputs", "mode", "tags"]
    assert yaml.safe_load(paths[4].read_text(encoding="utf-8"))["inputs"] == []


def test_converted_jobs_go_through_submit(tmp_path: Path, photos: Path, staging: Path, roots: list[Path]) -> None:
    lines = [
        request("img", [text("What is it?"), image(str(photos / "b.png"))]),
        request("data", [text("And this?"), image(data_uri(image_bytes()))]),
        request("text", "Say hello."),
    ]
    config = Config(spool=SpoolConfig(dir=tmp_path / "jobs", media_roots=tuple(roots)))
    inbox = [submit_job(path, config) for path in convert(tmp_path, lines, roots, staging)]
    jobs = [parse_job(p, allowed_roots=roots, generation=config.generation, media=config.media) for p in inbox]
    assert [job.id for job in jobs] == ["img", "data", "text"]
    assert jobs[1].media[0].parent == (staging / "media").resolve()
    assert jobs[2].units() == [()]


def test_relative_paths_resolve_against_the_request_file(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    (paths,) = [convert(tmp_path, [request("r", [text("q"), image("photos/b.png")])], roots, staging)]
    assert parse(paths[0], roots).media == (tmp_path / "photos" / "b.png",)


def test_duplicate_images_are_one_input(tmp_path: Path, photos: Path, staging: Path, roots: list[Path]) -> None:
    url = str(photos / "a.jpg")
    (path,) = convert(
        tmp_path, [request("r", [text("q"), image(url), image((photos / "a.jpg").as_uri())])], roots, staging
    )
    job = parse(path, roots)
    assert job.media == (photos / "a.jpg",) and job.mode == "each"


def test_harmless_and_default_keys_are_accepted(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    body = {
        "user": "u1",
        "stream": False,
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "stop": None,
        "tools": [],
        "response_format": {"type": "text"},
        "metadata": {"k": "v"},
        "top_k": -1,
        "max_tokens": 16,
        "max_completion_tokens": 16,
    }
    (path,) = convert(tmp_path, [request("r", "hi", **body)], roots, staging)
    assert parse(path, roots).generation == GenerationSettings(max_new_tokens=16, top_k=0)


def test_id_prefix_and_existing_files(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    staging.mkdir()
    (staging / "r1.yaml").write_text("keep me")
    (path,) = convert(tmp_path, [request("r1", "hi")], roots, staging)
    assert path.name == "r1.1.yaml" and (staging / "r1.yaml").read_text() == "keep me"
    (path,) = convert(tmp_path, [request("r1", "hi")], roots, staging, id_prefix="nightly:")
    job = parse(path, roots)
    assert job.id == "nightly:r1" and job.tags["openai_custom_id"] == "r1"


def test_media_dir_option(tmp_path: Path, photos: Path, staging: Path) -> None:
    media = photos / "from-batch"
    (path,) = convert(
        tmp_path, [request("r", [text("q"), image(data_uri(image_bytes()))])], [photos], staging, media_dir=media
    )
    (saved,) = parse(path, [photos]).media
    assert saved.parent == media.resolve()


# ---------------------------------------------------------------------------------------------------------------
# bad lines

GOOD = request("good", "hello")
SYSTEM = "system messages are not supported; InternVL3's own system prompt is used"


def body_case(**body: Any) -> dict[str, Any]:
    return request("bad", "question", **body)


def messages_case(messages: Any) -> dict[str, Any]:
    line = request("bad", "q")
    line["body"]["messages"] = messages
    return line


def bad_cases(photos: Path) -> list[tuple[Any, str]]:
    png = image_bytes()
    user = {"role": "user", "content": "q"}
    five = [text("q")] + [image(data_uri(image_bytes(color=(i, 0, 0)))) for i in range(MAX_TOGETHER + 1)]
    return [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got a list"),
        ('{"custom_id": "a", "custom_id": "b"}', "key 'custom_id' appears twice"),
        ('{"custom_id": NaN}', "NaN is not a JSON number"),
        (
            {k: v for k, v in GOOD.items() if k != "custom_id"} | {"custom_id": ""},
            "custom_id must be a non-empty string",
        ),
        ({k: v for k, v in GOOD.items() if k != "custom_id"}, "missing key 'custom_id'"),
        (GOOD | {"custom_id": 5}, "custom_id must be a non-empty string, got 5"),
        (GOOD | {"custom_id": "a/b"}, "must not start with '.' or hold slashes"),
        (GOOD | {"custom_id": ".hidden"}, "must not start with '.'"),
        (GOOD | {"custom_id": " x"}, "must not start or end with spaces"),
        (GOOD | {"custom_id": "x" * 129}, "custom_id is longer than 128 characters"),
        (GOOD | {"method": "GET"}, 'method must be "POST", got "GET"'),
        (GOOD | {"url": "/v1/embeddings"}, "url must be /v1/chat/completions"),
        (GOOD | {"extra": 1}, "unknown key 'extra'"),
        (GOOD | {"body": []}, "body must be a JSON object"),
        (messages_case([]), "body.messages must be a non-empty list"),
        (messages_case([{"role": "system", "content": "Be brief."}, user]), SYSTEM),
        (messages_case([{"role": "developer", "content": "Be brief."}, user]), "developer messages are not supported"),
        (
            messages_case([user, {"role": "assistant", "content": "A cat."}, user]),
            "assistant messages are not supported",
        ),
        (messages_case([user, {"role": "tool", "content": "x"}]), "tool messages are not supported"),
        (messages_case([user, user]), "only one user message per request"),
        (messages_case([{"role": "robot", "content": "x"}]), 'unsupported role "robot"'),
        (messages_case([user | {"weight": 1}]), "user message key 'weight' is not supported"),
        (messages_case([{"role": "user", "content": 5}]), "content must be text or a list"),
        (
            request("bad", [text("q"), image("https://example.com/a.jpg")]),
            "image_url must be a file path, a file:// URL or a data: URI (got https://example.com/a.jpg)",
        ),
        (request("bad", [text("q"), image("file://server/share/a.jpg")]), "names a host"),
        (request("bad", [text("q"), image("/etc/hostname.jpg")]), "is outside the allowed media folders"),
        (request("bad", [text("q"), image(str(photos / "missing.jpg"))]), "not found"),
        (request("bad", [text("q"), image(str(photos / "clip.mp4"))]), "is a video; only images are supported"),
        (request("bad", [text("q"), image(str(photos / "notes.txt"))]), "unsupported file type '.txt'"),
        (request("bad", [text("q"), image("")]), "image_url is empty"),
        (
            request("bad", [text("q"), image("data:text/plain;base64,aGk=")]),
            "data: URI type 'text/plain' is not supported",
        ),
        (request("bad", [text("q"), image("data:image/png,rawbytes")]), "must be base64-encoded"),
        (request("bad", [text("q"), image("data:image/png;base64,@@@")]), "data: URI is not valid base64"),
        (request("bad", [text("q"), image("data:image/png;base64,")]), "data: URI holds no data"),
        (request("bad", [text("q"), image(data_uri(png, "image/jpeg"))]), "does not hold image/jpeg data"),
        (
            request("bad", [text("q"), image(data_uri(b"\x89PNG\r\n\x1a\n" + bytes(MAX_DATA_URI_BYTES)))]),
            "larger than 20 MB",
        ),
        (request("bad", five), f"5 images in one request; at most {MAX_TOGETHER} are supported"),
        (request("bad", [image(str(photos / "a.jpg"))]), "the user message has no text"),
        (request("bad", "   "), "the user message has no text"),
        (request("bad", [{"type": "input_audio", "input_audio": {}}]), 'type "input_audio"; only text and image_url'),
        (
            request("bad", [{"type": "image_url", "image_url": {"url": "x.png", "detail": "ultra"}}, text("q")]),
            "detail",
        ),
        (request("bad", [{"type": "text", "text": 3}]), "content[0].text must be a string"),
        (body_case(n=2), "n must be 1 (one answer per request), got 2"),
        (body_case(stream=True), "stream must be false"),
        (body_case(tools=[{"type": "function", "function": {"name": "f"}}]), "body key 'tools' is not supported"),
        (body_case(response_format={"type": "json_object"}), "body key 'response_format' is not supported"),
        (body_case(logprobs=True), "body key 'logprobs' is not supported"),
        (body_case(stop=["\n"]), "body key 'stop' is not supported"),
        (body_case(presence_penalty=0.5), "body key 'presence_penalty' is not supported"),
        (body_case(max_token=5), "body key 'max_token' is not supported (did you mean 'max_tokens'?)"),
        (body_case(model=3), "body.model must be a string, got 3"),
        (body_case(max_tokens=0), "body.max_tokens must be at least 1, got 0"),
        (body_case(max_tokens="64"), "body.max_tokens must be an integer"),
        (body_case(max_tokens=64, max_completion_tokens=32), "max_tokens (64) and max_completion_tokens (32) differ"),
        (body_case(temperature=-1), "body.temperature must be in [0, 2], got -1"),
        (body_case(temperature=True), "body.temperature must be a number"),
        (body_case(top_p=0), "body.top_p must be in (0, 1], got 0"),
        (body_case(seed=-1), "body.seed must be at least 0"),
        (body_case(top_k=-2), "body.top_k must be at least -1"),
    ]


def test_every_kind_of_bad_line_is_refused_with_its_line_number(
    tmp_path: Path, photos: Path, staging: Path, roots: list[Path]
) -> None:
    cases = bad_cases(photos)
    assert len(cases) > 50
    failures = []
    for index, (line, expected) in enumerate(cases):
        folder = tmp_path / f"case{index}"
        with pytest.raises(BatchFileRejected) as info:
            convert(folder, [GOOD, "", line], roots, staging)
        (problem,) = info.value.problems
        if not (problem.startswith("requests.jsonl line 3: ") and expected in problem):
            failures.append(f"case {index}: expected {expected!r}, got {problem!r}")
    assert not failures, "\n".join(failures)
    assert job_files(staging) == [] and not (staging / "media").exists()


def test_duplicate_custom_id_names_the_first_line(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    found = problems(tmp_path, [GOOD, request("x", "q"), GOOD], roots, staging)
    assert found == ["requests.jsonl line 3: custom_id 'good' is already used on line 1"]


def test_non_utf8_line(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(BatchFileRejected) as info:
        requests_to_jobs(path, staging, roots)
    assert info.value.problems == ["requests.jsonl line 2: not UTF-8 text (byte 0xff at offset 0)"]


def test_empty_file_is_refused(tmp_path: Path, staging: Path, roots: list[Path]) -> None:
    assert problems(tmp_path, ["", "  "], roots, staging) == ["requests.jsonl: holds no requests"]


def test_all_bad_lines_reported_and_nothing_written(
    tmp_path: Path, photos: Path, staging: Path, roots: list[Path]
) -> None:
    lines = [
        request("ok-1", [text("q"), image(data_uri(image_bytes()))]),
        request("bad-2", [text("q"), image("http://example.com/x.png")]),
        request("ok-3", "hello"),
        messages_case([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]),
    ]
    found = problems(tmp_path, lines, roots, staging)
    assert [p.split(":")[0] for p in found] == ["requests.jsonl line 2", "requests.jsonl line 4"]
    assert SYSTEM in found[1]
    assert job_files(staging) == []
    assert not (staging / "media").exists()  # the data: URI image of line 1 was removed again
    assert not staging.exists() or list(staging.iterdir()) == []  # no staging folder left either


def test_data_uri_media_must_be_readable_by_the_worker(tmp_path: Path, photos: Path, staging: Path) -> None:
    lines = [
        request("path", [text("q"), image(str(photos / "a.jpg"))]),
        request("data", [text("q"), image(data_uri(image_bytes()))]),
    ]
    (found,) = problems(tmp_path, lines, [photos], staging)
    assert found.startswith("requests.jsonl line 2: data: URI images are saved in ")
    assert "outside the allowed media folders" in found


def test_symlink_out_of_the_roots_is_refused(tmp_path: Path, photos: Path, staging: Path, roots: list[Path]) -> None:
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes())
    (photos / "link.png").symlink_to(outside / "secret.png")
    (found,) = problems(tmp_path, [request("r", [text("q"), image(str(photos / "link.png"))])], roots, staging)
    assert "outside the allowed media folders" in found


# ---------------------------------------------------------------------------------------------------------------
# text-only jobs in the job format


@pytest.mark.parametrize("inputs", ["", "inputs: []\n"])
def test_text_only_job(tmp_path: Path, inputs: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"prompt: Write a haiku.\n{inputs}max_new_tokens: 20\n", encoding="utf-8")
    job = parse(path, [])
    assert job.prompt == "Write a haiku." and job.media == () and job.inputs == ()
    assert job.units() == [()]
    assert job.generation.max_new_tokens == 20


def test_text_only_job_together_and_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("prompt: p\nmode: together\n", encoding="utf-8")
    assert parse(path, []).units() == [()]
    path.write_text("prompt: p\nsidecar: true\n", encoding="utf-8")
    with pytest.raises(JobRejected, match="sidecar: true needs inputs"):
        parse(path, [])


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [("['']", "empty entry"), ("missing.png", "not found"), ("null", "'inputs' must be text or a list of text")],
)
def test_jobs_with_inputs_keep_their_rules(tmp_path: Path, inputs: str, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"prompt: p\ninputs: {inputs}\n", encoding="utf-8")
    with pytest.raises(JobRejected, match=expected):
        parse(path, [])


# ---------------------------------------------------------------------------------------------------------------
# result lines

STAMP = "2026-11-25T15:24:33.765+00:00"
STAMP_SECONDS = calendar.timegm((2026, 11, 25, 15, 24, 33))


def row(result_id: int, custom_id: str, answer: str | None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    base = {
        "custom_id": custom_id,
        "answer": answer,
        "error": error,
        "finish_reason": "stop" if answer is not None else None,
        "prompt_tokens": 1800 if answer is not None else None,
        "output_tokens": 12 if answer is not None else None,
        "model_id": MODEL,
        "created_utc": STAMP,
        "result_id": result_id,
    }
    return base | extra


def test_result_lines_have_the_published_shape() -> None:
    rows = [
        row(7, "request-1", "A red square on a white table."),
        row(8, "request-2", "Ein rotes Quadrat…", finish_reason="length", output_tokens=64),
        row(9, "request-3", None, error="a.jpg: cannot decode (truncated file)"),
        row(10, "request-4", None),
    ]
    lines = list(result_lines(rows))
    assert len(lines) == 4 and not any("\n" in line for line in lines)
    records = [json.loads(line) for line in lines]
    assert all(set(record) == {"id", "custom_id", "response", "error"} for record in records)
    assert [r["custom_id"] for r in records] == ["request-1", "request-2", "request-3", "request-4"]
    assert len({r["id"] for r in records}) == 4 and all(r["id"].startswith("batch_req_") for r in records)

    first = records[0]
    assert first["error"] is None
    response = first["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    assert response["status_code"] == 200 and isinstance(response["request_id"], str) and response["request_id"]
    body = response["body"]
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["created"] == STAMP_SECONDS and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "A red square on a white table."},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert body["usage"] == {"prompt_tokens": 1800, "completion_tokens": 12, "total_tokens": 1812}

    second = records[1]["response"]["body"]
    assert second["choices"][0]["finish_reason"] == "length"
    assert second["choices"][0]["message"]["content"] == "Ein rotes Quadrat…"
    assert second["usage"]["total_tokens"] == 1800 + 64

    for record, message in ((records[2], "a.jpg: cannot decode (truncated file)"), (records[3], None)):
        assert record["response"] is None
        assert set(record["error"]) == {"code", "message"}
        assert isinstance(record["error"]["code"], str) and record["error"]["code"]
        assert record["error"]["message"] == (message or record["error"]["message"]) and record["error"]["message"]


def test_result_lines_are_reproducible() -> None:
    rows = [row(1, "a", "x"), row(2, "b", None, error="boom")]
    assert list(result_lines(rows)) == list(result_lines(rows))
    assert json.loads(next(result_lines([row(41, "a", "x")])))["id"] == "batch_req_41"


@pytest.mark.parametrize("stamp", ["2026-11-25T15:24:33Z", "2026-11-25T15:24:33", "2026-11-25T16:24:33.5+01:00"])
def test_created_from_other_timestamps(stamp: str) -> None:
    record = json.loads(next(result_lines([row(1, "a", "x", created_utc=stamp)])))
    assert record["response"]["body"]["created"] == STAMP_SECONDS
