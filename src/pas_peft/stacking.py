"""
PAS steering on top of a LoRA adapter.

PEFT cannot hold a LoRA and a PAS adapter in one `PeftModel` (`add_adapter` and `load_adapter` raise
"Cannot combine adapters with different peft types"), and `PeftMixedModel` accepts only a fixed list of
adapter types and cannot save. Two routes work:

- `attach_pas`: a second `PeftModel` for PAS on the same transformers model as the LoRA `PeftModel`. Both
  adapters are active in forward and `generate`, each can be switched off alone, and each saves to its
  own adapter directory. PAS adds its vectors through forward hooks on the decoder layers, so it never
  replaces a module that LoRA wraps.
- `merge_lora_and_attach_pas`: merge the LoRA into the base weights with `merge_and_unload()`, then add
  PAS to the merged model. The LoRA can no longer be switched off, and the PAS adapter must always be
  loaded onto that merged model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .config import PASConfig
from .layer import PASLayer
from .model import PASModel

logger = logging.getLogger(__name__)

PASSource = Union[PASConfig, str, os.PathLike]

_MISSING = object()


class PASStack:
    """
    A LoRA `PeftModel` and a PAS `PeftModel` that share one transformers model.

    Calling the stack or its `generate` runs the model with both adapters active; PAS position modes
    (`last_prompt`, `generated`) are honoured by `generate`. Use `pas_disabled()` or `lora_disabled()` to
    switch one adapter off, and the two `PeftModel`s to save, load more adapters or change strength.

    Attributes:
        lora_model (`peft.PeftModel`): the LoRA model passed to `attach_pas`, still usable on its own;
            `lora_model.save_pretrained(...)` writes only the LoRA adapter.
        pas_model (`peft.PeftModel`): the PAS model; `pas_model.save_pretrained(...)` writes only the PAS
            adapter, and `pas_peft.set_strength(stack.pas_model, ...)` changes its strength.
        pas_adapter_name (`str`): name of the PAS adapter created by `attach_pas`.
    """

    def __init__(self, lora_model, pas_model, pas_adapter_name: str, hook_handles: Sequence[Any] = ()) -> None:
        self.lora_model = lora_model
        self.pas_model = pas_model
        self.pas_adapter_name = pas_adapter_name
        self._hook_handles = list(hook_handles)

    @property
    def model(self) -> nn.Module:
        """The transformers model with both adapters in it: pass it to activation extraction."""
        return self.lora_model.get_base_model()

    def __call__(self, *args: Any, **kwargs: Any):
        return self.lora_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """Generate with LoRA and PAS active; same arguments as `transformers`' `generate`."""
        return self.lora_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def pas_disabled(self) -> Iterator[None]:
        """Switch every PAS adapter off inside the block; LoRA stays on."""
        with _layers_disabled(self.model, (PASLayer,)):
            yield

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Switch every LoRA adapter off inside the block; PAS stays on."""
        with _layers_disabled(self.model, _lora_layer_classes()):
            yield

    def freeze_lora(self) -> None:
        """Set `requires_grad=False` on every LoRA parameter, so a Trainer given `pas_model` trains only PAS."""
        for module in self.model.modules():
            if isinstance(module, _lora_layer_classes()):
                for name in module.adapter_layer_names:
                    getattr(module, name).requires_grad_(False)

    def unload_pas(self):
        """Remove every PAS adapter, hook and `generate` wrapper, and return the LoRA model as it was."""
        inner = self.model
        lora_config = self.lora_model.peft_config
        self.pas_model.unload()
        inner.peft_config = lora_config
        _restore_enable_scope(self.lora_model.base_model)
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        return self.lora_model

    def __repr__(self) -> str:
        lora_names = ", ".join(self.lora_model.peft_config)
        pas_names = ", ".join(self.pas_model.peft_config)
        return f"PASStack(model={type(self.model).__name__}, lora=[{lora_names}], pas=[{pas_names}])"


def attach_pas(
    lora_model,
    pas: PASSource,
    adapter_name: str = "steer",
    is_trainable: bool = False,
    vectors: Optional[Mapping[int, torch.Tensor]] = None,
    **load_kwargs: Any,
) -> PASStack:
    """
    Add a PAS adapter on top of a LoRA `PeftModel` and return a `PASStack` with both active.

    Args:
        lora_model (`peft.PeftModel`): a `PeftModel` with one or more LoRA adapters, for example
            `PeftModel.from_pretrained(base, "sft-lora/")`. It is modified in place: PAS layers are attached
            to its decoder layers.
        pas (`PASConfig`, `str` or `os.PathLike`): a config for a new adapter (zero vectors, trainable), or a
            saved PAS adapter: a local directory or a Hub repo id.
        adapter_name (`str`): name of the PAS adapter.
        is_trainable (`bool`): when loading a saved adapter, keep its vectors trainable.
        vectors (`dict[int, torch.Tensor]`, *optional*): steering vectors by decoder layer index, copied into
            the adapter. Give one for every steered layer, for example vectors extracted from `stack.model`.
        load_kwargs: passed to `PeftModel.from_pretrained` when `pas` is a saved adapter (for example
            `revision` or `token`).

    Raises:
        TypeError: `lora_model` is not a `PeftModel` (a plain or merged model needs `get_peft_model` instead).
        ValueError: `lora_model` is a `PeftMixedModel`, has no LoRA, already has PAS, or `pas` is not a
            PAS adapter.
    """
    _check_lora_model(lora_model)
    inner = lora_model.get_base_model()

    # The second PeftModel must get its own peft_config dict. Otherwise BaseTuner finds the LoRA dict on the
    # transformers model and shares it, and save_pretrained on either wrapper then writes both adapters.
    with _own_peft_config(inner):
        if isinstance(pas, PASConfig):
            pas_model = _new_pas_model(inner, pas, adapter_name)
        elif isinstance(pas, (str, os.PathLike)):
            from .loading import from_pretrained

            pas_model = from_pretrained(inner, pas, adapter_name=adapter_name, is_trainable=is_trainable, **load_kwargs)
        else:
            raise TypeError(
                f"`pas` must be a PASConfig or the path or Hub repo id of a saved PAS adapter, got {type(pas).__name__}."
            )

    # peft's disable_adapter() switches every tuner layer of the model off, so disabling either adapter through
    # its own PeftModel would also switch the other off. Scope each tuner to its own layer class.
    _scope_enable_to_own_layers(lora_model.base_model, _lora_layer_classes(), include_auxiliary=True)
    _scope_enable_to_own_layers(pas_model.base_model, (PASLayer,), include_auxiliary=False)

    # peft 0.21 picks the adapter entries of a state dict from every tuner layer of the model, whatever its type.
    # Each wrapper's state_dict() therefore drops the other adapter's entries, so that save_pretrained (and
    # Trainer checkpoints) write only their own adapter.
    handles = [
        lora_model.register_state_dict_post_hook(_make_state_dict_filter(lambda module: isinstance(module, PASLayer))),
        pas_model.register_state_dict_post_hook(_make_state_dict_filter(_is_foreign_to_pas)),
    ]

    stack = PASStack(lora_model, pas_model, adapter_name, handles)
    if vectors is not None:
        try:
            pas_model.set_steering_vectors(dict(vectors), adapter_name=adapter_name)
        except Exception:
            stack.unload_pas()
            raise

    logger.info(
        "Attached PAS adapter %r to LoRA adapter(s) %s", adapter_name, ", ".join(map(repr, lora_model.peft_config))
    )
    return stack


def merge_lora_and_attach_pas(
    lora_model,
    pas: PASSource,
    adapter_name: str = "default",
    vectors: Optional[Mapping[int, torch.Tensor]] = None,
    **load_kwargs: Any,
):
    """
    Merge the LoRA into the base weights, then add a PAS adapter to the merged model and return its `PeftModel`.

    `lora_model` is consumed: after `merge_and_unload()` its LoRA layers are gone. The PAS adapter's
    `disable_adapter()` gives the merged LoRA model's output. A PAS adapter made this way must always be
    loaded onto the same merged model. `pas`, `vectors` and `load_kwargs` are as for `attach_pas`.
    """
    _check_lora_model(lora_model)
    if not isinstance(pas, (PASConfig, str, os.PathLike)):
        raise TypeError(
            f"`pas` must be a PASConfig or the path or Hub repo id of a saved PAS adapter, got {type(pas).__name__}."
        )
    merged = lora_model.merge_and_unload()

    if isinstance(pas, PASConfig):
        from peft import get_peft_model

        pas_model = get_peft_model(merged, pas, adapter_name=adapter_name)
    else:
        from .loading import from_pretrained

        pas_model = from_pretrained(merged, pas, adapter_name=adapter_name, **load_kwargs)
    if vectors is not None:
        pas_model.set_steering_vectors(dict(vectors), adapter_name=adapter_name)
    return pas_model


# -- checks --------------------------------------------------------------------------------------------


def _check_lora_model(model) -> None:
    from peft import PeftMixedModel, PeftModel

    if isinstance(model, PeftMixedModel):
        raise ValueError(
            "PeftMixedModel cannot hold PAS adapters: it accepts only a fixed list of adapter types and cannot save. "
            "Load the LoRA as a PeftModel (PeftModel.from_pretrained(base, lora_dir)) and call "
            "pas_peft.attach_pas(lora_model, pas_config_or_dir), or merge the LoRA first with "
            "pas_peft.merge_lora_and_attach_pas(lora_model, pas_config_or_dir)."
        )
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"attach_pas expects a LoRA PeftModel, got {type(model).__name__}. For a model without LoRA, or a LoRA "
            "already merged with merge_and_unload(), use get_peft_model(model, PASConfig(...)) or "
            "pas_peft.from_pretrained(model, adapter_dir)."
        )
    if isinstance(model.base_model, PASModel):
        raise ValueError(
            "This PeftModel contains PAS adapters, not LoRA. Add more PAS adapters with model.add_adapter(name, "
            "PASConfig(...)) or model.load_adapter(adapter_dir, adapter_name=name); attach_pas takes a LoRA PeftModel."
        )

    from peft.tuners.lora import LoraModel

    if not isinstance(model.base_model, LoraModel):
        peft_types = sorted({str(config.peft_type.value) for config in model.peft_config.values()})
        raise ValueError(
            f"attach_pas supports LoRA PeftModels, but this PeftModel contains {', '.join(peft_types)} adapters. "
            "Merge them with merge_and_unload() and add PAS with get_peft_model(merged, PASConfig(...))."
        )
    if any(isinstance(module, PASLayer) for module in model.get_base_model().modules()):
        raise ValueError(
            "This model already has PAS adapters attached. Add more through the existing stack: "
            "stack.pas_model.add_adapter(name, PASConfig(...)) or stack.pas_model.load_adapter(adapter_dir, "
            "adapter_name=name)."
        )


# -- helpers -------------------------------------------------------------------------------------------


def _new_pas_model(inner: nn.Module, config: PASConfig, adapter_name: str):
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    # Same as get_peft_model, minus its warning about modifying a PEFT model twice: the LoRA layers it
    # finds are intended here.
    config.base_model_name_or_path = inner.__dict__.get("name_or_path", None) or None
    model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    return model_cls(inner, config, adapter_name=adapter_name)


@contextlib.contextmanager
def _own_peft_config(inner: nn.Module) -> Iterator[None]:
    shared = inner.__dict__.pop("peft_config", _MISSING)
    try:
        yield
    finally:
        if shared is _MISSING:
            inner.__dict__.pop("peft_config", None)
        else:
            inner.__dict__["peft_config"] = shared


def _lora_layer_classes() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def _scope_enable_to_own_layers(tuner: nn.Module, layer_classes: tuple[type, ...], include_auxiliary: bool) -> None:
    from peft.utils.other import AuxiliaryTrainingWrapper

    classes = layer_classes + ((AuxiliaryTrainingWrapper,) if include_auxiliary else ())

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, classes):
                module.enable_adapters(enabled)

    # NOTE: this shadows BaseTuner._enable_adapter_layers (peft 0.21) on this tuner instance only;
    # unload_pas() removes it again.
    tuner.__dict__["_enable_adapter_layers"] = types.MethodType(_enable_adapter_layers, tuner)


def _restore_enable_scope(tuner: nn.Module) -> None:
    tuner.__dict__.pop("_enable_adapter_layers", None)


def _is_foreign_to_pas(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer) and not isinstance(module, PASLayer)


def _make_state_dict_filter(is_foreign: Callable[[nn.Module], bool]):
    def drop_foreign_adapter_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        foreign = []
        for name, submodule in module.named_modules():
            if not is_foreign(submodule):
                continue
            attributes = (
                [attribute for attribute, _ in submodule.named_children()]
                + [attribute for attribute, _ in submodule.named_parameters(recurse=False)]
                + [attribute for attribute, _ in submodule.named_buffers(recurse=False)]
            )
            foreign.extend(f"{prefix}{name}.{attribute}." for attribute in attributes if attribute != "base_layer")
        if not foreign:
            return
        for key in [key for key in state_dict if key.startswith(tuple(foreign))]:
            del state_dict[key]

    return drop_foreign_adapter_entries


@contextlib.contextmanager
def _layers_disabled(model: nn.Module, layer_classes: tuple[type, ...]) -> Iterator[None]:
    layers = [module for module in model.modules() if isinstance(module, layer_classes)]
    # enable_adapters(True) on a peft layer marks its active adapters trainable again, so the previous
    # requires_grad flags are restored by hand.
    previous = [
        (layer, layer.disable_adapters, {id(p): p.requires_grad for p in layer.parameters()}) for layer in layers
    ]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled, requires_grad in previous:
            layer.enable_adapters(not was_disabled)
            for parameter in layer.parameters():
                parameter.requires_grad_(requires_grad[id(parameter)])
