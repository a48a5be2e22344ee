"""One loaded model answering requests: media -> tiles -> prompt -> ViT -> prefill -> decode -> result."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch.errors import ModelFolderError, PromptTooLongError, VlbatchError
from batch.infer.decode import InProcessDecoder, MediaDecoder
from batch.infer.detokenize import IncrementalDetokenizer
from batch.infer.generate import GenerationResult, Step, Timings, generate_steps
from batch.infer.media import media_kind, normalize_tiles
from batch.infer.prompt import DEFAULT_SYSTEM, END_OF_TEXT, IM_END, IMG_CONTEXT, IMG_END, IMG_START, PromptMedia
from batch.infer.prompt_budget import PromptBudget
from batch.infer.runtime.base import Backend
from batch.infer.runtime.select import embeddings_file, metadata_dir, open_backend
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.infer.vit_cache import VitCache
from batch.model.checkpoint import read_config
from batch.model.modelspec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class Request:
    """A prompt ready for the model: token ids, pixel tiles and what it cost to prepare."""

    ids: np.ndarray  # (S,) int64
    pixels: np.ndarray | None  # (tiles, 3, S, S) float32
    media: PromptMedia | None
    preprocess_ms: float


class Pipeline:
    """A model loaded once: its runtime, tokenizer, embedding table and media settings."""

    def __init__(
        self,
        backend: Backend,
        tokenizer,
        spec: ModelSpec,
        embeddings: np.ndarray,
        media: MediaSettings | None = None,
        system: str | None = DEFAULT_SYSTEM,
        decoder: MediaDecoder | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.spec = spec
        self.embeddings = embeddings
        self.media = media or MediaSettings(max_tiles=spec.max_dynamic_patch, use_thumbnail=spec.use_thumbnail)
        self.prompts = PromptBudget(tokenizer, spec.image_tokens_per_tile, backend.prefill_capacity, system)
        self.decoder = decoder or InProcessDecoder()
        self.vit_cache = VitCache()
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT, IM_END) if t not in vocab]
        if missing:
            raise ModelFolderError(f"the tokenizer lacks the InternVL special tokens {', '.join(missing)}")
        self.image_token = vocab[IMG_CONTEXT]
        if spec.image_token_id not in (-1, self.image_token):
            raise ModelFolderError(
                f"config image_token_id {spec.image_token_id} differs from the tokenizer's {IMG_CONTEXT} "
                f"({self.image_token})"
            )
        stops = {vocab[IM_END], vocab.get(END_OF_TEXT, -1), tokenizer.eos_token_id}
        self.stop_ids = frozenset(int(t) for t in stops if t is not None and t >= 0)
        if len(embeddings) < len(vocab):
            raise ModelFolderError(f"embedding table has {len(embeddings)} rows, tokenizer {len(vocab)} tokens")

    @classmethod
    def open(
        cls,
        model_dir: Path,
        backend: str = "auto",
        hf_dir: Path | None = None,
        threads: int | None = None,
        media: MediaSettings | None = None,
        decoder: MediaDecoder | None = None,
        providers: Sequence[str] = (),
        device_id: int | None = None,
        npu_io: str = "copy",
    ) -> Pipeline:
        """Load the runtime, tokenizer and embedding table of a model folder once.

        `providers` and `device_id` pick axengine's execution provider and device (an AXCL card), `npu_io` how
        its decoder layers take their inputs (copy, resident, auto); an onnxruntime folder refuses them.
        """
        model_dir = Path(model_dir)
        meta_dir = metadata_dir(model_dir, hf_dir)
        _, _, spec = read_config(meta_dir)
        runtime = open_backend(
            model_dir, backend, threads=threads, providers=providers, device_id=device_id, npu_io=npu_io
        )
        try:  # a model that fails from here on gives its runtime back (an NPU's buffers, above all)
            embed_file = embeddings_file(model_dir)
            embeddings = np.load(embed_file, mmap_mode="r")
            if embeddings.shape[1] != spec.text.hidden_size:
                raise ModelFolderError(
                    f"{embed_file}: rows of width {embeddings.shape[1]}, "
                    f"but config.json says hidden {spec.text.hidden_size}"
                )
            return cls(runtime, load_tokenizer(meta_dir), spec, embeddings, media, decoder=decoder)
        except BaseException:
            runtime.close()
            raise

    # request preparation ------------------------------------------------------------------------
    def prepare(self, question: str, media: Sequence[Path] = (), settings: MediaSettings | None = None) -> Request:
        """Decode and tile the media, build the prompt and check it fits the prefill capacity."""
        started = time.perf_counter()
        settings = settings or self.media
        paths = [Path(p) for p in media]
        kinds = [media_kind(p) for p in paths]
        if "video" in kinds and len(paths) > 1:
            raise VlbatchError(f"one video per question, without other media: {', '.join(p.name for p in paths)}")
        decoded = None
        if paths:
            kind = "video" if kinds[0] == "video" else "image"
            items = settings.video_frames if kind == "video" else len(paths)
            decoded = self.decoder.decode(paths, kind, settings, self.prompts.tile_budget(question, kind, items))
            if decoded.cap < settings.max_tiles and kind == "image":
                log.info("max_tiles lowered from %d to %d so the prompt fits", settings.max_tiles, decoded.cap)
            ids, prompt_media = self.prompts.encode(question, kind, decoded.per_item)
        else:
            ids, prompt_media = self.prompts.encode(question, None, ())
        if len(ids) > self.prompts.capacity:
            raise PromptTooLongError(self.prompts.too_long(question, len(ids), prompt_media))
        pixels = normalize_tiles(decoded.tiles) if decoded is not None else None
        return Request(ids, pixels, prompt_media, (time.perf_counter() - started) * 1e3)

    # generation --------------------------------------------------------------------------------
    def steps(self, request: Request, settings: GenerationSettings, timings: Timings) -> Iterator[Step]:
        """Run the ViT, embed the prompt with image features in place, then yield tokens as they come."""
        started = time.perf_counter()
        embeds = self.prompt_embeds(request, timings)
        return generate_steps(self.backend, self.embeddings, embeds, settings, self.stop_ids, timings, started)

    def prompt_embeds(self, request: Request, timings: Timings) -> np.ndarray:
        """The prompt's (S, hidden) embeddings with the ViT's features in the image slots (ViT time in `timings`)."""
        timings.preprocess_ms = request.preprocess_ms
        embeds = np.asarray(self.embeddings[request.ids], dtype=np.float32)  # (S, hidden)
        if request.pixels is not None:
            t = time.perf_counter()
            key = VitCache.key(request.pixels)
            features = self.vit_cache.get(key)
            if features is None:
                features = self.backend.vit(request.pixels)  # (tiles, 256, hidden)
                self.vit_cache.put(key, features)
            timings.vit_ms = (time.perf_counter() - t) * 1e3
            slots = request.ids == self.image_token
            embeds[slots] = features.reshape(-1, features.shape[-1])
        return embeds

    def ask(
        self,
        question: str,
        media: Sequence[Path] = (),
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        media_settings: MediaSettings | None = None,
    ) -> GenerationResult:
        """Answer one question about zero or more images or one video; `on_text` receives the streamed text."""
        return self.answer(self.prepare(question, media, media_settings), settings, on_text)

    def answer(
        self,
        request: Request,
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate the answer to a prepared request (see prepare(), which a caller may run ahead)."""
        settings = settings or GenerationSettings()
        timings = Timings()
        answer = AnswerText(self, settings, on_text)
        for step in self.steps(request, settings, timings):
            if answer.add(step.token):
                break
        return answer.result(request, timings)

    def close(self) -> None:
        self.decoder.close()
        self.backend.close()


