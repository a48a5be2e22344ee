"""onnxruntime (CPU) over the folder written by `vlbatch export`: dynamic lengths, float32 activations.

An export of format 3 keeps each answer's K/V history head-major in its manifest's `kv_cache` dtype (AnswerCache,
RowCache with heads) and takes the rotary tables as inputs, computed once per step; one answer's decode steps run
through onnxruntime's IOBinding (_DecodeBinding). Where the history is fp16, the decode weights are quantized and
this machine has the fused attention (native_attention.py), each layer's attention is that one node. Exports of
formats 1 and 2 run as they were written: a float32 token-major history (KVCache) and the positions as `indices`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from batch.errors import BackendError, ModelFolderError
from batch.infer.kvcache import AnswerCache, KVCache, RowCache
from batch.infer.runtime.base import Backend
from batch.infer.runtime.native_attention import fused_options, layer_session
from batch.infer.runtime.native_attention import library as fused_library
from batch.infer.runtime.native_attention import wanted as fused_wanted
from batch.model.attention_mask import MASKED, chunk_mask, decode_mask, prefill_mask
from batch.model.export.manifest import (
    CACHE_DTYPES,
    FIRST_HEAD_MAJOR_VERSION,
    FIRST_ROWS_VERSION,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_ROWS,
)
from batch.model.modelspec import ModelSpec
from batch.model.ort_options import session_options
from batch.model.rotary import inverse_frequencies, rotary_inputs, rotary_tables

log = logging.getLogger(__name__)


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
        self.format_version = int(manifest["version"])
        self.head_major = self.format_version >= FIRST_HEAD_MAJOR_VERSION
        self.cache_dtype = np.dtype(CACHE_DTYPES[manifest.get("kv_cache", "fp32")] if self.head_major else np.float32)
        options = session_options(threads)

        def session(name: str) -> Any:
            return ort.InferenceSession(
                str(self.folder / name), sess_options=options, providers=["CPUExecutionProvider"]
            )

        # a 16-bit history is read by the fused attention where it is wanted and this machine has it
        fits = self.head_major and self.cache_dtype == np.float16
        library = fused_library() if fits and fused_wanted(manifest.get("weights", "fp32")) else None
        fused = fused_options(session_options(threads), library) if library is not None else None
        fused_count = 0

        def layer(name: str) -> Any:
            nonlocal fused_count
            made, was_fused = layer_session(self.folder / name, options, fused)
            fused_count += was_fused
            return made

        files = manifest["files"]
        self._vit = session(files["vit"])
        self._layers = [layer(name) for name in files["layers"]]
        # prompts run through layers of their own where the export made them (int8 arithmetic, faster on long
        # chunks); decode steps always run through the decode layers
        self._prefill_layers = [layer(name) for name in files.get("prefill_layers", [])] or self._layers
        self._post = session(files["post"])
        self.num_layers = len(self._layers)
        self.fused_attention = fused_count > 0
        if library is not None:
            total = len(files["layers"]) + len(files.get("prefill_layers", []))
            log.info("fused attention in %d of %d layer graphs", fused_count, total)
        self.chunk_len = int(manifest["prefill_chunk"])
        self.kv_capacity = int(manifest["kv_capacity"])
        self.prefill_capacity = prefill_capacity(manifest)
        self._kv_dim = self.spec.text.kv_dim
        self.max_rows = max_rows(manifest)
        self._inv_freq = inverse_frequencies(self.spec.text)

    def vit(self, pixels: np.ndarray) -> np.ndarray:
        # one tile per run: an int8 ViT quantizes its activations with one scale per run, so tiles run together
        # would change each other's features (cosine 0.991 against alone), and 2 or 4 tiles per run were no
        # faster per tile (real shape, 2 cores)
        return np.concatenate([self._vit.run(None, {"image": pixels[i : i + 1]})[0] for i in range(len(pixels))])

    def new_cache(self) -> KVCache | AnswerCache:  # type: ignore[override]
        if self.head_major:
            t = self.spec.text
            return AnswerCache(self.num_layers, t.num_kv_heads, t.head_dim, self.kv_capacity, self.cache_dtype)
        return KVCache(self.num_layers, self.kv_capacity, self._kv_dim, np.float32)

    def _step_inputs(self, positions: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs every layer of a format 3 step shares: the mask, and the rotary tables of `positions` (B, S)."""
        return {"mask": mask, **rotary_inputs(self._inv_freq, positions)}

    def _run_chunk(self, session: Any, layer: int, hidden: np.ndarray, start: int, cache: Any, shared: dict) -> Any:
        """One layer over a chunk at `start` (either format); writes its K/V rows, returns its output states."""
        if not self.head_major:
            return self._run_layer(session, layer, hidden, start, shared["mask"], cache)
        feed = {**shared, "K_cache": cache.k[layer], "V_cache": cache.v[layer], "input": hidden}
        k_rows, v_rows, out = session.run(None, feed)
        cache.write_chunk(layer, start, k_rows, v_rows)
        return out

    def _chunk_inputs(self, n: int, start: int, cache: Any, decode: bool) -> dict[str, np.ndarray]:
        if not self.head_major:
            return {"mask": decode_mask(start, start + 1) if decode else prefill_mask(start, n, n, start + n)}
        cache.reserve(start + n)
        return self._step_inputs(np.arange(start, start + n)[None], chunk_mask(start, n, cache.width))

    def prefill_layers(self, hidden: np.ndarray, start: int, cache: Any) -> np.ndarray:
        shared = self._chunk_inputs(hidden.shape[1], start, cache, decode=False)
        for layer, session in enumerate(self._prefill_layers):
            hidden = self._run_chunk(session, layer, hidden, start, cache, shared)
        return hidden

    def prefill_chunk(self, layer: int, hidden: np.ndarray, start: int, cache: Any) -> np.ndarray:
        shared = self._chunk_inputs(hidden.shape[1], start, cache, decode=False)
        return self._run_chunk(self._prefill_layers[layer], layer, hidden, start, cache, shared)

    def decode(self, layer: int, hidden: np.ndarray, pos: int, cache: Any) -> np.ndarray:
        shared = self._chunk_inputs(1, pos, cache, decode=True)
        return self._run_chunk(self._layers[layer], layer, hidden, pos, cache, shared)

    def decode_layers(self, hidden: np.ndarray, pos: int, cache: Any) -> np.ndarray:
        if not self.head_major:
            return super().decode_layers(hidden, pos, cache)
        binding = cache.binding
        if not isinstance(binding, _DecodeBinding) or binding.backend is not self:
            binding = cache.binding = _DecodeBinding(self, cache.dtype)
        return binding.step(hidden, pos, cache)

    def _run_layer(
        self, session: Any, layer: int, hidden: np.ndarray, start: int, mask: np.ndarray, cache: KVCache
    ) -> np.ndarray:
        """A layer of a format 1 or 2 export: the history as the first `start` rows, the positions as indices."""
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

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self._post.run(None, {"input": np.ascontiguousarray(hidden, dtype=np.float32)})[0][0, -1]

    def new_row_cache(self, rows: int) -> RowCache:
        heads = self.spec.text.num_kv_heads if self.head_major else None
        return RowCache(self.num_layers, rows, self._kv_dim, self.kv_capacity, self.cache_dtype, heads=heads)

    def decode_rows(
        self, layer: int, hidden: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: RowCache
    ) -> np.ndarray:
        return self.decode_rows_layers(hidden, positions, mask, cache, layers=range(layer, layer + 1))

    def decode_rows_layers(
        self,
        hidden: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        cache: RowCache,
        layers: range | None = None,
    ) -> np.ndarray:
        if self.head_major:
            shared = self._step_inputs(positions[:, None], mask)
        else:
            shared = {"indices": positions.astype(np.uint32)[:, None], "mask": mask}
        for layer in layers if layers is not None else range(self.num_layers):
            k_hist, v_hist = cache.history(layer)
            feed = {**shared, "K_cache": k_hist, "V_cache": v_hist, "input": hidden}
            k_rows, v_rows, hidden = self._layers[layer].run(None, feed)
            cache.write(layer, positions, k_rows, v_rows)
        return hidden

    def logits_rows(self, hidden: np.ndarray) -> np.ndarray:
        return self._post.run(None, {"input": np.ascontiguousarray(hidden, dtype=np.float32)})[0][:, -1]


