"""Peer: llama.cpp (llama-cpp-python) on the same language model, as GGUF quantized to Q4_0 and Q8_0.

    python bench/peer_llamacpp.py HF_DIR GGUF_DIR --threads 2 --prompt-tokens 128 400 --decode-tokens 32
                                  [--quants Q4_0 Q8_0] [--cpu-variant NAME [--force-variant]] [--allow-amx]

Writes GGUF_DIR/model-f16.gguf from the InternVL folder's language model (the `gguf` package's writer; the
folder's own tokenizer.json: its byte-level BPE vocabulary, merges and special tokens at their ids, padded to
the embedding's rows), quantizes it with `llama_model_quantize`, and prints one JSON object: the CPU variant it
ran and, per quantization and per --prompt-tokens length in turn, the prefill tokens/s of that prompt
(`prefill_N_tok_s`) and the decode speed of --decode-tokens tokens fed right after it (`decode_after_N_tok_s`,
`decode_after_N_ms_per_token`: decode at that context); `decode_tok_s` and `decode_ms_per_token` repeat the
figures after the last length. llama.cpp's own converter refuses a made-up tokenizer ("BPE pre-tokenizer was
not recognized"), hence this writer; with the real vocabulary llama.cpp tokenizes text, and the <img> and </img>
that its mtmd library puts around an image, as vlbatch does (bench/peer_mtmd.py uses the same file). The
prompt's token ids are drawn within the vocabulary, so every preset runs (tiny included).

`make bench` builds llama.cpp with every CPU variant as its own library (GGML_BACKEND_DL with
GGML_CPU_ALL_VARIANTS): AVX2-only, AVX-512 with and without VNNI and BF16, AVX-VNNI, AMX on x86-64; armv8.x
with and without dot-product, i8mm and SVE on arm64. This script loads the best variant the CPU can run, as
llama.cpp's own tools do, except the AMX one (`sapphirerapids`) unless --allow-amx: its AMX buffers crashed
llama.cpp on multi-token batches on an AMX Xeon, and the AVX-512 VNNI variant runs on the same CPU. A
`--cpu-variant` pins one (`--force-variant` even one this CPU cannot run, which dies of SIGILL: the failure a
build for a fixed feature list has on a CPU without that feature). A static build (one CPU library) runs as is.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from batch.model.checkpoint import Checkpoint

# general.name of the GGUF files this writer makes: a cached file with another name is rewritten (older ones
# had a made-up vocabulary without the image tokens)
GGUF_NAME = "vlbatch-language-model (tokenizer.json vocabulary)"
# llama.cpp token types
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5


def _pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's regex (ByteLevel) or Qwen2's (a Split)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "qwen2"


def gguf_vocabulary(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str, dict[str, int]]:
    """(tokens, token types, merges, pre-tokenizer, special ids) from the folder's tokenizer.json.

    Ids are the tokenizer's: the BPE vocabulary, then its added (special) tokens as control tokens, padded
    with unused `[PADn]` tokens up to the embedding's row count, as llama.cpp's converter pads.
    """
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id: dict[int, tuple[str, int]] = {i: (t, _NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], _CONTROL if added.get("special", True) else _NORMAL)
    if max(by_id) >= vocab_size:
        raise ValueError(f"{hf_dir}: tokenizer id {max(by_id)} is past the embedding's {vocab_size} rows")
    tokens = [by_id.get(i, (f"[PAD{i}]", _UNUSED))[0] for i in range(vocab_size)]
    types = [by_id.get(i, ("", _UNUSED))[1] for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    specials = {t: i for i, (t, kind) in by_id.items() if kind == _CONTROL}
    return tokens, types, merges, _pre_tokenizer(tokenizer), specials


def write_gguf(hf_dir: Path, path: Path) -> None:
    import gguf

    ckpt = Checkpoint(hf_dir)
    t = ckpt.spec.text
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name(GGUF_NAME)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_rope_freq_base(t.rope_theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges, pre, specials = gguf_vocabulary(hf_dir, t.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    w.add_eos_token_id(specials.get("<|im_end|>", len(tokens) - 1))
    if "<|endoftext|>" in specials:
        w.add_pad_token_id(specials["<|endoftext|>"])

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
    if not t.tie_word_embeddings:  # tied: llama.cpp takes the logits from token_embd
        put("output.weight", "language_model.lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


AMX_VARIANTS = {"sapphirerapids"}
_PREFIX = "libggml-cpu-"


def library_dir() -> Path:
    """llama-cpp-python's folder of shared libraries, found without importing it (that would start llama.cpp)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def cpu_variants(lib: Path) -> dict[str, Path]:
    """The CPU variants of a GGML_BACKEND_DL build, by name (haswell, zen4, ...); empty for a static build."""
    return {
        path.name[len(_PREFIX) :].split(".")[0]: path
        for path in sorted(lib.glob(f"{_PREFIX}*"))
        if path.suffix in (".so", ".dylib", ".dll")
    }


