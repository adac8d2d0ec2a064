"""PASConfig validation and documentation."""

from __future__ import annotations

import dataclasses
import json

import numpy
import pytest
import torch
from peft import PeftType, get_peft_model

import pas_peft
from conftest import make_model


def test_defaults():
    config = pas_peft.PASConfig(layers=[1])

    assert config.peft_type == PeftType.PAS
    assert config.positions == "all"
    assert config.activation == "residual"
    assert config.strength == 1.0
    assert config.pas_peft_version == pas_peft.__version__


def test_int_layer_becomes_list():
    assert pas_peft.PASConfig(layers=2).layers == [2]


@pytest.mark.parametrize(
    ("field", "value"),
    [("positions", "first"), ("activation", "attention"), ("vector_source", "middle")],
)
def test_unknown_choice_raises(field, value):
    with pytest.raises(ValueError) as error:
        pas_peft.PASConfig(layers=[1], **{field: value})

    assert repr(value) in str(error.value)
    assert field in str(error.value)


def test_empty_layers_raises():
    with pytest.raises(ValueError, match="`layers` is empty"):
        pas_peft.PASConfig(layers=[])


def test_duplicate_layers_raises():
    with pytest.raises(ValueError, match=r"contains a layer twice: \[1, 2, 1\]"):
        pas_peft.PASConfig(layers=[1, 2, 1])


@pytest.mark.parametrize("layer", [1.0, "1", True, None], ids=["float", "string", "bool", "none"])
def test_non_integer_layer_raises(layer):
    with pytest.raises(ValueError, match="integer layer indices"):
        pas_peft.PASConfig(layers=[0, layer])


def test_empty_target_modules_raises():
    with pytest.raises(ValueError, match="`target_modules` is empty"):
        pas_peft.PASConfig(target_modules=[])


@pytest.mark.parametrize("layers", [[3], [-4], [0, 7]], ids=["3", "-4", "7"])
def test_out_of_range_raises_at_creation(layers):
    bad = [layer for layer in layers if not -3 <= layer < 3][0]

    with pytest.raises(ValueError) as error:
        get_peft_model(make_model(), pas_peft.PASConfig(layers=layers))

    assert f"Layer {bad} is out of range" in str(error.value)
    assert "0 to 2" in str(error.value)
    assert "-3 to -1" in str(error.value)


def test_same_layer_twice_after_resolving_raises():
    with pytest.raises(ValueError, match="same decoder layer twice"):
        get_peft_model(make_model(), pas_peft.PASConfig(layers=[2, -1]))


def test_missing_layers_raises():
    with pytest.raises(ValueError, match="needs `layers`"):
        get_peft_model(make_model(), pas_peft.PASConfig())


def test_unknown_target_module_raises():
    with pytest.raises(ValueError, match="not decoder layers"):
        get_peft_model(make_model(), pas_peft.PASConfig(target_modules=["model.layers.1.mlp"]))


@pytest.mark.parametrize(
    "strength",
    [float("nan"), float("inf"), float("-inf"), "strong", "2.5", None, True, [1.0]],
    ids=["nan", "inf", "-inf", "string", "numeric_string", "none", "bool", "list"],
)
def test_invalid_strength_raises(strength):
    with pytest.raises(ValueError, match="Invalid strength"):
        pas_peft.PASConfig(layers=[1], strength=strength)


@pytest.mark.parametrize("strength", [0, -3, 2.5], ids=["zero", "negative", "float"])
def test_valid_strength(strength):
    assert pas_peft.PASConfig(layers=[1], strength=strength).strength == strength


def test_tensor_strength_saved_as_float(tmp_path):
    config = pas_peft.PASConfig(layers=[1], strength=torch.tensor(2.5))
    config.save_pretrained(str(tmp_path))

    assert json.loads((tmp_path / "adapter_config.json").read_text())["strength"] == 2.5


def test_numpy_layers_saved_as_int(tmp_path):
    config = pas_peft.PASConfig(layers=[numpy.int64(1), numpy.int32(-1)])
    config.save_pretrained(str(tmp_path))

    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers"] == [1, -1]


def test_input_source_needs_residual():
    with pytest.raises(ValueError, match="vector_source='input'"):
        pas_peft.PASConfig(layers=[1], vector_source="input", activation="mlp_output")


def test_every_field_has_help():
    missing = [field.name for field in dataclasses.fields(pas_peft.PASConfig) if not field.metadata.get("help")]

    assert missing == []


def test_config_dict_round_trip(tmp_path):
    config = pas_peft.PASConfig(layers=[1], strength=2.5, positions="generated", activation="mlp_input")
    config.save_pretrained(str(tmp_path))

    loaded = pas_peft.PASConfig.from_pretrained(str(tmp_path))

    assert loaded.to_dict() == config.to_dict()


def test_loaded_invalid_config_raises(tmp_path):
    pas_peft.PASConfig(layers=[1]).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"all"', '"everything"'))

    with pytest.raises(ValueError, match="'everything'"):
        pas_peft.PASConfig.from_pretrained(str(tmp_path))


def test_docstring_example_runs():
    # The example in PASConfig's docstring prints parameter counts, which must stay true.
    import doctest

    import pas_peft.config

    finder = doctest.DocTestFinder()
    (test,) = [test for test in finder.find(pas_peft.config) if test.name.endswith(".PASConfig")]
    # The example sits in a Markdown code block, whose closing fence doctest would read as expected output.
    for example in test.examples:
        example.want = example.want.replace("```\n", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)

    assert runner.failures == 0
    assert test.examples
