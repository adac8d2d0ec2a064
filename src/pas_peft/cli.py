"""The `pas-peft` command line: fit, eval and generate. Parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("pas_peft.cli")

DEFAULT_DATASET = "bbq_age"
# The embedded run is sized to finish in a few minutes on a 2-core CPU; `--full` uses the library defaults.
QUICK_MAX_SAMPLES = 150
QUICK_LAYER_COUNT = 5
QUICK_STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # PeftModel.__init__ of peft 0.21.2 reads transformers' deprecated `is_gradient_checkpointing`. The warning
    # is about peft's code, so a user of the command cannot act on it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"pas-peft {args.command}: error: {_command_line_wording(str(error))}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    """Parse an option value that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# The library's errors name its Python arguments; on the command line the same settings are options.
_PYTHON_TO_OPTIONS = (
    ("columns=ColumnMapping(question=..., choices=..., label=...)", "--question-column, --choices-column and --label-column"),
    ("schema=NAME", "--schema NAME"),
    ("schema='auto'", "--schema auto"),
    ("skip_invalid=True", "--skip-invalid"),
)


def _command_line_wording(message: str) -> str:
    for python, options in _PYTHON_TO_OPTIONS:
        message = message.replace(python, options)
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pas-peft",
        description="Painless Activation Steering: fit steering adapters from labeled multiple-choice data.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit(commands)
    _add_eval(commands)
    _add_generate(commands)
    _add_datasets(commands)
    _add_autoload(commands)
    return parser


# -- fit ---------------------------------------------------------------------------------------------------


def _add_fit(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="fit a PAS adapter on a dataset and write it with a report",
        description=(
            "Fit a PAS adapter. With no --model and no --data it runs a quick fit of the embedded "
            "SmolLM2-135M-Instruct on the bundled BBQ Age slice."
        ),
    )
    _add_model_options(fit)
    _add_data_options(fit)
    fit.add_argument("--output-dir", type=Path, default=None, help="directory for the adapter and report (default: runs/<dataset>-<scoring>)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    fit.add_argument("--scoring", choices=("likelihood", "likelihood_norm", "letter"), default="likelihood",
                     help="how the model's answer is read: answer-text log-likelihood (summed, or per UTF-8 byte with likelihood_norm) or the next-token letter (default: likelihood)")
    fit.add_argument("--methods", nargs="+", choices=("pasf", "ipas_all", "ipas_wrong_only"), default=None,
                     help="PAS methods to fit and compare (default: all three)")
    fit.add_argument("--layers", type=int, nargs="+", default=None,
                     help="candidate decoder layers for the sweep (default: 10 layers spread over 20-80%% of the depth; "
                          "5 in the quick run without --model and --data)")
    fit.add_argument("--strengths", type=float, nargs="+", default=None,
                     help="candidate strengths, raw multipliers of the vector (default: 0.25 0.5 1 4 7 10 13 16 19 22 25 32; "
                          "0.5 1 2 4 8 in the quick run)")
    fit.add_argument("--proportions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VALIDATION", "TEST"),
                     help="split fractions (default: 0.6 0.2 0.2)")
    fit.add_argument("--max-samples", type=_positive_int, default=None,
                     help="use at most this many items in total (default: all; 150 in the quick run)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the split and of the choice shuffle (default: 0)")
    fit.add_argument("--batch-size", type=_positive_int, default=None,
                     help="rows per forward pass (default: sized from a memory budget)")
    fit.add_argument("--vector-source", choices=("output", "input"), default="output",
                     help="read each layer's vector at its output (where it is added) or at its input, as the PAS reference code does")
    fit.add_argument("--full", action="store_true",
                     help="with the embedded defaults, run the full-size fit (all bundled items, library default grid)")
    fit.set_defaults(handler=_run_fit)


