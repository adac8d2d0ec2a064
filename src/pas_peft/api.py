"""Run-time control functions that accept a PeftModel, a PASModel or a transformers model with PAS layers."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

from torch import nn

from .layer import PASLayer
from .model import PASModel


def find_pas_tuner(model: nn.Module) -> Optional[PASModel]:
    """Return the PASModel behind `model` (a PeftModel, a PASModel or a PASStack), or None."""
    model = getattr(model, "pas_model", model)
    if isinstance(model, PASModel):
        return model
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, PASModel) else None


def set_active_adapters(
    model: nn.Module, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False
) -> None:
    """
    Make one or several PAS adapters active at once; their steering adds up.

    `PeftModel.set_adapter` takes a single name, so this is the way to run several PAS adapters together.
    Works on a PeftModel, a PASModel, or a transformers model whose PAS adapters were added with
    `load_adapter` or `inject_adapter_in_model`.
    """
    tuner = find_pas_tuner(model)
    if tuner is not None:
        tuner.set_active_adapters(adapter_names, inference_mode=inference_mode)
        return

    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = [module for module in model.modules() if isinstance(module, PASLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PAS adapters.")
    known = {name for layer in layers for name in layer.pas_vector}
    missing = [name for name in names if name not in known]
    if missing or not names:
        raise ValueError(f"Unknown PAS adapter(s) {missing or names}: this model has {sorted(known)}.")
    for layer in layers:
        layer.set_adapter(names, inference_mode=inference_mode)


def set_strength(model: nn.Module, strength: float, adapter_name: Optional[str] = None) -> None:
    """Set the strength of `adapter_name` (default: every active PAS adapter) of a PeftModel or PASModel."""
    _require_tuner(model).set_strength(strength, adapter_name)


@contextlib.contextmanager
def steering_strength(model: nn.Module, strength: float, adapter_name: Optional[str] = None) -> Iterator[None]:
    """Use `strength` inside the block and restore the previous strengths on exit, also after an error."""
    with _require_tuner(model).steering_strength(strength, adapter_name):
        yield


def _require_tuner(model: nn.Module) -> PASModel:
    tuner = find_pas_tuner(model)
    if tuner is None:
        raise ValueError(
            f"{type(model).__name__} is not a PAS PeftModel; create it with get_peft_model(model, PASConfig(...)) "
            "or load it with pas_peft.from_pretrained(model, adapter_dir)."
        )
    return tuner
