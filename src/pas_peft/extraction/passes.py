"""
Evaluation of a split: the unsteered answers, the activations PAS needs, and steered answers for a grid.

For each chunk of items the prefixes are encoded once. One unsteered run of the continuations gives the
baseline answers, the activations that build the vectors, and the input of every candidate layer. Each
steering configuration (method, layer L, strength) is then a batch of continuations that starts at layer L
from those cached inputs, so nothing the cache holds is computed twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .batching import MemoryModel, prefix_tokens_per_batch, rows_per_batch
from .engine import BatchRunner, ReadPoint, Steering
from .scoring import EncodedItem, last_positions, predict_from_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """One steering configuration: a method's vector at `layer`, scaled by `strength`."""

    method: str
    layer: int
    strength: float


@dataclass
class SplitEvaluation:
    """Results of one pass over a split."""

    labels: torch.Tensor  # (items,)
    predictions: torch.Tensor  # (items,) unsteered answers
    prompt_activations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (items, hidden)
    answer_activations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (rows, hidden)
    answer_rows: dict[tuple[int, int], int] = field(default_factory=dict)  # (item, choice) -> row
    configs: list[SweepConfig] = field(default_factory=list)
    config_predictions: Optional[torch.Tensor] = None  # (items, configs)

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels


def evaluate_split(
    runner: BatchRunner,
    encoded: Sequence[EncodedItem],
    *,
    vector_layers: Sequence[int] = (),
    vector_source: str = "output",
    configs: Sequence[SweepConfig] = (),
    vectors: Optional[dict[str, dict[int, torch.Tensor]]] = None,
    budget_bytes: int,
    batch_size: Optional[int] = None,
    on_chunk_done: Optional[Callable[[int], None]] = None,
) -> SplitEvaluation:
    """
    Score `encoded` unsteered and under every configuration in `configs`.

    Args:
        vector_layers: layers whose activations are kept for building vectors (prompt and answer reads).
        vector_source: "output" reads the steered activation itself; "input" reads the layer's input.
        configs: steering configurations to evaluate; `vectors[method][layer]` gives their vectors.
        budget_bytes, batch_size: working-memory budget, or a fixed number of rows per forward.
        on_chunk_done: called with the number of items finished, for progress bars.
    """
    memory = MemoryModel.of(runner.model, runner.num_layers)
    read_kind = "layer_input" if vector_source == "input" else "steering_point"
    read_points = [ReadPoint(layer, read_kind) for layer in vector_layers]
    start_layers = sorted({config.layer for config in configs})
    result = SplitEvaluation(
        labels=torch.tensor([item.item.label for item in encoded]),
        predictions=torch.empty(len(encoded), dtype=torch.long),
        configs=list(configs),
        config_predictions=torch.empty((len(encoded), len(configs)), dtype=torch.long) if configs else None,
    )
    prompt_parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in vector_layers}
    answer_parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in vector_layers}

    max_prefix_tokens = prefix_tokens_per_batch(runner.device)
    for chunk_start, chunk in _chunks(encoded, memory, budget_bytes, batch_size, max_prefix_tokens):
        prefixes = runner.encode_prefixes([item.prefix for item in chunk])
        baseline = _run_rows(
            runner,
            prefixes,
            [(local, row) for local, item in enumerate(chunk) for row in range(len(item.continuations))],
            chunk,
            capture=read_points + [ReadPoint(layer, "layer_input") for layer in start_layers if layer > 0],
        )
        for local, item in enumerate(chunk):
            result.predictions[chunk_start + local] = predict_from_logits(item, baseline.logits_of(local))[0]
        _collect_vector_reads(chunk, chunk_start, baseline, read_points, prompt_parts, answer_parts, result.answer_rows)

        for layer in start_layers:
            layer_configs = [(index, config) for index, config in enumerate(configs) if config.layer == layer]
            _evaluate_layer(
                runner, prefixes, chunk, chunk_start, baseline, layer, layer_configs, vectors or {}, result,
                memory, budget_bytes, batch_size,
            )
        if on_chunk_done is not None:
            on_chunk_done(len(chunk))

    result.prompt_activations = {layer: torch.cat(parts) for layer, parts in prompt_parts.items() if parts}
    result.answer_activations = {layer: torch.cat(parts) for layer, parts in answer_parts.items() if parts}
    return result


# -- one chunk ---------------------------------------------------------------------------------------------


@dataclass
class _RowsOutput:
    """Logits and captures of a list of (item, row) continuations, with a lookup by item."""

    rows: list[tuple[int, int]]
    logits: list[torch.Tensor]  # per row, (scored positions, vocab)
    captured: dict[ReadPoint, list[torch.Tensor]]  # per row, (tokens, hidden)

    def logits_of(self, local_item: int) -> list[torch.Tensor]:
        return [logits for (item, _), logits in zip(self.rows, self.logits) if item == local_item]

    def captured_of(self, point: ReadPoint, local_item: int) -> list[torch.Tensor]:
        return [tensor for (item, _), tensor in zip(self.rows, self.captured[point]) if item == local_item]


def _run_rows(
    runner: BatchRunner,
    prefixes,
    rows: list[tuple[int, int]],
    chunk: Sequence[EncodedItem],
    capture: Sequence[ReadPoint] = (),
) -> _RowsOutput:
    continuations = [chunk[item].continuations[row] for item, row in rows]
    output = runner.run(
        prefixes,
        torch.tensor([item for item, _ in rows]),
        continuations,
        capture=capture,
        logit_positions=[chunk[item].scored_positions(row) for item, row in rows],
    )
    lengths = [len(tokens) for tokens in continuations]
    return _RowsOutput(
        rows=rows,
        logits=output.logits,
        captured={
            point: [output.captured[point][index, :length] for index, length in enumerate(lengths)]
            for point in capture
        },
    )


