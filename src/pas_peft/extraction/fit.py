"""`fit_pas`: a labeled multiple-choice dataset in, a fitted PAS adapter and an honest report out."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from ..api import find_pas_tuner
from ..config import PASConfig
from ..data import DatasetSplits, LoadedItems, MultipleChoiceItem, load_items, split_items, splits_from_mapping
from ..io import atomic_directory
from .adapter import adapter_config_of, attach_fitted_adapter, detach_fitted_adapter, fitted_config
from .batching import default_memory_budget
from .contrast import Activations, contrast_sums
from .distributed import ProcessGroup
from .engine import BatchRunner
from .methods import METHODS, contrast_set, missing_requirement
from .outputs import write_heatmap, write_report, write_sweep_csv
from .passes import SplitEvaluation, SweepConfig, evaluate_split, read_last_token_activations
from .report import build_report
from .scoring import SCORING_MODES, EncodedItem, ItemEncoder, drop_too_long, max_positions
from .selection import PAPER_STRENGTHS, choose_configuration, default_candidate_layers, sweep_rows
from .stats import accuracy

logger = logging.getLogger(__name__)

DEGENERATE_LETTER_SHARE = 0.9


@dataclass
class FitSettings:
    """Everything that decides a fit's result; recorded in the report."""

    scoring: str = "likelihood"
    methods: tuple[str, ...] = METHODS
    layers: Optional[tuple[int, ...]] = None
    strengths: tuple[float, ...] = PAPER_STRENGTHS
    seed: int = 0
    proportions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_samples: Optional[int] = None
    use_chat_template: bool = False
    system_prompt: Optional[str] = None
    activation: str = "residual"
    vector_source: str = "output"
    layers_module: Optional[str] = None
    batch_size: Optional[int] = None
    memory_budget_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"Invalid scoring {self.scoring!r}: use one of {', '.join(map(repr, SCORING_MODES))}.")
        self.methods = tuple(self.methods)
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Invalid methods {list(self.methods)}: choose from {', '.join(METHODS)}.")
        self.strengths = tuple(float(value) for value in self.strengths)
        if not self.strengths or not all(math.isfinite(value) for value in self.strengths):
            raise ValueError(f"Invalid strengths {self.strengths}: pass one or more finite numbers.")
        if self.layers is not None:
            self.layers = tuple(int(layer) for layer in self.layers)
            if not self.layers:
                raise ValueError("`layers` is empty: pass candidate layer indices or leave it unset for the default spread.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"Invalid batch_size {self.batch_size}: pass a positive number of rows.")
        # The adapter's own checks (activation, vector_source and their combination) run now, not after the sweep.
        PASConfig(layers=[0], activation=self.activation, vector_source=self.vector_source)


@dataclass
class FitResult:
    """Result of `fit_pas`: the steered model, the report and the validation sweep."""

    model: Any
    report: dict
    sweep: list[dict]
    output_dir: Optional[Path] = None
    vectors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


def fit_pas(
    model,
    tokenizer,
    data,
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    adapter_name: str = "default",
    dataset_name: Optional[str] = None,
    schema: str = "auto",
    columns=None,
    target_behavior: Optional[str] = None,
    binary_choices: Optional[Sequence[str]] = None,
    splits: Optional[dict[str, Sequence[MultipleChoiceItem]]] = None,
    skip_invalid: bool = False,
    show_progress: bool = True,
    **settings: Any,
) -> FitResult:
    """
    Fit a PAS steering adapter on a labeled multiple-choice dataset and report its effect.

    The dataset is split into train / validation / test. The model answers every item (by letter or by
    answer likelihood, see `scoring`); the training answers give one vector per method and candidate layer;
    the validation split chooses layer x strength x method; the test split reports baseline versus steered
    accuracy with 95% intervals and a paired McNemar test.

    Args:
        model: a transformers causal LM, or a PeftModel (a PAS PeftModel gets a new adapter; the activations
            of a LoRA PeftModel include its LoRA).
        tokenizer: the model's tokenizer.
        data: anything `pas_peft.data.load_items` reads (a file path, a bundled dataset name, a `datasets`
            Dataset or DatasetDict, a DataFrame, a list of dicts), its result (`LoadedItems`), or a list of
            `MultipleChoiceItem`.
        output_dir: if given, the adapter, `pas_report.json`, `sweep.csv` and `sweep_heatmap.png` are written
            there. An existing non-empty directory is refused unless `overwrite` is set.
        adapter_name: name of the fitted adapter.
        schema, columns, target_behavior, binary_choices, skip_invalid: passed to `load_items`.
        splits: explicit train / validation / test items, instead of splitting `data`.
        **settings: fields of `FitSettings`: scoring ("likelihood", "likelihood_norm" or "letter"), methods,
            layers (candidate layers), strengths, seed, proportions, max_samples, use_chat_template,
            system_prompt, activation, vector_source, layers_module, batch_size, memory_budget_bytes.

    Returns:
        `FitResult` with the steered PeftModel (the fitted adapter active), the report and the sweep rows.
    """
    options = FitSettings(**settings)
    _check_adapter_name(model, adapter_name)
    group = ProcessGroup.current()
    timer = StageTimer()
    if output_dir is not None:
        _check_output_dir(Path(output_dir), overwrite)

    with timer.stage("load_data"):
        loaded, dataset_splits = _load_splits(
            data, options, schema, columns, target_behavior, binary_choices, splits, skip_invalid
        )
    name = dataset_name or (loaded.name if loaded is not None else "items")
    logger.info("Dataset %s: train %d, validation %d, test %d items", name, *dataset_splits.sizes().values())

    runner = BatchRunner(model, activation=options.activation, layers_module=options.layers_module)
    runner.pad_token_id = _pad_token_id(tokenizer)
    layers = _candidate_layers(options, runner.num_layers)
    budget = options.memory_budget_bytes or default_memory_budget(runner.device)
    encoder = ItemEncoder(tokenizer, options.scoring, options.seed, options.use_chat_template, options.system_prompt)

    with timer.stage("encode"):
        encoded, dropped = _encode_splits(encoder, dataset_splits, max_positions(runner.model))

    fit = _Fit(runner, encoder, options, group, budget, layers, show_progress, timer)
    train = fit.train(encoded["train"])
    vectors, skipped = fit.build_vectors(train)
    validation, rows = fit.validation(encoded["validation"], vectors)
    best, best_by_method = choose_configuration(rows, list(vectors), accuracy(validation.correct).value)
    test = fit.test(encoded["test"], vectors, best_by_method)
    test_letter_shares = _test_letter_shares(encoded["test"], test)
    _warn_if_steering_only_moves_letters(test_letter_shares, best["method"])

    config = fitted_config(
        options, best, name, runner.stack.path, method_rows=best_by_method, validation=validation, test=test
    )
    config.fit_summary.update(_data_provenance(loaded, options))
    if isinstance(model, PeftModel) and find_pas_tuner(model) is None:
        # The vector was read from LoRA-adapted activations; evaluation without that LoRA measures something else.
        config.fit_summary["fitted_on_lora"] = True
    report = build_report(
        dataset_name=name,
        loaded=loaded,
        settings={**asdict(options), "candidate_layers": layers},
        split_sizes=dataset_splits.sizes(),
        dropped=dropped,
        train=train,
        validation=validation,
        test=test,
        best=best,
        best_by_method=best_by_method,
        skipped=skipped,
        vectors=vectors,
        wall_time_seconds=dict(timer.seconds),
        processes=group.world_size,
        activation_norms=fit.activation_norms(train),
        test_letter_shares=test_letter_shares,
    )

    previous_active = list(model.active_adapters) if isinstance(model, PeftModel) else None
    peft_model = attach_fitted_adapter(model, config, {best["layer"]: vectors[best["method"]][best["layer"]]}, adapter_name)
    result = FitResult(peft_model, report, rows, vectors=vectors)
    failed = False
    try:
        if output_dir is not None and group.is_main:
            saved_config = adapter_config_of(peft_model, adapter_name, config)
            result.output_dir = _write_outputs(
                Path(output_dir), overwrite, saved_config, vectors, best, report, rows, validation
            )
    except BaseException:
        # A failed fit gives the caller's model back as it was, as every earlier error does.
        failed = True
        detach_fitted_adapter(model, peft_model, adapter_name, previous_active)
        raise
    finally:
        group.raise_if_any_failed(failed, "writing the fit's outputs")
    return result


class _Fit:
    """The three passes of a fit, sharing the runner, the settings and the process group."""

    def __init__(self, runner, encoder, options: FitSettings, group: ProcessGroup, budget, layers, show_progress, timer):
        self.runner = runner
        self.encoder = encoder
        self.options = options
        self.group = group
        self.budget = budget
        self.layers = layers
        self.show_progress = show_progress and group.is_main
        self.timer = timer

    def train(self, encoded: list[EncodedItem]) -> dict:
        """Answer the training items and read their activations; `local_*` entries cover this process's shard."""
        if len(encoded) < self.group.world_size:
            raise ValueError(
                f"The training split has {len(encoded)} items but {self.group.world_size} processes share it; "
                "every process needs at least one item. Use more items or fewer processes."
            )
        indices, shard = self.group.shard(encoded)
        with self.timer.stage("train"), self._progress("train: read activations", len(shard)) as advance:
            evaluation = self._evaluate(shard, vector_layers=self.layers, on_chunk_done=advance)
        activations = Activations(evaluation.prompt_activations, evaluation.answer_activations, evaluation.answer_rows)
        labels, predictions = evaluation.labels.tolist(), evaluation.predictions.tolist()

        if self.options.scoring == "letter":
            with self.timer.stage("train_answers"):
                self._read_answered_prompts(shard, labels, predictions, activations)

        all_predictions = self.group.gather_rows(indices, evaluation.predictions, len(encoded))
        all_labels = torch.tensor([item.item.label for item in encoded])
        _warn_if_degenerate(encoded, all_predictions, self.options.scoring)
        return {
            "local_labels": labels,
            "local_predictions": predictions,
            "local_activations": activations,
            "accuracy": accuracy(all_predictions == all_labels),
            "num_correct": int((all_predictions == all_labels).sum()),
            "num_wrong": int((all_predictions != all_labels).sum()),
            "letter_shares": _letter_shares(encoded, all_predictions),
        }

    def build_vectors(self, train: dict) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, str]]:
        vectors, skipped = {}, {}
        for method in self.options.methods:
            reason = missing_requirement(method, train["num_correct"], train["num_wrong"])
            if reason:
                logger.warning("Skipping %s: %s (the model answered %d of %d training items correctly).",
                               method, reason, train["num_correct"], train["num_correct"] + train["num_wrong"])
                skipped[method] = reason
                continue
            contrast = contrast_set(method, train["local_labels"], train["local_predictions"])
            sums = contrast_sums(contrast, train["local_activations"], self.layers).reduced(self.group.all_sum)
            vectors[method] = sums.vectors()
        if not vectors:
            raise ValueError(
                "No PAS method can be fitted: " + "; ".join(skipped.values()) + ". Use more training items, another "
                "scoring mode (--scoring), or a dataset the model answers partly right and partly wrong."
            )
        return vectors, skipped

    def activation_norms(self, train: dict) -> dict[str, float]:
        """Return the mean norm of the last-prompt-token activation at each layer, over every process's items."""
        norms = {}
        for layer, tensor in train["local_activations"].prompt.items():
            totals = self.group.all_sum(torch.tensor([float(tensor.norm(dim=-1).sum()), float(tensor.shape[0])]))
            norms[str(layer)] = float(totals[0] / totals[1])
        return norms

    def validation(self, encoded: list[EncodedItem], vectors) -> tuple[SplitEvaluation, list[dict]]:
        configs = [
            SweepConfig(method, layer, strength)
            for method in vectors
            for layer in self.layers
            for strength in self.options.strengths
        ]
        evaluation = self._evaluate_gathered("validation: sweep", encoded, configs, vectors)
        return evaluation, sweep_rows(configs, evaluation.config_predictions, evaluation.labels)

    def test(self, encoded: list[EncodedItem], vectors, best_by_method: dict[str, dict]) -> SplitEvaluation:
        configs = [SweepConfig(method, row["layer"], row["strength"]) for method, row in best_by_method.items()]
        return self._evaluate_gathered("test: chosen configurations", encoded, configs, vectors)

    def _evaluate_gathered(self, description, encoded, configs, vectors) -> SplitEvaluation:
        indices, shard = self.group.shard(encoded)
        stage = description.split(":")[0]
        with self.timer.stage(stage), self._progress(description, len(shard)) as advance:
            evaluation = self._evaluate(shard, configs=configs, vectors=vectors, on_chunk_done=advance)
        return SplitEvaluation(
            labels=torch.tensor([item.item.label for item in encoded]),
            predictions=self.group.gather_rows(indices, evaluation.predictions, len(encoded)),
            configs=configs,
            config_predictions=self.group.gather_rows(indices, evaluation.config_predictions, len(encoded)),
        )

    def _evaluate(self, encoded, **kwargs) -> SplitEvaluation:
        return evaluate_split(
            self.runner,
            encoded,
            vector_source=self.options.vector_source,
            budget_bytes=self.budget,
            batch_size=self.options.batch_size,
            **kwargs,
        )

    def _read_answered_prompts(self, shard, labels, predictions, activations: Activations) -> None:
        """Letter mode: iPAS reads "prompt + answer" sequences, which the prediction pass did not run."""
        keys = sorted({(i, labels[i]) for i in range(len(shard))} | {(i, predictions[i]) for i in range(len(shard))})
        sequences = [self.encoder.encode_answered(shard[i].item, choice) for i, choice in keys]
        with self._progress("train: read answered prompts", len(sequences)) as advance:
            activations.answer = read_last_token_activations(
                self.runner, sequences, self.layers, vector_source=self.options.vector_source,
                budget_bytes=self.budget, batch_size=self.options.batch_size,
            )
            advance(len(sequences))
        activations.answer_rows = {key: row for row, key in enumerate(keys)}

    @contextlib.contextmanager
    def _progress(self, description: str, total: int) -> Iterator:
        with tqdm(total=total, desc=description, unit="item", disable=not self.show_progress, leave=False) as bar:
            yield bar.update