def variant_scores(variants: dict[str, Path]) -> dict[str, int]:
    """ggml's own score of each variant on this CPU: 0 = needs an instruction this CPU lacks, else higher = better.

    Loading a variant to ask runs none of its kernels: the score function is built for the baseline CPU.
    """
    _ggml(next(iter(variants.values())).parent)  # the variants need libggml-base, found by the name it is loaded as
    scores = {}
    for name, path in variants.items():
        score = ctypes.CDLL(str(path)).ggml_backend_score
        score.restype = ctypes.c_int
        scores[name] = int(score())
    return scores


def default_variant(scores: dict[str, int], allow_amx: bool = False) -> str | None:
    """The variant the peer runs unless told otherwise: ggml's best score here, AMX aside; None if none runs."""
    usable = {n: s for n, s in scores.items() if s > 0 and (allow_amx or n not in AMX_VARIANTS)}
    return max(usable, key=lambda n: usable[n]) if usable else None


def _ggml(lib: Path) -> ctypes.CDLL:
    """libggml (and with it libggml-base), the library that keeps the registry of backends."""
    names = [p for p in lib.iterdir() if p.name.split(".")[0] == "libggml"]
    if not names:
        raise FileNotFoundError(f"{lib}: no libggml")
    return ctypes.CDLL(str(min(names, key=lambda p: len(p.name))), mode=ctypes.RTLD_GLOBAL)


def load_cpu_backend(wanted: str | None, allow_amx: bool, force: bool) -> tuple[str, dict[str, int]]:
    """Register one CPU variant with ggml before llama.cpp starts; (its name, every variant's score).

    Must run before `import llama_cpp` initialises the backends (it loads every library it finds only when
    none is registered yet).
    """
    lib = library_dir()
    variants = cpu_variants(lib)
    if not variants:
        if wanted:
            sys.exit(f"--cpu-variant {wanted}: this llama-cpp-python is a static build with one CPU library")
        return "static", {}
    scores = variant_scores(variants)
    if wanted is None:
        wanted = default_variant(scores, allow_amx)
        if wanted is None:
            sys.exit(f"no CPU variant of {lib} runs on this CPU (scores: {scores})")
    elif wanted not in variants:
        sys.exit(f"--cpu-variant {wanted}: not built; the variants in {lib} are {', '.join(variants)}")
    elif scores[wanted] == 0 and not force:
        sys.exit(f"--cpu-variant {wanted} needs an instruction this CPU lacks (ggml's score 0); --force-variant")
    ggml = _ggml(lib)
    if force and scores[wanted] == 0:  # past ggml's own check, which refuses a variant scored 0
        init = ctypes.CDLL(str(variants[wanted])).ggml_backend_init
        init.restype = ctypes.c_void_p
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_register(init())
    else:
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        if not ggml.ggml_backend_load(str(variants[wanted]).encode()):
            sys.exit(f"ggml could not load {variants[wanted]}")
    return wanted, scores


