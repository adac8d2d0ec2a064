"""The `pas-peft` command line, run in-process on a tiny model and a JSONL dataset saved to disk."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import pytest

import pas_peft
from pas_peft.cli import build_parser, main
from tiny import make_items, make_tiny_model, make_tokenizer, relabel, write_jsonl

OUTPUT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "pas_report.json", "sweep.csv", "sweep_heatmap.png"}
FIT_OPTIONS = ["--layers", "1", "2", "--strengths", "1", "4", "--max-samples", "30", "-q"]


def run_cli(argv) -> tuple[int, str, str]:
    """Run `pas-peft argv` in this process and return the exit code, standard output and standard error."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit:
            code = exit.code
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model with its tokenizer, a 40-item JSONL file, and one `pas-peft fit` run on them."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer()
    model_dir = root / "model"
    make_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    items = make_items(40)
    data = write_jsonl(root / "data.jsonl", relabel(items, [index % item.num_choices for index, item in enumerate(items)]))
    output_dir = root / "out"
    fit = run_cli(["fit", "--model", model_dir, "--data", data, "--output-dir", output_dir, *FIT_OPTIONS])
    return {"root": root, "model": model_dir, "data": data, "output": output_dir, "fit": fit}


def test_fit_succeeds(workspace):
    code, stdout, stderr = workspace["fit"]

    assert code == 0, stderr
    assert {path.name for path in workspace["output"].iterdir()} == OUTPUT_FILES
    assert "Chosen on validation" in stdout


def test_fit_uses_options(workspace):
    report = json.loads((workspace["output"] / "pas_report.json").read_text())

    assert sum(report["dataset"]["split_sizes"].values()) == 30
    assert report["settings"]["candidate_layers"] == [1, 2]
    assert report["settings"]["strengths"] == [1.0, 4.0]
    assert report["dataset"]["schema"] == "mcq"


def test_fit_letter_prints_answer_letters(workspace, tmp_path):
    code, stdout, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", tmp_path / "letter",
         "--scoring", "letter", *FIT_OPTIONS]
    )
    report = json.loads((tmp_path / "letter" / "pas_report.json").read_text())

    assert code == 0, stderr
    assert "Answer letters on the test split" in stdout
    unsteered = ", ".join(f"{letter} {share:.2f}" for letter, share in report["test"]["unsteered_letter_shares"].items())
    assert f"unsteered        {unsteered}" in stdout


def test_fit_likelihood_prints_no_letters(workspace):
    assert "Answer letters" not in workspace["fit"][1]


def test_fit_records_base_model(workspace):
    config = json.loads((workspace["output"] / "adapter_config.json").read_text())

    assert Path(config["base_model_name_or_path"]) == workspace["model"]


def test_fit_again_needs_overwrite(workspace, monkeypatch):
    before = (workspace["output"] / "pas_report.json").read_text()

    def unexpected_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(pas_peft, "load_base_model", unexpected_load)
    code, _, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", workspace["output"], *FIT_OPTIONS]
    )

    assert code == 2
    assert "--overwrite" in stderr
    assert "Traceback" not in stderr
    assert (workspace["output"] / "pas_report.json").read_text() == before


def test_fit_overwrite_replaces(workspace, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("previous run")

    code, _, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", output_dir, "--overwrite",
         "--methods", "pasf", *FIT_OPTIONS]
    )

    assert code == 0, stderr
    assert {path.name for path in output_dir.iterdir()} == OUTPUT_FILES


def test_fit_records_data_source(workspace):
    config = json.loads((workspace["output"] / "adapter_config.json").read_text())

    assert Path(config["fit_summary"]["dataset_source"]) == workspace["data"]


def test_eval_defaults_to_fitted_test_split(workspace):
    code, stdout, stderr = run_cli(["eval", "--adapter", workspace["output"], "--json", "-q"])
    report = json.loads((workspace["output"] / "pas_report.json").read_text())
    chosen = report["test"]["chosen"]

    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["split"] == "test"
    assert result["items"] == report["dataset"]["split_sizes"]["test"]
    assert result["baseline"] == chosen["baseline"]
    assert result["steered"] == chosen["steered"]


def test_eval_all_items_of_fitted_data(workspace):
    code, stdout, stderr = run_cli(["eval", "--adapter", workspace["output"], "--split", "all", "--json", "-q"])

    assert code == 0, stderr
    assert json.loads(stdout)["items"] == 40


def test_fit_writes_model_card(workspace):
    card = (workspace["output"] / "README.md").read_text()

    assert "import pas_peft" in card
    assert "library_name: peft" in card


def test_fit_skip_invalid_rows(workspace, tmp_path):
    rows = [json.loads(line) for line in workspace["data"].read_text().splitlines()]
    rows.insert(3, {"question": "", "choices": ["red", "blue"], "label": 0})
    data = tmp_path / "with_empty_row.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["fit", "--model", workspace["model"], "--data", data, *FIT_OPTIONS]

    code, _, stderr = run_cli([*common, "--output-dir", tmp_path / "strict"])
    assert code == 2
    assert "--skip-invalid" in stderr or "skip_invalid" in stderr
    assert not (tmp_path / "strict").exists()

    code, _, stderr = run_cli([*common, "--output-dir", tmp_path / "lenient", "--skip-invalid"])
    assert code == 0, stderr
    assert (tmp_path / "lenient" / "adapter_config.json").exists()


def test_eval_prints_accuracies(workspace):
    code, stdout, stderr = run_cli(["eval", "--adapter", workspace["output"], "--data", workspace["data"], "-q"])

    assert code == 0, stderr
    assert "(test items): 6 items" in stdout
    assert "unsteered" in stdout
    assert "steered " in stdout


