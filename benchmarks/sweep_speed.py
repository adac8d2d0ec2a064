"""
Benchmark: pas_peft's extraction and sweep against the PAS reference loop, in one run.

Both paths get the same model, the same items and the same grid (default: 10 candidate layers x 12
strengths x 3 methods, letter scoring as in the PAS paper):

(a) reference: one example at a time; for activations, one full forward per training prompt; for the sweep,
    one full forward per validation example per configuration, steered by the PAS adapter itself;
(b) pas_peft: batched passes with a shared prefix cache; the sweep starts each configuration's continuation
    at its layer from cached inputs.

Each path runs in its own child process, so its peak memory (max RSS) is its own. The script prints wall
time, peak memory and the ratio, and checks that both paths build the same vectors and choose the same
configuration. It also times a one-epoch LoRA SFT run on the same training items and a whole `fit_pas`
against one plain batched forward pass over every prompt the fit reads.

    python benchmarks/sweep_speed.py --train-items 300 --validation-items 100 --json runs/benchmark.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    args = parse_args()
    results = {"settings": vars(args), "machine": machine_description()}
    print(f"Machine: {results['machine']}")

    context = multiprocessing.get_context("spawn")
    if not args.skip_comparison:
        with context.Pool(1) as pool:
            results["pas_peft"] = pool.apply(run_pas_peft, (vars(args),))
        print_path("pas_peft", results["pas_peft"])

        with context.Pool(1) as pool:
            results["reference"] = pool.apply(run_reference, (vars(args), results["pas_peft"]["vectors_file"]))
        print_path("reference", results["reference"])

        results["comparison"] = compare(results["pas_peft"], results["reference"])
        print_comparison(results["comparison"])

    if not args.skip_lora and not args.skip_comparison:
        with context.Pool(1) as pool:
            results["lora_sft"] = pool.apply(run_lora_sft, (vars(args),))
        print(f"\nLoRA SFT, one epoch over {args.train_items} items: {results['lora_sft']['seconds']:.1f} s; "
              f"PAS extraction {results['pas_peft']['extraction_seconds']:.1f} s, whole PAS fit "
              f"(extraction + sweep) {results['pas_peft']['extraction_seconds'] + results['pas_peft']['sweep_seconds']:.1f} s")

    if not args.skip_fit:
        with context.Pool(1) as pool:
            results["fit_vs_floor"] = pool.apply(run_fit_vs_floor, (vars(args),))
        floor = results["fit_vs_floor"]
        print(f"\nWhole fit_pas ({floor['scoring']}, default grid, train/validation/test {floor['split_sizes']}): "
              f"{floor['fit_seconds']:.1f} s; one plain batched forward over the {floor['floor_sequences']} "
              f"sequences it reads: {floor['floor_seconds']:.1f} s; ratio {floor['ratio']:.2f}x")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nWrote {args.json}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="bbq_age", help="dataset: bundled name or file (default: bbq_age)")
    parser.add_argument("--target-behavior", default=None, help="for A/B evaluation sets")
    parser.add_argument("--train-items", type=int, default=300)
    parser.add_argument("--validation-items", type=int, default=100)
    parser.add_argument("--test-items", type=int, default=100, help="test items of the whole-fit measurement")
    parser.add_argument("--scoring", default="letter", choices=("letter", "likelihood", "likelihood_norm"))
    parser.add_argument("--fit-scoring", default="likelihood", choices=("letter", "likelihood", "likelihood_norm"),
                        help="scoring mode of the whole-fit measurement (default: likelihood, the fit default)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="candidate layers (default: 10 spread)")
    parser.add_argument("--strengths", type=float, nargs="+", default=None, help="default: the paper's 12 strengths")
    parser.add_argument("--reference-configs", type=int, default=None,
                        help="time the reference sweep on this many configurations drawn at random and extrapolate "
                             "(default: all, which also checks the chosen configuration)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-comparison", action="store_true",
                        help="skip the pas_peft-against-reference measurement (and the LoRA timing compared with it)")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    return parser.parse_args()


# -- child processes -----------------------------------------------------------------------------------------


def _setup(settings: dict):
    import torch

    import pas_peft
    from pas_peft.data import load_items

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    model, tokenizer = pas_peft.load_base_model()
    model.eval()
    items = list(load_items(settings["data"], target_behavior=settings["target_behavior"]).items)
    random.Random(settings["seed"]).shuffle(items)
    return model, tokenizer, items


def _grid(settings: dict, num_layers: int):
    from pas_peft.extraction import PAPER_STRENGTHS, default_candidate_layers

    layers = settings["layers"] or default_candidate_layers(num_layers)
    strengths = settings["strengths"] or list(PAPER_STRENGTHS)
    return layers, strengths


def run_pas_peft(settings: dict) -> dict:
    import tempfile

    import torch

    from pas_peft.extraction.batching import default_memory_budget
    from pas_peft.extraction.contrast import Activations, contrast_sums
    from pas_peft.extraction.engine import BatchRunner
    from pas_peft.extraction.methods import METHODS, contrast_set, missing_requirement
    from pas_peft.extraction.passes import SweepConfig, evaluate_split, read_last_token_activations
    from pas_peft.extraction.scoring import ItemEncoder
    from pas_peft.extraction.selection import select_best, sweep_rows

    model, tokenizer, items = _setup(settings)
    footprint = _loaded_footprint()
    encoder = ItemEncoder(tokenizer, settings["scoring"], seed=settings["seed"])
    train = [encoder.encode(item) for item in items[: settings["train_items"]]]
    validation = [encoder.encode(item) for item in items[settings["train_items"] :][: settings["validation_items"]]]
    runner = BatchRunner(model)
    runner.pad_token_id = tokenizer.pad_token_id
    layers, strengths = _grid(settings, runner.num_layers)
    budget = default_memory_budget(runner.device)

    start = time.perf_counter()
    evaluation = evaluate_split(runner, train, vector_layers=layers, budget_bytes=budget)
    activations = Activations(evaluation.prompt_activations, evaluation.answer_activations, evaluation.answer_rows)
    labels, predictions = evaluation.labels.tolist(), evaluation.predictions.tolist()
    if settings["scoring"] == "letter":
        keys = sorted({(i, labels[i]) for i in range(len(train))} | {(i, predictions[i]) for i in range(len(train))})
        sequences = [encoder.encode_answered(train[i].item, choice) for i, choice in keys]
        activations.answer = read_last_token_activations(runner, sequences, layers, budget_bytes=budget)
        activations.answer_rows = {key: row for row, key in enumerate(keys)}
    correct = sum(label == prediction for label, prediction in zip(labels, predictions))
    vectors = {
        method: contrast_sums(contrast_set(method, labels, predictions), activations, layers).vectors()
        for method in METHODS
        if not missing_requirement(method, correct, len(labels) - correct)
    }
    extraction_seconds = time.perf_counter() - start

    configs = [SweepConfig(method, layer, strength) for method in vectors for layer in layers for strength in strengths]
    start = time.perf_counter()
    swept = evaluate_split(runner, validation, configs=configs, vectors=vectors, budget_bytes=budget)
    sweep_seconds = time.perf_counter() - start
    rows = sweep_rows(configs, swept.config_predictions, swept.labels)

    vectors_file = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
    torch.save({"vectors": vectors, "configs": configs, "predictions": swept.config_predictions,
                "train_predictions": predictions}, vectors_file)
    return {
        "extraction_seconds": extraction_seconds,
        "sweep_seconds": sweep_seconds,
        "configurations": len(configs),
        "train_accuracy": correct / len(labels),
        "validation_baseline_accuracy": float((swept.predictions == swept.labels).float().mean()),
        "chosen": select_best(rows),
        "model_footprint_bytes": footprint,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_rss_bytes": _max_rss_bytes(),
        "vectors_file": vectors_file,
    }


def run_reference(settings: dict, vectors_file: str) -> dict:
    import torch

    from pas_peft.extraction.reference import reference_sweep
    from pas_peft.extraction.scoring import ItemEncoder
    from pas_peft.extraction.selection import select_best, sweep_rows

    model, tokenizer, items = _setup(settings)
    footprint = _loaded_footprint()
    saved = torch.load(vectors_file, weights_only=False)
    encoder = ItemEncoder(tokenizer, settings["scoring"], seed=settings["seed"])
    train = [encoder.encode(item) for item in items[: settings["train_items"]]]
    validation = [encoder.encode(item) for item in items[settings["train_items"] :][: settings["validation_items"]]]
    layers = sorted({config.layer for config in saved["configs"]})

    start = time.perf_counter()
    labels, predictions, vectors = _reference_extraction(model, encoder, train, layers, settings["scoring"])
    extraction_seconds = time.perf_counter() - start

    configs = saved["configs"]
    timed = configs
    if settings["reference_configs"]:
        timed = random.Random(settings["seed"]).sample(configs, settings["reference_configs"])
    start = time.perf_counter()
    reference_predictions = reference_sweep(model, validation, timed, saved["vectors"])
    measured = time.perf_counter() - start
    sweep_seconds = measured * len(configs) / len(timed)

    columns = [configs.index(config) for config in timed]
    result = {
        "extraction_seconds": extraction_seconds,
        "sweep_seconds": sweep_seconds,
        "sweep_extrapolated": len(timed) < len(configs),
        "configurations_run": len(timed),
        "model_footprint_bytes": footprint,
        "peak_rss_bytes": _max_rss_bytes(),
        "same_train_predictions": predictions == saved["train_predictions"],
        "same_sweep_predictions": bool(torch.equal(reference_predictions, saved["predictions"][:, columns])),
        "max_vector_difference": max(
            float((vectors[method][layer] - saved["vectors"][method][layer]).abs().max())
            for method in saved["vectors"]
            for layer in layers
        ),
    }
    if len(timed) == len(configs):
        labels_tensor = torch.tensor([item.item.label for item in validation])
        result["chosen"] = select_best(sweep_rows(configs, reference_predictions, labels_tensor))
    return result


def _reference_extraction(model, encoder, train, layers, scoring):
    """Read activations with one full forward per training prompt (and per answered prompt), then average them."""
    import torch

    from pas_peft.extraction.methods import METHODS, contrast_set, missing_requirement
    from pas_peft.extraction.scoring import predict_from_logits

    device = model.get_input_embeddings().weight.device
    labels, predictions, prompt_reads, answer_reads = [], [], [], {}
    with torch.no_grad():
        for index, item in enumerate(train):
            row_logits, row_states = [], []
            for row in range(len(item.continuations)):
                tokens = item.prefix + item.continuations[row]
                output = model(input_ids=torch.tensor([tokens], device=device), output_hidden_states=True)
                positions = torch.tensor(item.scored_positions(row), device=device) + len(item.prefix)
                row_logits.append(output.logits[0].index_select(0, positions))
                row_states.append([state[0] for state in output.hidden_states])
            prediction = predict_from_logits(item, row_logits)[0]
            labels.append(item.item.label)
            predictions.append(prediction)
            position = len(item.prefix) + item.prompt_position
            prompt_reads.append({layer: row_states[0][layer + 1][position] for layer in layers})
            if scoring != "letter":
                for choice, states in enumerate(row_states):
                    answer_reads[(index, choice)] = {layer: states[layer + 1][-1] for layer in layers}
        if scoring == "letter":
            for index, item in enumerate(train):
                for choice in {labels[index], predictions[index]}:
                    tokens = encoder.encode_answered(item.item, choice)
                    output = model(input_ids=torch.tensor([tokens], device=device), output_hidden_states=True)
                    answer_reads[(index, choice)] = {layer: output.hidden_states[layer + 1][0, -1] for layer in layers}

    correct = sum(label == prediction for label, prediction in zip(labels, predictions))
    vectors = {}
    for method in METHODS:
        if missing_requirement(method, correct, len(labels) - correct):
            continue
        contrast = contrast_set(method, labels, predictions)
        vectors[method] = {
            layer: _mean(contrast.positive, layer, prompt_reads, answer_reads)
            - _mean(contrast.negative, layer, prompt_reads, answer_reads)
            for layer in layers
        }
    return labels, predictions, vectors


def _mean(keys, layer, prompt_reads, answer_reads):
    import torch

    reads = [prompt_reads[key[1]][layer] if key[0] == "prompt" else answer_reads[(key[1], key[2])][layer] for key in keys]
    return torch.stack(reads).double().mean(0).float()


def run_lora_sft(settings: dict) -> dict:
    """Time one epoch of LoRA SFT (rank 8 on the attention projections) on "prompt + correct answer" texts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from pas_peft.data import format_answered_prompt, format_letter_prompt

    model, tokenizer, items = _setup(settings)
    texts = []
    for item in items[: settings["train_items"]]:
        prompt = format_letter_prompt(item, seed=settings["seed"])
        texts.append(format_answered_prompt(prompt, item.label))
    dataset = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    from peft import get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    arguments = TrainingArguments(
        output_dir="/tmp/pas_peft_benchmark_lora", per_device_train_batch_size=8, num_train_epochs=1,
        learning_rate=2e-4, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    start = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": _max_rss_bytes()}


def run_fit_vs_floor(settings: dict) -> dict:
    import pas_peft
    from pas_peft.extraction.scoring import ItemEncoder

    model, tokenizer, items = _setup(settings)
    sizes = (settings["train_items"], settings["validation_items"], settings["test_items"])
    chosen = items[: sum(sizes)]
    splits = {
        "train": chosen[: sizes[0]],
        "validation": chosen[sizes[0] : sizes[0] + sizes[1]],
        "test": chosen[sizes[0] + sizes[1] :],
    }
    scoring = settings["fit_scoring"]

    # The floor: every token sequence the fit scores, in one batched forward pass with logits at the last token.
    encoder = ItemEncoder(tokenizer, scoring, seed=settings["seed"])
    sequences = [item_prefix + row for item in chosen for item_prefix, row in _sequences(encoder.encode(item))]
    start = time.perf_counter()
    _plain_forward(model, sequences, tokenizer.pad_token_id)
    floor_seconds = time.perf_counter() - start

    start = time.perf_counter()
    result = pas_peft.fit_pas(model, tokenizer, None, splits=splits, scoring=scoring, seed=settings["seed"], show_progress=False)
    fit_seconds = time.perf_counter() - start
    return {
        "scoring": scoring,
        "split_sizes": "/".join(str(size) for size in sizes),
        "floor_sequences": len(sequences),
        "floor_seconds": floor_seconds,
        "fit_seconds": fit_seconds,
        "ratio": fit_seconds / floor_seconds,
        "stage_seconds": result.report["wall_time_seconds"],
        "chosen": result.report["chosen"],
        "test_chosen": result.report["test"]["chosen"],
    }


def _sequences(encoded):
    return [(encoded.prefix, row) for row in encoded.continuations]


def _plain_forward(model, sequences, pad_token_id, batch_size: int = 16) -> None:
    from batch_size import run_batches

    run_batches(model, sequences, pad_token_id, batch_size)


# -- reporting ------------------------------------------------------------------------------------------------


def compare(ours: dict, reference: dict) -> dict:
    return {
        "sweep_speedup": reference["sweep_seconds"] / ours["sweep_seconds"],
        "extraction_speedup": reference["extraction_seconds"] / ours["extraction_seconds"],
        "total_speedup": (reference["sweep_seconds"] + reference["extraction_seconds"])
        / (ours["sweep_seconds"] + ours["extraction_seconds"]),
        "same_chosen_configuration": reference.get("chosen") == ours["chosen"] if "chosen" in reference else None,
        "same_sweep_predictions": reference["same_sweep_predictions"],
        "same_train_predictions": reference["same_train_predictions"],
        "max_vector_difference": reference["max_vector_difference"],
        "peak_memory_over_model": ours["peak_rss_bytes"] / ours["model_footprint_bytes"],
    }


def print_path(name: str, result: dict) -> None:
    extrapolated = " (extrapolated)" if result.get("sweep_extrapolated") else ""
    print(f"\n{name}: extraction {result['extraction_seconds']:.1f} s, sweep {result['sweep_seconds']:.1f} s{extrapolated}, "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB (after loading the model {result['model_footprint_bytes'] / 2**30:.2f} GiB)")


def print_comparison(comparison: dict) -> None:
    print(f"\nSweep speedup: {comparison['sweep_speedup']:.1f}x; extraction speedup: {comparison['extraction_speedup']:.1f}x; "
          f"extraction + sweep: {comparison['total_speedup']:.1f}x")
    print(f"Same sweep predictions: {comparison['same_sweep_predictions']}; same chosen configuration: "
          f"{comparison['same_chosen_configuration']}; same training answers: {comparison['same_train_predictions']}; "
          f"largest vector difference {comparison['max_vector_difference']:.2e}")
    print(f"pas_peft peak RSS / RSS after loading the model: {comparison['peak_memory_over_model']:.2f}")


def machine_description() -> str:
    import os

    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def _status_bytes(field: str) -> int:
    """Read a memory field (VmRSS, VmHWM) of this process from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loaded_footprint() -> int:
    """Return the resident memory now, and restart peak tracking so that loading spikes do not count."""
    footprint = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return footprint


def _max_rss_bytes() -> int:
    """Peak resident memory since the last `_loaded_footprint()` call (Linux), else since the start."""
    return _status_bytes("VmHWM")


if __name__ == "__main__":
    sys.exit(main())
