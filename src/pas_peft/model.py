"""The PEFT tuner that attaches PAS steering layers to a transformers model."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Sequence, Union

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .architectures import (
    DecoderStack,
    find_decoder_stack,
    find_steering_point,
    model_hidden_size,
    resolve_layer_indices,
)
from .config import PASConfig, check_strength
from .layer import STEERING_ATTRIBUTE, PASLayer
from .positions import PromptLengths, find_prompt_positions, install_prompt_positions

logger = logging.getLogger(__name__)

# Attribute that pas_peft's loaders set on a model read from a GGUF file, so adapters can record the file name.
GGUF_FILE_ATTRIBUTE = "_pas_peft_gguf_file"


class PASModel(BaseTuner):
    """
    Creates a Painless Activation Steering (PAS) model from a pretrained transformers model.

    Each steered decoder layer gets a `PASLayer` child (`model.layers.N.steering`) that stores one steering
    vector per adapter and adds `strength * vector` to the layer's activation through a forward hook. PAS
    cannot be merged into weights; `unload()` removes every hook and child module and returns the untouched
    model.

    Args:
        model (`transformers.PreTrainedModel`): the model to steer.
        config (`PASConfig`): the adapter configuration.
        adapter_name (`str`): the adapter name, `"default"` unless given.
        low_cpu_mem_usage (`bool`): create the vectors on the meta device (used when loading saved adapters).

    Example:

        ```py
        >>> import pas_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, pas_peft.PASConfig(layers=[12], strength=4.0))
        >>> model.set_steering_vectors({12: vector})
        >>> with model.steering_strength(8.0):
        ...     output = model.generate(**inputs)
        ```
    """

    prefix: str = "pas_"
    tuner_layer_cls = PASLayer
    target_module_mapping: dict = {}

    # -- injection -------------------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            # The config was added to a possibly shared peft_config dict before injection. The checks in
            # _prepare_model run before any module is touched, so dropping the config restores the old state.
            self.peft_config.pop(adapter_name, None)
            raise

    def _prepare_adapter_config(self, peft_config: PASConfig, model_config: dict) -> PASConfig:
        return peft_config

    def _prepare_model(self, peft_config: PASConfig, model: nn.Module) -> None:
        """Check the config against the model and resolve `layers` into `target_modules`."""
        if isinstance(model, PeftModel):
            raise ValueError(
                f"Cannot add PAS to a {type(model.base_model).__name__} PeftModel with get_peft_model: its adapter "
                "files would hold the other adapter too. Use pas_peft.attach_pas(peft_model, PASConfig(...)) to "
                "stack PAS on a LoRA, or merge the LoRA first with merge_and_unload()."
            )
        stack = find_decoder_stack(model, peft_config.layers_module)
        hidden_size = model_hidden_size(model)
        check_model_matches_config(peft_config, hidden_size, stack.num_layers)

        if peft_config.target_modules is None:
            if peft_config.layers is None:
                raise ValueError(
                    "PASConfig needs `layers`: pass the decoder layer indices to steer, for example "
                    f"PASConfig(layers=[{stack.num_layers // 2}]) (the model has {stack.num_layers} decoder layers)."
                )
            indices = resolve_layer_indices(peft_config.layers, stack.num_layers)
            peft_config.target_modules = [stack.module_name(index) for index in indices]
        else:
            _check_target_modules(peft_config.target_modules, stack)

        for name in peft_config.target_modules:
            find_steering_point(model.get_submodule(name), peft_config.activation)

        peft_config.layers_module = stack.path
        peft_config.hidden_size = hidden_size
        peft_config.num_hidden_layers = stack.num_layers
        if peft_config.base_model_gguf_file is None:
            peft_config.base_model_gguf_file = getattr(model, GGUF_FILE_ATTRIBUTE, None)
        self._decoder_stack = stack

    @staticmethod
    def _check_target_module_exists(peft_config: PASConfig, key: str) -> bool:
        return key in (peft_config.target_modules or [])

    def _create_and_replace(
        self,
        peft_config: PASConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        steering = getattr(target, STEERING_ATTRIBUTE, None)
        if not isinstance(steering, PASLayer):
            stack: DecoderStack = self._decoder_stack
            positions_state = install_prompt_positions(self.model, stack.owner)
            steering = PASLayer(
                point=find_steering_point(target, peft_config.activation),
                layer_index=_index_in_stack(target, stack),
                hidden_size=peft_config.hidden_size,
                positions_state=positions_state,
                device=_device_of(target),
            )
            target.add_module(STEERING_ATTRIBUTE, steering)
        elif steering.activation_side != find_steering_point(target, peft_config.activation).kind or any(
            self.peft_config[name].activation != peft_config.activation
            for name in steering.pas_vector
            if name in self.peft_config
        ):
            raise ValueError(
                f"Adapter {adapter_name!r} steers activation={peft_config.activation!r} on {current_key}, but "
                "another adapter of this model steers a different activation there. Put adapters that steer "
                "different activations on separate models."
            )
        # The decoder layer may have moved (model.to(...)) since the first adapter was added.
        steering._device = _device_of(target)
        steering.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # Only this tuner's layers: a LoRA PeftModel sharing the transformers model keeps its own switch.
        names = set(self.peft_config)
        for module in self.model.modules():
            owned_wrapper = isinstance(module, AuxiliaryTrainingWrapper) and names & module._get_available_adapters()
            if isinstance(module, PASLayer) or owned_wrapper:
                module.enable_adapters(enabled)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # Only PAS entries: another tuner's layers on the same model (a stacked LoRA) are not part of this adapter.
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        prefixes = tuple(
            f"{name}." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
            and not isinstance(module, PASLayer)
        )
        return {key: value for key, value in selected.items() if not _is_under(key, prefixes)}

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "PAS adapters cannot be merged into the model weights: a steering vector is added to activations at "
            "selected token positions, which no weight change reproduces. Use unload() to get the base model back, "
            "or keep the PeftModel."
        )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        remove_steering(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # -- run-time control ------------------------------------------------------------------------------

    def set_strength(self, strength: float, adapter_name: Optional[str] = None) -> None:
        """Set the strength of `adapter_name` (default: every active adapter) without rebuilding anything."""
        strength = check_strength(strength)
        for name in self._adapter_names(adapter_name):
            self.peft_config[name].strength = strength
            for layer in _steering_layers(self.model):
                if name in layer.strength:
                    layer.strength[name] = strength

    def get_strength(self, adapter_name: Optional[str] = None) -> float:
        """Return the strength of `adapter_name` (default: the first active adapter)."""
        return self.peft_config[self._adapter_names(adapter_name)[0]].strength

    @contextlib.contextmanager
    def steering_strength(self, strength: float, adapter_name: Optional[str] = None) -> Iterator[None]:
        """Use `strength` inside the block and restore the previous strengths on exit, also after an error."""
        previous = {name: self.peft_config[name].strength for name in self._adapter_names(adapter_name)}
        try:
            self.set_strength(strength, adapter_name)
            yield
        finally:
            for name, value in previous.items():
                self.set_strength(value, name)

    @contextlib.contextmanager
    def prompt_boundary(self, prompt_lengths: PromptLengths) -> Iterator[None]:
        """
        Set the prompt length for plain forward calls inside the block.

        `prompt_lengths` is an int, or a 1-D tensor with one length per row, in padded coordinates. With it,
        `last_prompt` steers position `prompt_lengths - 1` and `generated` steers every position from there on.
        """
        state = find_prompt_positions(self.model)
        if state is None:
            yield
            return
        with state.prompt_boundary(prompt_lengths):
            yield

    def set_active_adapters(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """
        Make one or several PAS adapters active at once; their steering adds up.

        `PeftModel.set_adapter` accepts a single name, so use this method (or `pas_peft.set_active_adapters`)
        to combine adapters at run time.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [name for name in names if name not in self.peft_config]
        if missing or not names:
            raise ValueError(
                f"Unknown adapter(s) {missing or names}: this model has {sorted(self.peft_config)}."
            )
        self.set_adapter(names, inference_mode=inference_mode)

    # -- vectors ---------------------------------------------------------------------------------------

    def get_steering_vectors(self, adapter_name: Optional[str] = None) -> dict[int, torch.Tensor]:
        """Return a copy of the vectors of `adapter_name` (default: the first active adapter) by layer index."""
        name = self._adapter_names(adapter_name)[0]
        return {
            layer.layer_index: layer.pas_vector[name].detach().clone()
            for layer in _steering_layers(self.model)
            if name in layer.pas_vector
        }

    @torch.no_grad()
    def set_steering_vectors(self, vectors: dict[int, torch.Tensor], adapter_name: Optional[str] = None) -> None:
        """
        Copy `vectors` (layer index to a tensor of shape (hidden_size,)) into the adapter's steered layers.

        Every steered layer of the adapter must be given, and no other layer.
        """
        name = self._adapter_names(adapter_name)[0]
        layers = {layer.layer_index: layer for layer in _steering_layers(self.model) if name in layer.pas_vector}
        indices = resolve_layer_indices([int(index) for index in vectors], self.peft_config[name].num_hidden_layers)
        provided = dict(zip(indices, vectors.values()))
        if set(provided) != set(layers):
            raise ValueError(
                f"Adapter {name!r} steers layers {sorted(layers)}, but vectors were given for layers {sorted(provided)}."
            )
        for index, value in provided.items():
            target = layers[index].pas_vector[name]
            value = torch.as_tensor(value)
            if value.shape != target.shape:
                raise ValueError(
                    f"The vector for layer {index} has shape {tuple(value.shape)}, expected {tuple(target.shape)} "
                    "(the model's hidden size)."
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
    ) -> None:
        """
        Add a new adapter whose vectors are the weighted sum of existing adapters' steering.

        Each source contributes `weight * strength * vector`, so the new adapter (strength 1.0) steers exactly
        like the sources active together with their strengths scaled by the weights. A weight of -1 negates an
        adapter; a single source with weight w scales it. All sources must steer the same layers, activation
        and positions.
        """
        from .vectors import weighted_sum_config

        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; choose a new name.")
        sources = [self.peft_config[name] for name in self._existing(adapters)]
        config = weighted_sum_config(list(adapters), sources, list(weights))
        combined = {}
        for name, weight, source in zip(adapters, weights, sources):
            for index, vector in self.get_steering_vectors(name).items():
                combined[index] = combined.get(index, 0) + float(weight) * source.strength * vector

        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        self.set_steering_vectors(combined, adapter_name)

    # -- helpers ---------------------------------------------------------------------------------------

    def _adapter_names(self, adapter_name: Optional[str]) -> list[str]:
        if adapter_name is not None:
            return self._existing([adapter_name])
        names = [name for name in self.active_adapters if name in self.peft_config]
        if not names:
            raise ValueError("No PAS adapter is active; pass adapter_name=... or activate one with set_adapter().")
        return names

    def _existing(self, names: Sequence[str]) -> list[str]:
        missing = [name for name in names if name not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapter(s) {missing}: this model has {sorted(self.peft_config)}.")
        return list(names)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        expected = {
            name
            for name, _ in model.named_parameters()
            if name.endswith(f".{STEERING_ATTRIBUTE}.pas_vector.{adapter_name}")
        }
        given = {key for key in remapped if ".pas_vector" in key}
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint of PAS adapter {adapter_name!r} does not match the layers its config steers "
                f"({config.target_modules}): missing vectors {missing}, unexpected vectors {unexpected}. The weights "
                "file was probably saved for another adapter or model; save the adapter again with save_pretrained()."
            )
        return remapped


