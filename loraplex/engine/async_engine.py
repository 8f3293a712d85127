"""AsyncEngine: the asyncio front of the engine, used by the server.

The engine runs its steps in one background thread, so the event loop never waits on the model.
Requests and aborts travel to that thread through a queue and are applied between steps; each
request's outputs come back to the event loop through its own asyncio queue.

That thread also builds the engine (loads the model): torch's parallel ops must all run on one
thread. Once a second thread has run one, each thread gets its own OpenMP team and the engine
thread's small parallel ops became up to 20x slower (measured on 2 cores: index_add_ on a
[32, 576] tensor 15 -> 320-460 us when the model was loaded on the main thread).
"""

import asyncio
import itertools
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.return_window import ReturnWindow
from loraplex.engine.sequence import AdapterRequest
from loraplex.lora.adapter import AdapterError
from loraplex.sampling_params import SamplingParams

IDLE_WAIT_SECONDS = 0.05  # how long the engine thread sleeps on an empty inbox
LOAD_POLL_SECONDS = 0.005  # how often `prewarm` looks whether its disk read has finished


@dataclass(frozen=True)
class StreamDelta:
    """What one completion gained since the last delta."""

    request_id: str
    index: int  # which of the request's n completions
    text: str  # new text
    token_ids: list[int]  # new tokens
    logprobs: list[float]  # of the new tokens
    top_logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None
    error: str | None
    error_kind: str | None  # "request" (a client error) or "engine" (a server error)
    prompt_tokens: int  # usage so far
    completion_tokens: int
    queue_seconds: float | None  # from arrival to first admission; None while queued

    @property
    def shows_anything(self) -> bool:
        """Whether a client is shown something of it: text, logprobs or the completion's end
        (tokens whose text is still incomplete show nothing yet)."""
        return bool(self.text or self.logprobs or self.finished)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        """Build the engine from `config` on the engine thread (raising what LLMEngine raises),
        or serve an `engine` built by the caller."""
        self.engine = engine
        config = config or EngineConfig()
        window_ms = (engine.config if engine is not None else config).return_window_ms
        self._returns = ReturnWindow(window_ms / 1e3)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,),
                                        name="loraplex-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer = self.engine.tokenizer
        self.grammars = self.engine.grammars  # compiled off the engine thread by the server

    # -- event-loop side ------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: AdapterRequest | None = None,
        request_id: str | None = None,
        fairness_key: str = "",
        fairness_weight: float = 1.0,
    ) -> AsyncIterator[StreamDelta]:
        """Stream a request's deltas until every completion is finished. Raises the engine's
        ValueError (a clear message) if the request is refused. Leaving the loop early (or a
        cancelled task, e.g. a client disconnect) aborts the request; a grammar that does not
        compile raises GrammarError (a ValueError) before it is queued. `fairness_key` and
        `fairness_weight`: see LLMEngine.add_request."""
        request_id = request_id or f"req-{next(self._ids)}"
        if params.grammar is not None:
            # Compiled here, on a worker thread: the engine thread then finds it in the cache.
            await asyncio.to_thread(self.grammars.compile, params.grammar)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        self._inbox.put(("add", request_id, prompt, params, adapter, fairness_key,
                         fairness_weight, time.monotonic()))
        sent: dict[int, RequestOutput] = {}
        remaining = params.n
        try:
            while remaining:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                delta = _delta(sent.get(item.index), item)
                sent[item.index] = item
                if item.finished:
                    remaining -= 1
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, function, *args):
        """Run `function(engine, *args)` on the engine thread between steps; returns a future."""
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", function, args, asyncio.get_running_loop(), future))
        return future

    async def prewarm(self, adapter: AdapterRequest, pin: bool = False) -> None:
        """Load an adapter ahead of traffic without pausing running requests: the disk read runs
        on the loader thread while the engine keeps stepping, then the adapter takes a free slot
        (and is pinned if asked). Raises AdapterError for a broken adapter."""
        while (problem := await self.call(lambda engine: engine.adapters.poll_host(adapter))
               ) == "loading":
            await asyncio.sleep(LOAD_POLL_SECONDS)
        if problem is not None:
            raise AdapterError(problem)
        await self.call(lambda engine: engine.prewarm(adapter, pin))  # in host memory: no read

    async def stats(self) -> dict:
        return await self.call(lambda engine: {**engine.stats(), **self._returns.stats()})

    async def evict_adapters(self, adapter_ids: set[int]) -> None:
        """LLMEngine.evict_adapters on the engine thread; the requests it ends get their error."""
        def evict(engine: LLMEngine) -> None:
            for out in engine.evict_adapters(adapter_ids):
                self._publish(out.request_id, out)
        await self.call(evict)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        if self.engine is not None:
            self.engine.shutdown()

    # -- engine-thread side ---------------------------------------------------------------------
    def _publish(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, adapter, key, weight, sent_at = message
            self._returns.arrived(sent_at)
            try:
                self.engine.add_request(request_id, prompt, params, adapter, key, weight)
            except ValueError as e:  # a bad request fails alone, with its message
                self._publish(request_id, e)
        elif kind == "abort":
            for out in self.engine.abort(message[1]):
                self._publish(out.request_id, out)
        elif kind == "call":
            _, function, args, loop, future = message
            try:
                result = function(self.engine, *args)
            except Exception as e:
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def _drain_inbox(self, wait: bool) -> None:
        """Apply every queued message; when `wait`, first sleep until one arrives (briefly)."""
        try:
            if wait:
                message = self._inbox.get(timeout=IDLE_WAIT_SECONDS)
            else:
                message = self._inbox.get_nowait()
            while True:
                self._handle(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _wait_for_returns(self) -> None:
        """Before a step: wait (briefly) for the next requests of clients whose requests the
        last step finished, while such clients are about (engine/return_window.py). Not while
        requests wait: the next step has work enough, and a new request would queue behind."""
        if self.engine.has_waiting():
            return
        start = time.monotonic()
        while (deadline := self._returns.deadline(time.monotonic())) is not None:
            try:
                self._handle(self._inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        if (waited := time.monotonic() - start) > 1e-4:  # not a window the inbox had filled
            self._returns.waited(waited)

    def _run(self, config: EngineConfig) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(config)
        except BaseException as e:  # handed to the constructor, which raises it
            self._build_error = e
            return
        finally:
            self._started.set()
        while not self._stopping.is_set():
            self._drain_inbox(wait=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            self._wait_for_returns()
            start = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:  # the model failed: fail what is in flight, keep serving
                traceback.print_exc()
                outputs = self.engine.fail_all(f"engine error: {type(e).__name__}: {e}")
            end = time.monotonic()
            # Requests that came during the step count toward the last finishing step's window;
            # the clients of this step's finished requests can only send after the publish.
            self._drain_inbox(wait=False)
            self._returns.step_ended(len({out.request_id for out in outputs if out.finished}),
                                     end - start, end)
            for out in outputs:
                self._publish(out.request_id, out)


def _set_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _delta(previous: RequestOutput | None, current: RequestOutput) -> StreamDelta:
    num_tokens = len(previous.token_ids) if previous else 0
    num_chars = len(previous.text) if previous else 0
    return StreamDelta(
        request_id=current.request_id,
        index=current.index,
        text=current.text[num_chars:],
        token_ids=current.token_ids[num_tokens:],
        logprobs=current.logprobs[num_tokens:],
        top_logprobs=current.top_logprobs[num_tokens:],
        finished=current.finished,
        finish_reason=current.finish_reason,
        error=current.error,
        error_kind=current.error_kind,
        prompt_tokens=len(current.prompt_token_ids),
        completion_tokens=len(current.token_ids),
        queue_seconds=current.queue_seconds,
    )