class _DecodeBinding:
    """One answer's decode steps (format 3) through onnxruntime's IOBinding, kept with its cache.

    Every layer's inputs and outputs are bound once to buffers held here and to the cache's own (bound again only
    when the cache widens and its buffers move), so a step converts no input, allocates no output, and each layer's
    output is the next layer's input in place; per step only the mask, the rotary rows and the token's input change
    (in place), and each layer's new K/V row is copied into the cache.
    """

    def __init__(self, backend: OnnxBackend, dtype: np.dtype) -> None:
        t = backend.spec.text
        self.backend = backend
        self.hidden = [np.zeros((1, 1, t.hidden_size), np.float32) for _ in range(2)]
        self.cos = np.zeros((1, t.head_dim // 2), np.float32)
        self.sin = np.zeros((1, t.head_dim // 2), np.float32)
        self.rope_rows = np.zeros((1, 1), np.int64)
        self.k_out = [np.zeros((1, t.num_kv_heads, 1, t.head_dim), dtype) for _ in range(backend.num_layers)]
        self.v_out = [np.zeros((1, t.num_kv_heads, 1, t.head_dim), dtype) for _ in range(backend.num_layers)]
        self.bindings = [session.io_binding() for session in backend._layers]
        self.mask = np.zeros((1, 1, 1), np.float32)
        self.width = -1  # the cache width the bindings hold

    @staticmethod
    def _bind(binding: Any, name: str, array: np.ndarray, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def _bind_all(self, cache: AnswerCache) -> None:
        self.mask = np.full((1, 1, cache.width + 1), MASKED, np.float32)
        for layer, binding in enumerate(self.bindings):
            inputs = {
                "K_cache": cache.k[layer],
                "V_cache": cache.v[layer],
                "input": self.hidden[layer % 2],
                "mask": self.mask,
                "cos": self.cos,
                "sin": self.sin,
                "rope_rows": self.rope_rows,
            }
            for name, array in inputs.items():
                self._bind(binding, name, array)
            self._bind(binding, "K_out", self.k_out[layer], output=True)
            self._bind(binding, "V_out", self.v_out[layer], output=True)
            self._bind(binding, "output", self.hidden[(layer + 1) % 2], output=True)
        self.width = cache.width

    def step(self, hidden: np.ndarray, pos: int, cache: AnswerCache) -> np.ndarray:
        cache.reserve(pos + 1)
        if cache.width != self.width:
            self._bind_all(cache)
        self.mask[...] = chunk_mask(pos, 1, self.width)
        cos, sin = rotary_tables(self.backend._inv_freq, np.array([pos]))
        self.cos[...], self.sin[...] = cos, sin
        self.hidden[0][...] = hidden
        for layer, (session, binding) in enumerate(zip(self.backend._layers, self.bindings, strict=True)):
            session.run_with_iobinding(binding)
            cache.k[layer][0, :, pos] = self.k_out[layer][0, :, 0]
            cache.v[layer][0, :, pos] = self.v_out[layer][0, :, 0]
        return self.hidden[self.backend.num_layers % 2].copy()