class AnswerText:
    """One answer's tokens as they come: the stop test, the streamed text and the finished GenerationResult."""

    def __init__(
        self, pipeline: Pipeline, settings: GenerationSettings, on_text: Callable[[str], None] | None = None
    ) -> None:
        self.pipeline, self.settings, self.on_text = pipeline, settings, on_text
        self.detok = IncrementalDetokenizer(pipeline.tokenizer, skip_special_tokens=True)
        self.tokens: list[int] = []
        self.finish = "length"

    def add(self, token: int) -> bool:
        """Take the next token; True when it ends the answer (an end-of-turn token, unless ignore_eos)."""
        if token in self.pipeline.stop_ids and not self.settings.ignore_eos:
            self.finish = "stop"
            return True
        self.tokens.append(token)
        piece = self.detok.add(token)
        if piece and self.on_text:
            self.on_text(piece)
        return False

    def result(self, request: Request, timings: Timings) -> GenerationResult:
        rest = self.detok.flush()
        if rest and self.on_text:
            self.on_text(rest)
        n_tiles = 0 if request.pixels is None else int(request.pixels.shape[0])
        return GenerationResult(
            text=self.detok.text,
            token_ids=self.tokens,
            prompt_tokens=len(request.ids),
            image_tokens=int((request.ids == self.pipeline.image_token).sum()),
            finish_reason=self.finish,
            timings=timings,
            tiles=n_tiles,
        )


def load_tokenizer(folder: Path):
    """The folder's tokenizer through AutoTokenizer, never running code from the folder."""
    # Without torch (the NPU board, a `.[cpu]` install), `import transformers` logs an advisory on stderr: "PyTorch was
    # not found..." (transformers 5) or "None of PyTorch, TensorFlow >= 2.0, or Flax have been found..." (4.x). It goes
    # through logger.warning_advice, which this variable turns off at call time; it is set for the import only, so
    # vlbatch's own logs and transformers' other warnings are untouched.
    advice = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    previous = os.environ.get(advice)
    os.environ[advice] = "1"
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    finally:
        if previous is None:
            os.environ.pop(advice, None)
        else:
            os.environ[advice] = previous

    # AutoTokenizer also reads config.json, whose InternVL model_type it does not know: a harmless warning
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{folder}: cannot load the tokenizer ({exc})") from exc
    finally:
        hf_logging.set_verbosity(level)
    tokenizer.model_max_length = sys.maxsize  # the model's own prefill capacity is checked instead
    return tokenizer
