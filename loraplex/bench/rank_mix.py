"""Memory by rank in the benchmark: the same slot memory spent as slots sized for the largest rank
(the design before lora/pages.py) or as pages by rank, for a mix of ranks (`loraplex bench --rank
8,16,32,64`).

Both systems get the memory of SLOTS slots of max_lora_rank: `loraplex-rank-max` as that many
slots, each adapter padded with zero rows to max_lora_rank (it takes a max-rank slot's pages and
the LoRA op reads all of them, as slots sized for max_lora_rank did); `loraplex-paged` as pages,
each adapter taking those of its own rank, with a slot for every page, so that the memory alone
bounds how many adapters stay resident.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn.functional as F

from loraplex.bench.loraplex_systems import LoraplexEngineSystem
from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.pages import pages_for

SLOTS = 32  # what the memory of both systems holds in adapters of max_lora_rank
RANK_MAX_NAME = f"loraplex, {SLOTS} slots of the largest rank"
PAGED_NAME = f"loraplex, the memory of {SLOTS} such slots in pages by rank"


def padded(weights: LoRAWeights, rank: int) -> LoRAWeights:
    """The adapter with zero rank rows up to `rank`: the same delta, a max-rank slot's size."""
    modules = {name: (F.pad(a, (0, 0, 0, rank - a.shape[1])),  # [layers, rank, in]
                      F.pad(b_t, (0, 0, 0, rank - b_t.shape[1])))  # [layers, rank, out]
               for name, (a, b_t) in weights.modules.items()}
    return dataclasses.replace(weights, modules=modules)


class RankMaxSlotsSystem(LoraplexEngineSystem):
    def __init__(self, **kwargs):
        super().__init__(max_loras=SLOTS, **kwargs)
        self.name = RANK_MAX_NAME

    def make_engine(self, config: EngineConfig) -> LLMEngine:
        engine = super().make_engine(config)
        slots, max_rank = engine.adapters.slots, config.max_lora_rank
        activate = slots.activate
        # Every adapter counts as max_lora_rank: in the pages it takes (the manager asks
        # pages_for too) and in the rows the op reads.
        slots.pages_for = lambda rank: pages_for(max_rank, slots.page_rank)
        slots.activate = lambda slot, weights: activate(slot, padded(weights, max_rank))
        return engine


class PagedSlotsSystem(LoraplexEngineSystem):
    def __init__(self, **kwargs):
        super().__init__(max_loras=SLOTS, **kwargs)
        self.name = PAGED_NAME

    def engine_config(self, model_dir: Path, used: list[Path], dtype: str) -> EngineConfig:
        config = super().engine_config(model_dir, used, dtype)
        num_pages = SLOTS * pages_for(config.max_lora_rank, config.lora_page_rank)
        return dataclasses.replace(config, max_loras=num_pages, max_lora_pages=num_pages)
