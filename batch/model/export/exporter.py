"""`vlbatch export`: stream a Hugging Face InternVL folder into the CPU layout, one graph at a time.

Out folder: vit.onnx, llm_layer_NN.onnx (one per decoder layer), post.onnx, embed_tokens.npy, with
`--prefill-weights int8` also llm_prefill_NN.onnx (the same layers with int8 arithmetic, for prompts),
manifest.json (written last: its presence marks a complete export), and copies of the config and
tokenizer files, so the folder is self-contained.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from batch.errors import VlbatchError

try:
    import onnx
except ImportError as exc:  # the CPU runtime (extra `cpu`) and the NPU board install no exporter
    raise VlbatchError("`vlbatch export` needs the export extra: pip install 'vlbatch[export]'") from exc

from batch.model.checkpoint import Checkpoint
from batch.model.export.graphs import decoder_layer_graph, post_graph, vit_graph
from batch.model.export.manifest import CACHE_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST
from batch.model.modelspec import ModelSpec

DEFAULT_CHUNK = 128
DEFAULT_KV_CAPACITY = 4096
WEIGHT_FORMATS = {"fp32": 32, "int8": 8, "int4": 4}
QUANT_BLOCK = 128  # weights per scale: at real shape 128 decodes 28% faster than 32 (fewer scale bytes)
VIT_FORMATS = ("fp32", "int8")
# an int8 ViT is kept only if its features on the check tiles stay this close to fp32's (cosine)
VIT_INT8_MIN_COSINE = 0.99
# "same": prompts run through the decode layers; "int8": through layers of their own with int8 arithmetic
PREFILL_FORMATS = ("same", "int8")
# int8 prefill layers are kept only if every layer's update of the check prompt stays this close to fp32's
PREFILL_INT8_MIN_COSINE = 0.99
_CHECK_PROMPT_TOKENS = 32  # text rows on either side of one check tile's image rows
_CHECK_TILES = 4
# graphs above this size keep their weights in a side file (protobuf caps a file at 2 GB)
_EXTERNAL_DATA_BYTES = 256 * 1024 * 1024
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.json",
)


def export(
    hf_dir: Path,
    out_dir: Path,
    kv_capacity: int = DEFAULT_KV_CAPACITY,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[str], None] | None = None,
    weights: str = "fp32",
    vit_weights: str = "fp32",
    prefill_weights: str = "same",
    kv_cache: str = "fp16",
) -> Path:
    """Export `hf_dir` into `out_dir`; returns the manifest path.

    `weights`: fp32, or int8 / int4 weight-only quantization of the language model's MatMuls (onnxruntime's
    MatMulNBits, symmetric, blocks of 128, accuracy level 4 = int8 arithmetic on the activations).
    `vit_weights`: fp32, or int8 (dynamic quantization of the ViT's MatMuls: int8 weights per channel, int8
    arithmetic, about 2.2x faster per tile on an AVX-512 VNNI CPU), kept only if its features stay within
    VIT_INT8_MIN_COSINE of fp32's on a fixed set of check tiles; the cosine is recorded in the manifest.
    `prefill_weights`: same (prompts run through the decode layers), or int8: a second set of layers for
    prompts, dynamically quantized like the int8 ViT (about 1.6x faster prefill than int4 on an AVX-512 VNNI
    CPU, at 1.3 GB more memory for a 2B model), kept only if each layer's update of a check prompt stays within
    PREFILL_INT8_MIN_COSINE of fp32's; the lowest cosine is recorded in the manifest.
    `kv_cache`: the K/V history's dtype, fp16 (half the bytes a decode step reads at long contexts; the logits
    move by up to about 0.1-1% of their range) or fp32 (within 1e-3 of transformers' logits, as the oracle tests
    hold it).
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if vit_weights not in VIT_FORMATS:
        raise ValueError(f"vit_weights must be one of {', '.join(VIT_FORMATS)}, got {vit_weights!r}")
    if prefill_weights not in PREFILL_FORMATS:
        raise ValueError(f"prefill_weights must be one of {', '.join(PREFILL_FORMATS)}, got {prefill_weights!r}")
    if kv_cache not in CACHE_DTYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(CACHE_DTYPES)}, got {kv_cache!r}")
    ckpt = Checkpoint(hf_dir)
    ckpt.check_complete()
    spec = ckpt.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    step = progress or (lambda _msg: None)

    step("vit")
    save = functools.partial(_save, weights=weights)
    # the language model's weight-only formats never apply to the ViT: its 1025-row matrix products are
    # compute-bound, and the int4 kernels were slower there (2.95 s vs 2.49 s per tile on 2 cores); int8
    # arithmetic is what speeds it up (--vit-weights int8)
    _save(vit_graph(spec, ckpt.tensor), out_dir / "vit.onnx")
    vit_facts: dict[str, object] = {"vit_weights": vit_weights}
    if vit_weights == "int8":
        vit_facts["vit_int8_cosine"] = _quantize_vit(out_dir / "vit.onnx", spec.vision.image_size)
    layers, prefill_layers = [], []
    check = None
    if prefill_weights == "int8":
        check = _PrefillCheck(_check_prompt(spec, ckpt, out_dir / "vit.onnx"), spec, kv_cache)
    for i in range(spec.text.num_layers):
        step(f"layer {i + 1}/{spec.text.num_layers}")
        graph = decoder_layer_graph(spec, i, ckpt.tensor, kv_cache)
        if check is not None:  # before save(), whose weight-only quantizer rewrites the graph in place
            prefill_layers.append(f"llm_prefill_{i:02d}.onnx")
            check.add_layer(graph, out_dir / prefill_layers[-1])
        layers.append(f"llm_layer_{i:02d}.onnx")
        save(graph, out_dir / layers[-1])
    prefill_facts: dict[str, object] = {"prefill_weights": prefill_weights}
    if check is not None:
        prefill_facts["prefill_int8_cosine"] = check.lowest
    step("post")
    save(post_graph(spec, ckpt.tensor), out_dir / "post.onnx")
    step("embeddings")
    np.save(out_dir / "embed_tokens.npy", ckpt.tensor("language_model.model.embed_tokens.weight"))

    for name in TOKENIZER_FILES + ("config.json",):
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, out_dir / name)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "source_layout": ckpt.layout,
        "prefill_chunk": chunk,
        "kv_capacity": min(kv_capacity, spec.text.max_position_embeddings),
        "weights": weights,
        "kv_cache": kv_cache,
        **vit_facts,
        **prefill_facts,
        "files": {"vit": "vit.onnx", "layers": layers, "post": "post.onnx", "embed": "embed_tokens.npy"},
    }
    if prefill_layers:
        manifest["files"]["prefill_layers"] = prefill_layers
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _quantize(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it logs every node it visits at INFO
    with _logging_at("onnxruntime.quantization.matmul_nbits_quantizer", logging.WARNING):
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4)
        quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _logging_at(name: str | None, level: int) -> Iterator[None]:
    """The logger `name` (None: the root) set to `level` while the block runs, then back to its own level."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def check_tiles(image_size: int, count: int = _CHECK_TILES) -> np.ndarray:
    """Fixed, photo-like normalised tiles (N, 3, S, S): smooth colour fields with edges, the same every time."""
    rng = np.random.default_rng(1234)
    grid = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    tiles = []
    for _ in range(count):
        coarse = rng.random((3, 6, 6), dtype=np.float32)
        rows = np.interp(grid, np.linspace(0, 1, 6), np.arange(6)).astype(np.int64)
        field = coarse[:, rows][:, :, rows]  # blocky regions, like objects against a background
        ramp = np.outer(grid, 1 - grid)[None]  # and a soft gradient across them
        tiles.append(np.clip(0.7 * field + 0.3 * ramp, 0, 1))
    unit = np.stack(tiles)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    return ((unit - mean) / std).astype(np.float32)


def _dynamic_int8(source: Path, target: Path) -> None:
    """Quantize the MatMuls of the graph at `source` dynamically into `target`: int8 weights per output
    channel, activations quantized to int8 on the fly, int8 arithmetic (VNNI where the CPU has it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _logging_at(None, logging.ERROR):  # the quantizer advises pre-processing on the root logger
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            # shape inference knows no contrib operators (RotaryEmbedding): every tensor here is float32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    from batch.model.ort_options import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _quantize_vit(path: Path, image_size: int) -> float:
    """Replace the fp32 ViT at `path` by an int8 one if it holds VIT_INT8_MIN_COSINE; returns the cosine."""
    quantized = path.with_name("vit-int8.onnx")
    _dynamic_int8(path, quantized)
    tiles = check_tiles(image_size)
    features = []
    for model in (path, quantized):
        session = _session(model)
        features.append(np.concatenate([session.run(None, {"image": t[None]})[0].ravel() for t in tiles]))
    cosine = _cosine(*features)
    if cosine < VIT_INT8_MIN_COSINE:
        quantized.unlink()
        raise VlbatchError(
            f"{path}: the int8 ViT's features drift from fp32's (cosine {cosine:.4f} < {VIT_INT8_MIN_COSINE}); "
            "export with --vit-weights fp32"
        )
    quantized.replace(path)
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # the fp32 weights, when they lay beside it
    return cosine


def _check_prompt(spec: ModelSpec, ckpt: Checkpoint, vit_path: Path) -> np.ndarray:
    """A fixed prompt's input rows (1, T, hidden): text rows, one check tile's image rows, text rows."""
    features = _session(vit_path).run(None, {"image": check_tiles(spec.vision.image_size, 1)})[0]
    table = ckpt.tensor("language_model.model.embed_tokens.weight")
    ids = np.random.default_rng(4321).integers(0, len(table), 2 * _CHECK_PROMPT_TOKENS)
    text = np.asarray(table[ids], np.float32)
    rows = [text[:_CHECK_PROMPT_TOKENS], features[0].astype(np.float32), text[_CHECK_PROMPT_TOKENS:]]
    return np.concatenate(rows)[None]


class _PrefillCheck:
    """Carries the check prompt through the fp32 decoder layers, one layer as it is exported, and writes each
    layer's int8 prefill form if its update of the prompt stays within PREFILL_INT8_MIN_COSINE of fp32's."""

    def __init__(self, prompt: np.ndarray, spec: ModelSpec, kv_cache: str) -> None:
        from batch.model.attention_mask import chunk_mask
        from batch.model.rotary import inverse_frequencies, rotary_inputs

        n = prompt.shape[1]
        self.hidden = prompt
        self.lowest = 1.0
        t = spec.text
        empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), CACHE_DTYPES[kv_cache])
        self._fixed = {
            "K_cache": empty,
            "V_cache": empty,
            "mask": chunk_mask(0, n, 0),
            **rotary_inputs(inverse_frequencies(t), np.arange(n)[None]),
        }

    def add_layer(self, graph: onnx.ModelProto, target: Path) -> None:
        fp32 = target.with_name(target.stem + ".fp32.onnx")
        _save(graph, fp32)
        try:
            _dynamic_int8(fp32, target)
            updates = [self._run(path) for path in (fp32, target)]
        finally:
            fp32.unlink()
            fp32.with_name(fp32.name + ".data").unlink(missing_ok=True)
        cosine = _cosine(updates[0] - self.hidden, updates[1] - self.hidden)
        if cosine < PREFILL_INT8_MIN_COSINE:
            target.unlink()
            raise VlbatchError(
                f"{target}: the int8 prefill layer's update of the check prompt drifts from fp32's (cosine "
                f"{cosine:.4f} < {PREFILL_INT8_MIN_COSINE}); export with --prefill-weights same"
            )
        self.lowest = min(self.lowest, cosine)
        self.hidden = updates[0]  # the next layer sees fp32's states, so each layer is judged on its own

    def _run(self, path: Path) -> np.ndarray:
        return _session(path).run(["output"], {"input": self.hidden, **self._fixed})[0]


def _save(model: onnx.ModelProto, path: Path, weights: str = "fp32") -> None:
    if weights != "fp32":
        model = _quantize(model, WEIGHT_FORMATS[weights])
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if model.ByteSize() > _EXTERNAL_DATA_BYTES:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, path)
