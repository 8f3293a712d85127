"""Run a benchmarked system in a process of its own, behind the same System interface.

Systems sharing one process disturb each other: llama.cpp's ggml brings its own OpenMP runtime
next to torch's, and every model, thread pool and allocator stays resident (which of these
costs most was not pinned down). Measured here (bf16, 32 requests, 32 adapters, 2 cores):
loraplex alone with its no-adapter twin ran at 76 output tokens/s; the same system in a process
that also held the HTTP server, transformers, PEFT and llama.cpp ran at 50. One process per
system, waiting on a pipe while the others run, gives each the machine as a user would.
"""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path

from loraplex.bench.system import RequestRecord
from loraplex.bench.workload import BenchRequest

# Errors that cross back to the parent as themselves (run_benchmark turns them into one line).
_KNOWN_ERRORS = (ImportError, ValueError, OSError, RuntimeError)


class IsolatedSystem:
    """SYSTEMS[key](options), built and driven in a spawned child process."""

    def __init__(self, key: str, options):
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread state
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, key, options), daemon=True,
                                         name=f"bench-{key}")
        self._process.start()
        child.close()
        self.name = self._call("name")

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        self._call("setup", model_dir, adapters, dtype)

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        return self._call("run", requests)

    def stats(self) -> dict:
        return self._call("stats")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._call("close")
            except (EOFError, OSError, RuntimeError):
                pass  # already gone: nothing left to close
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def _call(self, method: str, *args):
        try:
            self._conn.send((method, args))
            status, value = self._conn.recv()
        except (EOFError, BrokenPipeError):
            raise RuntimeError(f"the benchmark process for {method} died "
                               f"(exit code {self._process.exitcode})") from None
        if status == "ok":
            return value
        kind, message = value
        error = next((e for e in _KNOWN_ERRORS if e.__name__ == kind), RuntimeError)
        raise error(message)


def _serve(conn, key: str, options) -> None:
    """The child: build the system, then answer calls until close."""
    from loraplex.bench.run import SYSTEMS

    system = None
    while True:
        method, args = conn.recv()
        try:
            if method == "name":
                system = SYSTEMS[key](options)
                value = system.name
            elif method == "setup":
                model_dir, adapters, dtype = args
                value = system.setup(model_dir, adapters, dtype=dtype)
            else:
                value = getattr(system, method)(*args)
        except Exception as e:  # sent to the parent, which raises it there
            traceback.print_exc()
            kind = next((k.__name__ for k in _KNOWN_ERRORS if isinstance(e, k)), "RuntimeError")
            conn.send(("error", (kind, str(e))))
            continue
        conn.send(("ok", value))
        if method == "close":
            return
