"""Steering on every supported architecture, checked against a hand-written hook on an identical base model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import PretrainedConfig

import pas_peft
from conftest import (
    ARCHITECTURES,
    STEERED_LAYER,
    TinyCustomModel,
    decoder_layers,
    greedy_generate,
    make_model,
    position_mask,
    prompt_ids,
    reference_greedy,
    reference_steering,
    scaled_vector,
    steered_model,
)

MODES = ["all", "last_prompt", "generated"]
STRENGTH = 1.5
STEPS = 6


@pytest.fixture
def setup(architecture):
    """The architecture name, an untouched reference model and a steering vector sized to its hidden states."""
    reference = make_model(architecture)
    vector = scaled_vector(reference)
    return architecture, reference, vector


def steered_reference_logits(reference, architecture, delta, input_ids, **kwargs):
    layer = decoder_layers(reference, architecture)[STEERED_LAYER]
    with torch.no_grad(), reference_steering(layer, delta):
        return reference(input_ids, **kwargs).logits


def test_logits_match_hook(setup):
    architecture, reference, vector = setup
    model = steered_model(make_model(architecture), vector, STRENGTH)
    input_ids = prompt_ids()

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    expected = steered_reference_logits(reference, architecture, STRENGTH * vector, input_ids)
    with torch.no_grad():
        base_logits = reference(input_ids).logits

    assert not torch.allclose(expected, base_logits, atol=1e-3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_zero_vector_is_noop(setup):
    architecture, reference, _ = setup
    model = steered_model(make_model(architecture), strength=STRENGTH)
    input_ids = prompt_ids()

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        base_logits = reference(input_ids).logits

    assert torch.equal(logits, base_logits)


def test_disable_adapter_gives_base(setup):
    architecture, reference, vector = setup
    model = steered_model(make_model(architecture), vector, STRENGTH)
    input_ids = prompt_ids()

    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=input_ids).logits
        tokens, _ = greedy_generate(model, input_ids, STEPS)
    base_tokens, _ = reference_greedy(reference, input_ids, STEPS)
    with torch.no_grad():
        base_logits = reference(input_ids).logits

    assert torch.equal(logits, base_logits)
    assert torch.equal(tokens, base_tokens)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_matches_reference(setup, mode, use_cache):
    architecture, reference, vector = setup
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids()
    layer = decoder_layers(reference, architecture)[STEERED_LAYER]

    tokens, logits = greedy_generate(model, input_ids, STEPS, use_cache=use_cache)
    expected_tokens, expected_logits = reference_greedy(reference, input_ids, STEPS, layer, STRENGTH * vector, mode)
    _, base_logits = reference_greedy(reference, input_ids, STEPS)

    assert not torch.allclose(expected_logits, base_logits, atol=1e-3)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_modes_differ_in_reference(setup):
    # Guards the generate tests above: they only tell the modes apart if their references differ.
    architecture, reference, vector = setup
    layer = decoder_layers(reference, architecture)[STEERED_LAYER]
    logits = {
        mode: reference_greedy(reference, prompt_ids(), STEPS, layer, STRENGTH * vector, mode)[1] for mode in MODES
    }

    assert not torch.allclose(logits["all"], logits["last_prompt"], atol=1e-3)
    assert not torch.allclose(logits["all"], logits["generated"], atol=1e-3)
    assert not torch.allclose(logits["last_prompt"], logits["generated"], atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_rows_match_single(setup, mode):
    architecture, _, vector = setup
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    long_prompt = prompt_ids(7, seed=3)
    short_prompt = prompt_ids(4, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short_prompt], dim=1)
    input_ids = torch.cat([long_prompt, padded])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0

    tokens, logits = greedy_generate(model, input_ids, STEPS, attention_mask=attention_mask)
    long_tokens, long_logits = greedy_generate(model, long_prompt, STEPS)
    short_tokens, short_logits = greedy_generate(model, short_prompt, STEPS)

    assert torch.equal(tokens[0], long_tokens[0])
    assert torch.equal(tokens[1], short_tokens[0])
    torch.testing.assert_close(logits[0], long_logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], short_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("captured_before", [False, True], ids=["fresh", "captured_before_peft"])
def test_hidden_states_include_steering(setup, captured_before):
    architecture, reference, vector = setup
    base = make_model(architecture)
    input_ids = prompt_ids()
    if captured_before:
        # transformers installs its hidden-state capture hooks on the first such call and keeps them.
        with torch.no_grad():
            base(input_ids, output_hidden_states=True)
    model = steered_model(base, vector, STRENGTH)

    with torch.no_grad():
        hidden_states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        base_hidden_states = reference(input_ids, output_hidden_states=True).hidden_states

    # hidden_states[L + 1] is the output of decoder layer L, and the layers before it are not steered.
    expected = base_hidden_states[STEERED_LAYER + 1] + STRENGTH * vector
    torch.testing.assert_close(hidden_states[STEERED_LAYER + 1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(hidden_states[STEERED_LAYER], base_hidden_states[STEERED_LAYER])


def test_state_dict_keys_unchanged(setup):
    architecture, _, vector = setup
    base = make_model(architecture)
    keys_before = set(base.state_dict())
    model = steered_model(base, vector, STRENGTH)

    keys_after = set(model.get_base_model().state_dict())
    added = {f"{ARCHITECTURES[architecture][3]}.{STEERED_LAYER}.steering.pas_vector.default"}

    assert keys_after - keys_before == added
    assert keys_before - keys_after == set()


class NoLayersModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(hidden_size=16, num_hidden_layers=2)
        self.linear = nn.Linear(16, 16)

    def forward(self, hidden_states):
        return self.linear(hidden_states)


class BareModel(nn.Module):
    """No config and no layer list."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, hidden_states):
        return self.linear(hidden_states)


