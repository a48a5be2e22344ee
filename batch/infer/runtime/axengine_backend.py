"""axengine (Axera NPU) over the prebuilt axmodel layout: fixed shape groups, bf16 hidden states and KV cache.

Layout (as published for InternVL3-2B):
    MODEL_DIR/model.embed_tokens.weight.npy
    MODEL_DIR/<prefix>_l{N}_together.axmodel   one per decoder layer; shape group 0 = decode,
                                              group k >= 1 = prefill chunk k-1
    MODEL_DIR/<prefix>_post.axmodel            final norm + lm_head
    MODEL_DIR/*vit*.axmodel or MODEL_DIR/../vit_axmodel/*.axmodel

Every shape (chunk length, KV capacity, number of chunks) is read from the sessions.

How the decoder layers' inputs reach the NPU (`model.npu_io`): `copy` feeds every input through pyaxengine's
run() on every call, the whole K/V cache included; `resident` keeps the cache in the sessions' own buffers
(batch/infer/runtime/npu_resident.py); `auto` takes `resident` when a start-up self-check on the device (a short
prompt across a chunk boundary and a few decode steps, both ways) agrees, else `copy`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from batch.errors import BackendError, ModelFolderError
from batch.infer.kvcache import KVCache
from batch.infer.runtime.base import Backend
from batch.infer.runtime.npu_buffers import RuntimeMismatch, pyaxengine_version
from batch.infer.runtime.npu_resident import ResidentCache, ResidentLayers
from batch.model.attention_mask import decode_mask, prefill_mask

log = logging.getLogger(__name__)

_LAYER = re.compile(r"_l(\d+)_together\.axmodel$")
EMBED_FILE = "model.embed_tokens.weight.npy"
_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
NPU_IO = ("copy", "resident", "auto")
SELF_CHECK_STEPS = 4  # decode steps after the self-check's prompt (chunk_len + 8 tokens: two prefill chunks)


def _layer_files(folder: Path) -> dict[int, Path]:
    found = {}
    for path in folder.glob("*_together.axmodel"):
        match = _LAYER.search(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def is_axmodel_folder(folder: Path) -> bool:
    folder = Path(folder)
    return 0 in _layer_files(folder) and any(folder.glob("*_post.axmodel"))


def embeddings_file(folder: Path) -> Path:
    """The published folder's token embedding table, read on the host (the NPU graphs take hidden states)."""
    path = Path(folder) / EMBED_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder}: embedding table {EMBED_FILE} is missing")
    return path


def identity_bytes(folder: Path) -> bytes:
    """What identifies a published folder's contents: the names and sizes of its model files."""
    files = sorted((p.name, p.stat().st_size) for p in Path(folder).iterdir() if p.suffix in (".axmodel", ".npy"))
    return repr(files).encode()


def find_vit(folder: Path) -> Path | None:
    """The ViT axmodel: inside the folder, or in a `vit_axmodel` folder beside it."""
    for candidate_dir in (folder, folder.parent / "vit_axmodel"):
        found = sorted(candidate_dir.glob("*vit*.axmodel")) if candidate_dir.is_dir() else []
        if found:
            return found[0]
    return None


def _numpy_dtype(declared: Any) -> np.dtype:
    if str(declared) == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(declared)


class _Node:
    """One declared input or output of one shape group."""

    def __init__(self, arg: Any) -> None:
        self.name: str = arg.name
        self.shape: tuple[int, ...] = tuple(int(d) for d in arg.shape)
        self.dtype = _numpy_dtype(arg.dtype)

    def cast(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=self.dtype)


def _runtime_talk() -> contextlib.AbstractContextManager:
    """pyaxengine prints [INFO] lines on stdout when imported and for every session it loads: send them to
    stderr, where logs go, so that what vlbatch writes on stdout (answers, --json) stays its own."""
    return contextlib.redirect_stdout(sys.stderr)


def import_axengine(folder: Path) -> Any:
    """The axengine module, or a BackendError saying why not.

    Without the NPU runtime `import axengine` fails with ImportError, but also with OSError (its shared library
    is missing) or whatever its module body raises; each is the same plain refusal.
    """
    try:
        with _runtime_talk():
            import axengine
    except Exception as exc:  # ImportError, OSError from a missing libax_engine.so / libaxcl_rt.so, anything
        raise BackendError(
            f"axengine cannot be imported ({type(exc).__name__}: {exc}); the axmodel folder {folder} needs an "
            "Axera NPU (or AXCL card) with pyaxengine installed. On other machines export the Hugging Face "
            "folder with `vlbatch export`."
        ) from exc
    return axengine


