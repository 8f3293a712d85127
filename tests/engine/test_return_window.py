"""ReturnWindow: wait for the next requests of clients that answer at once, and only for them."""

import asyncio
import time

import pytest

from loraplex.config import ConfigError, EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.return_window import HISTORY, MAX_STEP_SHARE, ReturnWindow
from loraplex.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_engine, prompts

WINDOW = 0.05


def finish_and_return(window: ReturnWindow, now: float, finished: int, returned: int,
                      after: float = 0.01) -> float:
    """A 1 s step ends at `now` with `finished` requests; `returned` come back `after` s later.
    Returns the time after the window."""
    window.step_ended(finished, 1.0, now)
    for _ in range(returned):
        window.arrived(now + after)
    return now + 1.0


def test_no_wait_until_clients_are_seen_to_come_back():
    window = ReturnWindow(WINDOW)
    now = 100.0
    window.step_ended(2, 1.0, now)
    assert window.deadline(now) is None  # nothing seen yet: a server of people never pauses
    for _ in range(HISTORY // 2):
        now = finish_and_return(window, now, 2, 2)
    window.step_ended(3, 1.0, now)
    assert window.deadline(now + 0.001) == pytest.approx(now + WINDOW)
    window.arrived(now + 0.002)
    window.arrived(now + 0.003)
    assert window.deadline(now + 0.004) is not None  # 2 of 3 back: keep waiting
    window.arrived(now + 0.004)
    assert window.deadline(now + 0.005) is None  # all 3 back: step at once
    # The first step's clients never came back; the others' all did.
    returned = (HISTORY // 2 + 1) / (HISTORY // 2 + 2)
    assert window.stats()["return_window_returned"] == pytest.approx(returned)


def test_clients_that_answer_slowly_stop_the_waits():
    window = ReturnWindow(WINDOW)
    now = 100.0
    for _ in range(HISTORY):
        now = finish_and_return(window, now, 1, 1)
    for _ in range(HISTORY // 2):
        now = finish_and_return(window, now, 1, 1, after=2 * WINDOW)  # too late to count
    window.step_ended(1, 1.0, now)
    assert window.deadline(now) is not None  # half the recent ones came back in time
    window.arrived(now + 3 * WINDOW)  # late again
    now = finish_and_return(window, now + 1.0, 1, 0)
    window.step_ended(1, 1.0, now)
    assert window.deadline(now) is None
    assert window.stats()["return_window_returned"] < 0.5


def test_only_requests_after_the_step_and_within_the_window_count():
    window = ReturnWindow(WINDOW)
    now = 100.0
    for _ in range(HISTORY // 2):
        window.step_ended(1, 1.0, now)
        window.arrived(now - 0.001)  # sent during the step: not an answer to its end
        window.arrived(now + WINDOW + 0.001)
        now += 1.0
    window.step_ended(1, 1.0, now)
    assert window.deadline(now) is None
    assert window.stats()["return_window_returned"] == 0.0


def test_the_wait_is_a_share_of_the_last_step_and_ends_with_the_window():
    window = ReturnWindow(WINDOW)
    now = 100.0
    for _ in range(HISTORY // 2):
        now = finish_and_return(window, now, 1, 1)
    window.step_ended(1, 0.04, now)  # a short step: a late request waits little for it anyway
    assert window.deadline(now) == pytest.approx(now + MAX_STEP_SHARE * 0.04)
    assert window.deadline(now + MAX_STEP_SHARE * 0.04 + 1e-6) is None
    window.step_ended(1, 1.0, now + 1)
    assert window.deadline(now + 1 + WINDOW + 1e-6) is None


def test_zero_turns_it_off():
    window = ReturnWindow(0.0)
    now = 100.0
    for _ in range(HISTORY):
        now = finish_and_return(window, now, 1, 1, after=0.0)
    window.step_ended(1, 1.0, now)
    assert window.deadline(now) is None


@pytest.mark.parametrize("bad", [-1, 1001, "50", True, float("nan")])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match="return_window_ms"):
        EngineConfig(return_window_ms=bad)


class SlowSteps:
    """Make an engine's steps last `seconds`; log the step that finished each request and the
    steps begun when each request was added."""

    def __init__(self, engine, seconds: float):
        self.begun, self.added_at, self.finished_in = 0, {}, {}
        step, add = engine.step, engine.add_request

        def slow_step():
            self.begun += 1
            time.sleep(seconds)
            outputs = step()
            for out in outputs:
                if out.finished:
                    self.finished_in[out.request_id] = self.begun
            return outputs

        def logged_add(request_id, *args):
            self.added_at[request_id] = self.begun
            return add(request_id, *args)

        engine.step, engine.add_request = slow_step, logged_add


async def closed_loop_client(engine, name: str, turns: int, reaction: float) -> None:
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for turn in range(turns):
        async for _ in engine.generate(prompts(4)[turn % 4], params,
                                       request_id=f"{name}-{turn}"):
            pass
        await asyncio.sleep(reaction)  # a client over a network answers some ms later


async def long_request(engine) -> None:
    """Keeps the engine stepping while the clients think."""
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    async for _ in engine.generate(prompts(1)[0], params):
        pass


@pytest.mark.parametrize("window_ms", [0, 400])
def test_a_client_that_answers_at_once_joins_the_next_step(sharp_llama_dir, window_ms):
    """Two closed-loop clients that answer in 10 ms beside a long request, 0.3 s steps: with the
    window each next request is added before the step after its predecessor's end; without it,
    during that step."""
    inner = make_engine(sharp_llama_dir, return_window_ms=window_ms)
    slow = SlowSteps(inner, 0.3)
    engine = AsyncEngine(engine=inner)

    async def main():
        background = asyncio.create_task(long_request(engine))
        await asyncio.gather(*(closed_loop_client(engine, name, 8, 0.01) for name in "ab"))
        background.cancel()  # aborts it
        return await engine.stats()

    try:
        stats = asyncio.run(main())
    finally:
        engine.shutdown()
    # Steps begun between a request's finish and its successor's arrival, for the last turns
    # (once the estimate has seen enough clients come back).
    late = [slow.added_at[f"{name}-{turn}"] - slow.finished_in[f"{name}-{turn - 1}"]
            for name in "ab" for turn in range(HISTORY // 2 + 2, 8)]
    if window_ms:
        assert late == [0] * len(late), late
        assert stats["return_window_waits"] > 0
        assert stats["return_window_returned"] == 1.0
    else:
        assert late == [1] * len(late), late
        assert stats["return_window_waits"] == 0
