"""Adapter memory tiers: device slots (activate/deactivate) and the host LRU cache (add/remove).

Disk holds every adapter; the host cache keeps up to `max_cpu_loras` loaded `LoRAWeights` in RAM;
the device holds `max_loras` of them in stacked slot buffers that the forward pass reads.
"""

from collections import OrderedDict

import torch

from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.modules import FUSED_LINEARS
from loraplex.lora.quantize import quantize_into


class AdapterSlots:
    """Stacked slot buffers attached to the model's Linear layers, `max_loras` slots each.

    Per fused linear (FUSED_LINEARS), one A buffer [num_layers, max_loras, n * max_rank, in] for
    its n modules and one transposed B buffer [num_layers, max_loras, max_rank, out_i] per module
    (lora/ops.py reads B as rows of outputs); each
    layer's Linear gets views of its layer's part. Activating copies an adapter into one slot:
    one copy per module it targets (its weights come stacked over layers), zeros elsewhere. The
    base weights are never touched.

    With `int8` the buffers hold int8 weights, quantized on activation (lora/quantize.py), and
    each fused linear has a scale buffer [num_layers, max_loras, n * max_rank] float32 too.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int,
                 int8: bool = False):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.int8 = int8
        config = model.config
        shapes = config.module_shapes()
        num_layers = len(model.layers)
        weight = model.embed_tokens.weight
        dtype = torch.int8 if int8 else weight.dtype
        self.a: dict[str, torch.Tensor] = {}  # fused linear path -> its A buffer
        self.b: dict[str, torch.Tensor] = {}  # module name -> its B buffer
        self.scales: dict[str, torch.Tensor] = {}  # fused linear path -> its scales, if int8
        self.place: dict[str, tuple[str, int]] = {}  # module -> (fused linear path, A row offset)
        for path, modules in FUSED_LINEARS.items():
            in_features = shapes[modules[0]][0]
            self.a[path] = weight.new_zeros(num_layers, max_loras, len(modules) * max_rank,
                                            in_features, dtype=dtype)
            if int8:
                self.scales[path] = weight.new_zeros(num_layers, max_loras,
                                                     len(modules) * max_rank,
                                                     dtype=torch.float32)
            for i, module in enumerate(modules):
                self.b[module] = weight.new_zeros(num_layers, max_loras, max_rank,
                                                  shapes[module][1], dtype=dtype)
                self.place[module] = (path, i * max_rank)
            for layer_index, layer in enumerate(model.layers):
                linear = layer.get_submodule(path)
                linear.lora_a = self.a[path][layer_index]
                linear.lora_b = tuple(self.b[module][layer_index] for module in modules)
                linear.lora_scales = self.scales[path][layer_index] if int8 else None

    def buffers(self) -> list[torch.Tensor]:
        return [*self.a.values(), *self.b.values(), *self.scales.values()]

    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    def activate(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (any previous occupant is overwritten, padding included)."""
        self.deactivate(slot)
        for module, (a, b_t) in weights.modules.items():  # [layers, r, in], [layers, r, out]
            path, row = self.place[module]
            r = a.shape[1]
            a_part, b_part = self.a[path][:, slot, row:row + r], self.b[module][:, slot, :r]
            if self.int8:
                quantize_into(a, b_t, a_part, b_part, self.scales[path][:, slot, row:row + r])
            else:
                a_part.copy_(a)
                b_part.copy_(b_t)

    def deactivate(self, slot: int) -> None:
        for buffer in self.buffers():
            buffer[:, slot].zero_()


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
