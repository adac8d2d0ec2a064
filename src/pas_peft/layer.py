"""The steering layer that adds PAS vectors to a model's activations at run time."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architectures import SteeringPoint
from .config import PASConfig, check_strength
from .positions import PromptPositions

# Name of the child module attached to each steered decoder layer. It must not contain the prefix "pas_":
# peft's delete_adapter skips every module whose name contains the tuner prefix.
STEERING_ATTRIBUTE = "steering"


class PASLayer(nn.Module, BaseTunerLayer):
    """
    Steering vectors of one decoder layer, one per adapter, added through a forward hook.

    The decoder layer stays where it is. This module is attached to it as the child `steering`, so
    base-model state-dict keys, `output_hidden_states` and LoRA modules inside the layer are unchanged.
    A hook registered first on the steered module adds `strength * vector` to its output (or, for
    `activation="mlp_input"`, to the MLP's input) at the positions selected by the adapter's mode. The
    vectors are fp32 parameters and are cast to the activation's dtype and device when added.

    Args:
        point (`SteeringPoint`): the module and side (output or input) to steer.
        layer_index (`int`): index of the decoder layer in the decoder stack.
        hidden_size (`int`): length of each vector.
        positions_state (`PromptPositions`): the model's shared position state.
        device (`torch.device`): where the decoder layer's weights live.
    """

    adapter_layer_names = ("pas_vector",)
    other_param_names = ("strength", "positions")

    def __init__(
        self,
        point: SteeringPoint,
        layer_index: int,
        hidden_size: int,
        positions_state: PromptPositions,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.pas_vector = nn.ParameterDict()
        self.strength: dict[str, float] = {}
        self.positions: dict[str, str] = {}
        self.layer_index = layer_index
        self.hidden_size = hidden_size
        self.activation_side = point.kind
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._device = device
        # Plain attribute, not a submodule: the state is shared by all layers of the model.
        object.__setattr__(self, "_positions_state", positions_state)
        object.__setattr__(self, "_hook_handle", self._register_hook(point))

    def _register_hook(self, point: SteeringPoint):
        if point.kind == "output":
            return point.module.register_forward_hook(self._steer_output, prepend=True)
        return point.module.register_forward_pre_hook(self._steer_input, with_kwargs=True, prepend=True)

    def update_layer(self, adapter_name: str, config: PASConfig, inference_mode: bool = False) -> None:
        """Add (or reset) the zero vector of `adapter_name` with the config's strength and positions."""
        device = self._device if self._device is not None and self._device.type != "meta" else None
        self.pas_vector[adapter_name] = nn.Parameter(torch.zeros(self.hidden_size, dtype=torch.float32, device=device))
        self.strength[adapter_name] = check_strength(config.strength)
        self.positions[adapter_name] = config.positions
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def remove_hook(self) -> None:
        self._hook_handle.remove()

    # -- steering --------------------------------------------------------------------------------------

    def _steer_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.add_vectors(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.add_vectors(output[0]),) + tuple(output[1:])
        raise TypeError(
            f"PAS cannot steer {type(module).__name__}: its output is {type(output).__name__}, expected a tensor or "
            "a tuple whose first element is the hidden states."
        )

    def _steer_input(self, module: nn.Module, args: tuple, kwargs: dict):
        if args and isinstance(args[0], torch.Tensor):
            return (self.add_vectors(args[0]),) + tuple(args[1:]), kwargs
        for name in ("hidden_states", "x", "input"):
            if isinstance(kwargs.get(name), torch.Tensor):
                return args, {**kwargs, name: self.add_vectors(kwargs[name])}
        raise TypeError(
            f"PAS cannot find the input hidden states of {type(module).__name__} to steer; use activation='residual' "
            "or another activation for this model."
        )

    def add_vectors(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return `hidden_states` plus `strength * vector` of every active adapter at its positions."""
        if self._disable_adapters:
            return hidden_states
        result = hidden_states
        for adapter_name in self.active_adapters:
            if adapter_name not in self.pas_vector:
                continue
            mask = self._positions_state.steering_mask(self.positions[adapter_name], hidden_states)
            if mask is False:
                continue
            vector = self.pas_vector[adapter_name]
            delta = (self.strength[adapter_name] * vector).to(device=hidden_states.device, dtype=hidden_states.dtype)
            if mask is None:
                result = result + delta
            else:
                result = result + mask.unsqueeze(-1).to(hidden_states.dtype) * delta
        return result

    # -- PEFT tuner-layer protocol ---------------------------------------------------------------------

    def enable_adapters(self, enabled: bool) -> None:
        """Switch steering on or off without touching any vector's `requires_grad`."""
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "PAS adapters cannot be merged into the model weights: a steering vector is added to activations at "
            "selected token positions, which no weight change reproduces. Keep the adapter loaded, or call "
            "unload() to get the base model back."
        )

    def unmerge(self) -> None:
        # Nothing is ever merged.
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # The base implementation looks for a wrapped layer's weight; here the vectors follow the decoder layer.
        target = device if device is not None else self._device
        if target is None or adapter_name not in self.pas_vector:
            return
        vector = self.pas_vector[adapter_name]
        if vector.device != target:
            self.pas_vector[adapter_name] = nn.Parameter(
                vector.data.to(device=target, dtype=torch.float32), requires_grad=vector.requires_grad
            )

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{name}: strength={self.strength[name]}, positions={self.positions[name]}" for name in self.pas_vector
        )
        return f"layer={self.layer_index}, hidden_size={self.hidden_size}, adapters=[{adapters}]"