def check_model_matches_config(config: PASConfig, hidden_size: int, num_layers: int) -> None:
    """Raise a ValueError if a config made for another model shape is applied to this one."""
    if config.hidden_size is not None and config.hidden_size != hidden_size:
        raise ValueError(
            f"This PAS adapter was made for hidden size {config.hidden_size}, but the model has hidden size "
            f"{hidden_size}. Load it onto the base model it was made for ({config.base_model_name_or_path})."
        )
    if config.num_hidden_layers is not None and config.num_hidden_layers != num_layers:
        raise ValueError(
            f"This PAS adapter was made for a model with {config.num_hidden_layers} decoder layers, but the model has "
            f"{num_layers}. Load it onto the base model it was made for ({config.base_model_name_or_path})."
        )


def remove_steering(model: nn.Module) -> None:
    """Remove every PAS steering layer, hook and `generate` wrapper from `model`."""
    for parent in list(model.modules()):
        steering = parent._modules.get(STEERING_ATTRIBUTE)
        if isinstance(steering, PASLayer):
            steering.remove_hook()
            del parent._modules[STEERING_ATTRIBUTE]
    state = find_prompt_positions(model)
    if state is not None:
        state.remove(model)


def _is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix) or f".{prefix}" in key for prefix in prefixes) if prefixes else False


def _steering_layers(model: nn.Module) -> list[PASLayer]:
    return [module for module in model.modules() if isinstance(module, PASLayer)]


def _check_target_modules(target_modules: list[str], stack: DecoderStack) -> None:
    names = {stack.module_name(index) for index in range(stack.num_layers)}
    unknown = [name for name in target_modules if name not in names]
    if unknown:
        raise ValueError(
            f"target_modules {unknown} are not decoder layers of this model, whose decoder layers are "
            f"{stack.path}.0 to {stack.path}.{stack.num_layers - 1}. Was the adapter made for another architecture?"
        )


def _index_in_stack(decoder_layer: nn.Module, stack: DecoderStack) -> int:
    for index, layer in enumerate(stack.layers):
        if layer is decoder_layer:
            return index
    raise ValueError(f"{type(decoder_layer).__name__} is not one of the layers in {stack.path}.")


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for parameter in module.parameters():
        return parameter.device
    return None