def _run_fit(args) -> int:
    from . import fit_pas, load_base_model
    from .data import load_items

    settings = {
        "scoring": args.scoring,
        "seed": args.seed,
        "proportions": tuple(args.proportions),
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "vector_source": args.vector_source,
        "use_chat_template": args.chat_template,
    }
    if args.methods:
        settings["methods"] = tuple(args.methods)
    if args.layers:
        settings["layers"] = tuple(args.layers)
    if args.strengths:
        settings["strengths"] = tuple(args.strengths)

    quick = args.model is None and args.data is None and not args.full
    data = args.data or DEFAULT_DATASET
    output_dir = args.output_dir or Path("runs") / f"{Path(str(data)).stem}-{args.scoring}"
    # The directory is checked before the model loads, because loading can take minutes. fit_pas checks it again.
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(
            f"Output directory {output_dir} exists and is not empty; pass --overwrite to replace it, or choose "
            "another --output-dir."
        )
    # The data is read before the model loads too, so that a bad file or column fails in seconds.
    loaded = load_items(
        data,
        schema=args.schema,
        columns=_column_mapping(args),
        target_behavior=args.target_behavior,
        skip_invalid=args.skip_invalid,
    )
    model, tokenizer = load_base_model(
        args.model, gguf_file=args.gguf_file, torch_dtype=args.dtype, device_map=_device_map(args.device_map)
    )
    if quick:
        _apply_quick_defaults(settings, model)

    result = fit_pas(
        model,
        tokenizer,
        loaded,
        output_dir=output_dir,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        **settings,
    )
    _print_fit_summary(result, output_dir)
    if quick:
        print(
            f"\nThis was the quick embedded run ({settings['max_samples']} items, "
            f"{_count(len(settings['layers']), 'layer')} x {_count(len(settings['strengths']), 'strength')}). "
            "For the full size run:\n"
            "  pas-peft fit --full --output-dir runs/bbq_age-full"
        )
    return 0


def _apply_quick_defaults(settings: dict, model) -> None:
    from .architectures import find_decoder_stack
    from .extraction import default_candidate_layers

    num_layers = find_decoder_stack(model).num_layers
    settings.setdefault("max_samples", None)
    if settings["max_samples"] is None:
        settings["max_samples"] = QUICK_MAX_SAMPLES
    settings.setdefault("layers", tuple(default_candidate_layers(num_layers, QUICK_LAYER_COUNT)))
    settings.setdefault("strengths", QUICK_STRENGTHS)


def _print_fit_summary(result, output_dir: Path) -> None:
    report = result.report
    chosen = report["chosen"]
    sizes = report["dataset"]["split_sizes"]
    print(f"\nDataset {report['dataset']['name']} ({report['dataset']['schema']}): "
          f"train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} items")
    print(f"Chosen on validation: {chosen['method']}, layer {chosen['layer']}, strength {chosen['strength']:g} "
          f"(validation accuracy {chosen['validation_accuracy']:.3f}, unsteered "
          f"{report['validation']['baseline']['value']:.3f})")
    print("\nTest split, each method at its best validation configuration:")
    print(f"  {'method':<16} {'layer':>5} {'strength':>8} {'unsteered':>18} {'steered':>18} {'w->r':>5} {'r->w':>5} {'McNemar p':>10}")
    for method, row in report["test"]["by_method"].items():
        print(
            f"  {method:<16} {row['layer']:>5} {row['strength']:>8g} {_interval(row['baseline']):>18} "
            f"{_interval(row['steered']):>18} {row['wrong_to_right']:>5} {row['right_to_wrong']:>5} {row['mcnemar_p_value']:>10.3g}"
        )
    for method, reason in report["skipped_methods"].items():
        print(f"  {method:<16} skipped: {reason}")
    if report["test"].get("unsteered_letter_shares"):
        print("\nAnswer letters on the test split (share of items):")
        print(f"  {'unsteered':<16} {_format_shares(report['test']['unsteered_letter_shares'])}")
        for method, row in report["test"]["by_method"].items():
            print(f"  {method:<16} {_format_shares(row['letter_shares'])}")
    total = sum(report["wall_time_seconds"].values())
    print(f"\nWall time {total:.0f} s; adapter and report written to {output_dir}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _format_shares(shares: dict) -> str:
    return ", ".join(f"{letter} {share:.2f}" for letter, share in shares.items())


def _interval(accuracy: dict) -> str:
    return f"{accuracy['value']:.3f} [{accuracy['low']:.2f}, {accuracy['high']:.2f}]"


# -- eval --------------------------------------------------------------------------------------------------


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a saved adapter on a dataset, unsteered versus steered",
        description="Score a saved PAS adapter. The base model is the one the adapter records.",
    )
    evaluate.add_argument("--adapter", type=Path, required=True, help="adapter directory written by `pas-peft fit`")
    _add_data_options(evaluate, default_help="default: the data the adapter was fitted on")
    evaluate.add_argument("--strength", type=float, default=None, help="override the adapter's strength")
    evaluate.add_argument("--scoring", choices=("likelihood", "likelihood_norm", "letter"), default=None,
                          help="override the scoring mode the adapter was fitted with")
    evaluate.add_argument("--split", choices=("test", "all"), default=None,
                          help="on the dataset the adapter was fitted on: its test split (the default there) or every item")
    evaluate.add_argument("--max-samples", type=_positive_int, default=None, help="score at most this many items")
    evaluate.add_argument("--batch-size", type=_positive_int, default=None, help="rows per forward pass")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=_run_eval)


