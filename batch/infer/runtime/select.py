"""Choosing and opening a runtime for a model folder: `auto`, `onnxruntime` or `axengine`."""

from __future__ import annotations

from pathlib import Path

from batch.errors import BackendError, ModelFolderError
from batch.infer.runtime.axengine_backend import is_axmodel_folder
from batch.infer.runtime.base import Backend
from batch.infer.runtime.onnx_backend import is_onnx_folder

BACKENDS = ("auto", "onnxruntime", "axengine")


def folder_kind(model_dir: Path) -> str:
    """'onnxruntime' for a `vlbatch export` folder, 'axengine' for the prebuilt axmodel layout."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir}: model folder not found")
    if is_onnx_folder(model_dir):
        return "onnxruntime"
    if is_axmodel_folder(model_dir):
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


def open_backend(model_dir: Path, backend: str = "auto", threads: int | None = None) -> Backend:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind = folder_kind(model_dir)
    if backend != "auto" and backend != kind:
        raise BackendError(f"{model_dir} is a folder for {kind}, but backend {backend} was asked for")
    if kind == "axengine":
        from batch.infer.runtime.axengine_backend import AxBackend

        return AxBackend(Path(model_dir))
    from batch.infer.runtime.onnx_backend import OnnxBackend

    return OnnxBackend(Path(model_dir), threads=threads)
