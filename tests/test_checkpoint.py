"""Model folders read as data: both layouts, shards, half-precision weights, and the errors a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from batch.errors import ModelFolderError
from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline
from batch.infer.settings import GenerationSettings
from batch.model.checkpoint import NATIVE, ORIGINAL, Checkpoint, read_config
from batch.model.export.exporter import export
from batch.model.safetensors_io import SafetensorsFile, save_file


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def all_weights(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path / "model.safetensors")
    return {k: np.asarray(f.get(k)) for k in f.keys()}


def test_both_layouts_give_the_same_canonical_weights(tiny_hf, tiny_native):
    original, native = Checkpoint(tiny_hf), Checkpoint(tiny_native)
    assert (original.layout, native.layout) == (ORIGINAL, NATIVE)
    assert original.spec.vision == native.spec.vision and original.spec.text == native.spec.text
    for name in original.canonical_names():
        np.testing.assert_array_equal(original.tensor(name), native.tensor(name), err_msg=name)


def test_both_layouts_export_to_graphs_with_the_same_outputs(tiny_onnx, tiny_native, tmp_path, media_dir):
    export(tiny_native, tmp_path / "onnx")
    logits = []
    for folder in (tiny_onnx, tmp_path / "onnx"):
        pipeline = Pipeline.open(folder)
        request = pipeline.prepare("Describe the image.", [media_dir / "photo.jpg"])
        steps = pipeline.steps(request, GenerationSettings(max_new_tokens=8, ignore_eos=True), Timings())
        logits.append(np.stack([s.logits for s in steps]))
        pipeline.close()
    np.testing.assert_array_equal(logits[0], logits[1])


def test_sharded_folder_reads_like_a_single_file(tiny_hf, tmp_path):
    weights = all_weights(tiny_hf)
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_hf / name, folder / name)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, single = Checkpoint(folder), Checkpoint(tiny_hf)
    sharded.check_complete()
    for name in single.canonical_names():
        np.testing.assert_array_equal(sharded.tensor(name), single.tensor(name))

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="shard model-00002-of-00002.safetensors is missing"):
        Checkpoint(folder)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_weights_are_upcast_exactly(tiny_hf, tmp_path, dtype):
    folder = copy_model(tiny_hf, tmp_path / "half")
    weights = {k: v.astype(dtype) for k, v in all_weights(tiny_hf).items()}
    save_file(weights, folder / "model.safetensors")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    loaded = Checkpoint(folder).tensor(name)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, weights[name].astype(np.float32))


def test_pickled_weights_only_is_refused(tiny_hf, tmp_path):
    folder = copy_model(tiny_hf, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"only pickled weights \(pytorch_model.bin\)"):
        Checkpoint(folder)


def test_missing_weight_is_named(tiny_hf, tmp_path):
    folder = copy_model(tiny_hf, tmp_path / "missing")
    weights = all_weights(tiny_hf)
    del weights["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelFolderError, match=r"layers\.1\.mlp\.up_proj\.weight is missing"):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_config_that_contradicts_the_weights_is_named(tiny_hf, tmp_path):
    folder = copy_model(tiny_hf, tmp_path / "wrong")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"gate_proj.weight has shape \(192, 64\), but config.json implies"):
        Checkpoint(folder).check_complete()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "config.json: missing"),
        ("{not json", "not valid JSON"),
        ('{"model_type": "llama"}', "not an InternVL config"),
        ('{"llm_config": {}, "vision_config": {}}', "missing key"),
    ],
)
def test_bad_config_json(tiny_hf, tmp_path, content, message):
    folder = copy_model(tiny_hf, tmp_path / "bad")
    if content is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(content)
    with pytest.raises(ModelFolderError, match=message):
        read_config(folder)


def test_code_in_a_model_folder_is_never_run(tiny_hf, tmp_path):
    """A folder that asks for remote code: vlbatch reads its data and leaves its Python alone."""
    folder = copy_model(tiny_hf, tmp_path / "remote")
    marker = tmp_path / "code-ran"
    for module in ("configuration_internvl_chat", "modeling_internvl_chat", "tokenization_internlm2"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))

    export(folder, tmp_path / "onnx")
    Pipeline.open(tmp_path / "onnx").close()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("layout", "section", "tower"),
    [
        ("original", "llm_config", "language"),
        ("original", "vision_config", "vision"),
        ("native", "text_config", "language"),
        ("native", "vision_config", "vision"),
    ],
)
def test_config_with_more_layers_than_the_weights_says_so(tiny_hf, tiny_native, tmp_path, layout, section, tower):
    folder = copy_model(tiny_hf if layout == "original" else tiny_native, tmp_path / "deeper")
    config = json.loads((folder / "config.json").read_text())
    config[section]["num_hidden_layers"] = 24
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=f"config.json says 24 {tower} layers, the weights hold 2$"):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
