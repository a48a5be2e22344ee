"""onnxruntime (CPU) over the folder written by `vlbatch export`: dynamic lengths, float32 activations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from batch.errors import BackendError, ModelFolderError
from batch.infer.kvcache import KVCache, RowCache
from batch.infer.runtime.base import Backend
from batch.model.attention_mask import decode_mask, prefill_mask
from batch.model.export.manifest import FIRST_ROWS_VERSION, FORMAT, FORMAT_VERSION, MANIFEST, MAX_ROWS
from batch.model.modelspec import ModelSpec
from batch.model.ort_options import session_options


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: unreadable manifest ({exc})") from exc
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFolderError(f"{path}: not a vlbatch ONNX export")
    if version > FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: an export of format {version}, newer than this vlbatch reads ({FORMAT_VERSION}): upgrade vlbatch"
        )
    files = manifest["files"]
    for name in [files["vit"], files["post"], files["embed"], *files["layers"], *files.get("prefill_layers", [])]:
        if not (path.parent / name).is_file():
            raise ModelFolderError(f"{path.parent / name}: missing (re-run `vlbatch export`)")
    return manifest


def embeddings_file(folder: Path) -> Path:
    """The export's token embedding table (the manifest names it)."""
    return Path(folder) / read_manifest(folder)["files"]["embed"]


def prefill_capacity(manifest: dict[str, Any]) -> int:
    """The longest prompt an export prefills: one cache position stays free for the answer's first decode step."""
    return int(manifest["kv_capacity"]) - 1


def max_rows(manifest: dict[str, Any]) -> int:
    """Answers one decode step may carry: exports before FIRST_ROWS_VERSION have decoder graphs of one row."""
    return MAX_ROWS if int(manifest["version"]) >= FIRST_ROWS_VERSION else 1


def weights(folder: Path) -> tuple[str, str, str]:
    """The export's weight formats as its manifest records them: the language model's (fp32, int8 or int4), the
    ViT's (fp32 or int8) and the prompt layers' (same: the decode layers; int8: layers of their own)."""
    manifest = read_manifest(folder)
    return (
        str(manifest.get("weights", "fp32")),
        str(manifest.get("vit_weights", "fp32")),
        str(manifest.get("prefill_weights", "same")),
    )


def identity_bytes(folder: Path) -> bytes:
    """What identifies an export's contents: its manifest, which records the spec, weights format and files."""
    return (Path(folder) / MANIFEST).read_bytes()


class OnnxBackend(Backend):
    name = "onnxruntime"
    hidden_dtype = np.dtype(np.float32)

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install 'vlbatch[cpu]'") from exc
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.spec = ModelSpec.from_dict(manifest["spec"])
        options = session_options(threads)

        def session(name: str) -> Any:
            return ort.InferenceSession(
                str(self.folder / name), sess_options=options, providers=["CPUExecutionProvider"]
            )

        files = manifest["files"]
        self._vit = session(files["vit"])
        self._layers = [session(name) for name in files["layers"]]
        # prompts run through layers of their own where the export made them (int8 arithmetic, faster on long
        # chunks); decode steps always run through the decode layers
        self._prefill_layers = [session(name) for name in files.get("prefill_layers", [])] or self._layers
        self._post = session(files["post"])
        self.num_layers = len(self._layers)
        self.chunk_len = int(manifest["prefill_chunk"])
        self.kv_capacity = int(manifest["kv_capacity"])
        self.prefill_capacity = prefill_capacity(manifest)
        self._kv_dim = self.spec.text.kv_dim
        self.max_rows = max_rows(manifest)
        self.format_version = int(manifest["version"])

    def vit(self, pixels: np.ndarray) -> np.ndarray:
        # one tile per run: an int8 ViT quantizes its activations with one scale per run, so tiles run together
        # would change each other's features (cosine 0.991 against alone), and 2 or 4 tiles per run were no
        # faster per tile (real shape, 2 cores)
        return np.concatenate([self._vit.run(None, {"image": pixels[i : i + 1]})[0] for i in range(len(pixels))])

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers, self.kv_capacity, self._kv_dim, np.float32)

    def _run_layer(
        self, session: Any, layer: int, hidden: np.ndarray, start: int, mask: np.ndarray, cache: KVCache
    ) -> np.ndarray:
        n = hidden.shape[1]
        k_hist, v_hist = cache.history(layer, start)
        feed = {
            "K_cache": k_hist,
            "V_cache": v_hist,
            "indices": np.arange(start, start + n, dtype=np.uint32)[None],
            "input": np.ascontiguousarray(hidden, dtype=np.float32),
            "mask": mask,
        }
        k_rows, v_rows, out = session.run(None, feed)
        cache.write(layer, start, k_rows, v_rows)
        return out

    def prefill_chunk(self, layer: int, hidden: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        n = hidden.shape[1]
        mask = prefill_mask(start, n, n, start + n)
        return self._run_layer(self._prefill_layers[layer], layer, hidden, start, mask, cache)

    def decode(self, layer: int, hidden: np.ndarray, pos: int, cache: KVCache) -> np.ndarray:
        return self._run_layer(self._layers[layer], layer, hidden, pos, decode_mask(pos, pos + 1), cache)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self._post.run(None, {"input": np.ascontiguousarray(hidden, dtype=np.float32)})[0][0, -1]

    def new_row_cache(self, rows: int) -> RowCache:
        return RowCache(self.num_layers, rows, self._kv_dim, self.kv_capacity, np.float32)

    def decode_rows(
        self, layer: int, hidden: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: RowCache
    ) -> np.ndarray:
        k_hist, v_hist = cache.history(layer)
        feed = {
            "K_cache": k_hist,
            "V_cache": v_hist,
            "indices": positions.astype(np.uint32)[:, None],
            "input": np.ascontiguousarray(hidden, dtype=np.float32),
            "mask": mask,
        }
        k_rows, v_rows, out = self._layers[layer].run(None, feed)
        cache.write(layer, positions, k_rows, v_rows)
        return out

    def logits_rows(self, hidden: np.ndarray) -> np.ndarray:
        return self._post.run(None, {"input": np.ascontiguousarray(hidden, dtype=np.float32)})[0][:, -1]