@pytest.mark.parametrize("model_class", [NoLayersModel, BareModel])
def test_unknown_model_raises(model_class):
    with pytest.raises(ValueError) as error:
        get_peft_model(model_class(), pas_peft.PASConfig(layers=[0]))

    assert f"decoder layers of {model_class.__name__}" in str(error.value)
    assert "layers_module" in str(error.value)


def test_custom_model_without_override_raises():
    with pytest.raises(ValueError, match="layers_module"):
        get_peft_model(TinyCustomModel(), pas_peft.PASConfig(layers=[1]))


def test_layers_module_override():
    torch.manual_seed(0)
    model = TinyCustomModel()
    reference = TinyCustomModel()
    reference.load_state_dict(model.state_dict())
    vector = torch.randn(16)
    input_ids = torch.tensor([[1, 5, 7, 9]])

    peft_model = get_peft_model(model, pas_peft.PASConfig(layers=[1], strength=2.0, layers_module="blocks"))
    peft_model.set_steering_vectors({1: vector})
    with torch.no_grad():
        output = peft_model(input_ids)
    with torch.no_grad(), reference_steering(reference.blocks[1], 2.0 * vector):
        expected = reference(input_ids)

    assert peft_model.peft_config["default"].target_modules == ["blocks.1"]
    torch.testing.assert_close(output, expected)


def test_layers_module_wrong_path_raises():
    with pytest.raises(ValueError, match="model.blocks"):
        get_peft_model(make_model(), pas_peft.PASConfig(layers=[1], layers_module="model.blocks"))


def test_layer_out_of_range_raises():
    with pytest.raises(ValueError) as error:
        get_peft_model(make_model(), pas_peft.PASConfig(layers=[3]))

    assert "Layer 3" in str(error.value)
    assert "0 to 2" in str(error.value)


def test_negative_layer_counts_from_end():
    model = get_peft_model(make_model(), pas_peft.PASConfig(layers=[-1]))

    assert model.peft_config["default"].target_modules == ["model.layers.2"]


def test_position_mask_helper():
    # The reference itself: `generated` includes the last prompt token.
    assert position_mask("generated", 5, 3).tolist() == [False, False, True, True, True]
    assert position_mask("last_prompt", 5, 3).tolist() == [False, False, True, False, False]
