"""onnxruntime session options for this process: every session on one shared thread pool.

The CPU backend runs ~30 sessions one after another per decode step. With a pool each, the pools must not spin
between runs (30 spinning pools starve each other), so every operator that runs in parallel first wakes a
sleeping thread; one pool shared by every session spins between them instead (decode through the worker:
25.9 -> 29.0 tokens/s on a 2-core Zen 4). Once that pool exists onnxruntime refuses sessions with pools of their
own, so every session of the process (the exporter's checks, tests' doubles) takes its options from here.
"""

from __future__ import annotations

import logging
import os
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


def usable_cpus() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def session_options(threads: int | None = None) -> Any:
    """onnxruntime options for a session of this process: every session runs on the one shared thread pool.

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
    return options
