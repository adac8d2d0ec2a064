"""
Which tokens are steered.

Positions are absolute indices in padded coordinates: a forward call covers the positions
`offset, ..., offset + query_length - 1`, where `offset` is the number of tokens already in the KV cache.
The prompt boundary `P` is the number of prompt tokens (padding included), so the last prompt token sits
at position `P - 1`. The steering modes are:

- `all`: every position;
- `last_prompt`: the position `P - 1` only;
- `generated`: every position from `P - 1` on, i.e. the last prompt token and every generated token.

Where `P` comes from:

1. an explicit boundary set with `PromptPositions.prompt_boundary(...)` (an int, or one length per row);
2. inside `generate`, the length of the `input_ids` (or `inputs_embeds`) that `generate` received, recorded
   when it starts; with no inputs at all, the length of the first forward call;
3. otherwise (a plain forward or training call), the whole input is the prompt: `P` is one past each row's
   last non-padding token when a 2-D attention mask is given, else `offset + query_length`. So
   `last_prompt` and `generated` both steer each row's last real token, and `all` steers everything.

Counting from the cache length and the recorded prompt length, rather than from `position_ids`, keeps the
positions exact with and without a KV cache, with left padding, chunked prefill and assisted decoding.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

PromptLengths = Union[int, torch.Tensor]

# Attribute under which the shared state is stored on the transformers model.
STATE_ATTRIBUTE = "_pas_prompt_positions"


@dataclass
class ForwardCall:
    """The forward call the decoder stack is running: cache offset, input length, batch size and mask."""

    offset: int
    query_length: int
    batch_size: int
    attention_mask: Optional[torch.Tensor]


class PromptPositions:
    """
    Per-model state that turns a steering mode into a mask over the tokens of the current forward call.

    One instance is shared by every steering layer of a model. A forward pre-hook on the module that runs
    the decoder layers records the cache offset and input length of each call. A wrapper around the
    model's `generate` records the prompt length.

    NOTE: the state is mutable and shared, so one model should run one forward or `generate` at a time
    (no concurrent threads on the same model).
    """

    def __init__(self) -> None:
        self.current: Optional[ForwardCall] = None
        self._explicit: Optional[PromptLengths] = None
        self._generation_stack: list[dict[str, Optional[int]]] = []
        self._handles: list[Any] = []

    # -- recording -------------------------------------------------------------------------------------

    def record_forward(self, offset: int, query_length: int, batch_size: int, attention_mask) -> None:
        self.current = ForwardCall(offset, query_length, batch_size, attention_mask)
        if self._generation_stack:
            generation = self._generation_stack[-1]
            if generation["prompt_length"] is None and offset == 0:
                generation["prompt_length"] = query_length

    @contextlib.contextmanager
    def generation(self, prompt_length: Optional[int]) -> Iterator[None]:
        """Mark a `generate` call whose prompt has `prompt_length` tokens (None: learn it from the first forward)."""
        self._generation_stack.append({"prompt_length": prompt_length})
        try:
            yield
        finally:
            self._generation_stack.pop()

    @contextlib.contextmanager
    def prompt_boundary(self, prompt_lengths: PromptLengths) -> Iterator[None]:
        """
        Set the prompt length for the calls inside the block.

        `prompt_lengths` is an int for every row, or a 1-D tensor with one length per row, counted in padded
        coordinates from the first position of the row (padding included).
        """
        if isinstance(prompt_lengths, torch.Tensor):
            if prompt_lengths.dim() != 1:
                raise ValueError(
                    f"prompt_lengths must be an int or a 1-D tensor with one length per row, got shape "
                    f"{tuple(prompt_lengths.shape)}."
                )
            prompt_lengths = prompt_lengths.long()
        elif isinstance(prompt_lengths, bool) or not isinstance(prompt_lengths, int):
            raise ValueError(f"prompt_lengths must be an int or a 1-D tensor, got {prompt_lengths!r}.")
        elif prompt_lengths < 1:
            raise ValueError(f"prompt_lengths must be at least 1 (the prompt has a last token), got {prompt_lengths}.")

        previous = self._explicit
        self._explicit = prompt_lengths
        try:
            yield
        finally:
            self._explicit = previous

    # -- queries ---------------------------------------------------------------------------------------

    def prompt_lengths(self, call: ForwardCall) -> PromptLengths:
        """Return the prompt boundary `P` that applies to `call`."""
        if self._explicit is not None:
            return self._explicit
        if self._generation_stack:
            prompt_length = self._generation_stack[-1]["prompt_length"]
            if prompt_length is not None:
                return prompt_length
        end = call.offset + call.query_length
        mask = call.attention_mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == end:
            positions = torch.arange(end, device=mask.device)
            last_real = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
            return last_real + 1
        return end

    def steering_mask(self, mode: str, hidden_states: torch.Tensor) -> Union[None, bool, torch.Tensor]:
        """
        Return which tokens of `hidden_states` (batch, tokens, hidden) get the vector under `mode`.

        Returns None when every token is steered, False when none is, otherwise a boolean tensor of shape
        (batch, tokens).
        """
        if mode == "all":
            return None

        call = self._matching_call(hidden_states)
        prompt_lengths = self.prompt_lengths(call)
        last_prompt = prompt_lengths - 1
        start, end = call.offset, call.offset + call.query_length

        if isinstance(last_prompt, int):
            if mode == "generated" and start >= last_prompt:
                return None
            if not start <= last_prompt < end and not (mode == "generated" and last_prompt < end):
                return False

        positions = torch.arange(start, end, device=hidden_states.device)
        if isinstance(last_prompt, torch.Tensor):
            last_prompt = last_prompt.to(hidden_states.device)
            if last_prompt.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"The prompt boundary has {last_prompt.shape[0]} rows but the batch has "
                    f"{hidden_states.shape[0]}; pass one prompt length per row."
                )
            last_prompt = last_prompt[:, None]
        if mode == "last_prompt":
            mask = positions == last_prompt
        elif mode == "generated":
            mask = positions >= last_prompt
        else:
            raise ValueError(f"Unknown positions mode {mode!r}: use 'all', 'last_prompt' or 'generated'.")
        return mask.expand(hidden_states.shape[0], -1) if mask.dim() == 1 else mask

    def _matching_call(self, hidden_states: torch.Tensor) -> ForwardCall:
        call = self.current
        if call is None or call.query_length != hidden_states.shape[1]:
            # The layer runs outside the decoder stack's forward (for example a caller running layers by hand):
            # treat the input as a fresh prompt.
            return ForwardCall(0, hidden_states.shape[1], hidden_states.shape[0], None)
        return call

    # -- installation ----------------------------------------------------------------------------------

    def remove(self, model: nn.Module) -> None:
        """Remove the hooks and the `generate` wrapper this state installed on `model`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        generate = model.__dict__.get("generate")
        if isinstance(generate, types.MethodType) and generate.__func__ is _generate_with_prompt_boundary:
            del model.__dict__["generate"]
        model.__dict__.pop(STATE_ATTRIBUTE, None)


