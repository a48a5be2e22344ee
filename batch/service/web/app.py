"""`vlbatch serve`: Datasette, used as a library, over the results database, read-only, on loopback by default."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from datasette.app import Datasette
from datasette.database import Database

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.service.reports.reports import require_current_database
from batch.service.store.store import connect_read_only
from batch.service.web import plugin
from batch.service.web.metadata import DATABASE, metadata
from batch.service.web.thumbnails import Thumbnails

HERE = Path(__file__).parent
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001


class ReadOnlyDatabase(Database):
    """Every connection, Datasette's write connection included, opens the file read-only and query-only, with
    SQLite's size limits (`plugin.limit_connection`)."""

    def connect(self, write: bool = False) -> sqlite3.Connection:
        conn = connect_read_only(Path(self.path))
        plugin.limit_connection(conn)
        self._all_file_connections.append(conn)
        return conn

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute(*args, **kwargs)
        except MemoryError:  # SQLite's heap limit (SQLITE_NOMEM): an error of this query, shown like one
            raise plugin.ResultTooLarge(
                f"the query needs more memory than this server allows ({plugin.HEAP_BYTES // 2**20} MiB)"
            ) from None


class Site(Datasette):
    """A Datasette that carries vlbatch's state from the start: its in-process client, made in the constructor,
    already has the vlbatch routes."""

    def __init__(self, state: plugin.WebState, **settings: Any) -> None:
        self.vlbatch_state = state
        super().__init__(**settings)


def build(
    config: Config,
    thumbnail_cache: Path,
    decoder_factory: Callable[[], MediaDecoder] = IsolatedDecoder,
    allow_sql: bool = True,
) -> Datasette:
    """A Datasette over the configured database with vlbatch's metadata, pages and thumbnails; without
    `allow_sql`, only the tables and canned queries (no SQL box, no `?sql=`, no `_where=`)."""
    path = require_current_database(config)
    plugin.register()
    thumbnails = Thumbnails(config.spool.media_roots, thumbnail_cache, config.media, decoder_factory=decoder_factory)
    datasette = Site(
        plugin.WebState(thumbnails),
        metadata=metadata(),
        template_dir=str(HERE / "templates"),
        static_mounts=[("vlbatch-static", str(HERE / "static"))],
        settings={
            "allow_download": False,
            "default_page_size": 50,
            "default_facet_size": 10,  # a facet's commonest values: the rows still start on the first screen
            "sql_time_limit_ms": 3000,
            "max_returned_rows": 1000,
            "max_csv_mb": 100,
            "truncate_cells_html": 2048,
            "default_allow_sql": allow_sql,
        },
    )
    datasette.remove_database("_memory")  # Datasette adds an empty in-memory one when given no files: not ours
    datasette.add_database(ReadOnlyDatabase(datasette, path=str(path)), name=DATABASE)
    return datasette


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the address printed is the one really bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VlbatchError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether the socket is bound to a loopback address (only this machine can connect)."""
    try:
        address = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(datasette: Datasette, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM, then return (exit 0: a stop asked for is not a failure); the thumbnail
    decoder stops with it. uvicorn shuts down on either signal, then raises it again once done."""
    server = uvicorn.Server(uvicorn.Config(datasette.app(), log_level="warning", lifespan="on"))
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        datasette.vlbatch_state.thumbnails.close()
