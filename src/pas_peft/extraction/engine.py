"""
Batched forward passes with a shared prefix cache, activation capture and per-row steering.

Every scoring task is written as a prefix and a continuation: the prefix is encoded once into a KV cache,
and each row then runs a short continuation against its prefix. A continuation can start at decoder layer
L from cached layer inputs: the layers below L are bypassed, which is exact whenever nothing below L
changes between rows (steering at layer L only changes layer L and the layers above it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..architectures import DecoderStack, find_decoder_stack, find_steering_point
from ..layer import PASLayer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPoint:
    """Read location of an activation: the input of decoder layer `layer`, or its steered activation."""

    layer: int
    kind: str  # "layer_input" or "steering_point"


@dataclass
class PrefixCache:
    """KV cache of a left-padded batch of prefixes."""

    cache: Optional[object]
    attention_mask: torch.Tensor  # (batch, prefix_tokens), 1 for real tokens
    lengths: torch.Tensor  # (batch,) real prefix lengths

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


@dataclass
class Steering:
    """Add `deltas[row]` to the activation of decoder layer `layer` at the row's continuation tokens."""

    layer: int
    deltas: torch.Tensor  # (rows, hidden), fp32
    start_positions: Optional[torch.Tensor] = None
    """Per row, the first continuation position that is steered (default: every position)."""


@dataclass
class RunOutput:
    logits: Optional[list[torch.Tensor]]  # per row, (len(logit_positions[row]), vocab)
    captured: dict[ReadPoint, torch.Tensor] = field(default_factory=dict)  # (rows, continuation_tokens, hidden)


