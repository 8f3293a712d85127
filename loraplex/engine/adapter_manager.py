"""Moves adapters disk -> host cache (a background thread) -> device slot, and keeps score.

The scheduler asks three questions per waiting request: is its adapter loaded yet (`poll`), which
slot holds it (`slot_of`), and can it get one (`acquire_slot`). A slot is only ever recycled when
no running sequence uses its adapter; a request that finds no such slot reserves the least
recently used one, which then admits nobody new until it drains, so no request starves.
"""

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.engine.sequence import AdapterRequest
from loraplex.lora.adapter import AdapterError, LoRAWeights, load_adapter
from loraplex.lora.slots import AdapterSlots, HostCache
from loraplex.model.llama import LlamaModel


@dataclass
class AdapterStats:
    slot_hits: int = 0  # a request found its adapter already in a slot
    slot_misses: int = 0  # it had to be activated into a slot
    host_misses: int = 0  # it had to be read from disk
    load_seconds: list[float] = field(default_factory=list)  # disk -> host, per load
    activate_seconds: list[float] = field(default_factory=list)  # host -> slot, per activation


class AdapterManager:
    def __init__(self, model: LlamaModel, max_loras: int, max_rank: int, max_cpu_loras: int,
                 cache_dir: Path | None = None, int8: bool = False):
        self.config = model.config
        self.cache_dir = cache_dir  # where loaded adapters are kept ready to serve, if anywhere
        self.dtype = model.embed_tokens.weight.dtype
        self.max_rank = max_rank
        self.slots = AdapterSlots(model, max_loras, max_rank, int8=int8)
        self.host = HostCache(max_cpu_loras)
        self.stats = AdapterStats()
        self.slot_adapter: list[int | None] = [None] * max_loras  # slot -> adapter id
        self.slot_last_used: list[int] = [0] * max_loras  # step number, for LRU
        self.reserved: dict[int, int] = {}  # slot -> adapter id waiting for it to drain
        self.pinned: set[int] = set()
        self._loads: dict[int, Future] = {}
        # One loader thread: reading safetensors releases the GIL, so decoding goes on meanwhile.
        # It runs torch single-threaded: a torch op parallel on a second thread starts a second
        # OpenMP thread team, and from then on the step's own parallel ops ran up to 20x slower
        # (measured on 2 cores: index_add_ 10 -> 260 us, a 576x576 matmul 82 -> 118 us).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                            initializer=torch.set_num_threads, initargs=(1,))

    # -- disk -> host ---------------------------------------------------------------------------
    def _load(self, adapter: AdapterRequest) -> LoRAWeights:
        start = time.perf_counter()
        weights = load_adapter(
            adapter.path,
            num_layers=self.config.num_layers,
            module_shapes=self.config.module_shapes(),
            max_rank=self.max_rank,
            dtype=self.dtype,
            cache_dir=self.cache_dir,
            read_files=adapter.read_files,
            cache_scope=adapter.cache_scope,
        )
        self.stats.load_seconds.append(time.perf_counter() - start)
        return weights

    def poll(self, adapter: AdapterRequest) -> str | None:
        """Start loading if needed. Returns None when loaded, "loading", or an error message.

        An adapter in a slot counts as loaded: it serves from there, and when its slot is taken
        by another it is no longer in one, so the next poll reads it again if the host cache
        dropped it meanwhile (max_loras may exceed max_cpu_loras)."""
        if self.slot_of(adapter.adapter_id) is not None:
            return None
        return self.poll_host(adapter)

    def poll_host(self, adapter: AdapterRequest) -> str | None:
        """poll, for the host cache only (pre-warming and pinning keep an adapter there)."""
        if adapter.adapter_id in self.host:
            return None
        future = self._loads.get(adapter.adapter_id)
        if future is None:
            self.stats.host_misses += 1
            self._loads[adapter.adapter_id] = self._executor.submit(self._load, adapter)
            return "loading"
        if not future.done():
            return "loading"
        del self._loads[adapter.adapter_id]
        try:
            self.host.add(adapter.adapter_id, future.result())
        except AdapterError as e:
            return str(e)
        except Exception as e:  # an unreadable file must fail its own requests, not the engine
            return f"adapter {adapter.path}: cannot be loaded ({type(e).__name__}: {e})"
        if adapter.adapter_id in self.pinned:
            self.host.pinned.add(adapter.adapter_id)
        return None

    def load_now(self, adapter: AdapterRequest) -> None:
        """Blocking disk -> host load (pre-warming); raises AdapterError for a broken adapter."""
        while (problem := self.poll_host(adapter)) == "loading":
            self._loads[adapter.adapter_id].result()
        if problem is not None:
            raise AdapterError(problem)

    def wait_for_loads(self, timeout: float) -> None:
        """Block until some pending load finishes (used when nothing else can run)."""
        pending = [f for f in self._loads.values() if not f.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    @property
    def num_loading(self) -> int:
        return len(self._loads)

    # -- host -> slot ---------------------------------------------------------------------------
    def slot_of(self, adapter_id: int) -> int | None:
        try:
            return self.slot_adapter.index(adapter_id)
        except ValueError:
            return None

    def can_admit(self, adapter_id: int) -> int | None:
        """The slot a new sequence of this adapter may run in now, or None."""
        slot = self.slot_of(adapter_id)
        if slot is None or (slot in self.reserved and self.reserved[slot] != adapter_id):
            return None
        return slot

    def acquire_slot(
        self, adapter_id: int, in_use: set[int], step: int, may_reserve: bool = True
    ) -> int | None:
        """Activate a loaded adapter into a free or drained slot; if every candidate is busy,
        reserve the least recently used one (unless may_reserve is False) and return None."""
        slot = self.slot_of(adapter_id)
        if slot is not None:
            if self.can_admit(adapter_id) is None:
                return None  # its slot drains for another adapter; it is re-activated later
            self.stats.slot_hits += 1
            return slot
        mine = [s for s, a in self.reserved.items() if a == adapter_id]
        if mine:
            candidates = mine
        else:
            candidates = [
                s for s in range(len(self.slot_adapter))
                if s not in self.reserved and self.slot_adapter[s] not in self.pinned
            ]
            if not candidates:
                return None
            candidates = [min(candidates, key=lambda s: (self.slot_adapter[s] is not None,
                                                          self.slot_last_used[s]))]
        slot = candidates[0]
        if self.slot_adapter[slot] in in_use:
            if may_reserve:
                self.reserved[slot] = adapter_id  # drain: admit nobody new for the old adapter
            return None
        self.reserved.pop(slot, None)
        start = time.perf_counter()
        self.slots.activate(slot, self.host.get(adapter_id))
        self.stats.activate_seconds.append(time.perf_counter() - start)
        self.stats.slot_misses += 1
        self.slot_adapter[slot] = adapter_id
        self.slot_last_used[slot] = step
        return slot

    def release_reservations(self, waiting_ids: set[int]) -> None:
        """Drop reservations whose requests left the queue (aborted or failed)."""
        for slot, adapter_id in list(self.reserved.items()):
            if adapter_id not in waiting_ids:
                del self.reserved[slot]

    def touch(self, slot: int, step: int) -> None:
        self.slot_last_used[slot] = step

    # -- pre-warm and pin -----------------------------------------------------------------------
    def pin(self, adapter_id: int) -> None:
        if len(self.pinned | {adapter_id}) >= len(self.slot_adapter):
            raise ValueError(
                f"cannot pin more than {len(self.slot_adapter) - 1} adapters with max_loras="
                f"{len(self.slot_adapter)}: one slot must stay free for everyone else"
            )
        self.pinned.add(adapter_id)
        # Its slot may be draining for another adapter: cancel that, or the pin would not hold.
        self.reserved.pop(self.slot_of(adapter_id), None)
        if adapter_id in self.host:
            self.host.pinned.add(adapter_id)

    def unpin(self, adapter_id: int) -> None:
        self.pinned.discard(adapter_id)
        self.host.pinned.discard(adapter_id)

    def forget(self, adapter_ids: set[int]) -> None:
        """Drop these adapters' host copies, pins and pending loads (their owner's data was
        deleted, so no new request resolves to them). A slot holding one keeps it until the
        slot is next taken: a running request may still be using it."""
        for adapter_id in adapter_ids:
            self.pinned.discard(adapter_id)
            self.host.remove(adapter_id)
            self._loads.pop(adapter_id, None)

    def evict_slots(self, adapter_ids: set[int]) -> None:
        """Zero the slots holding these adapters (no running sequence may use them: the engine
        finished theirs first) and cancel reservations made for them."""
        for slot, adapter_id in enumerate(self.slot_adapter):
            if adapter_id in adapter_ids:
                self.slots.deactivate(slot)
                self.slot_adapter[slot] = None
        for slot, adapter_id in list(self.reserved.items()):
            if adapter_id in adapter_ids:
                del self.reserved[slot]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        return {
            "adapters_in_slots": [a for a in self.slot_adapter if a is not None],
            "adapters_in_host_cache": self.host.ids(),
            "adapters_loading": len(self._loads),
            "pinned": sorted(self.pinned),
            "slot_hits": self.stats.slot_hits,
            "slot_misses": self.stats.slot_misses,
            "host_misses": self.stats.host_misses,
            "slot_buffer_bytes": self.slots.num_bytes(),
        }
