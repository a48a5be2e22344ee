"""What one Ray actor is: a loaded model on its node answering units the head sends, read from a shared path or
sent as bytes. Plain Python (no Ray import): the pool wraps it with `ray.remote`.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from batch.config import ClusterConfig, ModelConfig
from batch.errors import VlbatchError
from batch.infer.batching import BatchScheduler
from batch.infer.decode import IsolatedDecoder
from batch.infer.pipeline import Pipeline
from batch.infer.settings import MediaSettings
from batch.service.worker.units import UnitAnswer, UnitTask


@dataclass(frozen=True)
class NodeInfo:
    node: str  # host name
    ip: str
    pid: int
    backend: str
    error: str | None = None  # the model could not be loaded here: the actor is of no use, and says why
    rows: int = 1  # answers its model decodes together (model.batch, as far as its runtime decodes several)


class UnitAnswerer:
    """Loads the model once (paths through cluster.path_map), then answers the units the head sends, up to
    model.batch decoded together (a threaded actor: one call per unit, one BatchScheduler). Media are decoded in
    a child process with the configured limits, as in a local worker."""

    def __init__(self, model: ModelConfig, media: MediaSettings, cluster: ClusterConfig, threads: int) -> None:
        self.node = socket.gethostname()
        # a model that cannot be loaded is reported through info() with this node, not raised: an exception in
        # __init__ kills the actor, and the head would learn the reason but not the node that failed
        self.pipeline: Pipeline | None = None
        try:
            if model.dir is None:
                raise VlbatchError("no model: set model.dir")
            node_dir = Path(cluster.node_path(model.dir))
            hf_dir = Path(cluster.node_path(model.hf_dir)) if model.hf_dir else None
            self.pipeline = Pipeline.open(
                node_dir,
                model.backend,
                hf_dir,
                threads,
                media,
                decoder=IsolatedDecoder(),
                providers=model.providers,
                device_id=model.device_id,
                npu_io=model.npu_io,
            )
        except Exception as exc:
            self.info_ = NodeInfo(self.node, _node_ip(), os.getpid(), model.backend, f"{type(exc).__name__}: {exc}")
        else:
            # the units the head sends at once run in Ray's threads: each decodes its media, then joins the batch
            self.scheduler = BatchScheduler(self.pipeline, model.batch)
            rows = self.scheduler.batch.rows
            self.info_ = NodeInfo(self.node, _node_ip(), os.getpid(), self.pipeline.backend.name, rows=rows)

    def info(self) -> NodeInfo:
        return self.info_

    def answer(self, task: UnitTask) -> UnitAnswer:
        try:
            if task.files is None:
                return self._answer(task, [Path(p) for p in task.paths])
            with tempfile.TemporaryDirectory(prefix="vlbatch-unit-") as folder:
                paths = []
                for i, (name, data) in enumerate(task.files):
                    path = Path(folder) / f"{i}-{Path(name).name}"  # the suffix tells the media kind
                    path.write_bytes(data)
                    paths.append(path)
                answer = self._answer(task, paths)
                if answer.error:  # name the head's files, not the temporary copies
                    error = answer.error
                    for copy, original in zip(paths, task.paths, strict=True):
                        error = error.replace(str(copy), original)
                    answer = replace(answer, error=error)
                return answer
        except VlbatchError as exc:
            return UnitAnswer(None, str(exc), self.node, self.info_.backend)

    def _answer(self, task: UnitTask, paths: list[Path]) -> UnitAnswer:
        if self.pipeline is None:
            raise VlbatchError(f"no model loaded on {self.node}: {self.info_.error}")
        try:
            request = self.pipeline.prepare(task.prompt, paths, task.media)
            result = self.scheduler.answer(request, task.generation, task.alone)
            return UnitAnswer(result, None, self.node, self.info_.backend)
        except VlbatchError as exc:
            return UnitAnswer(None, str(exc), self.node, self.info_.backend)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())
