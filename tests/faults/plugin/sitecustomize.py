"""Faults for the fault suite, loaded into each of its vlbatch processes through PYTHONPATH (never installed).

- A Pillow format for `.png` files that start with `VLBFAULT:<kind>`: `segv` crashes the decoder with SIGSEGV,
  `hang` never returns, `alloc` allocates without bound, `slow` takes two seconds and then decodes a grey image.
- With FAULT_SUITE_CRASH_ON_MAGENTA=1, the worker process itself crashes (SIGSEGV) when it is about to answer
  about a solid magenta image: a model runtime that dies on one input.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
import time


def _install_image_faults() -> None:
    from PIL import Image, ImageFile

    class FaultImageFile(ImageFile.ImageFile):
        format = "VLBFAULT"
        format_description = "vlbatch fault-suite image"

        def _open(self) -> None:
            self.fault = self.fp.read(32).split(b":", 1)[1].split(b"\n")[0].strip().decode()
            self._size = (64, 48)
            self._mode = "RGB"
            self.tile = []

        def load(self):  # noqa: ANN201 - Pillow's signature
            if self._im is not None:  # decoded already (Pillow calls load() more than once)
                return Image.Image.load(self)
            if self.fault == "segv":
                import ctypes

                ctypes.string_at(0)  # reads address 0: SIGSEGV
            elif self.fault == "hang":
                time.sleep(3600)
            elif self.fault == "alloc":
                import numpy as np

                blocks = []
                for _ in range(256):  # 64 GiB of address space at most, then give up: the cap must stop it first
                    # address space taken at once, never written: the cap stops it in no time, however busy the
                    # machine (zero-filling each block could outlast the suite's short decode time limit)
                    blocks.append(np.empty(256 << 20, np.uint8))
                raise RuntimeError("the memory cap was not enforced")
            elif self.fault == "slow":
                time.sleep(2)
            self.im = Image.new("RGB", self.size, (128, 128, 128)).im
            return Image.Image.load(self)

    Image.register_open(FaultImageFile.format, FaultImageFile, lambda prefix: prefix[:9] == b"VLBFAULT:")


class _PatchPipeline(importlib.abc.MetaPathFinder):
    """After batch.infer.pipeline is imported, make the model crash the process on a magenta image (its ViT)."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != "batch.infer.pipeline":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run(module)
            embeds = module.Pipeline.prompt_embeds

            def crashing_embeds(self, request, *args, **kwargs):  # noqa: ANN001, ANN202
                pixels = request.pixels
                # magenta (255, 0, 255) normalised with the ImageNet mean and std
                if pixels is not None and abs(float(pixels[:, 0].mean()) - 2.2489) < 0.01:
                    if abs(float(pixels[:, 1].mean()) + 2.0357) < 0.01:
                        os.kill(os.getpid(), signal.SIGSEGV)
                return embeds(self, request, *args, **kwargs)

            module.Pipeline.prompt_embeds = crashing_embeds

        spec.loader.exec_module = exec_module
        return spec


try:
    _install_image_faults()
except ImportError:  # a process without Pillow has no media to break
    pass
if os.environ.get("FAULT_SUITE_CRASH_ON_MAGENTA") == "1":
    sys.meta_path.insert(0, _PatchPipeline())
