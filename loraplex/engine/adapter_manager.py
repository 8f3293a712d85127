"""Moves adapters disk -> host cache (a background thread) -> device slot, and keeps score.

The scheduler asks three questions per waiting request: is its adapter loaded yet (`poll`), which
slot holds it (`slot_of`), and can it get one (`acquire_slot`). A slot takes the pages of its
adapter's rank (lora/pages.py), so making room may take emptying several least recently used
slots. A slot is only ever emptied when no running sequence uses its adapter; a request whose
room is busy reserves those slots, which then admit nobody new until they drain, so no request
starves.
"""

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.engine.sequence import AdapterRequest
from loraplex.lora.adapter import AdapterError, LoRAWeights, load_adapter
from loraplex.lora.pages import DEFAULT_PAGE_RANK
from loraplex.lora.slots import AdapterSlots, HostCache
from loraplex.model.llama import LlamaModel


@dataclass
class AdapterStats:
    slot_hits: int = 0  # a request found its adapter already in a slot
    slot_misses: int = 0  # it had to be activated into a slot
    host_misses: int = 0  # it had to be read from disk
    load_seconds: list[float] = field(default_factory=list)  # disk -> host, per load
    load_seconds_total: float = 0.0
    activate_seconds: list[float] = field(default_factory=list)  # host -> slot, per activation
    activate_seconds_total: float = 0.0  # the sums: a reader of snapshots takes their deltas


class AdapterManager:
    def __init__(self, model: LlamaModel, max_loras: int, max_rank: int, max_cpu_loras: int,
                 cache_dir: Path | None = None, int8: bool = False, num_pages: int | None = None,
                 page_rank: int = DEFAULT_PAGE_RANK):
        self.config = model.config
        self.cache_dir = cache_dir  # where loaded adapters are kept ready to serve, if anywhere
        self.dtype = model.embed_tokens.weight.dtype
        self.max_rank = max_rank
        self.slots = AdapterSlots(model, max_loras, max_rank, int8=int8, num_pages=num_pages,
                                  page_rank=page_rank)
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
        self.stats.load_seconds_total += self.stats.load_seconds[-1]
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
        """Activate a loaded adapter into a slot, in pages of its rank: an empty slot and free
        pages, else those of the least recently used slots, emptied. If one of those is busy,
        reserve them all (unless may_reserve is False) and return None."""
        slot = self.slot_of(adapter_id)
        if slot is not None:
            if self.can_admit(adapter_id) is None:
                return None  # its slot drains for another adapter; it is re-activated later
            self.stats.slot_hits += 1
            return slot
        weights = self.host.get(adapter_id)
        victims = self._victims(adapter_id, self.slots.pages_for(weights.rank))
        for s, waiting in list(self.reserved.items()):  # renewed to exactly the victims
            if waiting == adapter_id and s not in (victims or ()):
                del self.reserved[s]
        if victims is None:
            return None
        if any(self.slot_adapter[s] in in_use for s in victims):
            if may_reserve:  # drain: admit nobody new for their adapters
                self.reserved.update(dict.fromkeys(victims, adapter_id))
            return None
        start = time.perf_counter()
        for s in victims:
            self.reserved.pop(s, None)
            self.slots.deactivate(s)
            self.slot_adapter[s] = None
        slot = victims[0]
        self.slots.activate(slot, weights)
        self.stats.activate_seconds.append(time.perf_counter() - start)
        self.stats.activate_seconds_total += self.stats.activate_seconds[-1]
        self.stats.slot_misses += 1
        self.slot_adapter[slot] = adapter_id
        self.slot_last_used[slot] = step
        return slot

    def _victims(self, adapter_id: int, num_pages: int) -> list[int] | None:
        """The slots to empty for an adapter of num_pages pages, the one it will take first:
        an empty slot if any, then those reserved for it, then the least recently used, until
        the free pages suffice; None when every unpinned slot not reserved for another adapter
        would not make room."""
        def order(s: int) -> tuple:
            return (self.slot_adapter[s] is not None, self.reserved.get(s) != adapter_id,
                    self.slot_last_used[s])

        candidates = sorted((s for s in range(len(self.slot_adapter))
                             if self.reserved.get(s, adapter_id) == adapter_id
                             and self.slot_adapter[s] not in self.pinned), key=order)
        chosen, free = [], self.slots.pages.num_free
        for s in candidates:
            if chosen and free >= num_pages:
                break
            if not chosen or self.slot_adapter[s] is not None:  # an empty one adds no pages
                chosen.append(s)
                free += self.slots.num_pages_of(s)
        return chosen if chosen and free >= num_pages else None

    def release_reservations(self, waiting_ids: set[int]) -> None:
        """Drop reservations whose requests left the queue (aborted or failed)."""
        for slot, adapter_id in list(self.reserved.items()):
            if adapter_id not in waiting_ids:
                del self.reserved[slot]

    def touch(self, slot: int, step: int) -> None:
        self.slot_last_used[slot] = step

    # -- pre-warm and pin -----------------------------------------------------------------------
    def pin(self, adapter_id: int) -> None:
        pinned = self.pinned | {adapter_id}
        if len(pinned) >= len(self.slot_adapter):
            raise ValueError(
                f"cannot pin more than {len(self.slot_adapter) - 1} adapters with max_loras="
                f"{len(self.slot_adapter)}: one slot must stay free for everyone else"
            )
        num_pages = sum(self._num_pages(a) for a in pinned)
        room = self.slots.pages.num_pages - self.slots.pages_for(self.max_rank)
        if num_pages > room:
            raise ValueError(
                f"cannot pin adapter {adapter_id}: the pinned adapters would take {num_pages} of "
                f"{self.slots.pages.num_pages} slot pages, and an adapter of max_lora_rank="
                f"{self.max_rank} needs {self.slots.pages_for(self.max_rank)} to stay free for "
                "everyone else"
            )
        self.pinned.add(adapter_id)
        # Its slot may be draining for another adapter: cancel that, or the pin would not hold.
        self.reserved.pop(self.slot_of(adapter_id), None)
        if adapter_id in self.host:
            self.host.pinned.add(adapter_id)

    def _num_pages(self, adapter_id: int) -> int:
        """Pages an adapter takes: its slot's, else by its rank if loaded, else the most."""
        slot = self.slot_of(adapter_id)
        if slot is not None:
            return self.slots.num_pages_of(slot)
        weights = self.host.get(adapter_id)
        return self.slots.pages_for(weights.rank if weights else self.max_rank)

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
            "host_load_ms_total": 1e3 * self.stats.load_seconds_total,
            "slot_activate_ms_total": 1e3 * self.stats.activate_seconds_total,
            "slot_buffer_bytes": self.slots.num_bytes(),
            "slot_pages": self.slots.pages.num_pages,
            "slot_pages_free": self.slots.pages.num_free,
            "slot_compactions": self.slots.num_compactions,
        }
