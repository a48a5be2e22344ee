"""The fused attention (batch/infer/runtime/native/fused_attention.c, fused_layer.py, native_attention.py): the
operator against the attention's definition in float64, a layer graph with it against the layer as exported, whole
answers with and without it, and every way it stays off (the decode then runs the exported graphs' attention)."""

from __future__ import annotations

import io
import logging
import platform
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from batch.infer.generate import decode_one_token, prefill
from batch.infer.pipeline import Pipeline
from batch.infer.runtime import native_attention
from batch.infer.runtime.fused_layer import DOMAIN, OP, fuse_attention
from batch.infer.runtime.onnx_messages import load_model
from batch.model.attention_mask import MASKED, chunk_mask
from batch.model.ort_options import session_options
from batch.model.rotary import inverse_frequencies, rotary_inputs


@pytest.fixture
def library(fused_attention_root: Path | None) -> Path:
    """The built library, on a CPU that runs it; the tests that need it skip elsewhere."""
    if fused_attention_root is None:
        pytest.skip("the fused attention library cannot be built here (see native_attention.py)")
    path = native_attention.build(fused_attention_root)
    if not native_attention.cpu_supported(path):
        pytest.skip("this CPU lacks AVX-512F, F16C or FMA")
    return path


@pytest.fixture(autouse=True)
def fresh_choice():
    """Each test decides afresh whether the library is used (the choice is cached per process)."""
    native_attention.library.cache_clear()
    yield
    native_attention.library.cache_clear()


