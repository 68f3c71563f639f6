"""Running the app under uvicorn: in the foreground (``moekit serve``) or on a background
thread (tests, benchmarks), always with the engine loop started first and stopped last."""

from __future__ import annotations

import threading
import time

import uvicorn

from moekit.serve.app import ServeState, build_app


def _config(state: ServeState, host: str, port: int, log_level: str) -> uvicorn.Config:
    # One worker process: the engine and its KV slots live in this process. timeout_graceful_shutdown:
    # open streams must not hold Ctrl-C forever.
    return uvicorn.Config(build_app(state), host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=3, access_log=log_level == "debug")


def run(state: ServeState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted."""
    state.scheduler.start()
    try:
        uvicorn.Server(_config(state, host, port, log_level)).run()
    finally:
        state.scheduler.stop()


class BackgroundServer:
    """``with BackgroundServer(state) as url:`` a live server on 127.0.0.1 and a free port."""

    def __init__(self, state: ServeState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.state = state
        self.server = uvicorn.Server(_config(state, host, port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="moekit-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.state.scheduler.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.state.scheduler.stop()


__all__ = ["run", "BackgroundServer"]
