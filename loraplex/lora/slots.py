"""Adapter memory tiers: device slots (activate/deactivate) and the host LRU cache (add/remove).

Disk holds every adapter; the host cache keeps up to `max_cpu_loras` loaded `LoRAWeights` in RAM;
the device holds up to `max_loras` of them in page-pooled buffers that the forward pass reads,
each taking the pages of its own rank (lora/pages.py).
"""

from collections import OrderedDict

import torch

from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.modules import FUSED_LINEARS
from loraplex.lora.pages import DEFAULT_PAGE_RANK, PageError, PagePool, pages_for
from loraplex.lora.quantize import quantize_into


class AdapterSlots:
    """Page-pooled adapter buffers attached to the model's Linear layers, `max_loras` slots.

    A page is `page_rank` rank rows; with R = num_pages * page_rank rows in all, per fused linear
    (FUSED_LINEARS) of n modules there is one A buffer [num_layers, n * R, in] and one
    transposed B buffer [num_layers, R, out_i] per module (lora/ops.py reads B as rows of
    outputs); each layer's Linear gets views of its layer's part. A slot holding an adapter of
    rank r has a run of ceil(r / page_rank) pages whose first B row is `row`: its B rows are
    [row, row + r) of every module's buffer and its A rows [n * row, n * row + n * r), module i
    at n * row + i * r. `places[slot]` = (row, r), (0, 0) for an empty slot: what the LoRA op
    reads. Activating copies an adapter into the pages: one copy per module it targets (its
    weights come stacked over layers). Free pages hold zeros (a module below the slot's rank,
    or one the adapter does not target, reads zeros), so a deactivated adapter leaves no trace.
    The base weights are never touched.

    With `int8` the buffers hold int8 weights, quantized on activation (lora/quantize.py), and
    each fused linear has a scale buffer [num_layers, n * R] float32 too, one per row of A.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int,
                 int8: bool = False, num_pages: int | None = None,
                 page_rank: int = DEFAULT_PAGE_RANK):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.page_rank = page_rank
        self.int8 = int8
        # Default: as many pages as max_loras adapters of max_rank take, the memory of slots
        # sized for max_rank.
        self.pages = PagePool(num_pages or max_loras * pages_for(max_rank, page_rank))
        num_rows = self.pages.num_pages * page_rank
        self.places: list[tuple[int, int]] = [(0, 0)] * max_loras  # slot -> (first B row, rank)
        self.num_compactions = 0
        shapes = model.config.module_shapes()
        num_layers = len(model.layers)
        weight = model.embed_tokens.weight
        dtype = torch.int8 if int8 else weight.dtype
        self.a: dict[str, torch.Tensor] = {}  # fused linear path -> its A buffer
        self.b: dict[str, torch.Tensor] = {}  # module name -> its B buffer
        self.scales: dict[str, torch.Tensor] = {}  # fused linear path -> its scales, if int8
        self.place: dict[str, tuple[str, int]] = {}  # module -> (fused linear path, its index)
        for path, modules in FUSED_LINEARS.items():
            in_features = shapes[modules[0]][0]
            self.a[path] = weight.new_zeros(num_layers, len(modules) * num_rows, in_features,
                                            dtype=dtype)
            if int8:
                self.scales[path] = weight.new_zeros(num_layers, len(modules) * num_rows,
                                                     dtype=torch.float32)
            for i, module in enumerate(modules):
                self.b[module] = weight.new_zeros(num_layers, num_rows, shapes[module][1],
                                                  dtype=dtype)
                self.place[module] = (path, i)
            for layer_index, layer in enumerate(model.layers):
                linear = layer.get_submodule(path)
                linear.attach_lora(self.a[path][layer_index],
                                   tuple(self.b[module][layer_index] for module in modules),
                                   self.scales[path][layer_index] if int8 else None)

    def buffers(self) -> list[torch.Tensor]:
        return [*self.a.values(), *self.b.values(), *self.scales.values()]

    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    def bytes_per_page(self) -> int:
        return self.num_bytes() // self.pages.num_pages

    def pages_for(self, rank: int) -> int:
        return pages_for(rank, self.page_rank)

    def num_pages_of(self, slot: int) -> int:
        return self.pages.runs.get(slot, (0, 0))[1]

    def activate(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot`, in pages of its own rank (any previous occupant is freed
        first). Raises PageError when the free pages, compacted, are too few: make room first
        (deactivate), e.g. as the adapter manager does."""
        self.deactivate(slot)
        rank = weights.rank
        count = self.pages_for(rank)
        first = self.pages.allocate(slot, count)
        if first is None and self.pages.can_allocate(count):
            self._compact()
            first = self.pages.allocate(slot, count)
        if first is None:
            raise PageError(f"an adapter of rank {rank} needs {count} pages, "
                            f"{self.pages.num_free} of {self.pages.num_pages} are free")
        row = first * self.page_rank
        self.places[slot] = (row, rank)
        for module, (a, b_t) in weights.modules.items():  # [layers, r, in], [layers, r, out]
            path, i = self.place[module]
            n, r = len(FUSED_LINEARS[path]), a.shape[1]
            a_rows = slice(n * row + i * rank, n * row + i * rank + r)
            a_part, b_part = self.a[path][:, a_rows], self.b[module][:, row:row + r]
            if self.int8:
                quantize_into(a, b_t, a_part, b_part, self.scales[path][:, a_rows])
            else:
                a_part.copy_(a)
                b_part.copy_(b_t)

    def deactivate(self, slot: int) -> None:
        """Zero the slot's pages and free them."""
        if slot in self.pages.runs:
            first, count = self.pages.runs[slot]
            self._zero(first, count)
            self.pages.free(slot)
        self.places[slot] = (0, 0)

    def page_views(self, first: int, count: int) -> list[torch.Tensor]:
        """Every buffer's part for pages [first, first + count), [num_layers, rows, ...]."""
        rows = slice(first * self.page_rank, (first + count) * self.page_rank)
        views = []
        for path, modules in FUSED_LINEARS.items():
            n = len(modules)
            a_rows = slice(n * rows.start, n * rows.stop)
            views.append(self.a[path][:, a_rows])
            if self.int8:
                views.append(self.scales[path][:, a_rows])
            views.extend(self.b[module][:, rows] for module in modules)
        return views

    def _zero(self, first: int, count: int) -> None:
        for view in self.page_views(first, count):
            view.zero_()

    def _compact(self) -> None:
        """Slide every run to the front (PagePool.compact), moving the adapters' weights with
        them, and zero what is left behind: free pages hold zeros, no stale copy."""
        for move in self.pages.compact():
            sources = self.page_views(move.source, move.count)
            targets = self.page_views(move.target, move.count)
            for source, target in zip(sources, targets, strict=True):
                target.copy_(source.clone())  # a move may overlap its own source
            self.places[move.owner] = (move.target * self.page_rank, self.places[move.owner][1])
        used = self.pages.num_used
        self._zero(used, self.pages.num_pages - used)
        self.num_compactions += 1


class HostCache:
    """Least-recently-used cache of loaded adapters in host memory, keyed by adapter id.

    Pinned adapters are never evicted; when everything is pinned the cache may exceed capacity
    rather than drop an adapter the operator asked to keep.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[int, LoRAWeights] = OrderedDict()
        self.pinned: set[int] = set()

    def __contains__(self, adapter_id: int) -> bool:
        return adapter_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[int]:
        return list(self._items)

    def get(self, adapter_id: int) -> LoRAWeights | None:
        weights = self._items.get(adapter_id)
        if weights is not None:
            self._items.move_to_end(adapter_id)
        return weights

    def add(self, adapter_id: int, weights: LoRAWeights) -> None:
        self._items[adapter_id] = weights
        self._items.move_to_end(adapter_id)
        for victim in [k for k in self._items if k not in self.pinned]:
            if len(self._items) <= self.capacity:
                break
            if victim != adapter_id:
                del self._items[victim]

    def remove(self, adapter_id: int) -> None:
        self._items.pop(adapter_id, None)
        self.pinned.discard(adapter_id)