class StageTimer:
    """Wall time of each stage of a fit, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# -- data --------------------------------------------------------------------------------------------------


def _load_splits(data, options, schema, columns, target_behavior, binary_choices, splits, skip_invalid):
    if splits is not None:
        return None, splits_from_mapping(splits, seed=options.seed, max_samples=options.max_samples)
    if isinstance(data, (list, tuple)) and data and all(isinstance(item, MultipleChoiceItem) for item in data):
        loaded = None
        items = list(data)
    else:
        loaded = data if isinstance(data, LoadedItems) else load_items(
            data,
            schema=schema,
            columns=columns,
            target_behavior=target_behavior,
            binary_choices=binary_choices,
            skip_invalid=skip_invalid,
        )
        if {"train", "test"} <= set(loaded.splits) and set(loaded.splits) & {"validation", "valid", "val", "dev"}:
            logger.info("Using the dataset's own splits %s", sorted(loaded.splits))
            return loaded, splits_from_mapping(loaded.splits, seed=options.seed, max_samples=options.max_samples)
        items = list(loaded.items)
    return loaded, split_items(items, seed=options.seed, proportions=options.proportions, max_samples=options.max_samples)


def _data_provenance(loaded: Optional[LoadedItems], options: FitSettings) -> dict:
    """Return where the items came from and how they were split, so `pas-peft eval` can rebuild the test split."""
    provenance = {
        "seed": options.seed,
        "proportions": list(options.proportions),
        "max_samples": options.max_samples,
        "system_prompt": options.system_prompt,
    }
    if loaded is not None and loaded.source is not None and not loaded.splits:
        provenance["dataset_source"] = loaded.source
    if loaded is not None and loaded.target_behavior is not None:
        provenance["target_behavior"] = loaded.target_behavior
    return provenance


def _encode_splits(encoder: ItemEncoder, splits: DatasetSplits, context: Optional[int]):
    encoded, dropped = {}, {}
    for name in ("train", "validation", "test"):
        items = [encoder.encode(item) for item in getattr(splits, name)]
        encoded[name], dropped[name] = drop_too_long(items, context, name)
    return encoded, dropped


def _candidate_layers(options: FitSettings, num_layers: int) -> list[int]:
    if options.layers is None:
        return default_candidate_layers(num_layers)
    from ..architectures import resolve_layer_indices

    return sorted(resolve_layer_indices(list(options.layers), num_layers))


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)
    return 0


def _letter_shares(encoded: Sequence[EncodedItem], predictions: torch.Tensor) -> dict[str, float]:
    if encoded[0].choice_letters is None:
        return {}
    letters = [item.choice_letters[int(prediction)] for item, prediction in zip(encoded, predictions)]
    return {letter: letters.count(letter) / len(letters) for letter in sorted(set(letters))}


def _dominant_letter(shares: dict[str, float]) -> Optional[tuple[str, float]]:
    """Return the most frequent letter and its share when that share exceeds `DEGENERATE_LETTER_SHARE`, else None."""
    if not shares:
        return None
    letter, share = max(shares.items(), key=lambda pair: pair[1])
    return (letter, share) if share > DEGENERATE_LETTER_SHARE else None


def _test_letter_shares(encoded: Sequence[EncodedItem], test: SplitEvaluation) -> dict:
    """Return the letter shares of the unsteered and of each method's steered test answers, or {} in likelihood mode."""
    if not encoded or encoded[0].choice_letters is None:
        return {}
    return {
        "unsteered": _letter_shares(encoded, test.predictions),
        "by_method": {
            config.method: _letter_shares(encoded, test.config_predictions[:, index])
            for index, config in enumerate(test.configs)
        },
    }


