"""Decoder-layer discovery for transformers models, and the modules behind each steerable activation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

# Attribute names of the attention and MLP blocks inside a decoder layer, in the order they are tried.
# Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 use `self_attn` and `mlp`; GPT-2 uses `attn`;
# GPT-NeoX uses `attention`.
ATTENTION_ATTRIBUTES = ("self_attn", "attn", "attention", "self_attention")
MLP_ATTRIBUTES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")

# Dotted paths of the decoder stack for families whose layout the generic search might not pick.
KNOWN_DECODER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")


@dataclass(frozen=True)
class DecoderStack:
    """The decoder layers of a model and the module that runs them."""

    path: str
    """Dotted path of the `nn.ModuleList`, e.g. `"model.layers"`."""
    layers: nn.ModuleList
    owner: nn.Module
    """The module whose forward runs the layers in order (the parent of `layers`)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def module_name(self, index: int) -> str:
        return f"{self.path}.{index}"


@dataclass(frozen=True)
class SteeringPoint:
    """The module whose output (or input) is the steered activation of one decoder layer."""

    module: nn.Module
    kind: Literal["output", "input"]


def text_config(model: nn.Module):
    """Return the text part of a transformers config (the config itself for text-only models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no `config` attribute; pas_peft works with transformers models "
            "(PreTrainedModel subclasses)."
        )
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def model_hidden_size(model: nn.Module) -> int:
    """Return the residual-stream width of a transformers model."""
    config = text_config(model)
    hidden_size = getattr(config, "hidden_size", None)
    if hidden_size is None:
        raise ValueError(f"The config of {type(model).__name__} has no `hidden_size`.")
    return int(hidden_size)


def find_decoder_stack(model: nn.Module, layers_module: Optional[str] = None) -> DecoderStack:
    """
    Find the `nn.ModuleList` of decoder layers in `model`.

    With `layers_module` set, that dotted path is used as given. Otherwise the search looks for a
    ModuleList whose members are transformers decoder layers (classes listed in `_no_split_modules`
    or subclasses of `GradientCheckpointingLayer`) and, when several qualify, keeps the one whose
    length equals the config's `num_hidden_layers`.
    """
    if layers_module:
        return _stack_at_path(model, layers_module)

    candidates = _decoder_layer_lists(model)
    if not candidates:
        for path in KNOWN_DECODER_PATHS:
            module = _get_submodule_or_none(model, path)
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                return _stack_at_path(model, path)
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of decoder layers was "
            "found. Pass the dotted path of the layer list as PASConfig(layers_module=...), for example "
            "layers_module='model.layers'."
        )

    expected = getattr(text_config(model), "num_hidden_layers", None) if hasattr(model, "config") else None
    if len(candidates) > 1 and expected is not None:
        matching = [path for path, layers in candidates if len(layers) == expected]
        if len(matching) == 1:
            return _stack_at_path(model, matching[0])
    if len(candidates) > 1:
        paths = ", ".join(path for path, _ in candidates)
        raise ValueError(
            f"{type(model).__name__} has several lists of decoder layers ({paths}). Choose one with "
            "PASConfig(layers_module=...)."
        )
    return _stack_at_path(model, candidates[0][0])


def resolve_layer_indices(layers: list[int], num_layers: int) -> list[int]:
    """Turn possibly negative layer indices into indices in `range(num_layers)`, or raise a ValueError."""
    resolved = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"Layer {layer} is out of range: the model has {num_layers} decoder layers, so valid indices are "
                f"0 to {num_layers - 1} (or -{num_layers} to -1 counting from the end)."
            )
        resolved.append(layer % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`layers` {layers} names the same decoder layer twice (the model has {num_layers} layers).")
    return resolved


def find_steering_point(decoder_layer: nn.Module, activation: str) -> SteeringPoint:
    """Return where `activation` lives inside `decoder_layer`."""
    if activation == "residual":
        return SteeringPoint(decoder_layer, "output")
    if activation == "attention_output":
        return SteeringPoint(_child(decoder_layer, ATTENTION_ATTRIBUTES, "attention"), "output")
    if activation == "mlp_output":
        return SteeringPoint(_child(decoder_layer, MLP_ATTRIBUTES, "MLP"), "output")
    if activation == "mlp_input":
        # The norm in front of the MLP feeds only the MLP, so its output is the MLP's first input.
        return SteeringPoint(_child(decoder_layer, MLP_ATTRIBUTES, "MLP"), "input")
    raise ValueError(f"Unknown activation {activation!r}.")


def _child(decoder_layer: nn.Module, names: tuple[str, ...], role: str) -> nn.Module:
    for name in names:
        module = getattr(decoder_layer, name, None)
        if isinstance(module, nn.Module):
            return module
    children = ", ".join(name for name, _ in decoder_layer.named_children())
    raise ValueError(
        f"Could not find the {role} block of {type(decoder_layer).__name__}: none of {', '.join(names)} exists "
        f"(its children are {children}). Use activation='residual' for this model."
    )


def _decoder_layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()

    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first = module[0]
        if type(first).__name__ in no_split or isinstance(first, GradientCheckpointingLayer):
            found.append((path, module))
    return found


def _stack_at_path(model: nn.Module, path: str) -> DecoderStack:
    layers = _get_submodule_or_none(model, path)
    if not isinstance(layers, nn.ModuleList):
        found = "nothing" if layers is None else type(layers).__name__
        raise ValueError(
            f"layers_module={path!r} does not name an nn.ModuleList in {type(model).__name__} (found {found}). "
            "Pass the dotted path of the decoder layer list, for example 'model.layers'."
        )
    owner_path = path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    return DecoderStack(path=path, layers=layers, owner=owner)


def _get_submodule_or_none(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