def session_providers(axengine: Any, providers: Sequence[str] = (), device_id: int | None = None) -> list[Any] | None:
    """The `providers` argument of axengine.InferenceSession, checked against the runtime's available ones.

    () and no device_id: None, the runtime's default. A device_id goes to every provider as
    (name, {"device_id": N}); with no providers named it goes to the runtime's first available provider.
    """
    if not providers and device_id is None:
        return None
    try:
        available = list(axengine.get_available_providers())
    except Exception as exc:
        raise BackendError(f"axengine cannot list its execution providers ({exc})") from exc
    names = list(providers)
    if not names:
        if not available:
            raise BackendError("axengine reports no available execution providers to run on device_id")
        names = available[:1]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise BackendError(
            f"unknown or unavailable axengine provider(s) {', '.join(unknown)}; this machine's axengine offers "
            f"{', '.join(available) or 'none'} (model.providers, --providers)"
        )
    if device_id is None:
        return names
    return [(name, {"device_id": int(device_id)}) for name in names]


class _Session:
    """An axengine session with its shape groups resolved to plain names, shapes and numpy dtypes."""

    def __init__(self, axengine: Any, path: Path, providers: list[Any] | None) -> None:
        self.path = path
        kwargs: dict[str, Any] = {}
        if providers is not None:
            kwargs["providers"] = providers
            options = [entry[1] for entry in providers[:1] if isinstance(entry, tuple)]
            if options:  # pyaxengine's AXCL session reads its device from here, not from the providers' tuples
                kwargs["provider_options"] = options
        try:
            with _runtime_talk():
                self.session = axengine.InferenceSession(str(path), **kwargs)
        except Exception as exc:  # the runtime reports load failures as RuntimeError or its own types
            raise BackendError(f"{path}: axengine could not load it ({exc})") from exc
        self.inputs: list[dict[str, _Node]] = []
        self.outputs: list[list[_Node]] = []
        for group in range(_group_count(self.session)):
            self.inputs.append({a.name: _Node(a) for a in self.session.get_inputs(group)})
            self.outputs.append([_Node(a) for a in self.session.get_outputs(group)])

    @property
    def groups(self) -> int:
        return len(self.inputs)

    def input(self, group: int, name: str) -> _Node:
        try:
            return self.inputs[group][name]
        except KeyError:
            raise ModelFolderError(
                f"{self.path}: shape group {group} has no input {name!r} (it has {', '.join(self.inputs[group])})"
            ) from None

    def run(self, group: int, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [node.name for node in self.outputs[group]]
        try:
            return self.session.run(names, feed, shape_group=group)
        except RuntimeError as exc:  # the runtime's "Failed to run model." and its AXCL failures: this answer's
            raise BackendError(f"{self.path}: {exc}") from exc


def _group_count(session: Any) -> int:
    """Shape groups of a session: probed through get_inputs(g), the public API."""
    count = 0
    while count < 64:
        try:
            if not session.get_inputs(count):
                break
        except (IndexError, ValueError, RuntimeError):
            break
        count += 1
    if count == 0:
        raise BackendError("axengine session declares no inputs")
    return count


def _prefill_shape(first: _Session) -> tuple[int, int]:
    """(chunk length, longest prompt) from layer 0's shape groups: group 0 decodes, each later one prefills a chunk."""
    if first.groups < 2:
        raise ModelFolderError(f"{first.path}: needs a decode group and at least one prefill group")
    for name in _INPUTS:
        first.input(0, name)
    chunk_len = first.input(1, "input").shape[1]
    return chunk_len, chunk_len * (first.groups - 1)


def _layer_zero(folder: Path) -> Path:
    files = _layer_files(folder)
    if 0 not in files:
        raise ModelFolderError(f"{folder}: decoder layer files missing for layers [0]")
    return files[0]


def prefill_capacity(folder: Path, providers: Sequence[str] = (), device_id: int | None = None) -> int:
    """The longest prompt the folder prefills, read from the layer-0 session alone (the rest stays unloaded)."""
    folder = Path(folder)
    axengine = import_axengine(folder)
    return _prefill_shape(_Session(axengine, _layer_zero(folder), session_providers(axengine, providers, device_id)))[1]


class AxBackend(Backend):
    name = "axengine"
    hidden_dtype = np.dtype(ml_dtypes.bfloat16)

    def __init__(
        self, folder: Path, providers: Sequence[str] = (), device_id: int | None = None, npu_io: str = "copy"
    ) -> None:
        if npu_io not in NPU_IO:
            raise BackendError(f"npu_io must be one of {', '.join(NPU_IO)}, got {npu_io!r}")
        axengine = import_axengine(folder)
        self.folder = Path(folder)
        chosen = session_providers(axengine, providers, device_id)
        if chosen is not None:
            log.info("axengine providers for %s: %s", self.folder, chosen)
        files = _layer_files(self.folder)
        missing = sorted(set(range(max(files) + 1)) - set(files)) if files else [0]
        if missing:
            raise ModelFolderError(f"{self.folder}: decoder layer files missing for layers {missing}")
        posts = sorted(self.folder.glob("*_post.axmodel"))
        if not posts:
            raise ModelFolderError(f"{self.folder}: no *_post.axmodel")
        vit = find_vit(self.folder)
        if vit is None:
            raise ModelFolderError(f"{self.folder}: no ViT axmodel (*vit*.axmodel here or in ../vit_axmodel)")

        self._layers = [_Session(axengine, files[i], chosen) for i in range(len(files))]
        self._post = _Session(axengine, posts[0], chosen)
        self._vit = _Session(axengine, vit, chosen)
        self.num_layers = len(self._layers)
        self._step_inputs: tuple[int, np.ndarray, np.ndarray] | None = None
        self._read_shapes()
        self._resident: ResidentLayers | None = None
        if npu_io != "copy":
            self._resident = self._resident_layers(npu_io)
        self.npu_io = "copy" if self._resident is None else "resident"

    def _resident_layers(self, npu_io: str) -> ResidentLayers | None:
        """The resident path, or None (with one log line saying why) when it cannot be trusted here."""
        version = f"pyaxengine {pyaxengine_version()}"

        def copy_instead(why: str) -> None:
            log.warning("model.npu_io %s: %s; decoding with copy", npu_io, why)

        try:
            expected = self._self_check() if npu_io == "auto" else None  # run() first, before the buffers are taken
        except (BackendError, RuntimeError) as exc:
            return copy_instead(f"the self-check failed through copy ({exc}, {version})")
        try:
            resident = ResidentLayers(self._layers, self.chunk_len)
        except RuntimeMismatch as exc:
            return copy_instead(f"{version} differs from what the resident path needs ({exc})")
        except (BackendError, RuntimeError) as exc:  # a C call the set-up made failed on this device
            return copy_instead(f"setting the resident path up failed ({exc}, {version})")
        if expected is not None:
            try:
                problem = _disagreement(expected, self._self_check(resident))
            except (BackendError, RuntimeError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                resident.close()
                return copy_instead(
                    f"the resident path's self-check disagrees with copy on this device ({problem}, {version})"
                )
        log.info("model.npu_io %s: decoding with the K/V cache resident in the NPU's buffers (%s)", npu_io, version)
        return resident

    def _self_check(self, resident: ResidentLayers | None = None) -> list[np.ndarray]:
        """Logits of a fixed prompt (chunk_len + 8 rows, or what fits) and SELF_CHECK_STEPS decode steps after it,
        through `resident` or, without it, through run(). The inputs are fixed pseudo-random hidden states of an
        embedding's scale: the comparison needs the same inputs both ways, not a meaningful prompt."""
        rows = min(self.chunk_len + 8, self.prefill_capacity, self.kv_capacity - SELF_CHECK_STEPS)
        states = np.random.default_rng(0).normal(0.0, 0.02, (rows + SELF_CHECK_STEPS, self.hidden_size))
        states = states.astype(np.float32)
        if resident is None:
            cache: Any = KVCache(self.num_layers, self.kv_capacity, self._kv_dim, self._kv_dtype)
            prefill, decode = partial(Backend.prefill_layers, self), partial(Backend.decode_layers, self)
        else:
            cache, prefill, decode = resident.new_cache(), resident.prefill, resident.decode
        for start in range(0, rows, self.chunk_len):
            x = prefill(states[None, start : min(rows, start + self.chunk_len)], start, cache)
        logits = [self.logits(x[:, -1:])]
        for pos in range(rows, rows + SELF_CHECK_STEPS):
            logits.append(self.logits(decode(states[None, None, pos], pos, cache)))
        return logits

    def _read_shapes(self) -> None:
        first = self._layers[0]
        self.chunk_len, self.prefill_capacity = _prefill_shape(first)
        k_decode = first.input(0, "K_cache")
        self.kv_capacity = k_decode.shape[1]
        self._kv_dim = k_decode.shape[2]
        self._kv_dtype = k_decode.dtype
        self.hidden_size = first.input(0, "input").shape[-1]
        for layer in self._layers[1:]:
            if layer.groups != first.groups or layer.input(0, "K_cache").shape != k_decode.shape:
                raise ModelFolderError(f"{layer.path}: shape groups differ from {first.path}")
        self._vit_in = next(iter(self._vit.inputs[0].values()))
        self._post_in = next(iter(self._post.inputs[0].values()))

    def vit(self, pixels: np.ndarray) -> np.ndarray:
        rows = [self._vit.run(0, {self._vit_in.name: self._vit_in.cast(tile[None])})[0] for tile in pixels]
        return np.concatenate(rows).astype(np.float32)

    def new_cache(self) -> KVCache | ResidentCache:  # type: ignore[override]
        if self._resident is not None:
            return self._resident.new_cache()
        return KVCache(self.num_layers, self.kv_capacity, self._kv_dim, self._kv_dtype)

    def prefill_layers(self, hidden: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        if self._resident is not None:
            return self._resident.prefill(hidden, start, cache)  # type: ignore[arg-type]
        return super().prefill_layers(hidden, start, cache)

    def decode_layers(self, hidden: np.ndarray, pos: int, cache: KVCache) -> np.ndarray:
        if self._resident is not None:
            return self._resident.decode(hidden, pos, cache)  # type: ignore[arg-type]
        return super().decode_layers(hidden, pos, cache)

    def close(self) -> None:
        if self._resident is not None:
            self._resident.close()
            self._resident = None

    def prefill_chunk(self, layer: int, hidden: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        _host_cache(cache)
        session = self._layers[layer]
        n, chunk = hidden.shape[1], self.chunk_len
        group = start // chunk + 1
        if start % chunk or group >= session.groups or n > chunk:
            raise BackendError(f"prefill chunk at {start} of {n} tokens is outside the compiled groups")
        k_node, v_node = session.input(group, "K_cache"), session.input(group, "V_cache")
        if start == 0:
            # the first chunk's graph takes a placeholder history whose declared shape it fixes
            k_hist, v_hist = np.zeros(k_node.shape, k_node.dtype), np.zeros(v_node.shape, v_node.dtype)
        else:
            if k_node.shape[1] != start:
                raise ModelFolderError(f"{session.path}: group {group} expects {k_node.shape[1]} history rows")
            k_hist, v_hist = cache.history(layer, start)
        x_node = session.input(group, "input")
        x = np.zeros(x_node.shape, x_node.dtype)
        x[:, :n] = hidden
        mask_node = session.input(group, "mask")
        feed = {
            "K_cache": k_node.cast(k_hist),
            "V_cache": v_node.cast(v_hist),
            "indices": session.input(group, "indices").cast(np.arange(start, start + chunk)[None]),
            "input": x,
            "mask": mask_node.cast(prefill_mask(start, n, chunk, mask_node.shape[2])),
        }
        k_rows, v_rows, out = session.run(group, feed)
        cache.write(layer, start, k_rows[:, :n], v_rows[:, :n])
        return out[:, :n]

    def _decode_step_inputs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """indices and mask for position `pos`: the same for every layer, so made once per token."""
        if self._step_inputs is None or self._step_inputs[0] != pos:
            first = self._layers[0]
            mask_node = first.input(0, "mask")
            indices = first.input(0, "indices").cast(np.full((1, 1), pos))
            self._step_inputs = (pos, indices, mask_node.cast(decode_mask(pos, mask_node.shape[2])))
        return self._step_inputs[1], self._step_inputs[2]

    def decode(self, layer: int, hidden: np.ndarray, pos: int, cache: KVCache) -> np.ndarray:
        _host_cache(cache)
        session = self._layers[layer]
        indices, mask = self._decode_step_inputs(pos)
        feed = {
            "K_cache": cache.k[layer],  # the full cache, as the decode graph is compiled; no copy on the host
            "V_cache": cache.v[layer],
            "indices": indices,
            "input": session.input(0, "input").cast(hidden),
            "mask": mask,
        }
        k_row, v_row, out = session.run(0, feed)
        cache.write(layer, pos, k_row, v_row)
        return out

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        out = self._post.run(0, {self._post_in.name: self._post_in.cast(hidden)})[0]
        return out.reshape(-1, out.shape[-1])[-1].astype(np.float32)


def _host_cache(cache: object) -> None:
    if not isinstance(cache, KVCache):
        raise BackendError("a resident K/V cache runs every layer at once (prefill_layers, decode_layers)")


def _disagreement(expected: list[np.ndarray], got: list[np.ndarray]) -> str:
    """Why two runs of the self-check differ ('' when they agree): each step's greedy token must match, and its
    logits must lie within 1% of the expected logits' range (both runs feed the device the same bytes)."""
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        if int(np.argmax(want)) != int(np.argmax(have)):
            return f"step {step}: greedy token {int(np.argmax(have))} instead of {int(np.argmax(want))}"
        if not np.all(np.isfinite(have)):
            return f"step {step}: logits are not finite"
        spread = float(np.ptp(want)) or 1.0
        worst = float(np.abs(want - have).max())
        if worst > 0.01 * spread:
            return f"step {step}: logits differ by up to {worst:.4g} (range {spread:.4g})"
    return ""
