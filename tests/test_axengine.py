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


@pytest.fixture(scope="module")
def ax_folder(tiny_onnx_npu: Path, tmp_path_factory) -> Path:
    return build_axmodel_folder(tiny_onnx_npu, tmp_path_factory.mktemp("ax"), CHUNK, PREFILL_CHUNKS, KV)


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


def _layer_feed(session, group: int) -> dict[str, np.ndarray]:
    return {a.name: np.zeros(a.shape, a.dtype) for a in session.get_inputs(group)}


def test_the_double_declares_numpy_dtypes_and_list_shapes(axengine, ax_folder):
    session = axengine.InferenceSession(str(ax_folder / "qwen2_p128_l0_together.axmodel"))
    args = session.get_inputs(1) + session.get_outputs(1)
    assert all(isinstance(a.dtype, np.dtype) and isinstance(a.shape, list) for a in args)
    assert {str(a.dtype) for a in args} == {"bfloat16", "uint32"}
    feed = _layer_feed(session, 1)
    outputs = session.run(None, feed, shape_group=1)  # None: every output, in declared order
    assert [list(o.shape) for o in outputs] == [a.shape for a in session.get_outputs(1)]
    assert [o.dtype for o in outputs] == [a.dtype for a in session.get_outputs(1)]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("wrong dtype", "input input expects"),
        ("wrong shape", "input mask expects"),
        ("missing input", "fed"),
        ("unknown input", "fed"),
        ("not an array", "input indices expects"),
    ],
)
def test_double_refuses_feeds_that_break_the_contract(case, match, axengine, ax_folder):
    session = axengine.InferenceSession(str(ax_folder / "qwen2_p128_l0_together.axmodel"))
    feed = _layer_feed(session, 1)
    bad = {
        "wrong dtype": dict(feed, input=feed["input"].astype(np.float32)),
        "wrong shape": dict(feed, mask=np.zeros((1, CHUNK, CHUNK * 2), ml_dtypes.bfloat16)),
        "missing input": {k: v for k, v in feed.items() if k != "indices"},
        "unknown input": dict(feed, extra=feed["indices"]),
        "not an array": dict(feed, indices=feed["indices"].tolist()),
    }[case]
    with pytest.raises(axengine.ContractError, match=match):
        session.run(None, bad, shape_group=1)
    with pytest.raises(axengine.ContractError, match="group 0: input K_cache expects"):  # another group's shapes
        session.run(None, feed, shape_group=0)
    assert axengine.calls == []


def test_double_takes_every_output_name_in_any_order(axengine, ax_folder):
    session = axengine.InferenceSession(str(ax_folder / "qwen2_p128_l0_together.axmodel"))
    feed = _layer_feed(session, 1)
    declared = [a.name for a in session.get_outputs(1)]
    by_name = dict(zip(declared, session.run(declared, feed, shape_group=1), strict=True))
    reordered = declared[::-1]
    again = session.run(reordered, feed, shape_group=1)
    assert [a.shape for a in again] == [by_name[n].shape for n in reordered]
    assert all(np.array_equal(a, by_name[n]) for a, n in zip(again, reordered, strict=True))
    with pytest.raises(ValueError, match="is not in list"):  # a partial list, as pyaxengine's list.index
        session.run(declared[:2], feed, shape_group=1)
    with pytest.raises(ValueError, match="output names"):
        session.run([*declared, "logits"], feed, shape_group=1)


def test_double_refuses_unknown_and_unavailable_providers(axengine, ax_folder, monkeypatch):
    path = str(ax_folder / "qwen2_post.axmodel")
    with pytest.raises(ValueError, match="Unknown provider: CUDAExecutionProvider"):
        axengine.InferenceSession(path, providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="not available"):
        axengine.InferenceSession(path, providers=["AXCLRTExecutionProvider"])
    monkeypatch.setattr(axengine, "AVAILABLE", ["AXCLRTExecutionProvider"])
    with pytest.raises(ValueError, match="device_id"):
        axengine.InferenceSession(path, providers=[("AXCLRTExecutionProvider", {"device_id": axengine.DEVICES})])
    axengine.InferenceSession(path, providers=[("AXCLRTExecutionProvider", {"device_id": 1})])
    assert axengine.sessions[-1] == ("qwen2_post.axmodel", [("AXCLRTExecutionProvider", {"device_id": 1})])


def test_providers_and_device_id_reach_every_session(axengine, ax_folder, monkeypatch):
    monkeypatch.setattr(axengine, "AVAILABLE", ["AXCLRTExecutionProvider", "AxEngineExecutionProvider"])
    axengine.sessions.clear()
    backend = open_backend(ax_folder, providers=("AXCLRTExecutionProvider",), device_id=2)
    layers = len(list(ax_folder.glob("*_together.axmodel")))
    assert len(axengine.sessions) == layers + 2  # the layers, post and the ViT
    assert {repr(p) for _, p in axengine.sessions} == {repr([("AXCLRTExecutionProvider", {"device_id": 2})])}
    # the card each session runs on: pyaxengine reads it from provider_options, not from the providers' tuples
    sessions = [*backend._layers, backend._post, backend._vit]
    assert {s.session._sess._device_index for s in sessions} == {2}
    axengine.sessions.clear()
    backend = open_backend(ax_folder, device_id=1)  # no provider named: the runtime's first available one
    assert {repr(p) for _, p in axengine.sessions} == {repr([("AXCLRTExecutionProvider", {"device_id": 1})])}
    assert {s.session._sess._device_index for s in [*backend._layers, backend._post, backend._vit]} == {1}
    axengine.sessions.clear()
    open_backend(ax_folder, providers=("AxEngineExecutionProvider",))
    assert {repr(p) for _, p in axengine.sessions} == {repr([("AxEngineExecutionProvider", {})])}


