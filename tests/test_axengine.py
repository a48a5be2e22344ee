"""The NPU path (AxBackend) through a double of axengine that enforces the axmodel I/O contract."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from batch.errors import BackendError, ModelFolderError, PromptTooLongError
from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.select import embeddings_file, folder_kind, model_identity, open_backend
from batch.infer.settings import GenerationSettings

DOUBLES = Path(__file__).parent / "doubles"
sys.path.insert(0, str(DOUBLES))
from axmodel_folder import build_axmodel_folder  # noqa: E402

CHUNK, PREFILL_CHUNKS, KV = 128, 5, 1023
STEPS = 32


@pytest.fixture
def axengine(monkeypatch):
    """Make the double importable as `axengine` for one test."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    monkeypatch.delitem(sys.modules, "axengine", raising=False)
    import axengine

    axengine.calls.clear()
    yield axengine
    sys.modules.pop("axengine", None)


@pytest.fixture(scope="module")
def ax_folder(tiny_onnx: Path, tmp_path_factory) -> Path:
    return build_axmodel_folder(tiny_onnx, tmp_path_factory.mktemp("ax"), CHUNK, PREFILL_CHUNKS, KV)


@pytest.fixture
def ax_pipeline(axengine, ax_folder, tiny_hf):
    p = Pipeline.open(ax_folder, backend="auto", hf_dir=tiny_hf)
    yield p
    p.close()


@pytest.fixture(scope="module")
def cpu_pipeline(tiny_onnx):
    p = Pipeline.open(tiny_onnx)
    yield p
    p.close()


def greedy(pipeline: Pipeline, request: Request) -> tuple[list[int], np.ndarray]:
    steps = list(pipeline.steps(request, GenerationSettings(max_new_tokens=STEPS + 1, ignore_eos=True), Timings()))
    return [s.token for s in steps], np.stack([s.logits for s in steps])


def test_shapes_come_from_the_sessions(ax_pipeline):
    backend = ax_pipeline.backend
    assert backend.name == "axengine"
    assert (backend.chunk_len, backend.kv_capacity, backend.prefill_capacity) == (CHUNK, KV, CHUNK * PREFILL_CHUNKS)
    assert backend.new_cache().k[0].dtype == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("case", ["text", "image", "129 tokens"])
def test_same_greedy_tokens_as_onnxruntime(case, ax_pipeline, cpu_pipeline, media_dir, axengine):
    if case == "text":
        requests = [p.prepare("Where was this photo taken?") for p in (cpu_pipeline, ax_pipeline)]
    elif case == "image":
        requests = [p.prepare("Describe the image.", [media_dir / "square.png"]) for p in (cpu_pipeline, ax_pipeline)]
    else:
        ids = np.random.default_rng(7).integers(0, 1000, 129)
        requests = [Request(ids, None, None, 0.0)] * 2
    assert np.array_equal(requests[0].ids, requests[1].ids)
    cpu_tokens, cpu_logits = greedy(cpu_pipeline, requests[0])
    ax_tokens, ax_logits = greedy(ax_pipeline, requests[1])
    diff = np.abs(cpu_logits - ax_logits).max()
    top2 = np.sort(cpu_logits, axis=-1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).min()
    # bf16 keeps 8 significant bits: rounding hidden states and KV rows at every layer boundary moves single
    # logits by up to ~0.2 here, but the greedy choice flips only where that shift lands on the two best
    # tokens in opposite directions by more than their gap; for these fixed prompts it never does.
    print(f"\n{case}: {len(requests[0].ids)} tokens, max |logit diff| {diff:.3f}, smallest top-2 gap {margin:.3f}")
    assert ax_tokens == cpu_tokens
    assert len(set(ax_tokens)) >= 8
    groups = {g for name, g in axengine.calls if "_l0_" in name}
    chunks = -(-len(requests[0].ids) // CHUNK)
    assert groups == set(range(chunks + 1))  # decode (0) and prefill groups 1 .. chunks, nothing else


def test_double_refuses_feeds_that_break_the_contract(axengine, ax_folder):
    session = axengine.InferenceSession(str(ax_folder / "qwen2_p128_l0_together.axmodel"))
    feed = {
        a.name: np.zeros(a.shape, ml_dtypes.bfloat16 if a.dtype == "bfloat16" else a.dtype)
        for a in session.get_inputs(1)
    }
    assert [o.shape for o in session.get_outputs(1)][2] == session.run(None, feed, shape_group=1)[2].shape
    bad_dtype = dict(feed, input=feed["input"].astype(np.float32))
    with pytest.raises(axengine.ContractError, match="input input expects"):
        session.run(None, bad_dtype, shape_group=1)
    bad_shape = dict(feed, mask=np.zeros((1, CHUNK, CHUNK * 2), ml_dtypes.bfloat16))
    with pytest.raises(axengine.ContractError, match="mask"):
        session.run(None, bad_shape, shape_group=1)
    with pytest.raises(axengine.ContractError, match="fed"):
        session.run(None, {k: v for k, v in feed.items() if k != "indices"}, shape_group=1)


def test_too_long_prompt_names_both_numbers(ax_pipeline, media_dir):
    images = [media_dir / n for n in ["square.png", "tall.jpg", "small.png"]]
    with pytest.raises(PromptTooLongError) as err:
        ax_pipeline.prepare("Compare these.", images)
    message = str(err.value)
    assert f"at most {CHUNK * PREFILL_CHUNKS}" in message and "3 images" in message
    assert "at most 1 image fits" in message


def test_tiles_are_lowered_until_the_prompt_fits(ax_pipeline, media_dir):
    request = ax_pipeline.prepare("Describe.", [media_dir / "wide.png"])  # 3x1 + thumbnail would not fit
    assert request.pixels.shape[0] == 1 and len(request.ids) <= ax_pipeline.backend.prefill_capacity


def test_auto_needs_axengine_for_an_axmodel_folder(ax_folder, monkeypatch):
    assert folder_kind(ax_folder) == "axengine"
    monkeypatch.setitem(sys.modules, "axengine", None)  # import fails as on a machine without an NPU
    with pytest.raises(BackendError, match="axengine cannot be imported"):
        open_backend(ax_folder)


def test_wrong_backend_and_missing_hf_dir_are_explained(ax_folder, tiny_onnx, tiny_hf):
    with pytest.raises(BackendError, match="folder for axengine"):
        open_backend(ax_folder, "onnxruntime")
    with pytest.raises(BackendError, match="folder for onnxruntime"):
        open_backend(tiny_onnx, "axengine")
    with pytest.raises(ModelFolderError, match="--hf-dir"):
        Pipeline.open(ax_folder)
    with pytest.raises(ModelFolderError, match="vlbatch export"):
        folder_kind(tiny_hf)


def test_each_kind_of_folder_names_its_embeddings_and_identity(ax_folder, tiny_onnx, tmp_path):
    assert embeddings_file(ax_folder).name == "model.embed_tokens.weight.npy"
    assert embeddings_file(tiny_onnx).name == "embed_tokens.npy"
    copy = shutil.copytree(ax_folder, tmp_path / ax_folder.name)
    assert model_identity(copy) == model_identity(ax_folder)  # the contents, not the place
    next(copy.glob("*_post.axmodel")).write_bytes(b"a different post graph")
    assert model_identity(copy) != model_identity(ax_folder)
    assert model_identity(tiny_onnx) != model_identity(ax_folder)
    (copy / "model.embed_tokens.weight.npy").unlink()
    with pytest.raises(ModelFolderError, match="embed_tokens"):
        embeddings_file(copy)
