"""Each steerable activation against a hand-written hook on the matching submodule."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import pas_peft
from conftest import (
    STEERED_LAYER,
    TinyCustomModel,
    decoder_layers,
    greedy_generate,
    make_model,
    prompt_ids,
    reference_greedy,
    reference_steering,
    scaled_vector,
    steered_model,
)

STRENGTH = 1.5

# Independent of pas_peft's own table: where each architecture keeps its attention and MLP blocks.
ATTENTION = {"gpt2": "attn", "gpt_neox": "attention"}
MLP = "mlp"

# activation: (submodule of the decoder layer or None for the layer itself, side of the hook)
ACTIVATIONS = {
    "residual": (None, "output"),
    "attention_output": ("attention", "output"),
    "mlp_output": ("mlp", "output"),
    "mlp_input": ("mlp", "input"),
}


def steered_submodule(model, architecture, activation):
    layer = decoder_layers(model, architecture)[STEERED_LAYER]
    child, side = ACTIVATIONS[activation]
    if child is None:
        return layer, side
    if child == "attention":
        return getattr(layer, ATTENTION.get(architecture, "self_attn")), side
    return getattr(layer, MLP), side


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_forward_matches_hook(architecture, activation):
    reference = make_model(architecture)
    vector = scaled_vector(reference)
    model = steered_model(make_model(architecture), vector, STRENGTH, activation=activation)
    input_ids = prompt_ids()
    module, side = steered_submodule(reference, architecture, activation)

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        base_logits = reference(input_ids).logits
        with reference_steering(module, STRENGTH * vector, side=side):
            expected = reference(input_ids).logits

    assert not torch.allclose(expected, base_logits, atol=1e-3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["attention_output", "mlp_output", "mlp_input"])
@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_generate_matches_reference(activation, mode):
    reference = make_model("llama")
    vector = scaled_vector(reference)
    model = steered_model(make_model("llama"), vector, STRENGTH, activation=activation, positions=mode)
    input_ids = prompt_ids()
    module, side = steered_submodule(reference, "llama", activation)

    tokens, logits = greedy_generate(model, input_ids, 6)
    expected_tokens, expected_logits = reference_greedy(
        reference, input_ids, 6, module, STRENGTH * vector, mode, side=side
    )

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_activation_steering_point_differs():
    # Guards the tests above: steering the MLP input must not equal steering its output.
    reference = make_model("llama")
    vector = scaled_vector(reference)
    input_ids = prompt_ids()
    mlp = decoder_layers(reference)[STEERED_LAYER].mlp

    with torch.no_grad():
        with reference_steering(mlp, STRENGTH * vector, side="input"):
            at_input = reference(input_ids).logits
        with reference_steering(mlp, STRENGTH * vector, side="output"):
            at_output = reference(input_ids).logits

    assert not torch.allclose(at_input, at_output, atol=1e-3)


def test_mixed_activations_on_one_layer_raise():
    model = steered_model(make_model(), activation="residual")

    with pytest.raises(ValueError, match="different activation"):
        model.add_adapter("mlp", pas_peft.PASConfig(layers=[STEERED_LAYER], activation="mlp_output"))


def test_missing_attention_block_raises():
    with pytest.raises(ValueError) as error:
        get_peft_model(
            TinyCustomModel(), pas_peft.PASConfig(layers=[1], layers_module="blocks", activation="attention_output")
        )

    assert "attention block of TinyBlock" in str(error.value)
    assert "activation='residual'" in str(error.value)
