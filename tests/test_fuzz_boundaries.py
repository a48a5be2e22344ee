"""Property-based tests of the untrusted-input boundaries: job files, config files, OpenAI Batch lines, file names.

Each boundary gets generated input (arbitrary bytes, YAML-ish text from a grammar, valid documents with random
values) in real temp folders, and must end in its documented outcome: parse_job a Job or a JobRejected naming the
file; load_config + check_config a Config or a one-line ConfigError; requests_to_jobs job files or a
BatchFileRejected naming the bad lines. Never another exception, never a hang (fuzz_support.hard_limit).

HYPOTHESIS_PROFILE=long runs 20 000 examples per boundary (see tests/fuzz_support.py); the default (ci) about 500.
The regressions found by these tests are kept as plain tests at the end of the file.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import examples, hard_limit
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from batch import strict_yaml
from batch.config import Config, ConfigError, check_config, env_variables, load_config
from batch.infer.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.jobfile import MAX_TOGETHER, Job, JobRejected, parse_job
from batch.service.spool.openai_batch import BatchFileRejected, requests_to_jobs

GEN = GenerationSettings()
MEDIA = MediaSettings()
MEDIA_SUFFIXES = sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
MEDIA_NAMES = ("a.jpg", "b.png", "c.webp", "clip.mp4", "sub/d.jpeg", "sub/deeper/e.PNG", ".hidden.jpg", "notes.txt")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


_SHARED: list[Path] = []


def shared_media() -> Path:
    """The media folder every example reads (never writes): a few images, a video, a text file; made once."""
    if not _SHARED:
        folder = Path(tempfile.mkdtemp(prefix="vlbatch-fuzz-media-")).resolve()
        for name in MEDIA_NAMES:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PNG)
        (folder / "empty").mkdir()
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _SHARED.append(folder)
    return _SHARED[0]


class Tree:
    """One example's folders: root/media (a link to the shared media), root/jobs, root/out; removed afterwards."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="vlbatch-fuzz-")
        self.root = Path(self._tmp.name).resolve()
        self.media_real = shared_media()
        self.media = self.root / "media"
        self.media.symlink_to(self.media_real, target_is_directory=True)
        self.jobs = self.root / "jobs"
        self.out = self.root / "out"
        self.jobs.mkdir()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def parse_or_reject(path: Path, tree: Tree, **kwargs: Any) -> Job | JobRejected:
    """parse_job's outcome; a JobRejected must name the file, anything else fails the example."""
    with hard_limit():
        try:
            return parse_job(path, allowed_roots=[tree.media], generation=GEN, media=MEDIA, **kwargs)
        except JobRejected as exc:
            assert exc.path == path, (exc.path, path)
            assert str(exc).startswith(f"{path}: "), str(exc)
            assert exc.reason.strip(), "an empty reason"
            return exc


# ---------------------------------------------------------------------------------------------------------------
# YAML-ish text from a grammar: keys, values, nesting, anchors, aliases, tags, both styles


