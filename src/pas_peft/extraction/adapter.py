"""The PAS adapter a fit produces: its config (with provenance) and how it is attached to the model."""

from __future__ import annotations

import logging

import torch
from peft import PeftModel, get_peft_model

from ..config import PASConfig
from ..model import PASModel
from .stats import accuracy

logger = logging.getLogger(__name__)


def fitted_config(options, best: dict, dataset_name: str, layers_module: str, method_rows, validation, test) -> PASConfig:
    """Build the config of the chosen configuration, with the fit's provenance in `fit_summary`."""
    chosen_column = next(
        index
        for index, config in enumerate(test.configs)
        if (config.method, config.layer, config.strength) == (best["method"], best["layer"], best["strength"])
    )
    return PASConfig(
        layers=[best["layer"]],
        strength=best["strength"],
        # Letter scoring steers the last prompt token only; likelihood scoring steers it and the answer after it.
        positions="last_prompt" if options.scoring == "letter" else "generated",
        activation=options.activation,
        vector_source=options.vector_source,
        layers_module=layers_module,
        method=best["method"],
        fit_summary={
            "dataset": dataset_name,
            "scoring": options.scoring,
            "use_chat_template": options.use_chat_template,
            "layer": best["layer"],
            "strength": best["strength"],
            "validation_accuracy": best["validation_accuracy"],
            "validation_baseline_accuracy": accuracy(validation.correct).value,
            "test_accuracy": accuracy(test.config_predictions[:, chosen_column] == test.labels).value,
            "test_baseline_accuracy": accuracy(test.correct).value,
            "best_validation_accuracy_by_method": {
                method: row["validation_accuracy"] for method, row in method_rows.items()
            },
        },
    )


def attach_fitted_adapter(model, config: PASConfig, vectors: dict[int, torch.Tensor], adapter_name: str):
    """
    Add the fitted adapter to `model` and make it active; return the model that carries it.

    A plain transformers model is wrapped with `get_peft_model`; a PAS PeftModel gets one more adapter; a
    LoRA PeftModel gets PAS on top through `pas_peft.stacking.attach_pas`, which returns a `PASStack`.
    """
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, PASModel):
            from ..stacking import attach_pas

            return attach_pas(model, config, adapter_name=adapter_name, vectors=vectors)
        if adapter_name in model.peft_config:
            raise ValueError(
                f"The model already has an adapter named {adapter_name!r} (adapters: {sorted(model.peft_config)}); "
                "pass another adapter_name."
            )
        # get_peft_model records the base model; add_adapter does not, and eval / generate need it.
        config.base_model_name_or_path = getattr(model.get_base_model(), "name_or_path", None)
        model.add_adapter(adapter_name, config)
        model.set_adapter(adapter_name)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.base_model.set_steering_vectors(vectors, adapter_name)
    return peft_model


def adapter_config_of(fitted_model, adapter_name: str, default: PASConfig) -> PASConfig:
    """Return the config object the fitted adapter carries (resolved layer names, base model path)."""
    pas_model = getattr(fitted_model, "pas_model", fitted_model)
    return getattr(pas_model, "peft_config", {}).get(adapter_name, default)


def detach_fitted_adapter(model, peft_model, adapter_name: str, previous_active) -> None:
    """
    Undo `attach_fitted_adapter`: remove the adapter it added and give `model` back as it was passed in.

    `previous_active` lists the active adapters of a PAS PeftModel before the fit, which are made active again.
    """
    from ..stacking import PASStack

    if isinstance(peft_model, PASStack):
        peft_model.unload_pas()
    elif peft_model is model:
        peft_model.base_model.set_adapter(previous_active)
        peft_model.base_model.delete_adapter(adapter_name)
    else:
        peft_model.unload()
