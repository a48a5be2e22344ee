"""Peer: llama.cpp (llama-cpp-python) on the same language model, as GGUF quantized to Q4_0 and Q8_0.

    python bench/peer_llamacpp.py HF_DIR GGUF_DIR --threads 2 --prompt-tokens 128 400 --decode-tokens 32

Writes GGUF_DIR/model-f16.gguf from the InternVL folder's language model (the `gguf` package; a byte-level
vocabulary of the model's size), quantizes it with `llama_model_quantize`, and prints one JSON object with
prefill tokens/s per prompt length and decode tokens/s for each quantization. Needs `pip install
'vlbatch[bench]'` (llama-cpp-python compiles from source, 5-10 minutes); `make bench` builds it without
AMX, whose buffers crashed llama.cpp on multi-token batches on an AMX-capable Xeon.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from batch.model.checkpoint import Checkpoint


def _byte_symbols() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_gguf(hf_dir: Path, path: Path) -> None:
    import gguf

    ckpt = Checkpoint(hf_dir)
    t = ckpt.spec.text
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("vlbatch-language-model")
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_rope_freq_base(t.rope_theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    symbols = _byte_symbols()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = symbols + [f"tok{i}" for i in range(t.vocab_size - len(symbols) - len(specials))] + specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges([f"{symbols[0]} {symbols[1]}"])
    w.add_eos_token_id(len(tokens) - 1)

    def put(name: str, canonical: str, half: bool = True) -> None:
        array = ckpt.tensor(canonical)
        w.add_tensor(name, array.astype(np.float16) if half and array.ndim == 2 else array)

    m = "language_model.model."
    put("token_embd.weight", m + "embed_tokens.weight")
    for i in range(t.num_layers):
        p, q = f"blk.{i}.", f"{m}layers.{i}."
        put(p + "attn_norm.weight", q + "input_layernorm.weight")
        for x in "qkv":
            put(p + f"attn_{x}.weight", q + f"self_attn.{x}_proj.weight")
            put(p + f"attn_{x}.bias", q + f"self_attn.{x}_proj.bias")
        put(p + "attn_output.weight", q + "self_attn.o_proj.weight")
        put(p + "ffn_norm.weight", q + "post_attention_layernorm.weight")
        for x in ("gate", "up", "down"):
            put(p + f"ffn_{x}.weight", q + f"mlp.{x}_proj.weight")
    put("output_norm.weight", m + "norm.weight")
    put("output.weight", "language_model.lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("gguf_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 400])
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = args.gguf_dir / "model-f16.gguf"
    if not f16.exists():
        write_gguf(args.hf_dir, f16)
    result = {}
    for name, ftype in (("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        path = args.gguf_dir / f"model-{name}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, args.threads
            assert llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) == 0
        started = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_ctx=4096,
            n_batch=512,
            verbose=False,
        )
        figures: dict[str, float] = {"load_s": time.perf_counter() - started}
        for n in args.prompt_tokens:
            tokens = [1000 + (i * 7) % 5000 for i in range(n)]
            llm.reset()
            t = time.perf_counter()
            llm.eval(tokens)
            figures[f"prefill_{n}_tok_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(args.decode_tokens):
            llm.eval([2000 + i])
        seconds = time.perf_counter() - t
        figures["decode_ms_per_token"] = seconds / args.decode_tokens * 1e3
        figures["decode_tok_s"] = args.decode_tokens / seconds
        result[name] = figures
        del llm
    print(json.dumps(result))


if __name__ == "__main__":
    main()
