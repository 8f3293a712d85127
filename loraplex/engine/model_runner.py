"""Turns a scheduled step into the model's input tensors, runs the forward pass, returns logits."""

import torch

from loraplex.config import EngineConfig
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels import decode_layers, fused_stages
from loraplex.lora.ops import AdapterBatch
from loraplex.model.llama import AttentionMetadata, LlamaModel, PrefillChunk


def kv_cache_rows(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[num_seqs, max_blocks] block ids -> [num_seqs, max_blocks * block_size] the KV cache row
    of every token position."""
    offsets = torch.arange(block_size, device=block_tables.device)
    return (block_tables[:, :, None] * block_size + offsets).flatten(1)


class ModelRunner:
    def __init__(self, model: LlamaModel, config: EngineConfig, num_blocks: int):
        self.model = model
        self.device = config.torch_device
        self.block_size = config.block_size
        # Built (once per machine) or found now, not on the first request.
        self.use_lora_kernel = cpu_kernel.is_available(config.torch_dtype, self.device)
        mc = model.config
        self.use_attention_kernel = cpu_kernel.attention_is_available(
            config.torch_dtype, self.device, mc.num_heads, mc.num_kv_heads, mc.head_dim)
        model.use_fused_stages(fused_stages.is_available(config.torch_dtype, self.device))
        # One tensor per layer: [keys/values, every token row of every block, kv heads, head dim]
        self.kv_caches = [
            torch.zeros(2, num_blocks * self.block_size, mc.num_kv_heads, mc.head_dim,
                        dtype=config.torch_dtype, device=self.device)
            for _ in range(mc.num_layers)
        ]
        # Decode-only steps as one C++ call (kernels/decode_layers.py), built at the first such
        # step: by then the engine has attached the adapter slots it points to.
        self.use_layers_kernel = decode_layers.takes_model(model, config.torch_dtype,
                                                           self.device)
        self.layers_kernel: decode_layers.DecodeLayers | None = None

    @staticmethod
    def kv_bytes_per_block(model: LlamaModel, config: EngineConfig) -> int:
        mc = model.config
        itemsize = torch.tensor([], dtype=config.torch_dtype).element_size()
        return 2 * mc.num_layers * config.block_size * mc.num_kv_heads * mc.head_dim * itemsize

    def execute(self, batch: list[ScheduledSeq], slot_places: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Run one step, the adapter slots' rows at `slot_places` (AdapterSlots.places). Returns
        logits [num_outputs, vocab] and the sequences they belong to: those whose step reached
        the end of their known tokens (the others are mid-prefill)."""
        # Decode rows (one new token) first, so attention batches them; prefill chunks after.
        # Decode rows with an adapter lead, by slot (the LoRA op's pieces and kernel groups).
        batch = sorted(batch, key=lambda s: (s.num_tokens != 1, s.seq.slot < 0, s.seq.slot))
        input_ids, positions, slot_mapping, token_slots = [], [], [], []
        logits_indices, outputs = [], []
        decode_tables, decode_lens = [], []
        prefills = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            table, bs = seq.block_table, self.block_size
            query_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            token_slots.extend([seq.slot] * item.num_tokens)
            if item.num_tokens == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                history = None
                if start > 0:
                    history = kv_cache_rows(torch.tensor([table], device=self.device), bs)[0, :end]
                prefills.append(PrefillChunk(query_start, item.num_tokens, end, history))
            if end == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                outputs.append(item)

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        decode_kv_indices = decode_mask = lens = None
        if decode_tables:
            num_blocks = max(len(t) for t in decode_tables)
            tables = as_tensor([t + [0] * (num_blocks - len(t)) for t in decode_tables])
            width = max(decode_lens)
            decode_kv_indices = kv_cache_rows(tables, self.block_size)[:, :width]
            if self.use_attention_kernel:  # it takes the lengths, no mask
                lens = as_tensor(decode_lens)
            else:
                key_positions = torch.arange(width, device=self.device)
                decode_mask = key_positions[None, :] < as_tensor(decode_lens)[:, None]
                decode_mask = decode_mask[:, None, None, :]  # [num_decode, 1, 1, width]
        attn = AttentionMetadata(
            slot_mapping=as_tensor(slot_mapping),
            num_decode_tokens=len(decode_tables),
            decode_kv_indices=decode_kv_indices,
            decode_mask=decode_mask,
            prefills=tuple(prefills),
            decode_lens=lens,
        )
        adapters = AdapterBatch.build(token_slots, slot_places, self.device, self.use_lora_kernel)
        if self.use_layers_kernel and self.layers_kernel is None and not prefills:
            self.layers_kernel = decode_layers.DecodeLayers(self.model, self.kv_caches)
        logits = self.model(
            as_tensor(input_ids), as_tensor(positions), self.kv_caches, attn, adapters,
            as_tensor(logits_indices), self.layers_kernel,
        )
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
        return logits, outputs
