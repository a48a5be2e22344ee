"""What a runnable model folder is and how it opens: its kind, embedding table, identity, metadata and runtime.

The two kinds are a `vlbatch export` folder (onnxruntime) and the published axmodel layout (axengine); each
backend module owns its own file names, and this module dispatches by kind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from batch.errors import BackendError, ModelFolderError
from batch.infer.runtime import axengine_backend, onnx_backend
from batch.infer.runtime.base import Backend

BACKENDS = ("auto", "onnxruntime", "axengine")


def folder_kind(model_dir: Path) -> str:
    """'onnxruntime' for a `vlbatch export` folder, 'axengine' for the prebuilt axmodel layout."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir}: model folder not found")
    if onnx_backend.is_onnx_folder(model_dir):
        return "onnxruntime"
    if axengine_backend.is_axmodel_folder(model_dir):
        return "axengine"
    if (model_dir / "config.json").is_file():
        raise ModelFolderError(
            f"{model_dir}: a Hugging Face folder, not a runnable one; convert it first with "
            f"`vlbatch export {model_dir} OUT_DIR` and use OUT_DIR"
        )
    raise ModelFolderError(
        f"{model_dir}: neither a `vlbatch export` folder (manifest.json) nor an axmodel folder "
        "(*_l0_together.axmodel, *_post.axmodel, model.embed_tokens.weight.npy)"
    )


def metadata_dir(model_dir: Path, hf_dir: Path | None = None) -> Path:
    """Where config.json and the tokenizer are: an export carries them, an axmodel folder needs its HF folder."""
    model_dir = Path(model_dir)
    if hf_dir is not None:
        return Path(hf_dir)
    if folder_kind(model_dir) == "axengine":
        raise ModelFolderError(
            f"{model_dir}: an axmodel folder needs the Hugging Face folder beside it for the config and "
            "tokenizer (--hf-dir, or model.hf_dir in config.yaml)"
        )
    return model_dir


def embeddings_file(model_dir: Path) -> Path:
    """The folder's token embedding table (.npy, read with mmap on the host by either runtime)."""
    module = onnx_backend if folder_kind(model_dir) == "onnxruntime" else axengine_backend
    return module.embeddings_file(Path(model_dir))


def model_identity(model_dir: Path) -> str:
    """A short stable id of a model folder's contents: its name and a digest of its manifest or model files."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir}: model folder not found")
    module = onnx_backend if onnx_backend.is_onnx_folder(model_dir) else axengine_backend
    return f"{model_dir.resolve().name}@{hashlib.sha256(module.identity_bytes(model_dir)).hexdigest()[:12]}"


def runtime_kind(model_dir: Path, backend: str = "auto") -> str:
    """The runtime a folder runs on ('onnxruntime' or 'axengine'); BackendError when `backend` names another."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind = folder_kind(model_dir)
    if backend != "auto" and backend != kind:
        raise BackendError(f"{model_dir} is a folder for {kind}, but backend {backend} was asked for")
    return kind


def prefill_capacity(
    model_dir: Path, backend: str = "auto", providers: Sequence[str] = (), device_id: int | None = None
) -> int:
    """The longest prompt a folder prefills, without loading the model: an export's manifest, or the shapes of
    an axmodel folder's layer-0 session (which needs axengine and may need `providers`/`device_id`)."""
    if runtime_kind(model_dir, backend) == "axengine":
        return axengine_backend.prefill_capacity(Path(model_dir), providers, device_id)
    return onnx_backend.prefill_capacity(onnx_backend.read_manifest(Path(model_dir)))


def decode_rows(model_dir: Path) -> int:
    """How many answers the folder's runtime decodes per step: an export of format 2 or later, many; an older
    export, or an axmodel folder (its graphs are compiled for one row), one."""
    if folder_kind(model_dir) == "axengine":
        return 1
    return onnx_backend.max_rows(onnx_backend.read_manifest(Path(model_dir)))


def weights_formats(model_dir: Path) -> tuple[str | None, str | None, str | None]:
    """An export's weight formats: the language model's (fp32, int8, int4), the ViT's (fp32, int8) and the
    prompt layers' (same, int8); all None for an axmodel folder, whose weights are compiled in."""
    if folder_kind(model_dir) == "axengine":
        return None, None, None
    return onnx_backend.weights(Path(model_dir))


def open_backend(
    model_dir: Path,
    backend: str = "auto",
    threads: int | None = None,
    providers: Sequence[str] = (),
    device_id: int | None = None,
    npu_io: str = "copy",
) -> Backend:
    """The runtime of a model folder; `providers`/`device_id` choose axengine's execution provider and device,
    `npu_io` how its decoder layers take their inputs (batch/infer/runtime/axengine_backend.py)."""
    kind = runtime_kind(model_dir, backend)
    if kind == "axengine":
        from batch.infer.runtime.axengine_backend import AxBackend

        return AxBackend(Path(model_dir), providers=tuple(providers), device_id=device_id, npu_io=npu_io)
    if providers or device_id is not None:
        raise BackendError(
            f"{model_dir} is an onnxruntime folder: providers and device_id choose an axengine NPU device and "
            "do not apply to it; unset model.providers/model.device_id (--providers/--device-id)"
        )
    if npu_io != "copy":
        raise BackendError(
            f"{model_dir} is an onnxruntime folder: npu_io {npu_io} chooses how an axengine NPU's layers take their "
            "inputs and does not apply to it; unset model.npu_io"
        )
    from batch.infer.runtime.onnx_backend import OnnxBackend

    return OnnxBackend(Path(model_dir), threads=threads)
