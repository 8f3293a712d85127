"""Fair shares between tenants: the virtual token counter (VTC) of Sheng et al., "Fairness in
Serving Large Language Models" (OSDI 2024).

The engine knows a tenant only as an opaque fairness key handed in with each request. Every key
has a counter of the service it has received, in cost units divided by its weight (a tier set by
the operator): a prompt token computed for it costs `input_cost`, a token generated for it
`output_cost`. The scheduler serves the key with the lowest counter first, so over any window two
backlogged keys' weighted service differs by a bounded amount (the paper's bound: about twice the
cost of the largest step one request can take).

Invariants:
- counters only grow, and only with service actually given;
- a key with no work (nothing waiting or running) banks no credit: when work arrives for it, its
  counter is lifted to the lowest counter of the keys that have work (to the counter of the last
  key that had work, when none has), so a tenant that was idle cannot then starve the others;
- it is work-conserving: the counters only order the keys that have work, they never hold work
  back, so a lone key gets the whole engine.
"""

from dataclasses import dataclass


@dataclass
class KeyShare:
    """One fairness key's standing."""

    counter: float = 0.0  # weighted cost of the service received
    weight: float = 1.0  # its tier: twice the weight, twice the service when both are backlogged
    num_active: int = 0  # its sequences waiting or running


class VirtualTokenCounter:
    def __init__(self, input_cost: float, output_cost: float):
        self.input_cost = input_cost
        self.output_cost = output_cost
        self.keys: dict[str, KeyShare] = {}
        self._last_counter = 0.0  # the counter of the last key whose work ran out
        # The sum of the active keys' weights, kept as keys come and go: the scheduler reads it
        # for every key every step, and idle keys stay in `keys` (their counters still count).
        self._active_weight = 0.0

    def arrive(self, key: str, weight: float) -> None:
        """A sequence of `key` enters the engine; the latest weight given for a key holds."""
        share = self.keys.setdefault(key, KeyShare())
        if share.num_active == 0:
            active = [s.counter for s in self.keys.values() if s.num_active > 0]
            floor = min(active) if active else self._last_counter
            share.counter = max(share.counter, floor)
            self._active_weight += weight
        else:
            self._active_weight += weight - share.weight
        share.weight = weight
        share.num_active += 1

    def leave(self, key: str) -> None:
        """A sequence of `key` finished (or was aborted)."""
        share = self.keys[key]
        share.num_active -= 1
        if share.num_active == 0:
            self._last_counter = share.counter
            self._active_weight -= share.weight
            if not any(s.num_active for s in self.keys.values()):
                self._active_weight = 0.0  # no rounding drift survives an idle engine

    def charge(self, key: str, input_tokens: int, output_tokens: int) -> None:
        share = self.keys[key]
        cost = self.input_cost * input_tokens + self.output_cost * output_tokens
        share.counter += cost / share.weight

    def counter(self, key: str) -> float:
        return self.keys[key].counter

    def weight(self, key: str) -> float:
        return self.keys[key].weight

    def active_weight(self) -> float:
        return self._active_weight

    def snapshot(self) -> dict[str, dict]:
        """Per key with work: its counter, weight and number of sequences."""
        return {key: {"counter": s.counter, "weight": s.weight, "sequences": s.num_active}
                for key, s in self.keys.items() if s.num_active > 0}