def test_an_unknown_provider_is_explained_with_the_available_ones(axengine, ax_folder):
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*offers AxEngineExecutionProvider"):
        open_backend(ax_folder, providers=("CUDAExecutionProvider",))
    with pytest.raises(BackendError, match="AXCLRTExecutionProvider.*offers AxEngineExecutionProvider"):
        open_backend(ax_folder, providers=("AXCLRTExecutionProvider",))  # known, but no AXCL card here
    with pytest.raises(BackendError, match="could not load it.*device_id"):
        open_backend(ax_folder, device_id=axengine.DEVICES)  # the runtime's own refusal, with the file named


def test_providers_do_not_apply_to_an_onnxruntime_folder(tiny_onnx):
    with pytest.raises(BackendError, match="onnxruntime folder: providers and device_id"):
        open_backend(tiny_onnx, providers=("AxEngineExecutionProvider",))
    with pytest.raises(BackendError, match="onnxruntime folder"):
        open_backend(tiny_onnx, device_id=0)


def test_the_backend_reads_dtypes_given_as_objects_or_names():
    from batch.infer.runtime.axengine_backend import _Node

    class Arg:
        def __init__(self, dtype):
            self.name, self.shape, self.dtype = "x", [1, 2], dtype

    bf16 = np.dtype(ml_dtypes.bfloat16)
    for declared, expected in [
        (bf16, bf16),
        ("bfloat16", bf16),
        (np.dtype(np.uint32), np.dtype(np.uint32)),
        ("float32", np.dtype(np.float32)),
        (np.float32, np.dtype(np.float32)),
    ]:
        node = _Node(Arg(declared))
        assert node.dtype == expected and node.shape == (1, 2)
        assert node.cast(np.ones((1, 2))).dtype == expected


@pytest.mark.parametrize("command", ["ask", "run", "watch"])
def test_the_cli_passes_providers_and_device_id(command, tiny_onnx, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import batch.infer.pipeline as pipeline_module
    import batch.service.worker.worker as worker_module
    from batch.cli import main
    from batch.errors import VlbatchError

    seen = {}

    def stop(**kwargs):
        seen.update(kwargs)
        raise VlbatchError("stopped here")

    monkeypatch.setattr(pipeline_module.Pipeline, "open", lambda *a, **k: stop(**k))
    monkeypatch.setattr(worker_module.Worker, "from_config", lambda config, force, **_: stop(model=config.model))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLBATCH_CONFIG", raising=False)
    args = [command, "--model", str(tiny_onnx), "--providers", "AXCLRTExecutionProvider, AxEngineExecutionProvider"]
    args += ["--device-id", "3"] + (["-p", "hi"] if command == "ask" else [])
    result = CliRunner().invoke(main, args)
    assert "stopped here" in result.output
    model = seen.get("model")
    got = (model.providers, model.device_id) if model else (seen["providers"], seen["device_id"])
    assert got == (("AXCLRTExecutionProvider", "AxEngineExecutionProvider"), 3)
    bad = CliRunner().invoke(main, [command, "--model", str(tiny_onnx), "--providers", "A,,B"])
    assert bad.exit_code == 2 and "NAME[,NAME]" in bad.output


def test_worker_from_config_opens_the_configured_device(axengine, ax_folder, tiny_hf, tmp_path, monkeypatch):
    from batch.config import Config, ModelConfig, SpoolConfig
    from batch.service.worker.worker import Worker

    monkeypatch.setattr(axengine, "AVAILABLE", ["AXCLRTExecutionProvider"])
    model = ModelConfig(dir=ax_folder, hf_dir=tiny_hf, providers=["AXCLRTExecutionProvider"], device_id=1)
    assert model.providers == ("AXCLRTExecutionProvider",)
    config = Config(model=model, spool=SpoolConfig(dir=tmp_path / "jobs", database=tmp_path / "v.db"))
    worker = Worker.from_config(config)
    try:
        axengine.sessions.clear()
        assert worker.pipeline.backend.name == "axengine"
        assert {repr(p) for _, p in axengine.sessions} == {repr([("AXCLRTExecutionProvider", {"device_id": 1})])}
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("field", "value"), [("providers", "AXCLRTExecutionProvider"), ("providers", [""]), ("device_id", -1)]
)
def test_model_config_refuses_bad_providers_and_device_ids(field, value):
    from batch.config import ModelConfig

    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


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


@pytest.mark.parametrize(
    "failure",
    [
        'OSError("libax_engine.so: cannot open shared object file: No such file or directory")',
        'RuntimeError("AXCL runtime init failed")',
        "ImportError(\"No module named 'axengine._capi'\")",
    ],
)
def test_an_axengine_that_fails_to_import_is_explained(failure, ax_folder, tmp_path, monkeypatch):
    broken = tmp_path / "broken" / "axengine"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(f"raise {failure}\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.delitem(sys.modules, "axengine", raising=False)
    with pytest.raises(BackendError, match="axengine cannot be imported.*export") as err:
        open_backend(ax_folder)
    assert failure.split("(")[0] in str(err.value)
    assert "axengine" not in sys.modules


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


def test_the_runtimes_own_prints_go_to_stderr(axengine, ax_folder, tiny_hf, capsys):
    """pyaxengine prints [INFO] lines on stdout when imported and for each session; vlbatch's stdout (answers,
    --json) stays its own."""
    sys.modules.pop("axengine", None)  # imported afresh, as on a board's first use
    pipeline = Pipeline.open(ax_folder, backend="auto", hf_dir=tiny_hf)
    pipeline.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "[INFO] Available providers" in err and "[INFO] Using provider: AxEngineExecutionProvider" in err