class BatchRunner:
    """
    Runs a transformers causal LM on prefix + continuation batches.

    Args:
        model: a transformers model, or a PeftModel (its LoRA layers stay active; PAS layers are switched off
            while this runner works, so extraction always reads the unsteered model).
        activation: the steered activation (`PASConfig.activation`), which decides where `steering_point`
            read points and steering live.
        layers_module: dotted path of the decoder layer list, if it cannot be found automatically.
    """

    def __init__(self, model: nn.Module, activation: str = "residual", layers_module: Optional[str] = None) -> None:
        if hasattr(model, "pas_model"):
            # A PASStack: its transformers model carries both the LoRA and the PAS layers.
            model = model.model
        get_base_model = getattr(model, "get_base_model", None)
        self.model = get_base_model() if get_base_model is not None else model
        self.stack: DecoderStack = find_decoder_stack(self.model, layers_module)
        self.activation = activation
        self.pad_token_id = 0
        self._layer_returns_tuple: Optional[bool] = None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    # -- prefixes --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prefixes(self, prefixes: Sequence[Sequence[int]]) -> PrefixCache:
        """Encode left-padded prefixes into a KV cache (the cache is empty when every prefix is empty)."""
        width = max(len(prefix) for prefix in prefixes)
        input_ids = torch.full((len(prefixes), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            if prefix:
                input_ids[row, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
                attention_mask[row, width - len(prefix):] = 1
        lengths = attention_mask.sum(dim=1)
        if width == 0:
            return PrefixCache(None, attention_mask.to(self.device), lengths.to(self.device))

        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self._unsteered(), self._learn_layer_output_type():
            output = self.stack.owner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask),
                use_cache=True,
            )
        return PrefixCache(output.cache, attention_mask, lengths.to(self.device))

    # -- continuations ---------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        prefixes: PrefixCache,
        prefix_rows: torch.Tensor,
        continuations: Sequence[Sequence[int]],
        *,
        start_layer: int = 0,
        start_hidden: Optional[torch.Tensor] = None,
        steering: Optional[Steering] = None,
        capture: Sequence[ReadPoint] = (),
        logit_positions: Optional[Sequence[Sequence[int]]] = None,
    ) -> RunOutput:
        """
        Run right-padded continuations, row `i` attending to prefix `prefix_rows[i]`.

        With `start_layer` L > 0, `start_hidden` (rows, tokens, hidden) is the input of decoder layer L for
        the continuation tokens, and layers 0 to L-1 are bypassed. Logits are computed only at
        `logit_positions[i]` of each row (none at all when it is None), because the output projection over
        the vocabulary costs as much as several decoder layers.
        """
        rows = len(continuations)
        width = max(len(tokens) for tokens in continuations)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        continuation_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, tokens in enumerate(continuations):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            continuation_mask[row, : len(tokens)] = 1
        prefix_rows = prefix_rows.to(self.device)
        input_ids, continuation_mask = input_ids.to(self.device), continuation_mask.to(self.device)

        prefix_mask = prefixes.attention_mask[prefix_rows]
        attention_mask = torch.cat([prefix_mask, continuation_mask], dim=1)
        position_ids = prefixes.lengths[prefix_rows][:, None] + torch.arange(width, device=self.device)[None, :]
        cache = _select_cache_rows(prefixes.cache, prefix_rows, first_layer=max(start_layer - 1, 0))

        captured: dict[ReadPoint, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._unsteered())
            if start_layer > 0:
                if start_hidden is None:
                    raise ValueError("start_hidden is required when start_layer > 0.")
                stack.enter_context(self._bypass_layers_below(start_layer, start_hidden))
            if steering is not None:
                stack.enter_context(self._steer(steering))
            for point in capture:
                stack.enter_context(self._capture(point, captured))
            inputs = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
            if logit_positions is None:
                self.stack.owner(**inputs)
                return RunOutput(None, captured)
            flat = [row * width + position for row, positions in enumerate(logit_positions) for position in positions]
            stack.enter_context(self._keep_positions(torch.tensor(flat, device=self.device)))
            logits = self.model(**inputs, logits_to_keep=0).logits[0]
        counts = [len(positions) for positions in logit_positions]
        return RunOutput(list(torch.split(logits, counts)), captured)

    # -- hooks -----------------------------------------------------------------------------------------

    def steering_module(self, layer: int):
        return find_steering_point(self.stack.layers[layer], self.activation)

    @contextlib.contextmanager
    def _capture(self, point: ReadPoint, store: dict) -> Iterator[None]:
        decoder_layer = self.stack.layers[point.layer]

        def save(tensor: torch.Tensor) -> None:
            store[point] = tensor.detach().float()

        if point.kind == "layer_input":
            handle = decoder_layer.register_forward_pre_hook(
                lambda module, args, kwargs: save(_first_tensor(module, args, kwargs)), with_kwargs=True
            )
        else:
            steering_point = self.steering_module(point.layer)
            if steering_point.kind == "output":
                handle = steering_point.module.register_forward_hook(
                    lambda module, args, output: save(output if isinstance(output, torch.Tensor) else output[0])
                )
            else:
                handle = steering_point.module.register_forward_pre_hook(
                    lambda module, args, kwargs: save(_first_tensor(module, args, kwargs)), with_kwargs=True
                )
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _steer(self, steering: Steering) -> Iterator[None]:
        # NOTE: the sweep adds vectors here rather than through PASLayer, because every row carries its own
        # vector and strength. The equivalence tests check that both give the same predictions.
        point = self.steering_module(steering.layer)

        def add(hidden: torch.Tensor) -> torch.Tensor:
            delta = steering.deltas[:, None, :].to(device=hidden.device, dtype=hidden.dtype)
            if steering.start_positions is None:
                return hidden + delta
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            mask = positions[None, :] >= steering.start_positions.to(hidden.device)[:, None]
            return hidden + mask[:, :, None].to(hidden.dtype) * delta

        if point.kind == "output":

            def on_output(module, args, output):
                if isinstance(output, torch.Tensor):
                    return add(output)
                return (add(output[0]),) + tuple(output[1:])

            handle = point.module.register_forward_hook(on_output)
        else:

            def on_input(module, args, kwargs):
                if args:
                    return (add(args[0]),) + tuple(args[1:]), kwargs
                name = next(key for key in ("hidden_states", "x", "input") if key in kwargs)
                return args, {**kwargs, name: add(kwargs[name])}

            handle = point.module.register_forward_pre_hook(on_input, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _bypass_layers_below(self, start_layer: int, start_hidden: torch.Tensor) -> Iterator[None]:
        """Replace layers 0..L-1 so that layer L receives `start_hidden` without computing the layers below."""
        returns_tuple = bool(self._layer_returns_tuple)

        def passthrough(hidden_states, *args, **kwargs):
            return (hidden_states,) if returns_tuple else hidden_states

        def inject(hidden_states, *args, **kwargs):
            value = start_hidden.to(device=hidden_states.device, dtype=hidden_states.dtype)
            return (value,) if returns_tuple else value

        # Layers dispatched by accelerate (device_map) already carry an instance-level forward; keep it to restore.
        replaced = []
        try:
            for index in range(start_layer):
                layer = self.stack.layers[index]
                replaced.append((layer, layer.__dict__.get("forward")))
                layer.forward = inject if index == start_layer - 1 else passthrough
            yield
        finally:
            for layer, previous in replaced:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    @contextlib.contextmanager
    def _keep_positions(self, flat_positions: torch.Tensor) -> Iterator[None]:
        """Feed the output projection only the hidden states at `flat_positions` (indices into rows x tokens)."""
        output_embeddings = self.model.get_output_embeddings()

        def gather(module, args):
            hidden = args[0]
            positions = flat_positions.to(hidden.device)
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)[None],) + tuple(args[1:])

        handle = output_embeddings.register_forward_pre_hook(gather)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _learn_layer_output_type(self) -> Iterator[None]:
        if self._layer_returns_tuple is not None:
            yield
            return

        def record(module, args, output):
            self._layer_returns_tuple = isinstance(output, tuple)

        handle = self.stack.layers[0].register_forward_hook(record)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _unsteered(self) -> Iterator[None]:
        with pas_steering_disabled(self.model):
            yield


@contextlib.contextmanager
def pas_steering_disabled(model: nn.Module) -> Iterator[None]:
    """Switch off every PAS steering layer of `model` inside the block (other adapters such as LoRA stay on)."""
    layers = [module for module in model.modules() if isinstance(module, PASLayer)]
    previous = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer._disable_adapters = was_disabled


def _select_cache_rows(cache, rows: torch.Tensor, first_layer: int = 0):
    """Return a cache whose batch is `cache[rows]`; layers below `first_layer` are left as they are (unused)."""
    if cache is None:
        return None
    selected = copy.copy(cache)
    selected.layers = []
    for index, layer in enumerate(cache.layers):
        layer = copy.copy(layer)
        if index >= first_layer:
            # With a device_map split, each cache layer lives on its decoder layer's device.
            keys = getattr(layer, "keys", None)
            layer.batch_select_indices(rows.to(keys.device) if isinstance(keys, torch.Tensor) else rows)
        selected.layers.append(layer)
    return selected


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _first_tensor(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError(
        f"Could not find the hidden states among the inputs of {type(module).__name__}; use activation='residual'."
    )
