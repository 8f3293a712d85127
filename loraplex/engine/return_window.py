"""ReturnWindow: after a step that finished requests, wait briefly for their clients' next ones.

A closed-loop client (an agent's tool loop, a chat app replaying a conversation, a load
generator) sends its next request as soon as the last one ends. In-process that is microseconds,
before the engine's next step begins; over HTTP it is some 20-40 ms, just after the next step
began. On a CPU a step with prompts in it lasts up to a second or more, and the request then
waits for all of it before its own prefill can start: measured at 32 clients, the HTTP first
token came a whole step later than in-process (BENCHMARKS.md, issue 19).

So after a step that finished F requests, the engine thread waits until F new requests have
arrived or `seconds` have passed, whichever is first, before its next step. It does not wait:
- while requests wait for seats or prompt chunks: the step has work enough, and a newcomer
  would queue behind them anyway (the fairness benchmark's 96 busy streams on 16 seats lost
  throughput to such waits);
- unless most of the last `HISTORY` finishing steps saw as many new requests within the window
  (observed whether or not it waited): a server whose clients are people, who answer in
  seconds, never pauses;
- longer than a quarter of the last step: a short step delays a late request little anyway,
  and the running requests' inter-token latency rises by at most that share.
"""

from collections import deque

HISTORY = 8  # finishing steps the "are clients coming back at once?" estimate looks at
MIN_RETURNED = 0.5  # share of them whose clients came back within the window, to wait
MAX_STEP_SHARE = 0.25  # the longest wait, as a share of the last step's duration


class ReturnWindow:
    """Engine-thread state; `arrived` is called with each request's arrival time."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._returned: deque[bool] = deque(maxlen=HISTORY)
        # The finishing step being observed: when it ended, how many it finished, how many
        # requests arrived within the window after it.
        self._ended_at: float | None = None
        self._expected = 0
        self._arrived = 0
        self._limit = 0.0
        self.waits = 0
        self.waited_seconds = 0.0

    def step_ended(self, finished: int, step_seconds: float, now: float) -> None:
        """A step of `step_seconds` ended at `now` having finished `finished` requests."""
        if finished == 0:
            return
        self._close()
        self._ended_at, self._expected, self._arrived = now, finished, 0
        self._limit = min(self.seconds, MAX_STEP_SHARE * step_seconds)

    def arrived(self, at: float) -> None:
        """A request (sent at monotonic time `at`) reached the engine thread."""
        if self._ended_at is not None and self._ended_at < at <= self._ended_at + self.seconds:
            self._arrived += 1
            if self._arrived >= self._expected:
                self._close()

    def deadline(self, now: float) -> float | None:
        """Until when to wait for arrivals before the next step, or None not to."""
        if self._ended_at is not None and now > self._ended_at + self.seconds:
            self._close()
        if self._ended_at is None or self.seconds <= 0 or len(self._returned) < HISTORY // 2:
            return None
        if sum(self._returned) < MIN_RETURNED * len(self._returned):
            return None
        end = self._ended_at + self._limit
        return end if end > now else None

    def waited(self, seconds: float) -> None:
        self.waits += 1
        self.waited_seconds += seconds

    def stats(self) -> dict:
        return {
            "return_window_waits": self.waits,
            "return_window_waited_ms": round(1e3 * self.waited_seconds, 1),
            "return_window_returned": (sum(self._returned) / len(self._returned)
                                       if self._returned else None),
        }

    def _close(self) -> None:
        """Record whether the observed step's clients came back in time; stop observing it."""
        if self._ended_at is not None:
            self._returned.append(self._arrived >= self._expected)
            self._ended_at = None
