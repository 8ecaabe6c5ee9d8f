"""`edgeq serve` in this process: the uvicorn listener (`Server`) and `serve()`, which loads the bundles and
starts it. The routes are `edgeq.serving.api`; the queues they share are `edgeq.serving.scheduler`."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from ..errors import EdgeqError
from ..generate import LanguageModel

INSTALL_HINT = "the server needs fastapi and uvicorn: pip install 'edgeq[serve]'"


def parse_drafts(values) -> dict[str | None, str]:
    """`--draft` values: MODEL=lookup|DIR for one bundle, lookup|DIR for every bundle (a path holding "=" that exists is
    taken whole)."""
    drafts: dict[str | None, str] = {}
    for value in values:
        name, sep, what = value.partition("=")
        if sep and not Path(value).exists():
            drafts[name] = what
        else:
            drafts[None] = value
    return drafts


def load_models(bundles, *, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
                drafts: dict[str | None, str] | None = None, draft_tokens: int | None = None) -> list[LanguageModel]:
    """Each bundle loaded (models from `edgeq.load` kept as they are), with the drafter `drafts` names for its folder
    name (the None key: every bundle without its own)."""
    from ..loading import load
    from ..speculation import DEFAULT_DRAFT_TOKENS

    drafts = dict(drafts or {})
    unknown = set(drafts) - {None} - {Path(b).name for b in bundles if not isinstance(b, LanguageModel)}
    if unknown:
        raise EdgeqError(f"--draft names {sorted(unknown)[0]!r}, which is not a served bundle's folder name; use BUNDLE=lookup|DIR")
    return [b if isinstance(b, LanguageModel) else
            load(b, backend=backend, threads=threads, n_ctx=n_ctx, draft=drafts.get(Path(b).name, drafts.get(None)),
                 draft_tokens=draft_tokens or DEFAULT_DRAFT_TOKENS) for b in bundles]


class Server:
    """A server running in this process (from `edgeq.serve(..., block=False)`): `url`, `stop()`, or `with`."""

    def __init__(self, app, sock: socket.socket, log_level: str = "warning"):
        import uvicorn

        self.sock = sock
        self.service = app.state.service  # the served models and their queues
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread: threading.Thread | None = None

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="edgeq-serve")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EdgeqError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        self._server.run(sockets=[self.sock])

    def wait(self) -> None:
        """Blocks until the server stops (Ctrl-C reaches the caller, which then calls `stop()`)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgeqError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock


def serve(bundles, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, queue_size: int = 8,
          timeout: float = 600.0, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
          block: bool = True, log_level: str = "info", drafts: dict[str | None, str] | None = None,
          draft_tokens: int | None = None) -> Server | None:
    """Serves bundles (paths, or models from `edgeq.load`) with an OpenAI-compatible API.

    `block=False` returns a started `Server` (its `url`; `stop()` or a `with` block ends it), for tests and
    apps; port 0 picks a free port. `queue_size` requests may wait per model; `timeout` seconds bound each.
    `drafts` maps a bundle's folder name (None: every bundle) to its drafter for speculative decoding ("lookup" or a
    draft bundle); a request's `"speculative": false` turns it off, its `prediction` drafts by prompt lookup.
    """
    try:
        from .api import create_app
    except ImportError:
        raise EdgeqError(INSTALL_HINT) from None
    if isinstance(bundles, (str, Path, LanguageModel)):
        bundles = [bundles]
    if not bundles:
        raise EdgeqError("serve needs at least one bundle")
    if queue_size < 0 or timeout <= 0:
        raise EdgeqError(f"queue_size must be ≥ 0 and timeout > 0, got {queue_size} and {timeout}")
    models = load_models(bundles, backend=backend, threads=threads, n_ctx=n_ctx, drafts=drafts, draft_tokens=draft_tokens)
    app = create_app(models, api_key=api_key, queue_size=queue_size, timeout=timeout)
    server = Server(app, bind(host, port), log_level)
    if not block:
        return server.start()
    server.run()
    return None
