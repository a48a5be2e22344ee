"""The fused attention library: native/fused_attention.c compiled on this machine, once, into vlbatch's cache folder,
and the decoder layer sessions that run it (see batch/infer/runtime/fused_layer.py for the graph it goes into).

The C file is an onnxruntime custom operator, so it compiles against onnxruntime's C API header,
onnxruntime_c_api.h, which the onnxruntime wheel does not ship. It is taken from Debian's libonnxruntime-dev
1.21.0 package (the C API of onnxruntime 1.21: every later onnxruntime serves it), fetched once from
deb.debian.org and checked against the package's SHA-256. The library lands in
$XDG_CACHE_HOME/vlbatch/native/<hash of source, header and compiler> (default ~/.cache/vlbatch/native), or
under $VLBATCH_NATIVE_CACHE where that is set.

It is used where all of this holds: Linux on x86-64 with AVX-512F, F16C and FMA; a C compiler (`cc`, or $CC);
the header fetched once; a format 3 export with an fp16 history; and `wanted`: by default for exports whose
decode weights are int8 or int4 (editing a layer's graph as it loads costs about 0.1 s per 25 MB of it: 2.5 s for
the 28 int4 layers of InternVL3-2B, 22 s for its fp32 ones, whose decode the attention hardly moves);
VLBATCH_FUSED_ATTENTION=1 asks for it with any weights, 0 never. Anywhere else the layers run their own attention
as exported, with the same results to float32 rounding, and the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import http.client
import io
import logging
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from batch.cache_home import cache_home

log = logging.getLogger(__name__)

SWITCH = "VLBATCH_FUSED_ATTENTION"  # 1: wanted with any weights, 0: never
CACHE_VARIABLE = "VLBATCH_NATIVE_CACHE"  # where the library is built, instead of the default below
SOURCE = Path(__file__).with_name("native") / "fused_attention.c"
HEADER = "onnxruntime_c_api.h"
HEADER_PACKAGE = (
    "https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
    "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08",
)
FETCH_TIMEOUT_S = 30
COMPILE_TIMEOUT_S = 120


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _switch() -> bool | None:
    """VLBATCH_FUSED_ATTENTION as set: True (1, on, ...), False (0, off, ...), or None (unset or neither)."""
    value = os.environ.get(SWITCH, "").strip().lower()
    return True if value in _ON else False if value in _OFF else None


def wanted(decode_weights: str) -> bool:
    """Whether an export whose decode layers hold `decode_weights` (its manifest's `weights`) should have its
    attention fused: VLBATCH_FUSED_ATTENTION=1 or 0 says so; unset, where the weights are quantized."""
    switch = _switch()
    return decode_weights != "fp32" if switch is None else switch


class NativeUnavailable(Exception):
    """Why the fused attention library cannot be had here."""


def cache_root() -> Path:
    """$VLBATCH_NATIVE_CACHE, else $XDG_CACHE_HOME/vlbatch/native (~/.cache/vlbatch/native)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return cache_home("native")


def _members(archive: bytes) -> dict[str, bytes]:
    """The files of an `ar` archive (a .deb): name -> contents."""
    if not archive.startswith(b"!<arch>\n"):
        raise NativeUnavailable("the header package is not an ar archive")
    members, at = {}, 8
    while at + 60 <= len(archive):
        name, size = archive[at : at + 16].decode().strip().rstrip("/"), int(archive[at + 48 : at + 58])
        members[name] = archive[at + 60 : at + 60 + size]
        at += 60 + size + size % 2
    return members


def header_from_package(package: bytes, sha256: str) -> bytes:
    """onnxruntime_c_api.h out of a libonnxruntime-dev .deb whose SHA-256 is `sha256`."""
    if hashlib.sha256(package).hexdigest() != sha256:
        raise NativeUnavailable("the header package's SHA-256 is not the one expected")
    data = next((body for name, body in _members(package).items() if name.startswith("data.tar")), None)
    if data is None:
        raise NativeUnavailable("the header package holds no data.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(f"/onnxruntime/{HEADER}"):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    return extracted.read()
    raise NativeUnavailable(f"the header package holds no {HEADER}")


def _write_whole(path: Path, data: bytes) -> None:
    """`data` to `path` through a temp file beside it, so a reader sees all of it or none (no fsync: a header lost
    is fetched again). batch.service.atomic_write is the service floor's, above this one (tests/test_layout.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".vlbatch-", suffix=".tmp", delete=False) as handle:
        temp = Path(handle.name)
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def include_dir(root: Path) -> Path:
    """The folder holding onnxruntime_c_api.h: fetched into `root`/include the first time."""
    folder = root / "include"
    if not (folder / HEADER).is_file():
        url, sha256 = HEADER_PACKAGE
        log.info("fetching onnxruntime's C API header (%s)", url)
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                package = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise NativeUnavailable(f"onnxruntime's C API header could not be fetched from {url}: {error}") from error
        _write_whole(folder / HEADER, header_from_package(package, sha256))
    return folder


def _compiler() -> tuple[str, str]:
    """The C compiler (`cc`, or $CC) and its version line."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler ({compiler}) on PATH")
    try:
        run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeUnavailable(f"the C compiler {compiler} did not answer: {error}") from error
    return compiler, (run.stdout.splitlines() or [""])[0]


def build(root: Path) -> Path:
    """The compiled library under `root`, compiled first where this source, header and compiler have none."""
    include = include_dir(root)
    compiler, version = _compiler()
    key = hashlib.sha256(SOURCE.read_bytes() + (include / HEADER).read_bytes() + version.encode()).hexdigest()[:16]
    library = root / key / "libvlbatch_attention.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    command = [compiler, "-O3", "-std=c11", "-shared", "-fPIC", "-I", str(include), "-o", str(partial), str(SOURCE)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        partial.unlink(missing_ok=True)
        raise NativeUnavailable(f"compiling {SOURCE.name} failed: {error}") from error
    if run.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeUnavailable(f"compiling {SOURCE.name} failed: {run.stderr.strip()[:800]}")  # its first error
    os.replace(partial, library)
    return library


def cpu_supported(library: Path) -> bool:
    """Whether this CPU has what the library's kernels use (AVX-512F, F16C, FMA), as the library itself asks."""
    return bool(ctypes.CDLL(str(library)).vlb_supported())


@functools.cache
def library() -> Path | None:
    """The fused attention library for this process, or None (the reason logged once) where it cannot run."""
    if _switch() is False:
        log.info("fused attention off (%s=%s)", SWITCH, os.environ[SWITCH])
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        log.info("fused attention: not built on %s %s (x86-64 Linux only)", platform.system(), platform.machine())
        return None
    try:
        path = build(cache_root())
    except NativeUnavailable as error:
        log.warning("fused attention unavailable, the layers run their own attention: %s", error)
        return None
    if not cpu_supported(path):
        log.info("fused attention: this CPU lacks AVX-512F, F16C or FMA; the layers run their own attention")
        return None
    return path


def fused_options(options: Any, fused: Path) -> Any | None:
    """`options` with the fused attention library registered, for the layer sessions whose graphs hold it; None
    (the reason logged) where onnxruntime refuses the library."""
    try:
        options.register_custom_ops_library(str(fused))
    except Exception as error:  # onnxruntime's own errors: its Fail, InvalidArgument, ... (RuntimeError kin)
        log.warning("fused attention unavailable, onnxruntime refused %s: %s", fused, error)
        return None
    return options


def layer_session(path: Path, options: Any, fused: Any | None) -> tuple[Any, bool]:
    """An onnxruntime session of the decoder layer at `path`, and whether its attention is the fused one: so where
    `fused` (options with the library registered, see fused_options) is given and the graph has the attention
    fused_layer knows; otherwise the graph as exported, with `options`. A fused graph onnxruntime will not load is
    logged and the graph as exported is loaded instead."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if fused is not None:
        from batch.infer.runtime.fused_layer import fuse_attention
        from batch.infer.runtime.onnx_messages import load_model

        model = load_model(path.read_bytes())
        if fuse_attention(model):
            try:
                return ort.InferenceSession(model.SerializeToString(), sess_options=fused, providers=providers), True
            except Exception as error:  # onnxruntime's own errors, as above
                log.warning("%s: its fused attention did not load, the layer runs its own: %s", path.name, error)
    return ort.InferenceSession(str(path), sess_options=options, providers=providers), False