def prompt_tokens(n: int, vocab_size: int = 151_674) -> list[int]:
    """The fixed prompt of n tokens this peer prefills (bench/decode_rounds.py prefills it too).

    Ids 1000-5999 on a real vocabulary; on a small one (the tiny preset's 1024) the same walk within its first
    rows, below the special tokens at the top.
    """
    low = min(1000, vocab_size // 8)
    span = min(5000, vocab_size - 16 - low)
    return [low + (i * 7) % span for i in range(n)]


def decode_token(i: int, vocab_size: int = 151_674) -> int:
    """The i-th token fed while timing decode: 2000 + i on a real vocabulary, within a small one likewise."""
    low = min(2000, vocab_size // 4)
    return low + i % (vocab_size - 16 - low)


def cached_gguf(hf_dir: Path, gguf_dir: Path, quant: str, threads: int) -> Path:
    """GGUF_DIR/model-QUANT.gguf, written (f16 from the folder, then quantized) unless a current one is there."""
    import llama_cpp

    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / "model-f16.gguf"
    if f16.exists() and gguf_name(f16) != GGUF_NAME:  # an older writer's file: rewrite it and its quantizations
        for stale in gguf_dir.glob("model-*.gguf"):
            stale.unlink()
    if not f16.exists():
        partial = f16.with_suffix(".partial")
        write_gguf(hf_dir, partial)
        partial.replace(f16)
    path = gguf_dir / f"model-{quant}.gguf"
    if not path.exists():
        ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftypes[quant], threads
        partial = path.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {path}")
        partial.replace(path)
    return path


def context_figures(llm: Any, lengths: list[int], decode_tokens: int) -> dict[str, float]:
    """For each prompt length in turn: its prefill from an empty cache, then decode_tokens tokens fed after it.

    Keys `prefill_N_tok_s`, `decode_after_N_tok_s` and `decode_after_N_ms_per_token`: decode at each context.
    """
    vocab_size = llm.n_vocab()
    figures: dict[str, float] = {}
    for n in lengths:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt_tokens(n, vocab_size))
        figures[f"prefill_{n}_tok_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(decode_tokens):
            llm.eval([decode_token(i, vocab_size)])
        seconds = time.perf_counter() - t
        figures[f"decode_after_{n}_ms_per_token"] = seconds / decode_tokens * 1e3
        figures[f"decode_after_{n}_tok_s"] = decode_tokens / seconds
    return figures


def gguf_name(path: Path) -> str:
    """general.name of a GGUF file ('' if it has none)."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.name")
    return "" if field is None else bytes(field.parts[-1]).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("gguf_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--prompt-tokens", type=int, nargs="+", default=[128, 400], help="prompt lengths, each prefilled, then decoded"
    )
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--quants", nargs="+", default=["Q4_0", "Q8_0"], choices=["Q4_0", "Q8_0"])
    parser.add_argument("--cpu-variant", help="run this CPU variant (default: the best this CPU runs, AMX aside)")
    parser.add_argument("--force-variant", action="store_true", help="even one this CPU cannot run (it will crash)")
    parser.add_argument("--allow-amx", action="store_true", help="let the default choice take the AMX variant")
    args = parser.parse_args()
    variant, scores = load_cpu_backend(args.cpu_variant, args.allow_amx, args.force_variant)

    import llama_cpp

    lengths = list(dict.fromkeys(args.prompt_tokens))  # each once, in the order given
    result: dict[str, object] = {"cpu_variant": variant, "cpu_variant_scores": scores}
    for name in args.quants:
        path = cached_gguf(args.hf_dir, args.gguf_dir, name, args.threads)
        started = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_ctx=max(4096, max(lengths) + args.decode_tokens),
            n_batch=512,
            verbose=False,
        )
        figures: dict[str, float] = {"load_s": time.perf_counter() - started}
        figures.update(context_figures(llm, lengths, args.decode_tokens))
        last = lengths[-1]
        figures["decode_ms_per_token"] = figures[f"decode_after_{last}_ms_per_token"]
        figures["decode_tok_s"] = figures[f"decode_after_{last}_tok_s"]
        result[name] = figures
        del llm
    print(json.dumps(result))


if __name__ == "__main__":
    main()
