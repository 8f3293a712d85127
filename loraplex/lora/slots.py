"""Adapter memory tiers: device slots (activate/deactivate) and the host LRU cache (add/remove).

Disk holds every adapter; the host cache keeps up to `max_cpu_loras` loaded `LoRAWeights` in RAM;
the device holds `max_loras` of them in stacked slot buffers that the forward pass reads.
"""

from collections import OrderedDict

import torch

from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.modules import TARGET_MODULES


class AdapterSlots:
    """Stacked per-layer buffers with `max_loras` slots, attached to the model's Linear layers.

    Activating copies an adapter's small matrices into one slot of every layer it targets and
    zeroes that slot elsewhere; the base weights are never touched.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int):
        self.max_loras = max_loras
        self.max_rank = max_rank
        # (layer index, module name) -> the Linear that owns that slot buffer pair
        self.linears = {}
        for i, layer in enumerate(model.layers):
            for name in TARGET_MODULES:
                parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                linear = getattr(parent, name)
                w = linear.weight  # [out, in]
                out_features, in_features = w.shape
                linear.lora_a = w.new_zeros(max_loras, max_rank, in_features)
                linear.lora_b = w.new_zeros(max_loras, out_features, max_rank)
                self.linears[(i, name)] = linear

    def num_bytes(self) -> int:
        return sum(
            lin.lora_a.nbytes + lin.lora_b.nbytes for lin in self.linears.values()
        )

    def activate(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (any previous occupant is overwritten)."""
        for key, linear in self.linears.items():
            pair = weights.weights.get(key)
            if pair is None:
                linear.lora_a[slot].zero_()
                linear.lora_b[slot].zero_()
                continue
            a, b = pair  # [r, in], [out, r]
            r = a.shape[0]
            linear.lora_a[slot, :r].copy_(a)
            linear.lora_b[slot, :, :r].copy_(b)
            if r < self.max_rank:  # the padded tail must not keep an old adapter's numbers
                linear.lora_a[slot, r:].zero_()
                linear.lora_b[slot, :, r:].zero_()

    def deactivate(self, slot: int) -> None:
        for linear in self.linears.values():
            linear.lora_a[slot].zero_()
            linear.lora_b[slot].zero_()


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
