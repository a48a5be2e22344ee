"""`model.backend: openai`: a worker whose units an OpenAI-compatible model server answers (batch/infer/remote.py).

Everything else is the local worker's: the spool, claims and leases, reuse by cache key, sidecars, the records and
their timings, pause, cancel and stop signals. Up to `model.concurrency` requests are in flight at once (one
thread each) and each answer is committed as it comes back. Answers are stored under the server's model identity
(its name and a fingerprint of the server and its model entry), so another model or another server answers again.
A server that cannot be reached or is busy is a passing fault: the job goes back, the worker waits it out, and
the units already answered stay answered.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from batch.config import Config
from batch.errors import PassingFault, VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.infer.remote import BACKEND, ServerModel
from batch.service.logs import event
from batch.service.spool.spool import Spool
from batch.service.store.records import failure_class
from batch.service.store.store import Store
from batch.service.worker.pooled import PooledWorker
from batch.service.worker.units import Done, UnitAnswer, UnitTask

log = logging.getLogger("batch.service.worker.server")


def server_model(config: Config, decoder: MediaDecoder | None = None) -> ServerModel:
    """The configured server (its model is asked for on first use); media decoded in a child process unless
    `decoder` says otherwise."""
    model = config.model
    assert model.url is not None  # the config refuses backend openai without it
    decoder = decoder or IsolatedDecoder()
    return ServerModel(model.url, model.name, model.api_key_env, model.timeout_seconds, decoder)


class ServerPool:
    """One job's requests to the server: up to `concurrency` in flight, answers taken as they complete."""

    def __init__(self, model: ServerModel, concurrency: int) -> None:
        self.model = model
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="server-request")
        self._futures: dict[Future[UnitAnswer], Any] = {}

    def full(self) -> bool:
        return len(self._futures) >= self.concurrency

    def busy(self) -> bool:
        return bool(self._futures)

    def submit(self, tag: Any, task: UnitTask) -> None:
        self._futures[self._executor.submit(self._answer, task)] = tag

    def _answer(self, task: UnitTask) -> UnitAnswer:
        node = self.model.info.node
        try:
            result = self.model.answer(task.prompt, task.paths, task.generation, task.media)
        except PassingFault:
            raise  # the server's, not the unit's: the job goes back and the worker waits
        except VlbatchError as exc:  # the unit's media, or the server refusing this request
            return UnitAnswer(None, str(exc), node, BACKEND, failure_class(exc))
        return UnitAnswer(result, None, node, BACKEND)

    def next_done(self, timeout: float = 1.0) -> Done | None:
        """An answer that has come back (None after `timeout`); a passing fault of its request is raised."""
        finished, _ = wait(self._futures, timeout=timeout, return_when=FIRST_COMPLETED)
        if not finished:
            return None
        future = next(iter(finished))
        tag = self._futures.pop(future)
        answer = future.result()  # raises the request's PassingFault
        return Done(tag, answer, answer.node)

    def cancel(self) -> None:
        """Drop what is in flight: requests not started are not sent; answers still coming are not recorded (a
        request under way ends within model.timeout_seconds, its thread then free again)."""
        for future in self._futures:
            future.cancel()
        self._futures.clear()

    def close(self) -> None:
        self.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class ServerWorker(PooledWorker):
    """A worker over the configured spool and database whose model is a server."""

    server: ServerModel
    _pool: ServerPool | None = None  # made at the first job whose units the server answers
    _said_identity: str | None = None  # the identity last logged (event=model.server)

    @classmethod
    def from_config(cls, config: Config, force: bool = False, retry_failed: bool = False) -> ServerWorker:
        spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()
        server = server_model(config)
        # slots and heartbeats name the server as configured; answers carry its model's identity (model_id below)
        where = urlsplit(server.url).netloc
        worker = cls(
            config,
            Store(config.spool.database, config.spool.database_timeout_seconds, spool=spool.root),
            spool,
            _no_local_model,
            f"{config.model.name or 'server'}@{where}",
            force,
            retry_failed,
        )
        worker.server = server
        return worker

    def answer_model_id(self) -> str:
        """The identity answers are stored and reused under: asked of the server once (a passing fault until it
        can be reached)."""
        identity = self.server.info.identity
        if identity != self._said_identity:
            event(log, "model.server", url=self.server.url, model=self.server.info.name, id=identity)
            self._said_identity = identity
        return identity

    def _units_pool(self) -> ServerPool:
        """One pool for the worker's life: its threads serve one job after another."""
        if self._pool is None:
            self._pool = ServerPool(self.server, self.config.model.concurrency)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self.server.decoder is not None:
            self.server.decoder.close()
        super().close()


def _no_local_model() -> Any:
    raise VlbatchError("model.backend is openai: the model server answers, no model is loaded here")
