"""A small deterministic byte-level BPE tokenizer with InternVL3's special tokens, for tests and fixtures."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Order matters: these ids follow the learned vocab directly, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# Qwen2TokenizerFast in transformers v5 rebuilds the backend from vocab/merges with Qwen's own regex and an
# NFC normalizer, ignoring the pre-tokenizer in tokenizer.json; the generic class loads tokenizer.json as is.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_MAX_LENGTH = 8192

# Word tables as "|"-separated strings to keep them compact under the formatter.
_SUBJECTS = (
    "a dog|two cats|a young woman|an old man|a child|a group of friends|a red car|a small boat|a brown horse|"
    "three birds|a cyclist|a street vendor|a chef|a tall building|a wooden table|a bowl of fruit|a white cup|"
    "a mountain|a lighthouse|a busy market"
).split("|")
_VERBS = (
    "is sitting on|is standing next to|is running across|is lying on|is walking along|is looking at|"
    "is parked near|is floating on|is playing with|is resting under|is holding|is covered by"
).split("|")
_PLACES = (
    "the beach|a grassy field|the kitchen counter|a snowy road|the river bank|a city street|a wooden bench|"
    "the sofa|a park|the harbor|a forest trail|the window|a stone bridge"
).split("|")
_DETAILS = (
    "in the afternoon light|at sunset|on a rainy day|under a blue sky|with trees in the background|"
    "in black and white|seen from above|in soft focus|at night|during the winter|with a blurred background|"
    "in warm colors"
).split("|")
_OPENERS = (
    "The image shows|This photo shows|In this picture,|The photograph captures|We can see|The scene contains|"
    "Describe the image:|Caption:"
).split("|")
_QUESTIONS = (
    "What is in the image?|How many people are there?|What color is the car?|Where was this taken?|"
    "Is it raining?|Please describe the photo in detail.|What time of day is it?"
).split("|")
_CHINESE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室开发的多模态大语言模型。|图片中有一只狗坐在草地上。|"
    "请详细描述这张图片。|这是一张在海边拍摄的照片，天空很蓝。|两只猫在沙发上睡觉。"
).split("|")
_EMOJI = "📷 🐶 🐱 🌅 🚗 🍎 😀 👍🏽 🇯🇵".split()
_SYLLABLES = "ka ro mi ten sa lu vor ne qui pa dor el fi gan zu ber".split()


def _corpus(seed: int, n_sentences: int = 3000) -> list[str]:
    """Deterministic captioning-style lines, mostly English with a little Chinese and emoji."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        sentence = (
            f"{rng.choice(_OPENERS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
            f"{rng.choice(_PLACES)} {rng.choice(_DETAILS)}."
        )
        if i % 5 == 0:
            sentence = f"{rng.choice(_QUESTIONS)} {sentence}"
        if i % 7 == 0:
            count, metres, cm = rng.randint(0, 120), rng.randint(1, 9), rng.randint(0, 99)
            sentence += f" There are {count} objects, {metres}.{cm}m away."
        # Rare on purpose, so that most CJK characters and emoji stay split over several byte tokens.
        if i % 50 == 0:
            sentence += " " + rng.choice(_CHINESE)
        if i % 40 == 0:
            sentence += " " + rng.choice(_EMOJI)
        # Made-up place names and file names: many distinct words, so larger vocab sizes can be filled.
        if i % 3 == 0:
            place = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
            sentence += f" Taken in {place}, file IMG_{rng.randint(0, 9999):04d}.jpg."
        if i % 9 == 0:
            sentence = sentence.upper() if i % 2 else sentence.lower()
        lines.append(sentence)
    return lines


def _with_made_up_merges(trained: Tokenizer, size: int, seed: int) -> Tokenizer:
    """The trained byte-level BPE extended to `size` tokens by merging random pairs of its tokens."""
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    pieces = sorted(vocab, key=vocab.__getitem__)
    rng = random.Random(seed)
    while len(vocab) < size:
        left, right = pieces[rng.randrange(len(pieces))], pieces[rng.randrange(len(pieces))]
        token = left + right
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        merges.append((left, right))
        pieces.append(token)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = trained.decoder
    tokenizer.post_processor = trained.post_processor
    return tokenizer


def build_tokenizer(out_dir: Path, vocab_size: int = 1024, seed: int = 0) -> None:
    """Train and write tokenizer.json and tokenizer_config.json into out_dir.

    The learned BPE vocab (256 byte symbols plus merges) gets ids 0 .. vocab_size - len(SPECIAL_TOKENS) - 1
    and SPECIAL_TOKENS follow in order, so the total is vocab_size. The built-in corpus runs out of merges at
    about 2080 learned tokens; larger sizes (InternVL3's ~151k) are filled with made-up merges of learned tokens
    ranked after the learned ones, so real text still tokenizes as trained and every id decodes to text. The
    seed picks the corpus and the made-up merges; the same seed gives byte-identical files.
    """
    learned_size = vocab_size - len(SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if learned_size < len(alphabet):
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    if tokenizer.get_vocab_size() < learned_size:  # the corpus ran out of merges: fill up with made-up ones
        tokenizer = _with_made_up_merges(tokenizer, learned_size, seed)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")

    added_tokens_decoder = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": TOKENIZER_CLASS,
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