def _collect_vector_reads(chunk, chunk_start, baseline: _RowsOutput, read_points, prompt_parts, answer_parts, answer_rows):
    """Keep the activation at each item's last prompt token and, in likelihood modes, at each answer's end."""
    for point in read_points:
        for local, item in enumerate(chunk):
            first_row = baseline.captured_of(point, local)[0]
            prompt_parts[point.layer].append(first_row[item.prompt_position][None])
            if item.answer_starts is None:
                continue
            rows = baseline.captured_of(point, local)
            for choice, (tensor, position) in enumerate(zip(rows, last_positions(item))):
                # Every layer's table gets its rows in the same order, so the row index is recorded once.
                if point == read_points[0]:
                    answer_rows[(chunk_start + local, choice)] = len(answer_rows)
                answer_parts[point.layer].append(tensor[position][None])


def _evaluate_layer(
    runner, prefixes, chunk, chunk_start, baseline: _RowsOutput, layer, layer_configs, vectors, result,
    memory, budget_bytes, batch_size,
) -> None:
    """Score every configuration at `layer` as batches of continuations starting at that layer."""
    jobs = [
        (local, row, config_index, config)
        for local, item in enumerate(chunk)
        for config_index, config in layer_configs
        for row in range(len(item.continuations))
    ]
    # Rows of similar length share a batch, so little compute goes to padding.
    jobs.sort(key=lambda job: len(chunk[job[0]].continuations[job[1]]))
    start_point = ReadPoint(layer, "layer_input")
    width = max(len(row) for item in chunk for row in item.continuations)
    step = rows_per_batch(memory, max(len(item.prefix) for item in chunk), width, budget_bytes, batch_size)
    logits_by_job: dict[tuple[int, int, int], torch.Tensor] = {}

    for start in range(0, len(jobs), step):
        batch = jobs[start : start + step]
        continuations = [chunk[local].continuations[row] for local, row, _, _ in batch]
        start_hidden = None
        if layer > 0:
            inputs = [baseline.captured_of(start_point, local)[row] for local, row, _, _ in batch]
            start_hidden = _pad_rows(inputs, max(len(tokens) for tokens in continuations))
        deltas = torch.stack([config.strength * vectors[config.method][layer] for _, _, _, config in batch])
        start_positions = torch.tensor([chunk[local].steered_from(row) for local, row, _, _ in batch])
        output = runner.run(
            prefixes,
            torch.tensor([local for local, _, _, _ in batch]),
            continuations,
            start_layer=layer,
            start_hidden=start_hidden,
            steering=Steering(layer, deltas, start_positions),
            logit_positions=[chunk[local].scored_positions(row) for local, row, _, _ in batch],
        )
        for index, (local, row, config_index, _) in enumerate(batch):
            logits_by_job[(local, row, config_index)] = output.logits[index]

    for local, item in enumerate(chunk):
        for config_index, _ in layer_configs:
            logits = [logits_by_job[(local, row, config_index)] for row in range(len(item.continuations))]
            result.config_predictions[chunk_start + local, config_index] = predict_from_logits(item, logits)[0]


def _pad_rows(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    hidden = tensors[0].shape[-1]
    padded = tensors[0].new_zeros((len(tensors), width, hidden))
    for index, tensor in enumerate(tensors):
        padded[index, : tensor.shape[0]] = tensor
    return padded


def _chunks(
    encoded: Sequence[EncodedItem],
    memory: MemoryModel,
    budget_bytes: int,
    batch_size: Optional[int],
    max_prefix_tokens: int,
):
    """Yield (start index, items) chunks whose prefixes fit one encoding forward and whose rows fit one batch."""
    start = 0
    while start < len(encoded):
        end = start
        rows = 0
        prefix_tokens = continuation_tokens = 0
        while end < len(encoded):
            item = encoded[end]
            prefix_tokens = max(prefix_tokens, len(item.prefix))
            continuation_tokens = max(continuation_tokens, max(len(row) for row in item.continuations))
            capacity = rows_per_batch(memory, prefix_tokens, continuation_tokens, budget_bytes, batch_size)
            too_many_rows = rows + len(item.continuations) > capacity
            too_many_tokens = batch_size is None and (end - start + 1) * prefix_tokens > max_prefix_tokens
            if end > start and (too_many_rows or too_many_tokens):
                break
            rows += len(item.continuations)
            end += 1
        yield start, list(encoded[start:end])
        start = end


def read_last_token_activations(
    runner: BatchRunner,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    vector_source: str = "output",
    budget_bytes: int,
    batch_size: Optional[int] = None,
) -> dict[int, torch.Tensor]:
    """Return each layer's activation at the last token of every sequence, as (sequences, hidden) tensors."""
    read_kind = "layer_input" if vector_source == "input" else "steering_point"
    read_points = [ReadPoint(layer, read_kind) for layer in layers]
    memory = MemoryModel.of(runner.model, runner.num_layers)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    longest = max((len(sequence) for sequence in sequences), default=0)
    step = rows_per_batch(memory, longest, 1, budget_bytes, batch_size)
    if batch_size is None:
        step = max(1, min(step, prefix_tokens_per_batch(runner.device) // max(longest, 1)))
    for start in range(0, len(sequences), step):
        batch = sequences[start : start + step]
        prefixes = runner.encode_prefixes([sequence[:-1] for sequence in batch])
        output = runner.run(
            prefixes, torch.arange(len(batch)), [sequence[-1:] for sequence in batch], capture=read_points
        )
        for point in read_points:
            parts[point.layer].append(output.captured[point][:, 0])
    return {layer: torch.cat(tensors) for layer, tensors in parts.items() if tensors}