def test_eval_json_output(workspace):
    code, stdout, stderr = run_cli(
        ["eval", "--adapter", workspace["output"], "--data", workspace["data"], "--max-samples", "5", "--json", "-q"]
    )

    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["items"] == 5
    assert result["baseline"]["total"] == 5


def test_generate_compare(workspace):
    code, stdout, stderr = run_cli(
        ["generate", "--adapter", workspace["output"], "--prompt", "Which word goes with red?", "--max-new-tokens", "3",
         "--compare"]
    )

    assert code == 0, stderr
    assert stdout.count("steered: ") == 2
    assert "unsteered: " in stdout


def test_datasets_lists_bundled(workspace):
    code, stdout, _ = run_cli(["datasets"])

    assert code == 0
    assert "bbq_age" in stdout
    assert "sycophancy_caa" in stdout


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", ["fit", "eval", "generate", "datasets"])
def test_help_explains_each_option(command, monkeypatch):
    # A wide terminal keeps argparse from wrapping the help text, which can split words at hyphens.
    monkeypatch.setenv("COLUMNS", "10000")
    code, stdout, _ = run_cli([command, "--help"])

    assert code == 0
    text = " ".join(stdout.split())
    for action in subcommands()[command]._actions:
        assert action.help, action.dest
        assert all(option in text for option in action.option_strings), action.dest
        assert " ".join(action.help.replace("%%", "%").split()) in text, action.dest


BAD_FIT_ARGUMENTS = {
    "unknown_question_column": (["--question-column", "prompt", "--label-column", "label"], "'prompt'"),
    "unknown_label_column": (["--question-column", "question", "--label-column", "gold"], "'gold'"),
    "one_column_option": (["--question-column", "question"], "--label-column"),
}


@pytest.mark.parametrize("case", list(BAD_FIT_ARGUMENTS))
def test_fit_bad_columns(workspace, tmp_path, case):
    extra, named = BAD_FIT_ARGUMENTS[case]
    output_dir = tmp_path / "out"

    code, _, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", output_dir, *extra, *FIT_OPTIONS]
    )

    assert code == 2
    assert "pas-peft fit: error: " in stderr
    assert named in stderr
    assert "Traceback" not in stderr
    assert not output_dir.exists()


def test_fit_bad_columns_lists_found(workspace, tmp_path):
    code, _, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", workspace["data"], "--output-dir", tmp_path / "out",
         "--question-column", "prompt", "--label-column", "label", *FIT_OPTIONS]
    )

    assert code == 2
    assert "['question', 'choices', 'label']" in stderr


def test_fit_missing_data_file(workspace, tmp_path):
    missing = tmp_path / "missing.jsonl"

    code, _, stderr = run_cli(
        ["fit", "--model", workspace["model"], "--data", missing, "--output-dir", tmp_path / "out", *FIT_OPTIONS]
    )

    assert code == 2
    assert f"data file {str(missing)!r} not found" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_missing_adapter_directory(tmp_path, command):
    missing = tmp_path / "nowhere"

    code, _, stderr = run_cli([command, "--adapter", missing])

    assert code == 2
    assert f"adapter directory {str(missing)!r} not found" in stderr
    assert "pas-peft fit --output-dir" in stderr
    assert "Traceback" not in stderr


def test_eval_directory_without_adapter(tmp_path):
    code, _, stderr = run_cli(["eval", "--adapter", tmp_path, "--data", "bbq_age"])

    assert code == 2
    assert "has no adapter_config.json" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("option", ["--max-samples", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_fit_rejects_non_positive_counts(workspace, tmp_path, option, value):
    code, _, stderr = run_cli(["fit", "--model", workspace["model"], "--output-dir", tmp_path / "out", option, value])

    assert code == 2
    assert option in stderr
    assert value in stderr
    assert not (tmp_path / "out").exists()


def test_fit_invalid_row_names_skip_option(workspace, tmp_path):
    data = tmp_path / "bad_row.jsonl"
    data.write_text('{"question": "Which?", "choices": ["a", "b"], "label": 7}\n')

    code, _, stderr = run_cli(["fit", "--model", workspace["model"], "--data", data, "--output-dir", tmp_path / "out", *FIT_OPTIONS])

    assert code == 2
    assert "--skip-invalid" in stderr
    assert "skip_invalid=True" not in stderr


def test_fit_undetected_schema_names_options(workspace, tmp_path):
    data = tmp_path / "odd.csv"
    data.write_text("prompt,options,gold\nWhich?,a,0\n")

    code, _, stderr = run_cli(["fit", "--model", workspace["model"], "--data", data, "--output-dir", tmp_path / "out", *FIT_OPTIONS])

    assert code == 2
    assert "--question-column, --choices-column and --label-column" in stderr
    assert "--schema NAME" in stderr
    assert "ColumnMapping" not in stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PAS_PEFT_SLOW_TESTS") != "1", reason="set PAS_PEFT_SLOW_TESTS=1 to run")
def test_quick_embedded_fit(tmp_path):
    output_dir = tmp_path / "quick"

    code, stdout, stderr = run_cli(
        ["fit", "--max-samples", "30", "--layers", "10", "--strengths", "1", "4", "--output-dir", output_dir, "-q"]
    )

    assert code == 0, stderr
    assert {path.name for path in output_dir.iterdir()} == OUTPUT_FILES
    report = json.loads((output_dir / "pas_report.json").read_text())
    assert report["dataset"]["name"] == "bbq_age"
    assert sum(report["dataset"]["split_sizes"].values()) == 30
    assert report["chosen"]["layer"] == 10
    assert "30 items, 1 layer x 2 strengths" in stdout