def operator_session(library: Path, head_dim: int) -> ort.InferenceSession:
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    names = [("q", f32, "M"), ("K", f16, "W"), ("V", f16, "W"), ("k", f32, "S"), ("v", f32, "S")]
    inputs = [helper.make_tensor_value_info(name, kind, ["B", "H", axis, head_dim]) for name, kind, axis in names]
    inputs.append(helper.make_tensor_value_info("mask", f32, ["B", "S", "T"]))
    node = helper.make_node(OP, [value.name for value in inputs], ["out"], domain=DOMAIN, scale=head_dim**-0.5)
    output = helper.make_tensor_value_info("out", f32, ["B", "H", "M", head_dim])
    model = helper.make_model(
        helper.make_graph([node], "attention", inputs, [output]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
    )
    model.ir_version = 9
    options = native_attention.fused_options(session_options(), library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(q, keys, values, own_keys, own_values, mask) -> np.ndarray:
    """softmax(q . [K; k] / sqrt(d) + mask) . [V; v] in float64, each query row i*S + s seeing mask row s."""
    rows, heads, queries, dim = q.shape
    chunk = own_keys.shape[2]
    k = np.concatenate([keys.astype(np.float64), own_keys], axis=2)
    v = np.concatenate([values.astype(np.float64), own_values], axis=2)
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * dim**-0.5
    scores = scores.reshape(rows, heads, queries // chunk, chunk, -1) + mask[:, None, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs.reshape(rows, heads, queries, -1) @ v


@pytest.mark.parametrize(
    ("rows", "kv_heads", "group", "chunk", "width", "dim"),
    [
        (1, 2, 6, 1, 2240, 128),  # a decode step of InternVL3-2B after 2,200 tokens
        (1, 2, 6, 1, 0, 128),  # the first token: no history
        (1, 2, 6, 128, 384, 128),  # a prompt chunk
        (3, 2, 6, 1, 77, 128),  # three answers decoded together, each its own length
        (2, 2, 2, 1, 37, 16),  # the tiny model's heads
        (1, 1, 3, 7, 16, 64),
        (1, 4, 1, 2, 45, 256),
    ],
)
def test_operator_matches_the_definition(library, rows, kv_heads, group, chunk, width, dim):
    rng = np.random.default_rng(width + dim)
    shape = (rows, kv_heads)
    q = (rng.standard_normal((*shape, group * chunk, dim)) * 2).astype(np.float32)
    keys = (rng.standard_normal((*shape, width, dim)) * 2).astype(np.float16)
    values = rng.standard_normal((*shape, width, dim)).astype(np.float16)
    own_keys = rng.standard_normal((*shape, chunk, dim)).astype(np.float32)
    own_values = rng.standard_normal((*shape, chunk, dim)).astype(np.float32)
    mask = np.concatenate([chunk_mask(int(rng.integers(0, width + 1)), chunk, width) for _ in range(rows)])
    feeds = {"q": q, "K": keys, "V": values, "k": own_keys, "v": own_values, "mask": mask}
    out = operator_session(library, dim).run(None, feeds)[0]
    want = reference(q, keys, values, own_keys, own_values, mask)
    assert np.abs(out - want).max() < 2e-5 * max(1.0, np.abs(want).max())


def attention_feeds(dim: int, width: int, mask_width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(dim)
    return {
        "q": rng.standard_normal((1, 1, 2, dim)).astype(np.float32),
        "K": np.zeros((1, 1, width, dim), np.float16),
        "V": np.zeros((1, 1, width, dim), np.float16),
        "k": np.zeros((1, 1, 1, dim), np.float32),
        "v": np.zeros((1, 1, 1, dim), np.float32),
        "mask": np.zeros((1, 1, mask_width), np.float32),
    }


def test_operator_refuses_shapes_it_does_not_take(library):
    with pytest.raises(Exception, match="FusedAttention: inputs of shapes it does not take"):
        operator_session(library, 24).run(None, attention_feeds(24, 4, 5))  # head_dim no multiple of 16
    with pytest.raises(Exception, match="FusedAttention: inputs of shapes it does not take"):
        operator_session(library, 32).run(None, attention_feeds(32, 4, 9))  # a mask wider than history + chunk


def layer_feeds(spec, rows: int, chunk: int, width: int, seed: int) -> dict[str, np.ndarray]:
    t = spec.text
    rng = np.random.default_rng(seed)
    positions = np.array([[width + s for s in range(chunk)]] * rows)
    history = (rows, t.num_kv_heads, width, t.head_dim)
    masks = [chunk_mask(width - 3 * r, chunk, width) for r in range(rows)]  # row r holds width - 3r positions
    return {
        "K_cache": rng.standard_normal(history).astype(np.float16),
        "V_cache": rng.standard_normal(history).astype(np.float16),
        "input": rng.standard_normal((rows, chunk, t.hidden_size)).astype(np.float32),
        "mask": np.concatenate(masks),
        **rotary_inputs(inverse_frequencies(t), positions),
    }


def test_a_fused_layer_gives_the_exported_layers_outputs(library, tiny_onnx):
    from batch.infer.runtime.onnx_backend import read_manifest
    from batch.model.modelspec import ModelSpec

    spec = ModelSpec.from_dict(read_manifest(tiny_onnx)["spec"])
    path = tiny_onnx / "llm_layer_00.onnx"
    model = load_model(path.read_bytes())
    assert fuse_attention(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count(OP) == 1 and "Softmax" not in ops and "FusedMatMul" not in ops
    checked = onnx.load_from_string(model.SerializeToString())  # the onnx package's own view of the edited graph
    onnx.checker.check_model(checked)
    assert not {init.name for init in checked.graph.initializer} - {i for n in checked.graph.node for i in n.input}
    exported = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(
        model.SerializeToString(),
        native_attention.fused_options(session_options(), library),
        providers=["CPUExecutionProvider"],
    )
    for rows, chunk, width in [(1, 1, 300), (1, 128, 256), (1, 5, 0), (4, 1, 64)]:  # decode, prompt chunks, batch
        feeds = layer_feeds(spec, rows, chunk, width, seed=rows + chunk + width)
        want, got = exported.run(None, feeds), fused.run(None, feeds)
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])  # the new K/V rows as they were
        assert np.abs(want[2] - got[2]).max() < 1e-5 * max(1.0, np.abs(want[2]).max())


def test_a_layer_read_and_written_back_untouched_is_the_same_model(tiny_onnx):
    """The runtime's own view of an ONNX file (onnx_messages) keeps every field it does not declare."""
    original = (tiny_onnx / "llm_layer_00.onnx").read_bytes()
    assert onnx.load_from_string(load_model(original).SerializeToString()) == onnx.load_from_string(original)


def test_graphs_it_does_not_know_are_left_as_they_are(tiny_onnx_fp32_cache, tiny_onnx, tmp_path):
    def unchanged(model_bytes: bytes) -> bool:
        model = load_model(model_bytes)
        return not fuse_attention(model) and model.SerializeToString() == load_model(model_bytes).SerializeToString()

    assert unchanged((tiny_onnx_fp32_cache / "llm_layer_00.onnx").read_bytes())  # the op reads fp16 histories only
    assert unchanged((tiny_onnx / "post.onnx").read_bytes())
    changed = onnx.load(str(tiny_onnx / "llm_layer_00.onnx"))  # a second reader of the scores
    scores = next(node for node in changed.graph.node if node.op_type == "Softmax").input[0]
    changed.graph.node.append(helper.make_node("Identity", [scores], ["also_scores"]))
    changed.graph.output.append(helper.make_tensor_value_info("also_scores", TensorProto.FLOAT, None))
    assert unchanged(changed.SerializeToString())
    external = onnx.load(str(tiny_onnx / "llm_layer_00.onnx"))  # weights in a file beside the graph
    onnx.save(external, str(tmp_path / "layer.onnx"), save_as_external_data=True, size_threshold=0)
    assert unchanged((tmp_path / "layer.onnx").read_bytes())


def greedy(folder: Path, prompt_tokens: int, steps: int) -> tuple[bool, list[int], np.ndarray]:
    pipeline = Pipeline.open(folder, threads=2)
    backend, table = pipeline.backend, pipeline.embeddings
    cache = backend.new_cache()
    embeds = np.asarray(table[np.arange(prompt_tokens) % len(table)], np.float32)
    logits = backend.logits(prefill(backend, embeds, cache))
    tokens, every = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        every.append(logits)
        logits = decode_one_token(backend, table[tokens[-1]][None, None].astype(np.float32), cache)
    return backend.fused_attention, tokens, np.array(every)


@pytest.mark.parametrize("prompt_tokens", [1, 129, 700])
def test_answers_are_the_same_with_the_fused_attention(library, tiny_onnx, monkeypatch, prompt_tokens):
    monkeypatch.setenv(native_attention.SWITCH, "1")  # asked for: the tiny export's weights are fp32
    fused, tokens, logits = greedy(tiny_onnx, prompt_tokens, 24)
    monkeypatch.setenv(native_attention.SWITCH, "0")
    native_attention.library.cache_clear()
    plain, plain_tokens, plain_logits = greedy(tiny_onnx, prompt_tokens, 24)
    assert fused and not plain
    assert tokens == plain_tokens
    assert np.abs(logits - plain_logits).max() < 1e-3  # the logits span about +-16


def fake_deb(header: bytes) -> bytes:
    """An ar archive as a .deb is, its data.tar.xz holding onnxruntime_c_api.h where libonnxruntime-dev has it."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/include/onnxruntime/onnxruntime_c_api.h")
        info.size = len(header)
        tar.addfile(info, io.BytesIO(header))
    archive = b"!<arch>\n"
    for name, body in [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b"x"), (b"data.tar.xz", data.getvalue())]:
        archive += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        archive += str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    return archive


def test_the_header_is_taken_only_from_the_package_with_the_expected_checksum():
    import hashlib

    package = fake_deb(b"/* the C API */\n")
    digest = hashlib.sha256(package).hexdigest()
    assert native_attention.header_from_package(package, digest) == b"/* the C API */\n"
    with pytest.raises(native_attention.NativeUnavailable, match="SHA-256"):
        native_attention.header_from_package(package + b"tampered", digest)
    not_ar = b"<html>a proxy's error page</html>"
    with pytest.raises(native_attention.NativeUnavailable, match="not an ar archive"):
        native_attention.header_from_package(not_ar, hashlib.sha256(not_ar).hexdigest())


def test_without_a_compiler_the_layers_run_their_own_attention_and_the_log_says_why(
    tiny_onnx, fused_attention_root, monkeypatch, tmp_path, caplog
):
    if fused_attention_root is None:
        pytest.skip("the header cannot be fetched here")
    # a fresh cache holding the header but no library, and no compiler to build one
    root = tmp_path / "native"
    (root / "include").mkdir(parents=True)
    header = fused_attention_root / "include" / native_attention.HEADER
    (root / "include" / native_attention.HEADER).write_bytes(header.read_bytes())
    monkeypatch.setenv(native_attention.CACHE_VARIABLE, str(root))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native_attention.SWITCH, "1")
    with caplog.at_level(logging.WARNING, logger="batch.infer.runtime.native_attention"):
        fused, tokens, _ = greedy(tiny_onnx, 40, 4)
    assert not fused and len(tokens) == 4
    assert any("no C compiler" in record.getMessage() for record in caplog.records)


def test_the_off_switch_and_other_machines_keep_it_off(monkeypatch, caplog):
    monkeypatch.setenv(native_attention.SWITCH, "0")
    with caplog.at_level(logging.INFO, logger="batch.infer.runtime.native_attention"):
        assert native_attention.library() is None
    assert "fused attention off" in caplog.text
    monkeypatch.delenv(native_attention.SWITCH)
    native_attention.library.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert native_attention.library() is None


def test_a_compile_error_is_reported_with_the_compilers_words(fused_attention_root, monkeypatch, tmp_path):
    if fused_attention_root is None:
        pytest.skip("the header cannot be fetched here")
    root = tmp_path / "native"
    (root / "include").mkdir(parents=True)
    (root / "include" / native_attention.HEADER).write_text("#error this header is broken\n")
    with pytest.raises(native_attention.NativeUnavailable, match="this header is broken"):
        native_attention.build(root)
    assert not list(root.glob("*/*.so")) and not list(root.glob("*/.lib*"))  # nothing half-written is kept


def test_unknown_variable_check_knows_the_switch():
    from batch.config import unknown_env_variables

    known = {native_attention.SWITCH: "0", native_attention.CACHE_VARIABLE: "/srv/cache"}
    assert unknown_env_variables({**known, "VLBATCH_NO_SUCH": "1"}) == ["VLBATCH_NO_SUCH"]


def test_masked_positions_weigh_nothing(library):
    """A history wider than a row's length (the cache grows in steps of 64): what lies past it weighs exactly 0."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 6, 128)).astype(np.float32)
    keys = rng.standard_normal((1, 2, 64, 128)).astype(np.float16)
    values = rng.standard_normal((1, 2, 64, 128)).astype(np.float16)
    own = rng.standard_normal((1, 2, 1, 128)).astype(np.float32)
    mask = chunk_mask(40, 1, 64)
    assert mask[0, 0, 40] == MASKED
    session = operator_session(library, 128)
    clean = session.run(None, {"q": q, "K": keys, "V": values, "k": own, "v": own, "mask": mask})[0]
    junk_keys, junk_values = keys.copy(), values.copy()
    junk_keys[:, :, 40:], junk_values[:, :, 40:] = 100, -100
    junk = session.run(None, {"q": q, "K": junk_keys, "V": junk_values, "k": own, "v": own, "mask": mask})[0]
    assert np.abs(clean - reference(q, keys, values, own, own, mask)).max() < 1e-5
    assert np.array_equal(clean, junk)


def test_a_fused_graph_onnxruntime_refuses_loads_as_exported(library, tiny_onnx, monkeypatch, caplog):
    from batch.infer.runtime import fused_layer

    real = fused_layer.fuse_attention

    def broken(model) -> bool:  # the node's type unknown to onnxruntime, as a library from another build might be
        done = real(model)
        next(node for node in model.graph.node if node.op_type == OP).op_type = "NoSuchAttention"
        return done

    monkeypatch.setattr(fused_layer, "fuse_attention", broken)
    monkeypatch.setenv(native_attention.SWITCH, "1")
    with caplog.at_level(logging.WARNING, logger="batch.infer.runtime.native_attention"):
        fused, tokens, _ = greedy(tiny_onnx, 40, 4)
    assert not fused and len(tokens) == 4
    assert "its fused attention did not load, the layer runs its own" in caplog.text


def test_a_library_onnxruntime_refuses_is_not_used(tmp_path, caplog):
    not_a_library = tmp_path / "libvlbatch_attention.so"
    not_a_library.write_text("not ELF\n")
    with caplog.at_level(logging.WARNING, logger="batch.infer.runtime.native_attention"):
        assert native_attention.fused_options(session_options(), not_a_library) is None
    assert "onnxruntime refused" in caplog.text


def test_by_default_only_quantized_exports_have_it(monkeypatch):
    for weights, default in [("fp32", False), ("int8", True), ("int4", True)]:
        monkeypatch.delenv(native_attention.SWITCH, raising=False)
        assert native_attention.wanted(weights) is default
        for switch, asked in [("1", True), ("on", True), ("0", False), ("no", False)]:
            monkeypatch.setenv(native_attention.SWITCH, switch)
            assert native_attention.wanted(weights) is asked


def test_an_int4_export_has_it_unasked(library, tiny_hf, tmp_path):
    from batch.model.export.exporter import export

    int4 = tmp_path / "int4"
    export(tiny_hf, int4, weights="int4")
    fused, tokens, _ = greedy(int4, 40, 4)
    assert fused and len(tokens) == 4
