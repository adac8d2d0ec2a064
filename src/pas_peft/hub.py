"""
Model cards and Hugging Face Hub uploads for saved PAS adapters.

`write_model_card` writes or updates README.md in an adapter directory: YAML metadata the Hub indexes
(base model, `library_name: peft`, tags, the PAS settings and scores) and a short section that shows how to
load the adapter. Content PEFT or the user already wrote is kept. `push_to_hub` writes the card and uploads
the adapter files with `huggingface_hub.HfApi`.

A PAS adapter on the Hub loads through the same code as a local directory:
`pas_peft.from_pretrained(model, "user/repo")` or `PeftModel.from_pretrained(model, "user/repo")`, after
`import pas_peft`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from huggingface_hub import HfApi, ModelCard

from . import __version__
from .config import PASConfig
from .io import CONFIG_FILE, WEIGHTS_FILE, layer_index, read_adapter_directory
from .loading import EMBEDDED_MODEL_GGUF_FILE

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PAS_TAGS = ("pas", "steering", "activation-steering", "pas-peft")
# Files of a PAS adapter directory that push_to_hub uploads by default.
UPLOAD_PATTERNS = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
# Hub repo id of the model shipped as the embedded GGUF file (a Q4_1 quantization of it).
EMBEDDED_MODEL_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAPER_URL = "https://arxiv.org/abs/2509.22739"

SECTION_BEGIN = "<!-- pas_peft:begin -->"
SECTION_END = "<!-- pas_peft:end -->"
# Prefixes of fit_summary keys that contain scores, for example "validation_accuracy" or "test_score".
SCORE_PREFIXES = ("validation", "val_", "test")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def write_model_card(
    adapter_directory: Union[str, os.PathLike],
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    scores: Optional[Mapping[str, float]] = None,
) -> Path:
    """
    Write or update README.md in a saved PAS adapter directory and return its path.

    The YAML metadata gets `base_model`, `library_name: peft`, the tags in `PAS_TAGS` (added to existing
    tags) and a `pas` mapping with the method, layers, strength, positions, activation, dataset and
    scores. The card body gets one section between `SECTION_BEGIN` and `SECTION_END`, which later calls
    replace; every other line of an existing card is kept.

    Args:
        adapter_directory: directory with the `adapter_config.json` of a PAS adapter.
        repo_id: Hub repo id used in the loading example of the card.
        base_model: Hub repo id of the base model. By default the config's `base_model_name_or_path` is
            used when it is a Hub repo id, and a local path is left out.
        dataset: dataset name; by default `fit_summary["dataset"]` (or `"dataset_name"`).
        scores: scores to record, for example `{"validation_accuracy": 0.71}`; by default the numbers in
            `fit_summary` whose keys start with "validation", "val_" or "test", including one level of
            nesting (`{"validation": {"accuracy": 0.71}}` becomes `validation_accuracy`).

    A dataset or scores already on the card stay there unless new values replace them. Call this after
    `save_pretrained`: PEFT's own card update replaces the card's tags.
    """
    directory = Path(adapter_directory)
    config = read_pas_config(directory)
    path = directory / CARD_FILE
    # An empty mapping, because an empty metadata block makes huggingface_hub log "metadata block was not found".
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n{}\n---\n")

    # A dataset or scores from an earlier call stay on the card unless new values replace them: the config's
    # fit_summary replaces earlier scores, and explicit `scores` replace both.
    previous = card.data.get("pas") or {}
    if dataset is None and not _dataset_of(config.fit_summary or {}):
        dataset = previous.get("dataset")
    scores = {**(previous.get("scores") or {}), **_scores_of(config.fit_summary or {}), **(scores or {})}

    metadata = card_metadata(config, base_model=base_model, dataset=dataset, scores=scores)
    _update_card_data(card, metadata)
    card.text = _replace_section(card.text, _card_section(config, metadata, repo_id))

    card.save(path)
    logger.info("Wrote model card %s", path)
    return path


def card_metadata(
    config: PASConfig,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    scores: Optional[Mapping[str, float]] = None,
) -> dict[str, Any]:
    """Return the YAML metadata that `write_model_card` puts on the card of an adapter with `config`."""
    summary = config.fit_summary or {}
    pas: dict[str, Any] = {
        "method": config.method or "manual",
        "layers": adapter_layers(config),
        "strength": float(config.strength),
        "positions": config.positions,
        "activation": config.activation,
    }
    dataset = dataset if dataset is not None else _dataset_of(summary)
    if dataset:
        pas["dataset"] = dataset
    found_scores = _scores_of(summary)
    found_scores.update({key: float(value) for key, value in (scores or {}).items()})
    if found_scores:
        pas["scores"] = found_scores
    if config.base_model_gguf_file:
        pas["base_model_gguf_file"] = config.base_model_gguf_file
    pas["pas_peft_version"] = config.pas_peft_version or __version__

    metadata: dict[str, Any] = {"library_name": "peft", "tags": list(PAS_TAGS), "pas": pas}
    base = base_model or _hub_base_model(config)
    if base:
        metadata["base_model"] = base
    return metadata


def push_to_hub(
    model_or_directory: Any,
    repo_id: str,
    adapter_name: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    write_card: bool = True,
    allow_patterns: Sequence[str] = UPLOAD_PATTERNS,
    api: Optional[HfApi] = None,
    **card_kwargs: Any,
):
    """
    Upload a PAS adapter to the Hugging Face Hub and return the commit info of the upload.

    Args:
        model_or_directory: a saved adapter directory, a PAS `PeftModel`, or a `PASStack` (its PAS adapter
            is uploaded). A model is saved to a temporary directory first.
        repo_id: the Hub repo, created if it does not exist.
        adapter_name: which adapter of a model to upload; defaults to the active one.
        private: passed to `HfApi.create_repo`; None keeps the Hub's default.
        token: used as `HfApi(token=...)` when `api` is not given.
        revision, commit_message, create_pr: passed to `HfApi.upload_folder`. The branch named by
            `revision` must exist already.
        write_card: write or update README.md first (see `write_model_card`). For a directory, the card is
            written into that directory.
        allow_patterns: files to upload; by default the adapter config, the weights and README.md.
        api: an `HfApi` to use instead of a new one.
        card_kwargs: passed to `write_model_card` (`base_model`, `dataset`, `scores`).
    """
    api = api if api is not None else HfApi(token=token)
    commit_message = commit_message or "Upload PAS adapter with pas_peft"

    if isinstance(model_or_directory, (str, os.PathLike)):
        return _push_directory(
            Path(model_or_directory), repo_id, api, private, revision, commit_message, create_pr, write_card,
            allow_patterns, card_kwargs,
        )

    peft_model, adapter_name = _pas_peft_model(model_or_directory, adapter_name)
    with tempfile.TemporaryDirectory(prefix="pas_peft_push_") as staging:
        # PAS adapters never contain embedding layers; "auto" would ask the Hub whether the base model exists.
        peft_model.save_pretrained(staging, selected_adapters=[adapter_name], save_embedding_layers=False)
        directory = Path(staging) / adapter_name if adapter_name != "default" else Path(staging)
        return _push_directory(
            directory, repo_id, api, private, revision, commit_message, create_pr, write_card, allow_patterns,
            card_kwargs,
        )


def read_pas_config(adapter_directory: Union[str, os.PathLike]) -> PASConfig:
    """Return the PASConfig saved in a local adapter directory, or raise if it contains another adapter type."""
    directory = Path(adapter_directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {directory}: pass the directory written by save_pretrained() (for an adapter not "
            "named 'default', PEFT writes it into a subfolder named after the adapter)."
        )
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "PAS":
        raise ValueError(f"{config_path} describes a {peft_type!r} adapter, not a PAS adapter.")
    return PASConfig.from_pretrained(str(directory))


def adapter_layers(config: PASConfig) -> list[int]:
    """Return the steered decoder layer indices of `config`, resolved when the adapter was created."""
    if config.target_modules:
        return sorted(layer_index(config, name) for name in config.target_modules)
    return list(config.layers or [])


# -- helpers -------------------------------------------------------------------------------------------


def _push_directory(
    directory: Path,
    repo_id: str,
    api: HfApi,
    private: Optional[bool],
    revision: Optional[str],
    commit_message: str,
    create_pr: bool,
    write_card: bool,
    allow_patterns: Sequence[str],
    card_kwargs: dict,
):
    # Checks the config, the weights file and that they match, before anything is uploaded.
    read_adapter_directory(directory)
    if write_card:
        write_model_card(directory, repo_id=repo_id, **card_kwargs)

    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    logger.info("Uploading %s to %s", directory, repo_id)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        allow_patterns=list(allow_patterns),
    )


def _pas_peft_model(model: Any, adapter_name: Optional[str]):
    from peft import PeftModel

    from .api import find_pas_tuner
    from .stacking import PASStack

    if isinstance(model, PASStack):
        model, adapter_name = model.pas_model, adapter_name or model.pas_adapter_name
    if not isinstance(model, PeftModel) or find_pas_tuner(model) is None:
        raise TypeError(
            f"push_to_hub expects a PAS PeftModel, a PASStack or an adapter directory, got {type(model).__name__}."
        )
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}: this model has {sorted(model.peft_config)}.")
    return model, adapter_name


def _hub_base_model(config: PASConfig) -> Optional[str]:
    if config.base_model_gguf_file == EMBEDDED_MODEL_GGUF_FILE:
        return EMBEDDED_MODEL_REPO_ID
    name = config.base_model_name_or_path
    if not name or os.path.exists(name) or not _HUB_REPO_ID.match(name):
        return None
    return name


def _dataset_of(summary: Mapping[str, Any]) -> Optional[str]:
    for key in ("dataset", "dataset_name"):
        value = summary.get(key)
        if isinstance(value, Mapping):
            value = value.get("name")
        if isinstance(value, str) and value:
            return value
    return None


def _scores_of(summary: Mapping[str, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    sources = [summary] + [summary[key] for key in ("scores", "metrics") if isinstance(summary.get(key), Mapping)]
    for source in sources:
        for key, value in source.items():
            if not str(key).lower().startswith(SCORE_PREFIXES):
                continue
            if _is_number(value):
                found[str(key)] = float(value)
            elif isinstance(value, Mapping):
                for inner_key, inner_value in value.items():
                    if _is_number(inner_value):
                        found[f"{key}_{inner_key}"] = float(inner_value)
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _update_card_data(card: ModelCard, metadata: dict[str, Any]) -> None:
    data = card.data
    data["library_name"] = metadata["library_name"]

    # PEFT writes `base_model: ''` and the tag 'base_model:adapter:' for models built from a config, and the
    # local path for local models; neither is a Hub repo id.
    tags = [tag for tag in (data.get("tags") or []) if not _is_invalid_adapter_tag(tag)]
    base = metadata.get("base_model")
    if base:
        data["base_model"] = base
        tags = [tag for tag in tags if not str(tag).startswith("base_model:adapter:")]
        tags.append(f"base_model:adapter:{base}")
    elif "base_model" in data.to_dict() and not _HUB_REPO_ID.match(str(data.get("base_model") or "")):
        data["base_model"] = None
    tags.extend(tag for tag in metadata["tags"] if tag not in tags)
    data["tags"] = tags
    data["pas"] = metadata["pas"]


def _is_invalid_adapter_tag(tag: Any) -> bool:
    prefix = "base_model:adapter:"
    return str(tag).startswith(prefix) and not _HUB_REPO_ID.match(str(tag)[len(prefix):])


def _card_section(config: PASConfig, metadata: dict[str, Any], repo_id: Optional[str]) -> str:
    pas = metadata["pas"]
    base = metadata.get("base_model")
    layers = ", ".join(map(str, pas["layers"]))
    rows = [
        ("Method", pas["method"]),
        ("Decoder layers", layers),
        ("Strength", pas["strength"]),
        ("Positions", pas["positions"]),
        ("Activation", pas["activation"]),
    ]
    if "dataset" in pas:
        rows.append(("Dataset", pas["dataset"]))
    rows.extend((f"Score: {name}", f"{value:.4g}") for name, value in pas.get("scores", {}).items())
    table = "\n".join(["| Setting | Value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])

    base_text = f"`{base}`" if base else "its base model"
    if pas["activation"] == "residual":
        target = f"the residual stream (the output) of decoder layer(s) {layers}"
    else:
        target = f"the {pas['activation']} activation of decoder layer(s) {layers}"
    loader = _loading_example(config, base, repo_id)
    return "\n".join(
        [
            SECTION_BEGIN,
            "## PAS steering adapter",
            "",
            f"This is a [Painless Activation Steering (PAS)]({PAPER_URL}) adapter for {base_text}, made with "
            f"pas_peft {pas['pas_peft_version']}. At run time it adds `strength * vector` to {target}, at the "
            f"`{pas['positions']}` token positions. It changes no model weights.",
            "",
            table,
            "",
            "Loading requires `pip install pas-peft` and `import pas_peft` before loading: the import registers "
            "the PAS adapter type with PEFT, and without it PEFT fails with `KeyError: 'PAS'`.",
            "",
            "```python",
            loader,
            "```",
            SECTION_END,
        ]
    )


def _loading_example(config: PASConfig, base: Optional[str], repo_id: Optional[str]) -> str:
    adapter = repo_id or "path/to/this/adapter"
    if config.base_model_gguf_file == EMBEDDED_MODEL_GGUF_FILE:
        base_lines = ["base, tokenizer = pas_peft.load_base_model()  # the embedded SmolLM2-135M-Instruct GGUF"]
        imports = ["import pas_peft  # registers the PAS adapter type with PEFT", "from peft import PeftModel"]
    else:
        base_lines = [f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")']
        imports = [
            "import pas_peft  # registers the PAS adapter type with PEFT",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
        ]
    return "\n".join(imports + [""] + base_lines + [f'model = PeftModel.from_pretrained(base, "{adapter}")'])


def _replace_section(text: str, section: str) -> str:
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(SECTION_END):]

    # Put the section under the card's first heading, or on top of a card that has none.
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# "):
            return "\n".join(lines[: index + 1] + ["", section, ""] + lines[index + 1 :]) + "\n"
    return "\n" + section + "\n\n" + text.lstrip("\n")