def _warn_if_steering_only_moves_letters(test_letter_shares: dict, method: str) -> None:
    """Warn when the model, steered by the chosen configuration, picks one letter for almost every test item."""
    dominant = _dominant_letter(test_letter_shares["by_method"][method]) if test_letter_shares else None
    if dominant is not None:
        letter, share = dominant
        logger.warning(
            "Steered by the chosen configuration, the model answered %s to %.0f%% of the test items, so its test "
            "gain may come from moving the preferred letter rather than from the content of the answers. Compare "
            "with --scoring likelihood.",
            letter, 100 * share,
        )


def _warn_if_degenerate(encoded, predictions, scoring: str) -> None:
    dominant = _dominant_letter(_letter_shares(encoded, predictions))
    if dominant is not None:
        letter, share = dominant
        logger.warning(
            "The model answered %s to %.0f%% of the training items, so its letter answers carry little signal; "
            "--scoring likelihood scores each answer text instead and usually works better for small models.",
            letter, 100 * share,
        )


def _check_adapter_name(model, adapter_name: str) -> None:
    tuner = find_pas_tuner(model)
    if tuner is not None and adapter_name in tuner.peft_config:
        raise ValueError(
            f"The model already has an adapter named {adapter_name!r} (adapters: {sorted(tuner.peft_config)}); "
            "pass another adapter_name."
        )


def _check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another output directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {path} exists and is not empty; choose another directory or pass overwrite=True "
            "(--overwrite on the command line)."
        )


# -- files ------------------------------------------------------------------------------------------------


def _write_outputs(path: Path, overwrite, config, vectors, best, report, rows, validation) -> Path:
    from ..io import write_adapter_files

    with atomic_directory(path, overwrite=overwrite) as staging:
        write_adapter_files(staging, config, {best["layer"]: vectors[best["method"]][best["layer"]]})
        write_report(staging, report)
        write_sweep_csv(staging, rows)
        write_heatmap(staging, rows, accuracy(validation.correct).value)
    logger.info("Wrote the adapter and report to %s", path)
    return path