def _check_adapter_directory(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(path)!r} not found; pass a directory written by `pas-peft fit --output-dir`"
        )
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no adapter_config.json, so it is not a saved adapter; pass a directory written by "
            "`pas-peft fit --output-dir`"
        )


def _run_eval(args) -> int:
    from . import AutoPASModelForCausalLM
    from .extraction.evaluate import evaluate_adapter

    _check_adapter_directory(args.adapter)
    model, tokenizer = AutoPASModelForCausalLM.from_pretrained(args.adapter)
    result = evaluate_adapter(
        model,
        tokenizer,
        args.data,
        strength=args.strength,
        scoring=args.scoring,
        use_chat_template=args.chat_template or None,
        split=args.split,
        max_samples=args.max_samples,
        schema=args.schema,
        columns=_column_mapping(args),
        target_behavior=args.target_behavior,
        skip_invalid=args.skip_invalid,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['dataset']} ({result['split']} items): {result['items']} items, layer {result['layer']}, "
          f"strength {result['strength']:g}, scoring {result['scoring']}")
    print(f"  unsteered {_interval(result['baseline'])}")
    print(f"  steered   {_interval(result['steered'])}")
    print(f"  {result['wrong_to_right']} wrong to right, {result['right_to_wrong']} right to wrong, "
          f"McNemar p = {result['mcnemar_p_value']:.3g}")
    return 0


# -- generate ----------------------------------------------------------------------------------------------


def _add_generate(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="chat with a saved adapter",
        description="Generate with a saved PAS adapter; without --prompt, read prompts from standard input.",
    )
    generate.add_argument("--adapter", type=Path, required=True, help="adapter directory written by `pas-peft fit`")
    generate.add_argument("--prompt", default=None, help="the user message (default: read lines from standard input)")
    generate.add_argument("--strength", type=float, default=None, help="override the adapter's strength")
    generate.add_argument("--positions", choices=("all", "last_prompt", "generated"), default=None,
                          help="override which tokens are steered")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    generate.add_argument("--no-chat-template", action="store_true",
                          help="send the prompt as plain text (fits use plain 'Question: ...\\nAnswer:' prompts unless fitted with --chat-template)")
    generate.add_argument("--compare", action="store_true", help="also print the unsteered answer")
    generate.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    from . import AutoPASModelForCausalLM

    _check_adapter_directory(args.adapter)
    model, tokenizer = AutoPASModelForCausalLM.from_pretrained(args.adapter)
    model.eval()
    if args.strength is not None:
        model.set_strength(args.strength)
    if args.positions is not None:
        _set_positions(model, args.positions)

    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        if not prompt.strip():
            continue
        print(f"steered: {_generate(model, tokenizer, prompt, args)}")
        if args.compare:
            with model.disable_adapter():
                print(f"unsteered: {_generate(model, tokenizer, prompt, args)}")
    return 0


def _set_positions(model, positions: str) -> None:
    from .layer import PASLayer

    name = model.active_adapter
    model.peft_config[name].positions = positions
    for module in model.modules():
        if isinstance(module, PASLayer) and name in module.positions:
            module.positions[name] = positions