def install_prompt_positions(model: nn.Module, stack_owner: nn.Module) -> PromptPositions:
    """
    Return the position state of `model`, installing it on first use.

    Installs a forward pre-hook on `stack_owner`, the module whose forward runs the decoder layers. Also
    wraps `model.generate` on the instance, so that `generate` records the prompt length when it is called
    on a PeftModel, on a PeftModel without task type, or on the transformers model itself.
    """
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is not None:
        return state

    state = PromptPositions()
    state._handles.append(
        stack_owner.register_forward_pre_hook(_make_record_hook(state), with_kwargs=True, prepend=True)
    )
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(_generate_with_prompt_boundary, model)
    model.__dict__[STATE_ATTRIBUTE] = state
    return state


def find_prompt_positions(model: nn.Module) -> Optional[PromptPositions]:
    """Return the position state installed on `model`, or None."""
    return model.__dict__.get(STATE_ATTRIBUTE)


def _make_record_hook(state: PromptPositions):
    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        inputs_embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            state.current = None
            return
        query_length, batch_size = tokens.shape[1], tokens.shape[0]
        attention_mask = kwargs.get("attention_mask")
        state.record_forward(_cache_length(kwargs, attention_mask, query_length), query_length, batch_size, attention_mask)

    return record


def _cache_length(kwargs: dict, attention_mask, query_length: int) -> int:
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    get_seq_length = getattr(cache, "get_seq_length", None)
    if get_seq_length is not None:
        return int(get_seq_length())
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return max(attention_mask.shape[1] - query_length, 0)
    return 0


def _generate_with_prompt_boundary(self: nn.Module, *args, **kwargs):
    """Run the class's `generate`, recording the prompt length for PAS position modes."""
    state = self.__dict__.get(STATE_ATTRIBUTE)
    generate = type(self).generate
    if state is None:
        return generate(self, *args, **kwargs)
    with state.generation(_prompt_length_of_generate_call(args, kwargs)):
        return generate(self, *args, **kwargs)


def _prompt_length_of_generate_call(args: tuple, kwargs: dict) -> Optional[int]:
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
        return int(inputs.shape[1])
    inputs_embeds = kwargs.get("inputs_embeds")
    if isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() == 3:
        return int(inputs_embeds.shape[1])
    return None
