"""Configuration of a PAS adapter."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft import PeftConfig

POSITION_MODES = ("all", "last_prompt", "generated")
ACTIVATIONS = ("residual", "attention_output", "mlp_output", "mlp_input")
VECTOR_SOURCES = ("output", "input")


@dataclass
class PASConfig(PeftConfig):
    """
    Configuration of a Painless Activation Steering (PAS) adapter.

    A PAS adapter stores one steering vector per steered decoder layer. At run time it adds
    `strength * vector` to the chosen activation of each steered layer, at the chosen token positions.
    Vectors start at zero, so a freshly created adapter leaves the model's outputs unchanged until
    vectors are fitted (see `pas_peft.fit_pas`) or trained.

    Args:
        layers (`list[int]` or `int`):
            Indices of the decoder layers to steer. Negative indices count from the end, as in Python.
            When the adapter is created they are resolved to module names in `target_modules`, so a saved
            config names its layers explicitly.
        target_modules (`list[str]`, *optional*):
            Full module names of the steered decoder layers. Filled in from `layers` when the adapter is
            created; set it yourself only to target modules that `layers` cannot express.
        layers_module (`str`, *optional*):
            Dotted path of the `nn.ModuleList` that holds the decoder layers, for example
            `"model.layers"`. Leave it empty to let pas_peft find the decoder stack.
        activation (`str`):
            The activation the vector is added to: `"residual"` (the decoder layer's output, i.e. the
            residual stream), `"attention_output"`, `"mlp_output"` or `"mlp_input"` (the output of the
            norm that feeds the MLP, such as Llama's `post_attention_layernorm`).
        strength (`float`):
            Factor applied to every vector of this adapter.
        positions (`str`):
            Which tokens are steered: `"all"`, `"last_prompt"` or `"generated"`. See `docs/positions.md`.
        vector_source (`str`):
            Where the vector for layer L was read during extraction. `"output"` reads it at the point
            where it is added. `"input"` reads the input of layer L, which is transformers'
            `hidden_states[L]`; the PAS reference code pairs that reading with adding at the output
            of layer L.

    Example:

        ```py
        >>> import pas_peft
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM

        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
        >>> model = get_peft_model(base, pas_peft.PASConfig(layers=[2], strength=4.0))
        >>> model.print_trainable_parameters()
        trainable params: 64 || all params: 180,864 || trainable%: 0.0354
        ```
    """

    layers: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": (
                "Indices of the decoder layers to steer; negative indices count from the end. Resolved to module "
                "names in `target_modules` when the adapter is created."
            )
        },
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Full module names of the steered decoder layers. Filled in from `layers` when the adapter is "
                "created, so that a saved config names its layers explicitly."
            )
        },
    )
    layers_module: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Dotted path of the nn.ModuleList holding the decoder layers (for example 'model.layers'). "
                "Leave empty to find the decoder stack automatically."
            )
        },
    )
    activation: str = field(
        default="residual",
        metadata={
            "help": (
                "Activation the vector is added to: 'residual' (decoder layer output), 'attention_output', "
                "'mlp_output' or 'mlp_input' (output of the norm that feeds the MLP)."
            )
        },
    )
    strength: float = field(
        default=1.0,
        metadata={"help": "Factor applied to every steering vector of this adapter; the added value is strength * vector."},
    )
    positions: str = field(
        default="all",
        metadata={
            "help": (
                "Steered tokens: 'all' (every token), 'last_prompt' (only the last prompt token) or 'generated' "
                "(the last prompt token and every generated token)."
            )
        },
    )
    vector_source: str = field(
        default="output",
        metadata={
            "help": (
                "Where the vector for layer L was read during extraction: 'output' (the point where it is added) "
                "or 'input' (transformers' hidden_states[L], the input of layer L, as the PAS reference code reads it)."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Extra modules to train and save with the adapter. PAS itself needs none; trainers such as trl's "
                "SFTTrainer set this when they add tokens to the vocabulary."
            )
        },
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": (
                "Token indices whose embeddings are trained and saved with the adapter. PAS itself needs none; "
                "trl's SFTTrainer sets this when its chat template adds tokens."
            )
        },
    )
    hidden_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Hidden size of the model the vectors were made for. Filled in when the adapter is created."
        },
    )
    num_hidden_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of decoder layers of the model the vectors were made for. Filled in when the adapter is created."
        },
    )
    base_model_gguf_file: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "GGUF file name inside `base_model_name_or_path` when the base model was loaded from GGUF; "
                "pas_peft's loaders pass it on as `gguf_file`."
            )
        },
    )
    method: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "How the vectors were made: 'pasf', 'ipas_all', 'ipas_wrong_only', 'trained', 'combined' or empty "
                "for vectors set by hand."
            )
        },
    )
    fit_summary: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": (
                "Provenance written by extraction: dataset, scoring mode, chosen layer and strength, validation and "
                "test scores. Informational only; it does not change what the adapter does."
            )
        },
    )
    pas_peft_version: Optional[str] = field(
        default=None,
        metadata={
            "help": "Version of pas_peft that wrote this config. Loading it requires `import pas_peft` first."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Imported here because pas_peft/__init__.py adds PeftType.PAS before this class is used.
        from peft.utils import PeftType

        from . import __version__

        self.peft_type = PeftType.PAS
        if self.pas_peft_version is None:
            self.pas_peft_version = __version__
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        self._validate()

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json, then add or update the PAS section of the directory's model card."""
        super().save_pretrained(save_directory, **kwargs)
        from .hub import write_model_card

        write_model_card(save_directory)

    def _validate(self) -> None:
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("`layers` is empty: pass at least one decoder layer index, for example layers=[12].")
            for layer in self.layers:
                if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                    raise ValueError(f"`layers` must contain integer layer indices, got {layer!r} in {self.layers}.")
            # Plain ints, so that indices such as numpy.int64 from an argmax serialise to JSON.
            self.layers = [int(layer) for layer in self.layers]
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"`layers` contains a layer twice: {self.layers}.")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("`target_modules` is empty: leave it unset and pass `layers` instead.")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"Invalid positions {self.positions!r}: use one of {', '.join(map(repr, POSITION_MODES))}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {self.activation!r}: use one of {', '.join(map(repr, ACTIVATIONS))}.")
        if self.vector_source not in VECTOR_SOURCES:
            raise ValueError(
                f"Invalid vector_source {self.vector_source!r}: use one of {', '.join(map(repr, VECTOR_SOURCES))}."
            )
        if self.vector_source == "input" and self.activation != "residual":
            raise ValueError(
                f"vector_source='input' reads transformers' hidden_states[L], which exists only for "
                f"activation='residual', not for activation={self.activation!r}."
            )
        # Stored as a float, so a 0-d tensor or numpy scalar still serialises to JSON.
        self.strength = check_strength(self.strength)


def check_strength(strength: float) -> float:
    """Return `strength` as a float, or raise a ValueError if it is not a finite number."""
    # float() would also accept bools and numeric strings such as "2.5"; neither is a strength.
    if isinstance(strength, (bool, str, bytes)):
        raise ValueError(f"Invalid strength {strength!r}: pass a finite number such as 4.0.")
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid strength {strength!r}: pass a finite number such as 4.0.") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid strength {strength!r}: pass a finite number such as 4.0.")
    return value