def _generate(model, tokenizer, prompt: str, args) -> str:
    import torch

    plain = args.no_chat_template or not getattr(tokenizer, "chat_template", None)
    if plain:
        text = prompt
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    # The chat template writes its own special tokens; a plain prompt gets the tokenizer's (such as BOS).
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=plain)
    device = model.get_base_model().get_input_embeddings().weight.device
    with torch.no_grad():
        output = model.generate(
            **{key: value.to(device) for key, value in inputs.items()},
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# -- datasets ----------------------------------------------------------------------------------------------


def _add_datasets(commands) -> None:
    datasets = commands.add_parser("datasets", help="list the datasets bundled with pas_peft")
    datasets.set_defaults(handler=_run_datasets)


def _run_datasets(args) -> int:
    from .data import list_bundled_datasets

    datasets = list_bundled_datasets()
    name_width = max(len(dataset.name) for dataset in datasets)
    license_width = max(len(dataset.license) for dataset in datasets)
    for dataset in datasets:
        print(f"{dataset.name:<{name_width}}  {dataset.license:<{license_width}}  {dataset.description}")
    return 0


# -- autoload ----------------------------------------------------------------------------------------------


def _add_autoload(commands) -> None:
    autoload = commands.add_parser(
        "autoload",
        help="opt in (or out) to importing pas_peft automatically whenever peft is imported",
        description=(
            "Write or remove a .pth file in this environment's site-packages that imports pas_peft right after "
            "peft, so code that never imports pas_peft can still load PAS adapters. Off by default."
        ),
    )
    autoload.add_argument("action", choices=("enable", "disable", "status"), help="what to do")
    autoload.add_argument("--site-dir", type=Path, default=None, help="folder for the .pth file (default: site-packages)")
    autoload.set_defaults(handler=_run_autoload)


def _run_autoload(args) -> int:
    from .autoload import autoload_path, disable_autoload, enable_autoload

    if args.action == "enable":
        print(f"Enabled: {enable_autoload(args.site_dir)}")
    elif args.action == "disable":
        removed = disable_autoload(args.site_dir)
        print(f"Disabled: removed {removed}" if removed else "Already disabled.")
    else:
        path = autoload_path(args.site_dir)
        print(f"Enabled: {path}" if path else "Disabled.")
    return 0


# -- shared options ----------------------------------------------------------------------------------------


def _add_model_options(parser) -> None:
    parser.add_argument("--model", default=None, help="model id or directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, for GGUF checkpoints")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device-map", default=None, help="transformers device_map, for example 'auto'")
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and results only")


def _add_data_options(parser, default_help: str = "default: bbq_age") -> None:
    parser.add_argument("--data", default=None,
                        help=f"dataset: a .jsonl/.json/.csv file or a bundled name (see `pas-peft datasets`; {default_help})")
    parser.add_argument("--schema", default="auto", help="dataset layout, or 'auto' to detect it (default: auto)")
    parser.add_argument("--target-behavior", choices=("matching", "not_matching"), default=None,
                        help="A/B evaluation sets: which answer is the label")
    parser.add_argument("--question-column", default=None, help="column with the question (with --label-column, replaces detection)")
    parser.add_argument("--context-column", default=None, help="column with text shown before the question")
    parser.add_argument("--choices-column", nargs="+", default=None,
                        help="one column holding a list of choices (in a CSV, written as JSON), or one column per choice")
    parser.add_argument("--label-column", default=None, help="column with the correct choice (index, letter or answer text)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip rows that cannot be read as items (empty question, bad label) instead of stopping")
    if not any(action.dest == "quiet" for action in parser._actions):
        parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and results only")


def _device_map(value: Optional[str]):
    """Pass --device-map on, and give each process its own GPU when a launcher started several."""
    import os

    import torch

    if value is not None:
        return value
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and torch.cuda.is_available():
        # NOTE: not run here (no GPU on the development machine); torchrun sets LOCAL_RANK for each process.
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return None


def _column_mapping(args):
    if args.question_column is None and args.label_column is None:
        return None
    if args.question_column is None or args.label_column is None:
        raise ValueError("--question-column and --label-column go together; pass both, or neither to detect the layout.")
    from .data import ColumnMapping

    choices = args.choices_column
    if choices is not None and len(choices) == 1:
        choices = choices[0]
    elif choices is not None:
        choices = tuple(choices)
    return ColumnMapping(question=args.question_column, label=args.label_column, choices=choices, context=args.context_column)


if __name__ == "__main__":
    sys.exit(main())
