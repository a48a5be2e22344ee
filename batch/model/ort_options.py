"""onnxruntime session options for this process: every session on one shared thread pool and one shared memory arena.

The CPU backend runs ~30 sessions one after another per decode step. With a pool each, the pools must not spin
between runs (30 spinning pools starve each other), so every operator that runs in parallel first wakes a
sleeping thread; one pool shared by every session spins between them instead (decode through the worker:
25.9 -> 29.0 tokens/s on a 2-core Zen 4). Once that pool exists onnxruntime refuses sessions with pools of their
own, so every session of the process (the exporter's checks, tests' doubles) takes its options from here.
Likewise each session would keep its own arena for the tensors between its nodes, so a decode step's ~30 sessions
would spread those over ~30 regions of memory, each cold in the CPU's caches by the time its session runs again;
one arena for the process hands every session the buffers the last one freed, still in cache (decode 1-7% faster
after 128 and after 2,200 tokens of context, paired runs on a 2-core Zen 4), and holds the largest session's
tensors once rather than every session's (1.1 GB less after a 2,200-token prompt of the 2B model).
On an x86-64 CPU without VNNI the options also ask for onnxruntime's exact int8 kernels (see int8_pairs_saturate).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_shared_pool_threads: int | None = None  # the size of this process's shared pool once made; 0: made elsewhere


def _shared_pool(threads: int) -> int:
    """The size of this process's one onnxruntime thread pool, made with `threads` threads on first use; every
    later session shares it, whatever thread count it asks for. 0: made by other code, size unknown."""
    global _shared_pool_threads
    if _shared_pool_threads is None:
        from onnxruntime.capi import _pybind_state

        try:
            _pybind_state.set_global_thread_pool_sizes(threads, 1)
            _shared_pool_threads = threads
        except Exception:  # made already by other code in this process, with a size not known here
            _shared_pool_threads = 0
    return _shared_pool_threads


@functools.cache
def _register_shared_arena() -> None:
    """Register this process's one CPU arena, once; sessions asking for the environment's allocators share it.
    Where one is registered already (by other code in this process), the sessions share that one instead."""
    import onnxruntime as ort

    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(memory, None)
    except Exception as error:  # registered already in this process
        log.debug("onnxruntime's shared CPU arena not registered here: %s", error)


def usable_cpus() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def session_options(threads: int | None = None) -> Any:
    """onnxruntime options for a session of this process: every session runs on the one shared thread pool and
    allocates from the one shared arena.

    `threads`: the pool's size if this session makes it (None: every usable core); asking for another size
    once it exists is logged, not an error.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    pool = _shared_pool(threads or usable_cpus())
    if threads and pool and pool != threads:
        log.warning("onnxruntime threads: %d asked for, but this process shares one pool of %d", threads, pool)
    options.use_per_session_threads = False
    _register_shared_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    if int8_pairs_saturate():
        # onnxruntime's exact u8 x u8 kernels instead (slower; on a VNNI CPU it would cost 1.7x per ViT tile)
        options.add_session_config_entry("session.x64quantprecision", "1")
    return options


@functools.cache
def int8_pairs_saturate() -> bool:
    """Whether onnxruntime's u8 x s8 kernels (the int8 ViT and prompt layers) can saturate on this CPU: an x86-64
    without VNNI (AVX2 only, or AVX-512 before Ice Lake) sums pairs of products in 16 bits.

    The CPU is asked through numpy's cpuid probe, as onnxruntime asks it, so an emulated CPU answers for itself;
    AVX-VNNI, which numpy does not probe, is read from /proc/cpuinfo, but only where that file describes the CPU
    this process sees: under an emulator (qemu-user) it lists the host's flags, so where it disagrees with the
    probe about AVX2 or AVX-512 its AVX-VNNI is not this CPU's.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    listed = set(flags.split())
    same_cpu = all(
        bool(features.get(probed)) == (flag in listed)
        for probed, flag in (("AVX2", "avx2"), ("AVX512F", "avx512f"), ("AVX512VNNI", "avx512_vnni"))
    )
    return not (features.get("AVX512VNNI") or (same_cpu and "avx_vnni" in listed))
