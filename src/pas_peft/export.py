"""
Export of PAS adapters to llama.cpp control vectors (GGUF), for `llama-cli --control-vector file.gguf`.

The file format is the one llama.cpp's `common_control_vector_load` reads (common/common.cpp): a GGUF file
with `general.architecture = "controlvector"` and one 1-D float32 tensor `direction.N` per steered layer.
llama.cpp adds `direction.N` to the output of decoder layer N, counted from 0, so PAS layer L is written as
`direction.L` unchanged. llama.cpp has no slot for layer 0 and rejects `direction.0`. See
docs/export-llama-cpp.md for the source lines.
"""

from __future__ import annotations

import logging
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .io import apply_umask
from .vectors import SteeringVectors

logger = logging.getLogger(__name__)

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
TENSOR_PREFIX = "direction."


def export_control_vector(
    source: Any,
    output_path: Union[str, os.PathLike],
    adapter_name: Optional[str] = None,
    model_hint: Optional[str] = None,
    ignore_positions: bool = False,
    overwrite: bool = False,
) -> Path:
    """
    Write a PAS adapter as a llama.cpp control-vector GGUF file and return its path.

    Each tensor `direction.L` contains `strength * vector` of decoder layer L, so `llama-cli --control-vector
    file.gguf` steers like the adapter, and `--control-vector-scaled file.gguf 0.5` halves the strength.

    Args:
        source: a saved adapter directory, a PAS `PeftModel` or `PASModel`, a `PASStack`, or `SteeringVectors`.
        output_path: the `.gguf` file to write.
        adapter_name: which adapter of a model to export; defaults to the active one.
        model_hint: written to `controlvector.model_hint`; defaults to the model's `config.model_type` for a
            model, else the adapter's `base_model_name_or_path`. llama.cpp does not read it.
        ignore_positions: export an adapter whose `positions` is not "all". llama.cpp adds control vectors
            at every token, so such an adapter steers differently there; this is logged as a warning.
        overwrite: replace an existing file.

    Raises:
        ValueError: the adapter steers an activation other than the residual stream, steers layer 0, or
            uses `last_prompt`/`generated` positions without `ignore_positions=True`.
    """
    steering, default_hint = _steering_vectors(source, adapter_name)
    _check_exportable(steering, ignore_positions)

    path = Path(output_path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True.")
    path.parent.mkdir(parents=True, exist_ok=True)

    hint = model_hint or default_hint or steering.config.base_model_name_or_path
    directions = {index: steering.vectors[index].detach().float().cpu().numpy() for index in steering.layers}
    _write_gguf(path, directions, hint)
    logger.info("Wrote llama.cpp control vector %s (layers %s)", path, ", ".join(map(str, steering.layers)))
    return path


def _steering_vectors(source: Any, adapter_name: Optional[str]) -> tuple[SteeringVectors, Optional[str]]:
    """Return the effective vectors (strength folded in) of `source` and the model type when known."""
    if isinstance(source, SteeringVectors):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        return SteeringVectors.from_pretrained(source), None

    from .api import find_pas_tuner
    from .stacking import PASStack

    if isinstance(source, PASStack):
        adapter_name = adapter_name or source.pas_adapter_name
        source = source.pas_model
    tuner = find_pas_tuner(source)
    if tuner is None:
        raise TypeError(
            "export_control_vector expects an adapter directory, a PAS PeftModel or PASModel, a PASStack or "
            f"SteeringVectors, got {type(source).__name__}."
        )
    model_type = getattr(getattr(tuner.model, "config", None), "model_type", None)
    # NOTE: SteeringVectors.from_model reads `model.base_model`, which on a bare PASModel resolves to the
    # transformers model's base model, so the tuner is handed over under that name.
    return SteeringVectors.from_model(types.SimpleNamespace(base_model=tuner), adapter_name), model_type


def _check_exportable(steering: SteeringVectors, ignore_positions: bool) -> None:
    config = steering.config
    if config.activation != "residual":
        raise ValueError(
            f"Only residual-stream adapters can be exported to llama.cpp, but this adapter steers "
            f"activation={config.activation!r}. llama.cpp adds control vectors to the output of each decoder layer; "
            "fit an adapter with activation='residual' to export it."
        )
    if config.positions != "all":
        message = (
            f"This adapter steers positions={config.positions!r}, but llama.cpp adds control vectors at every token, "
            "so the exported file steers more tokens than the adapter does."
        )
        if not ignore_positions:
            raise ValueError(message + " Pass ignore_positions=True to export it anyway.")
        logger.warning(message)
    if 0 in steering.vectors:
        raise ValueError(
            "The adapter steers decoder layer 0, which llama.cpp control vectors cannot express: llama.cpp keeps no "
            "vector for layer 0 and rejects a direction.0 tensor. Steer layers 1 and above to export."
        )
    num_layers = config.num_hidden_layers
    out_of_range = [index for index in steering.layers if index < 0 or (num_layers and index >= num_layers)]
    if out_of_range:
        raise ValueError(f"Layer indices {out_of_range} are outside the model's {num_layers} decoder layers.")


def _write_gguf(path: Path, directions: dict[int, np.ndarray], model_hint: Optional[str]) -> None:
    try:
        import gguf
    except ImportError:
        raise ImportError("Exporting to llama.cpp needs the gguf package: pip install 'pas-peft[gguf]'") from None

    # Write next to the target and move it into place, so a failed export leaves no partial file.
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, ARCHITECTURE)
        if model_hint:
            writer.add_string(MODEL_HINT_KEY, model_hint)
        # llama.cpp's own cvector-generator writes the number of direction tensors here, as int32.
        writer.add_int32(LAYER_COUNT_KEY, len(directions))
        for index, direction in sorted(directions.items()):
            writer.add_tensor(f"{TENSOR_PREFIX}{index}", np.ascontiguousarray(direction, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        apply_umask(staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
