"""fit_pas under `accelerate launch` with 2 CPU processes (gloo) builds the single-process vectors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import pas_peft
from pas_peft.data import MultipleChoiceItem

SCRIPT = Path(__file__).parent / "scripts" / "distributed_fit.py"
WORDS = "A B C . Question Answer : which animal is the largest small red blue green fast slow a cat dog horse mouse whale ant".split()


def make_items(count: int, offset: int) -> list[dict]:
    animals = ["cat", "dog", "horse", "mouse", "whale", "ant"]
    rows = []
    for index in range(count):
        choices = [animals[(index + shift) % len(animals)] for shift in range(3)]
        adjective = ["largest", "small", "fast", "slow"][index % 4]
        rows.append(
            {
                "question": f"which animal is the {adjective} {choices[index % 3]}",
                "choices": choices,
                "label": (index + offset) % 3,
                "source_id": f"row {offset + index}",
            }
        )
    return rows


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_model")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: index + 2 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("items") / "splits.json"
    splits = {"train": make_items(11, 0), "validation": make_items(7, 100), "test": make_items(5, 200)}
    path.write_text(json.dumps(splits))
    return path


def single_process_fit(saved_model: Path, items_file: Path, scoring: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    splits = {
        name: [MultipleChoiceItem(**row) for row in rows] for name, rows in json.loads(items_file.read_text()).items()
    }
    return pas_peft.fit_pas(
        model, tokenizer, None, splits=splits, scoring=scoring, layers=(1, 2), strengths=(1.0, 4.0),
        show_progress=False, batch_size=3,
    )


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="the accelerate launcher is not installed")
@pytest.mark.parametrize("scoring", ["likelihood", "letter"])
def test_two_processes_match_one(saved_model, items_file, tmp_path, scoring):
    output = tmp_path / "vectors.pt"
    launcher = Path(sys.executable).with_name("accelerate")
    command = [
        # On a machine without GPUs, --multi_gpu starts torchrun-style workers that use the gloo backend.
        str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), str(saved_model), str(items_file), str(output), scoring,
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]

    launched = torch.load(output, weights_only=False)
    single = single_process_fit(saved_model, items_file, scoring)

    assert launched["processes"] == 2
    assert launched["vectors"].keys() == single.vectors.keys()
    for method, by_layer in single.vectors.items():
        for layer, vector in by_layer.items():
            torch.testing.assert_close(launched["vectors"][method][layer], vector, atol=1e-5, rtol=1e-5)
    assert launched["sweep"] == single.sweep
    assert launched["chosen"] == single.report["chosen"]


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun is not installed")
def test_cli_fit_under_torchrun_exits_cleanly(saved_model, items_file, tmp_path):
    rows = [row for split in json.loads(items_file.read_text()).values() for row in split]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({key: row[key] for key in ("question", "choices", "label")}) + "\n" for row in rows))
    output = tmp_path / "adapter"
    command = [
        str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "pas_peft.cli", "fit",
        "--model", str(saved_model), "--data", str(data), "--output-dir", str(output), "--layers", "1", "2",
        "--strengths", "1", "4", "--scoring", "letter", "--batch-size", "3", "--quiet",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr
    report = json.loads((output / "pas_report.json").read_text())
    assert report["processes"] == 2
    assert (output / "adapter_model.safetensors").is_file()
