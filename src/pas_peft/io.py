"""Reading and writing PAS adapter directories without PEFT's model classes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors.torch import load_file, save_file

from .config import PASConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
VECTOR_KEY_SUFFIX = ".steering.pas_vector"
PEFT_KEY_PREFIX = "base_model.model."


def check_safetensors_adapter(adapter_directory: Union[str, os.PathLike]) -> None:
    """Raise a ValueError if a local adapter directory contains pickled weights but no safetensors file."""
    directory = Path(adapter_directory)
    if not directory.is_dir():
        return
    if not (directory / WEIGHTS_FILE).is_file() and (directory / PICKLE_WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{directory} contains {PICKLE_WEIGHTS_FILE} but no {WEIGHTS_FILE}. pas_peft loads safetensors only, "
            "because pickled weights can run code when loaded; convert the file to safetensors first."
        )


def read_adapter_directory(adapter_directory: Union[str, os.PathLike]) -> tuple[PASConfig, dict[int, torch.Tensor]]:
    """Return the config and the raw vectors (layer index to tensor) of a saved PAS adapter."""
    directory = Path(adapter_directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {directory}: pass the directory written by save_pretrained().")
    check_safetensors_adapter(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in {directory}: the adapter has no saved vectors.")

    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "PAS":
        raise ValueError(f"{config_path} describes a {peft_type!r} adapter, not a PAS adapter.")
    config = PASConfig.from_pretrained(str(directory))

    state_dict = load_file(str(weights_path))
    expected = {vector_key(name): name for name in config.target_modules or []}
    if set(state_dict) != set(expected):
        raise ValueError(
            f"{weights_path} does not match {config_path}: it contains {sorted(state_dict)} but the config steers "
            f"{config.target_modules}. Save the adapter again with save_pretrained()."
        )
    vectors = {layer_index(config, name): state_dict[key].float() for key, name in expected.items()}
    return config, vectors


def write_adapter_directory(
    save_directory: Union[str, os.PathLike],
    config: PASConfig,
    vectors: dict[int, torch.Tensor],
    overwrite: bool = False,
) -> None:
    """Write a PEFT-loadable PAS adapter directory atomically."""
    _adapter_state_dict(config, vectors)
    with atomic_directory(save_directory, overwrite=overwrite) as staging:
        write_adapter_files(staging, config, vectors)


def write_adapter_files(directory: Path, config: PASConfig, vectors: dict[int, torch.Tensor]) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory."""
    state_dict = _adapter_state_dict(config, vectors)
    config.save_pretrained(str(directory))
    save_file(state_dict, str(Path(directory) / WEIGHTS_FILE), metadata={"format": "pt"})


def _adapter_state_dict(config: PASConfig, vectors: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not config.target_modules or not config.layers_module:
        raise ValueError("The config has no resolved target_modules; create the adapter on a model first.")
    state_dict = {
        vector_key(f"{config.layers_module}.{index}"): vector.detach().float().contiguous().cpu()
        for index, vector in vectors.items()
    }
    expected = {vector_key(name) for name in config.target_modules}
    if set(state_dict) != expected:
        raise ValueError(
            f"Vectors were given for layers {sorted(vectors)}, but the config steers {config.target_modules}."
        )
    return state_dict


def vector_key(module_name: str) -> str:
    """Return the checkpoint key PEFT uses for the vector of the decoder layer `module_name`."""
    return f"{PEFT_KEY_PREFIX}{module_name}{VECTOR_KEY_SUFFIX}"


def layer_index(config: PASConfig, module_name: str) -> int:
    """Return the decoder layer index encoded in a target module name such as `model.layers.12`."""
    prefix = f"{config.layers_module}." if config.layers_module else ""
    suffix = module_name[len(prefix):] if module_name.startswith(prefix) else module_name.rpartition(".")[2]
    if not suffix.isdigit():
        raise ValueError(f"Cannot read a layer index from module name {module_name!r}.")
    return int(suffix)


@contextlib.contextmanager
def atomic_directory(target: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """
    Yield an empty staging directory that replaces `target` only if the block finishes without an error.

    An existing non-empty `target` is refused unless `overwrite` is set, and it is replaced only after the
    new contents are complete, so a crash leaves either the old directory or nothing new behind.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another output path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {target} exists and is not empty; choose another path or pass overwrite=True "
            "(--overwrite on the command line)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    apply_umask(staging)

    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.{os.getpid()}.old"
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        # Put the old directory back, so a failed swap loses nothing.
        if backup is not None:
            os.replace(backup, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def apply_umask(path: Union[str, os.PathLike]) -> None:
    """
    Give `path` and everything under it the permissions a plain `mkdir` or `open` would have given.

    `tempfile.mkdtemp` and `tempfile.mkstemp` create their directory or file readable by the owner only, so
    without this step a staged adapter could not be read by the other users of a shared machine.
    """
    umask = os.umask(0)
    os.umask(umask)
    root = Path(path)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)
