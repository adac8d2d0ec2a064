"""Batch sizes from a memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_GPU_BUDGET_FRACTION = 0.5
MAX_DEFAULT_GPU_BUDGET_BYTES = 8 * 1024**3
# On a CPU, batches beyond a few thousand tokens stop paying off and only cost memory. With SmolLM2-135M on
# 2 cores and prompts of ~83 tokens, batches of 8 to 32 ran within 6% of each other per prompt. Batches of
# 64 ran 13% slower than the fastest, and one prompt at a time 24% slower. The script is
# benchmarks/batch_size.py, and docs/benchmarks.md records the machine and the numbers.
DEFAULT_CPU_BUDGET_BYTES = 1024**3
CPU_PREFIX_TOKENS_PER_BATCH = 2048
GPU_PREFIX_TOKENS_PER_BATCH = 32768


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
    """Return a working-memory budget in bytes: half the free accelerator memory (at most 8 GiB), or 1 GiB on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free * DEFAULT_GPU_BUDGET_FRACTION, MAX_DEFAULT_GPU_BUDGET_BYTES))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = DEFAULT_CPU_BUDGET_BYTES * 4
    return int(min(available // 4, DEFAULT_CPU_BUDGET_BYTES))


def prefix_tokens_per_batch(device: torch.device) -> int:
    """Return how many padded prefix tokens one encoding forward should hold."""
    return GPU_PREFIX_TOKENS_PER_BATCH if device.type == "cuda" else CPU_PREFIX_TOKENS_PER_BATCH


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
