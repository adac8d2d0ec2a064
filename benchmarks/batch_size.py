"""
Benchmark: forward-pass time per prompt at several batch sizes, for the CPU default of the batch planner.

Runs the embedded SmolLM2-135M-Instruct over the same letter prompts of the bundled BBQ Age slice at each
batch size, in one process, and prints seconds per prompt and the ratio to the fastest size. The batch
planner's CPU budget (src/pas_peft/extraction/batching.py) is sized from this measurement.

    python benchmarks/batch_size.py --prompts 256 --batch-sizes 1 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pas_peft
from pas_peft.data import load_items
from pas_peft.extraction.scoring import ItemEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256, help="letter prompts to run at each batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size; the fastest counts")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    model, tokenizer = pas_peft.load_base_model()
    model.eval()
    encoder = ItemEncoder(tokenizer, "letter", seed=0)
    items = load_items("bbq_age").items[: args.prompts]
    encoded = [encoder.encode(item) for item in items]
    prompts = [row.prefix + row.continuations[0] for row in encoded]  # letter mode: one row, the last token
    mean_tokens = sum(len(tokens) for tokens in prompts) / len(prompts)
    print(f"{len(prompts)} prompts, {mean_tokens:.0f} tokens on average, {torch.get_num_threads()} torch threads")

    run_batches(model, prompts[:16], tokenizer.pad_token_id, 16)  # warm-up
    seconds = {}
    for batch_size in args.batch_sizes:
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_batches(model, prompts, tokenizer.pad_token_id, batch_size)
            timings.append(time.perf_counter() - start)
        seconds[batch_size] = min(timings) / len(prompts)
    fastest = min(seconds.values())
    for batch_size, per_prompt in seconds.items():
        print(f"batch {batch_size:>3}: {per_prompt * 1000:.1f} ms per prompt, {per_prompt / fastest:.2f}x the fastest")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"mean_tokens": mean_tokens, "seconds_per_prompt": seconds}, indent=2))


def run_batches(model, prompts: list[list[int]], pad_token_id: int, batch_size: int) -> None:
    """Run one forward per batch of left-padded prompts, with logits at the last position only."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(tokens) for tokens in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, tokens in enumerate(batch):
                input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)


if __name__ == "__main__":
    main()
