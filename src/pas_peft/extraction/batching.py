"""Batch sizes from a memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_CPU_BUDGET_FRACTION = 0.25
DEFAULT_GPU_BUDGET_FRACTION = 0.5
MAX_DEFAULT_BUDGET_BYTES = 8 * 1024**3


@dataclass(frozen=True)
class MemoryModel:
    """Bytes one token costs in the KV cache and in the logits, for sizing batches."""

    kv_bytes_per_token: int
    logits_bytes_per_token: int
    hidden_bytes_per_token: int

    @classmethod
    def of(cls, model: torch.nn.Module, num_layers: int) -> "MemoryModel":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = config.hidden_size
        heads = getattr(config, "num_attention_heads", 1)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        element = torch.finfo(next(model.parameters()).dtype).bits // 8
        return cls(
            kv_bytes_per_token=num_layers * 2 * kv_heads * head_dim * element,
            logits_bytes_per_token=config.vocab_size * 4 * 3,  # logits, log-softmax and a temporary copy
            hidden_bytes_per_token=hidden * 4 * 8,  # activations alive during one layer, roughly
        )


def default_memory_budget(device: torch.device) -> int:
    """Return a working-memory budget in bytes: part of the free accelerator memory, or of the machine's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free * DEFAULT_GPU_BUDGET_FRACTION, MAX_DEFAULT_BUDGET_BYTES))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 1024**3
    return int(min(available * DEFAULT_CPU_BUDGET_FRACTION, MAX_DEFAULT_BUDGET_BYTES))


def rows_per_batch(
    memory: MemoryModel,
    prefix_tokens: int,
    continuation_tokens: int,
    budget_bytes: int,
    batch_size: Optional[int] = None,
) -> int:
    """Return how many continuation rows fit in `budget_bytes` (or `batch_size` if the user set one)."""
    if batch_size is not None:
        return max(int(batch_size), 1)
    per_row = (
        (prefix_tokens + continuation_tokens) * memory.kv_bytes_per_token * 2  # selected cache copy + concatenation
        + continuation_tokens * (memory.logits_bytes_per_token + memory.hidden_bytes_per_token)
    )
    return max(int(budget_bytes // max(per_row, 1)), 1)
