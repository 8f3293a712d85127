"""Run the HTTP app on a free loopback port in a background thread (the demo and tests)."""

import threading
import time

import uvicorn

START_TIMEOUT_S = 30


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` at `url` until the block ends; leaving
    stops it the way SIGTERM would (running requests finish, then the app's shutdown runs)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (is the port free?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