JOB_KEYS = [
    *("id", "prompt", "inputs", "mode", "max_new_tokens", "temperature", "top_p", "top_k", "seed"),
    *("video_frames", "max_tiles", "sidecar", "sidecar_overwrite", "remove_gone_sidecars", "tags"),
]
CONFIG_KEYS = {
    "model": ["dir", "backend", "hf_dir", "threads", "providers", "device_id"],
    "generation": ["max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos"],
    "media": [
        *("image_size", "max_tiles", "use_thumbnail", "video_frames", "video_decoder"),
        *("max_image_pixels", "decode_timeout_seconds", "decode_memory_mb"),
    ],
    "spool": [
        *("dir", "database", "media_roots", "lease_seconds", "rescan_seconds", "settle_seconds", "polling"),
        *("max_attempts", "database_timeout_seconds", "give_up_seconds", "max_workers"),
    ],
    "cluster": [
        *("ray_address", "actors", "resource", "cpus_per_actor", "media", "bytes_nodes", "path_map"),
        *("in_flight_per_actor", "actor_start_seconds"),
    ],
}
# plain scalars YAML 1.1 resolves to something other than text, and some that pyyaml resolves but cannot build
TRICKY_SCALARS = [
    *("~", "null", "Null", "true", "yes", "No", "off", "y", "0", "-0", "007", "0o17", "0x1F", "0b101", "0x_"),
    *("0b_", "1_000", "1:30", "190:20:30", "._", ".5", "1e3", "1.0e+3", "-.inf", ".NaN", "2024-06-01"),
    *("2024-13-45", "2024-02-30 25:61:61", "2001-12-14t21:59:43.10-05:00", "<<", "=", "each", "together"),
    *("txt", "xmp", "auto", "pyav", "decord", "onnxruntime", "axengine", "shared", "bytes"),
    "9" * 5000,
    "1" + "0" * 400,
    "-" + "9" * 400,
]
TAGS = [
    *("!!str", "!!int", "!!float", "!!bool", "!!null", "!!timestamp", "!!binary", "!!map", "!!seq", "!!set"),
    *("!!omap", "!!pairs", "!!merge", "!custom", "!!python/object:os.system", "!<tag:yaml.org,2002:int>"),
]
PATHY = [
    *("a.jpg", "sub", "sub/*.jpg", "**/*.png", "*", "[ab].jpg", "../media", "/", "/etc/passwd", "~", "~root"),
    *("~nosuchuser/x.jpg", "empty", "notes.txt", ".hidden.jpg", "clip.mp4", "media/a.jpg", "*/../../**"),
    *("a.jpg\x00", "\u2028", "a\nb", " a.jpg", "C:\\x.jpg", "file:///a.jpg", ".", "*/../../../../../../../**/*.qqq"),
]


def _plain_or_quoted(text: str) -> str:
    """A text scalar written plain when YAML reads it back as text, else double-quoted."""
    if text and re.fullmatch(r"[A-Za-z_./][A-Za-z0-9_./ -]*", text) and text == text.strip():
        return text
    return json.dumps(text)  # JSON strings are YAML double-quoted scalars


scalars = st.one_of(
    st.sampled_from(TRICKY_SCALARS),
    st.sampled_from(PATHY).map(_plain_or_quoted),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr).map(lambda s: s.replace("inf", ".inf")),
    st.text(max_size=30).map(_plain_or_quoted),
    st.text(alphabet="abcxyz:-#&*!|>'\"{}[],? %@`", max_size=12),  # YAML indicators, raw
)


@st.composite
def decorated(draw: st.DrawFn, body: str, anchors: list[str]) -> str:
    """A node with, sometimes, an anchor and a tag in front (an anchor defined here is recorded for aliases)."""
    parts = []
    if draw(st.integers(0, 9)) == 0:
        parts.append(draw(st.sampled_from(TAGS)))
    if draw(st.integers(0, 5)) == 0:
        name = draw(st.sampled_from(["a", "b", "c", "x1"]))
        anchors.append(name)
        parts.append("&" + name)
    return " ".join([*parts, body])


@st.composite
def yaml_node(draw: st.DrawFn, keys: list[str], depth: int, anchors: list[str], indent: int = 0) -> str:
    """A YAML value as text, in flow style (a one-liner) or, at the top of a block, in block style."""
    choice = draw(st.integers(0, 9))
    if depth <= 0 or choice < 5:
        if anchors and choice == 0:
            return "*" + draw(st.sampled_from(anchors))  # an alias, maybe to an enclosing collection
        return draw(decorated(draw(scalars), anchors))
    if choice < 7:  # flow sequence
        items = draw(st.lists(yaml_node(keys, depth - 1, anchors), max_size=4))
        return draw(decorated("[" + ", ".join(items) + "]", anchors))
    if choice < 9:  # flow mapping
        pairs = draw(st.lists(st.tuples(st.sampled_from(keys), yaml_node(keys, depth - 1, anchors)), max_size=4))
        return draw(decorated("{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}", anchors))
    # block sequence
    pad = " " * (indent + 2)
    items = draw(st.lists(yaml_node(keys, depth - 1, anchors, indent + 2), min_size=1, max_size=3))
    return "\n" + "\n".join(f"{pad}- {item}" for item in items)


