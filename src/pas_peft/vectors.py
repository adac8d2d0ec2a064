"""Steering vectors as values: read from an adapter directory, combined with arithmetic, saved back."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .config import PASConfig
from .io import read_adapter_directory, write_adapter_directory

# Config fields that must agree before two adapters' vectors can be added.
_COMPATIBILITY_FIELDS = ("hidden_size", "activation", "positions", "vector_source")


@dataclass
class SteeringVectors:
    """
    The effective steering of one PAS adapter: `strength * vector` for each steered decoder layer.

    Supports `+`, `-`, unary `-` and multiplication by a number, so behaviours combine in one line:
    `(honest - 0.5 * sycophantic).save_pretrained("combined/")`. The result always has strength 1.0 with
    the strengths folded into the vectors.

    Args:
        vectors (`dict[int, torch.Tensor]`): decoder layer index to an fp32 tensor of shape (hidden_size,).
        config (`PASConfig`): the adapter configuration the vectors belong to.
    """

    vectors: dict[int, torch.Tensor]
    config: PASConfig

    @classmethod
    def from_pretrained(cls, adapter_directory: Union[str, os.PathLike]) -> "SteeringVectors":
        """Read a saved PAS adapter (adapter_config.json + adapter_model.safetensors) with its strength folded in."""
        config, vectors = read_adapter_directory(adapter_directory)
        effective = {index: config.strength * vector for index, vector in vectors.items()}
        config = copy.deepcopy(config)
        config.strength = 1.0
        return cls(effective, config)

    @classmethod
    def from_model(cls, model, adapter_name: Optional[str] = None) -> "SteeringVectors":
        """Take the effective vectors of `adapter_name` from a PeftModel or PASModel."""
        tuner = getattr(model, "base_model", model)
        name = tuner._adapter_names(adapter_name)[0]
        config = copy.deepcopy(tuner.peft_config[name])
        effective = {index: config.strength * vector.float() for index, vector in tuner.get_steering_vectors(name).items()}
        config.strength = 1.0
        return cls(effective, config)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Write a PEFT adapter directory that `PeftModel.from_pretrained` loads (after `import pas_peft`)."""
        write_adapter_directory(save_directory, self.config, self.vectors, overwrite=overwrite)

    def __add__(self, other: "SteeringVectors") -> "SteeringVectors":
        return combine_vectors([self, other], [1.0, 1.0])

    def __sub__(self, other: "SteeringVectors") -> "SteeringVectors":
        return combine_vectors([self, other], [1.0, -1.0])

    def __mul__(self, factor: float) -> "SteeringVectors":
        return combine_vectors([self], [factor])

    __rmul__ = __mul__

    def __neg__(self) -> "SteeringVectors":
        return combine_vectors([self], [-1.0])


def combine_vectors(sources: Sequence[SteeringVectors], weights: Sequence[float]) -> SteeringVectors:
    """Return the weighted sum of `sources`; they must steer the same layers and activation."""
    config = weighted_sum_config(
        [f"operand {i}" for i in range(len(sources))], [source.config for source in sources], weights
    )
    combined = {}
    for source, weight in zip(sources, weights):
        for index, vector in source.vectors.items():
            combined[index] = combined.get(index, 0) + float(weight) * vector.float()
    return SteeringVectors(combined, config)


def weighted_sum_config(names: Sequence[str], configs: Sequence[PASConfig], weights: Sequence[float]) -> PASConfig:
    """Build the config of a weighted sum of adapters, or raise a ValueError if they cannot be added."""
    if not configs:
        raise ValueError("Pass at least one adapter to combine.")
    if len(weights) != len(configs):
        raise ValueError(f"Got {len(configs)} adapters but {len(weights)} weights; pass one weight per adapter.")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"Invalid weight {weight!r}: pass a finite number.")

    first_name, first = names[0], configs[0]
    for name, config in zip(names[1:], configs[1:]):
        if sorted(config.target_modules or []) != sorted(first.target_modules or []):
            raise ValueError(
                f"Cannot combine {first_name} and {name}: they steer different layers "
                f"({first.target_modules} vs {config.target_modules}). Only adapters on the same layers add up."
            )
        for field_name in _COMPATIBILITY_FIELDS:
            if getattr(config, field_name) != getattr(first, field_name):
                raise ValueError(
                    f"Cannot combine {first_name} and {name}: {field_name} differs "
                    f"({getattr(first, field_name)!r} vs {getattr(config, field_name)!r})."
                )

    combined = copy.deepcopy(first)
    combined.strength = 1.0
    combined.method = "combined"
    combined.fit_summary = {
        "combined_from": [
            {"adapter": name, "weight": float(weight), "strength": config.strength, "method": config.method}
            for name, config, weight in zip(names, configs, weights)
        ]
    }
    return combined