@st.composite
def yaml_document(draw: st.DrawFn, keys: list[str], sections: dict[str, list[str]] | None = None) -> str:
    """A block mapping of (mostly known) keys to generated values; sometimes sections of their own mappings."""
    anchors: list[str] = []
    lines = []
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["%YAML 1.1\n---", "---", "# a comment", "\ufeff---"])))
    top_keys = list(sections) if sections else keys
    for key in draw(st.lists(st.sampled_from([*top_keys, "unknown", "<<", "? x"]), max_size=7)):
        if sections and key in sections and draw(st.integers(0, 4)):
            lines.append(f"{key}:")
            for sub in draw(st.lists(st.sampled_from([*sections[key], "typo"]), max_size=5)):
                lines.append(f"  {sub}: {draw(yaml_node(sections[key], 2, anchors, indent=2))}")
        else:
            lines.append(f"{key}: {draw(yaml_node(keys, 3, anchors))}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:  # a few random edits: unbalanced brackets, tabs, stray indicators
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.text(alphabet="\t\n :-[]{}&*!|>'\"#%\x00\x85\ufeff", max_size=3)) + text[at:]
    return text


# ---------------------------------------------------------------------------------------------------------------
# 1. job files through parse_job


@settings(max_examples=examples(500))
@given(data=st.binary(max_size=3000), name=st.sampled_from(["job.yaml", "job.yml", "2024.yaml", "x y.yaml"]))
def test_job_file_of_arbitrary_bytes_is_a_job_or_a_rejection(data: bytes, name: str) -> None:
    with Tree() as tree:
        path = tree.jobs / name
        path.write_bytes(data)
        parse_or_reject(path, tree)


@settings(max_examples=examples(500))
@given(text=yaml_document(JOB_KEYS), standing=st.booleans(), resolve=st.booleans())
def test_job_file_of_yamlish_text_is_a_job_or_a_rejection(text: str, standing: bool, resolve: bool) -> None:
    with Tree() as tree:
        path = tree.jobs / "job.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        parse_or_reject(path, tree, standing=standing, resolve_media=resolve, base_dir=tree.media)


def _any_value() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**50), max_value=10**50),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(PATHY),
        st.dates(),
    )
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner))


@st.composite
def random_job(draw: st.DrawFn) -> dict[str, Any]:
    """A job mapping whose keys are mostly right and whose values are anything YAML can hold."""
    keys = draw(st.lists(st.sampled_from(JOB_KEYS), unique=True, max_size=8))
    return {key: draw(_any_value()) for key in ["prompt", *keys]}


@settings(max_examples=examples(400))
@given(mapping=random_job())
def test_job_with_random_values_is_a_job_or_a_rejection(mapping: dict[str, Any]) -> None:
    with Tree() as tree:
        path = tree.jobs / "job.yaml"
        path.write_text(strict_yaml.dump_exact(mapping), encoding="utf-8")
        parse_or_reject(path, tree, base_dir=tree.media)


IMAGES = ["a.jpg", "b.png", "c.webp", "sub/d.jpeg", "sub/deeper/e.PNG"]


@st.composite
def valid_job(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A job every rule allows, and the media files (relative to the media root) it must resolve to."""
    mode = draw(st.sampled_from(["each", "together"]))
    choices = IMAGES if mode == "together" else [*IMAGES, "clip.mp4", "sub", "sub/*.jpeg", "**/*.png"]
    inputs = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4, unique=True))
    expected: set[str] = set()
    for spec in inputs:
        if spec == "sub":
            expected |= {"sub/d.jpeg", "sub/deeper/e.PNG"}
        elif spec == "sub/*.jpeg":
            expected.add("sub/d.jpeg")
        elif spec == "**/*.png":
            expected.add("b.png")  # glob is case-sensitive: e.PNG is not matched
        else:
            expected.add(spec)
    assume(mode == "each" or len(expected) <= MAX_TOGETHER)
    prompt = draw(st.text(min_size=1, max_size=80).filter(lambda s: s.strip()))
    mapping: dict[str, Any] = {"prompt": prompt, "inputs": [str(Path("..") / "media" / s) for s in inputs]}
    mapping["mode"] = mode
    if draw(st.booleans()):
        mapping["id"] = draw(
            st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40)
            .map(str.strip)
            .filter(lambda s: s and not s.startswith(".") and "/" not in s and "\\" not in s and s.isprintable())
        )
    optional = {
        "max_new_tokens": st.integers(1, 10**6),
        "temperature": st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.floats(0.001, 1),
        "top_k": st.integers(0, 1000),
        "seed": st.none() | st.integers(-(2**63), 2**63),
        "video_frames": st.integers(1, 64),
        "max_tiles": st.integers(1, 40),
        "tags": st.lists(st.text(max_size=10), max_size=3)
        | st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.integers() | st.text(max_size=8)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        mapping[key] = draw(optional[key])
    if mode == "each" and draw(st.booleans()):
        mapping["sidecar"] = draw(st.sampled_from([True, False, "txt", "xmp", " XMP "]))
    return mapping, expected


@settings(max_examples=examples(300))
@given(case=valid_job())
def test_valid_job_with_random_values_parses_to_its_files(case: tuple[dict[str, Any], set[str]]) -> None:
    mapping, expected = case
    with Tree() as tree:
        path = tree.jobs / "job.yaml"
        path.write_text(strict_yaml.dump_exact(mapping), encoding="utf-8")
        job = parse_or_reject(path, tree)
        assert isinstance(job, Job), str(job)
        assert set(job.media) == {tree.media_real / name for name in expected}
        assert job.prompt == mapping["prompt"].strip() and job.mode == mapping["mode"]
        assert job.id == mapping.get("id", "job")


# ---------------------------------------------------------------------------------------------------------------
# 2. config files through load_config and check_config

ENV_NAMES = sorted(env_variables())


def config_outcome(path: Path, environ: dict[str, str], needs_model: bool, needs_spool: bool) -> None:
    with hard_limit():
        try:
            config = load_config(path, environ=environ)
            assert isinstance(config, Config)
            check_config(config, needs_model=needs_model, needs_spool=needs_spool)
        except ConfigError as exc:
            message = str(exc)
            assert message.strip(), "an empty ConfigError"
            assert "\n" not in message and "\r" not in message, message


@settings(max_examples=examples(300))
@given(data=st.binary(max_size=2000), needs_model=st.booleans())
def test_config_of_arbitrary_bytes_is_a_config_or_one_line_error(data: bytes, needs_model: bool) -> None:
    with Tree() as tree:
        path = tree.root / "config.yaml"
        path.write_bytes(data)
        config_outcome(path, {}, needs_model, True)


@settings(max_examples=examples(500))
@given(
    text=yaml_document([key for keys in CONFIG_KEYS.values() for key in keys], CONFIG_KEYS),
    environ=st.dictionaries(
        st.sampled_from([*ENV_NAMES, "VLBATCH_TYPO"]),
        st.one_of(st.sampled_from(["", "1", "true", "null", "0", "-1", "nan", "inf", "1e400"]), st.text(max_size=12)),
        max_size=3,
    ).map(lambda env: {k: v.replace("\x00", "") for k, v in env.items()}),
    needs_model=st.booleans(),
    needs_spool=st.booleans(),
)
def test_config_of_yamlish_text_is_a_config_or_one_line_error(
    text: str, environ: dict[str, str], needs_model: bool, needs_spool: bool
) -> None:
    with Tree() as tree:
        path = tree.root / "config.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        config_outcome(path, environ, needs_model, needs_spool)


# ---------------------------------------------------------------------------------------------------------------
# 3. OpenAI Batch request lines through requests_to_jobs

DATA_URIS = [
    "data:image/png;base64," + base64.b64encode(PNG).decode(),
    "data:image/jpeg;base64," + base64.b64encode(PNG).decode(),  # the wrong signature
    "data:image/png;base64,!!!",
    "data:image/png,abc",
    "data:text/plain;base64,aGk=",
    "data:image/png;base64,",
]
URLS = [*DATA_URIS, "a.jpg", "media/a.jpg", "clip.mp4", "notes.txt", "file:///etc/passwd", "file://host/a.jpg"]
URLS += ["https://example.com/a.jpg", "", " ", "~/a.jpg", "../x.png", "/a\x00b.png", "file:///a%00b.png"]


def json_value() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(), st.text()
    )
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner))


@st.composite
def content_part(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind < 4:
        return {"type": "text", "text": draw(st.text(max_size=40))}
    if kind < 8:
        url = draw(st.sampled_from(URLS) | st.text(max_size=20))
        image: dict[str, Any] = {"url": url}
        if draw(st.integers(0, 4)) == 0:
            image["detail"] = draw(st.sampled_from(["auto", "low", "high", "max", None]))
        return {"type": "image_url", "image_url": image}
    return draw(json_value())


@st.composite
def request_object(draw: st.DrawFn) -> Any:
    """A request in the published shape, with a few of its parts replaced by anything JSON can hold."""
    role = draw(st.sampled_from(["user"] * 6 + ["system", "assistant", "tool", "", None]))
    content = draw(st.text(max_size=40) | st.lists(content_part(), max_size=MAX_TOGETHER + 2))
    body: dict[str, Any] = {"model": "m", "messages": [{"role": role, "content": content}]}
    body_keys = {
        "max_tokens": st.integers(-3, 10**6) | st.floats() | st.integers(min_value=10**300, max_value=10**400),
        "max_completion_tokens": st.integers(-3, 100),
        "temperature": st.floats() | st.integers(-(10**400), 10**400),
        "top_p": st.floats() | st.integers(-2, 2),
        "top_k": st.integers(-5, 5) | st.floats(),
        "seed": st.integers(-(10**400), 10**400) | st.floats(),
        "n": st.integers(0, 3),
        "stream": st.booleans(),
        "stop": st.lists(st.text(max_size=3), max_size=2),
        "logprobs": st.booleans(),
        "metadata": json_value(),
        "tools": st.just([]),
        "response_format": st.just({"type": "text"}) | json_value(),
        "frobnicate": json_value(),
    }
    for key in draw(st.lists(st.sampled_from(sorted(body_keys)), unique=True, max_size=4)):
        body[key] = draw(body_keys[key])
    obj: dict[str, Any] = {
        "custom_id": draw(st.text(max_size=20) | st.sampled_from(["r1", "r1", ".x", "a/b", " x"]) | json_value()),
        "method": draw(st.sampled_from(["POST"] * 8 + ["GET"])),
        "url": draw(st.sampled_from(["/v1/chat/completions"] * 8 + ["/v1/embeddings"])),
        "body": body if draw(st.integers(0, 9)) else draw(json_value()),
    }
    for key in draw(st.lists(st.sampled_from(sorted(obj)), unique=True, max_size=1)):
        if draw(st.integers(0, 3)) == 0:
            del obj[key]
    if draw(st.integers(0, 9)) == 0:
        obj["extra"] = 1
    return obj


def request_line() -> st.SearchStrategy[bytes]:
    as_json = request_object().map(lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return st.one_of(
        as_json,
        as_json,
        as_json,
        json_value().map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"   ", b"{", b"[1]", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"9" * 5000, b"\xff\xfe"]),
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
        st.just(b"[" * 100_000),
    )


LINE_PROBLEM = re.compile(r"^requests\.jsonl line (\d+): \S")


@settings(max_examples=examples(500))
@given(lines=st.lists(request_line(), min_size=0, max_size=5), bom=st.booleans())
def test_openai_batch_lines_are_jobs_or_errors_naming_the_line(lines: list[bytes], bom: bool) -> None:
    with Tree() as tree:
        path = tree.root / "requests.jsonl"  # relative image paths (media/a.jpg) resolve beside it
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
        with hard_limit():
            try:  # data: URI images go to out/media: allowed too
                jobs = requests_to_jobs(path, tree.out, [tree.media, tree.out])
            except BatchFileRejected as exc:
                assert exc.problems and str(exc).startswith(f"{path}: ")
                for problem in exc.problems:
                    match = LINE_PROBLEM.match(problem)
                    if match is None:
                        assert problem.startswith("requests.jsonl: "), problem  # about the whole file
                    else:
                        assert 1 <= int(match.group(1)) <= max(len(lines), 1), problem
                written = list(tree.out.glob("*.y*ml")) if tree.out.exists() else []
                assert not written, f"a rejected file left jobs behind: {written}"
                return
        nonblank = [line for line in lines if line.strip()]
        assert len(jobs) == len(nonblank) > 0
        for job_path in jobs:
            job = parse_or_reject(job_path, tree)
            assert isinstance(job, Job), str(job)


# ---------------------------------------------------------------------------------------------------------------
# 4. file names: any bytes POSIX allows in a name, in a media folder named by a job

name_bytes = st.binary(min_size=1, max_size=255).map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_"))


@st.composite
def file_name(draw: st.DrawFn) -> bytes:
    """A POSIX file name (no '/', no NUL, 1-255 bytes, not . or ..), often with a media suffix."""
    stem = draw(name_bytes)
    if draw(st.booleans()):
        suffix = draw(st.sampled_from(MEDIA_SUFFIXES)).encode()
        suffix = suffix.upper() if draw(st.booleans()) else suffix
        stem = stem[: 255 - len(suffix)] + suffix
    assume(stem not in (b".", b".."))
    return stem


@settings(max_examples=examples(500))
@given(name=file_name(), direct=st.booleans())
@example(name=b"..arw", direct=True)  # a hidden name with a RAW suffix, named directly: answered as RAW
def test_any_file_name_in_a_media_folder_resolves_or_is_refused_clearly(name: bytes, direct: bool) -> None:
    with Tree() as tree:
        folder = tree.root / "names"
        folder.mkdir()
        target = os.path.join(os.fsencode(folder), name)
        with open(target, "wb") as handle:
            handle.write(PNG)
        decoded = os.fsdecode(name)
        is_media = Path(decoded).suffix.lower() in MEDIA_SUFFIXES  # as media_kind reads it (`..arw` is RAW)
        try:
            name.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        direct = direct and utf8  # the file itself as the input: a YAML job file is UTF-8, so only UTF-8 names
        if direct:
            inputs = [decoded]
        else:  # its folder as the input
            inputs = ["."]
        path = tree.jobs / "job.yaml"
        path.write_text(strict_yaml.dump_exact({"prompt": "p", "inputs": inputs}), encoding="utf-8")
        outcome = parse_or_reject(path, tree, base_dir=folder)
        real = Path(os.fsdecode(target))
        if direct:
            expanded = os.path.expanduser(decoded) != decoded  # `~` or `~user`: the home folder, outside the roots
            if is_media and not expanded:
                assert isinstance(outcome, Job), str(outcome)
                assert outcome.media == (real,)
            elif not is_media:
                assert isinstance(outcome, JobRejected)
        elif is_media and not decoded.startswith("."):
            assert isinstance(outcome, Job), str(outcome)
            assert outcome.media == (real,)
        else:  # hidden or not media: the folder holds nothing to answer
            assert isinstance(outcome, JobRejected) and "holds no images or videos" in outcome.reason


# ---------------------------------------------------------------------------------------------------------------
# regressions found by the tests above


def _tree_job(tree: Tree, text: str) -> Job | JobRejected:
    path = tree.jobs / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return parse_or_reject(path, tree)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0x_", "`0x_` on line 1 is not a valid int value"),
        ("2024-13-45", "`2024-13-45` on line 1 is not a valid timestamp value"),
        ("!!int foo", "`foo` on line 1 is not a valid int value"),
        ("!!bool maybe", "`maybe` on line 1 is not a valid bool value"),
        ("!!timestamp soon", "`soon` on line 1 is not a valid timestamp value"),
        ("!!int ''", "`` on line 1 is not a valid int value"),
        ("9" * 5000, "on line 1 is not a valid int value (Exceeds the limit (4300 digits)"),
    ],
)
def test_scalars_pyyaml_cannot_build_are_refused_with_their_line(value: str, expected: str, tmp_path: Path) -> None:
    # pyyaml raised ValueError, KeyError, IndexError or AttributeError from its constructors: a traceback from
    # load_config, and "cannot parse the job file (ValueError: ...)" from parse_job
    config = tmp_path / "config.yaml"
    config.write_text(f"spool:\n  dir: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={})
    assert str(info.value).startswith(f"{config}:2:"), str(info.value)
    assert expected.replace("line 1", "line 2") in str(info.value)
    with Tree() as tree:
        outcome = _tree_job(tree, f"prompt: {value}\n")
        assert isinstance(outcome, JobRejected) and expected in outcome.reason, str(outcome)


@pytest.mark.parametrize(
    "text",
    [
        "generation:\n  temperature: 1" + "0" * 400 + "\n",  # OverflowError: int too large to convert to float
        "spool:\n  lease_seconds: 1" + "0" * 400 + "\n",
        'model:\n  dir: "a\\0b"\n',  # ValueError: embedded null byte, from check_config's stat
        "model:\n  dir: ~nosuchuser-vlbatch/x\n",  # RuntimeError from Path.expanduser
        '"a\\nb": 1\n',  # a ConfigError of two lines
        'spool:\n  "x\\ny": 1\n',
        'spool:\n  dir: "a\\nb/c"\n',
    ],
)
def test_config_values_that_raised_are_one_line_config_errors(text: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        check_config(load_config(config, environ={}), needs_model=True)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(config))


def test_job_with_a_huge_integer_temperature_is_refused_as_a_setting() -> None:
    with Tree() as tree:
        outcome = _tree_job(tree, "prompt: p\ntemperature: 1" + "0" * 400 + "\n")
        assert isinstance(outcome, JobRejected)
        assert outcome.reason.startswith("invalid generation setting: int too large"), outcome.reason


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"temperature": 10**400}, "body.temperature must be in [0, 2]"),  # was OverflowError from math.isfinite
        ({"top_p": -(10**400)}, "body.top_p must be in (0, 1]"),
    ],
)
def test_openai_huge_integer_sampling_values_are_refused(body: dict[str, Any], expected: str) -> None:
    with Tree() as tree:
        line = {"custom_id": "r", "method": "POST", "url": "/v1/chat/completions"}
        line["body"] = {"messages": [{"role": "user", "content": "hi"}], **body}
        path = tree.root / "requests.jsonl"
        path.write_text(json.dumps(line) + "\n", encoding="utf-8")
        with pytest.raises(BatchFileRejected) as info:
            requests_to_jobs(path, tree.out, [tree.media])
        assert info.value.problems[0].startswith(f"requests.jsonl line 1: {expected}"), info.value.problems


NUL_IMAGE = {"type": "image_url", "image_url": {"url": "file:///a%00b.png"}}
NUL_REQUEST = {
    "custom_id": "r",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, NUL_IMAGE]}]},
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"9" * 5000, "not valid JSON (Exceeds the limit (4300 digits)"),  # was ValueError from json.loads
        (json.dumps(NUL_REQUEST).encode(), "image 'file:///a%00b.png' holds a NUL character"),  # ValueError (realpath)
    ],
)
def test_openai_lines_that_raised_are_reported_with_their_line(raw: bytes, expected: str) -> None:
    with Tree() as tree:
        path = tree.root / "requests.jsonl"
        path.write_bytes(raw + b"\n")
        with pytest.raises(BatchFileRejected) as info:
            requests_to_jobs(path, tree.out, [tree.media])
        assert info.value.problems[0].startswith(f"requests.jsonl line 1: {expected}"), info.value.problems


@pytest.mark.parametrize("spec", ["*/../../../../../../../../**/*.qqq", "*/../a.jpg", "sub/**/../*.jpg"])
def test_glob_climbing_out_after_a_wildcard_is_refused_before_any_walk(spec: str) -> None:
    # `*/../../../../../../../../**/*.qqq` walked the whole file system (/proc/self/root loops included) looking
    # for a match: parse_job ran for minutes; the literal-prefix check saw only `.`
    with Tree() as tree:
        outcome = _tree_job(tree, f"prompt: p\ninputs: [{json.dumps(str(Path('..') / 'media' / spec))}]\n")
        assert isinstance(outcome, JobRejected), str(outcome)
        expected = f"glob {'../media/' + spec!r} has '..' after a wildcard; name the folder it climbs to instead"
        assert outcome.reason == expected


def test_glob_with_dotdot_before_any_wildcard_still_resolves() -> None:
    with Tree() as tree:
        outcome = _tree_job(tree, "prompt: p\ninputs: [../media/sub/../*.jpg]\n")
        assert isinstance(outcome, Job) and outcome.media == (tree.media_real / "a.jpg",), str(outcome)
