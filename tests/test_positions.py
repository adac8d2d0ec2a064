"""Position modes under every way `generate` runs, and in plain forward calls, against the no-cache reference."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import pas_peft
from conftest import (
    PAD_TOKEN_ID,
    STEERED_LAYER,
    decoder_layers,
    greedy_generate,
    make_model,
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
def reference(architecture):
    return make_model(architecture)


@pytest.fixture
def vector(reference):
    return scaled_vector(reference)


def reference_run(reference, architecture, vector, mode, input_ids, attention_mask=None, steps=STEPS):
    layer = decoder_layers(reference, architecture)[STEERED_LAYER]
    return reference_greedy(reference, input_ids, steps, layer, STRENGTH * vector, mode, attention_mask=attention_mask)


def left_padded_batch():
    """Three prompts of lengths 7, 4 and 5, left-padded to 7."""
    rows = [prompt_ids(7, seed=3)[0], prompt_ids(4, seed=4)[0], prompt_ids(5, seed=5)[0]]
    input_ids = torch.full((3, 7), PAD_TOKEN_ID)
    attention_mask = torch.zeros(3, 7, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, 7 - len(row):] = row
        attention_mask[index, 7 - len(row):] = 1
    return input_ids, attention_mask


def repetitive_prompt():
    """A prompt with repeated trigrams, so prompt-lookup decoding proposes candidates."""
    return torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])


# -- generate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_left_padded_batch(architecture, reference, vector, mode, use_cache):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids, attention_mask = left_padded_batch()

    tokens, logits = greedy_generate(model, input_ids, STEPS, attention_mask=attention_mask, use_cache=use_cache)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids, attention_mask)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [2, 3])
def test_chunked_prefill(architecture, reference, vector, mode, chunk_size):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(7)

    tokens, logits = greedy_generate(model, input_ids, STEPS, prefill_chunk_size=chunk_size)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_left_padded(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids, attention_mask = left_padded_batch()

    tokens, logits = greedy_generate(model, input_ids, STEPS, attention_mask=attention_mask, prefill_chunk_size=3)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids, attention_mask)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_lookup_decoding(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = repetitive_prompt()

    tokens, logits = greedy_generate(model, input_ids, 10, prompt_lookup_num_tokens=3)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids, steps=10)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_static_cache(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(7)

    tokens, logits = greedy_generate(model, input_ids, STEPS, cache_implementation="static")
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_assistant_model(architecture, reference, vector, mode):
    # Assisted decoding: an unsteered draft model proposes tokens, the steered model verifies several at once.
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(7)

    draft_model = make_model(architecture, seed=5)
    tokens, logits = greedy_generate(model, input_ids, STEPS, assistant_model=draft_model)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_prompt_lookup_reference_differs_by_mode(architecture, reference, vector):
    # Guards the prompt-lookup test: its reference must tell the modes apart on this prompt.
    logits = {
        mode: reference_run(reference, architecture, vector, mode, repetitive_prompt(), steps=10)[1] for mode in MODES
    }

    assert not torch.allclose(logits["all"], logits["last_prompt"], atol=1e-3)
    assert not torch.allclose(logits["last_prompt"], logits["generated"], atol=1e-3)


def peft_model_with_task_type(base, vector, mode):
    return steered_model(base, vector, STRENGTH, positions=mode)


def peft_model_without_task_type(base, vector, mode):
    model = get_peft_model(base, pas_peft.PASConfig(layers=[STEERED_LAYER], strength=STRENGTH, positions=mode))
    model.set_steering_vectors({STEERED_LAYER: vector})
    return model


def base_model_of_peft_model(base, vector, mode):
    return peft_model_with_task_type(base, vector, mode).get_base_model()


ENTRY_POINTS = {
    "causal_lm": peft_model_with_task_type,
    "no_task_type": peft_model_without_task_type,
    "base_model": base_model_of_peft_model,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_generate_entry_points(architecture, reference, vector, mode, entry_point):
    model = ENTRY_POINTS[entry_point](make_model(architecture), vector, mode)
    input_ids = prompt_ids(7)

    tokens, logits = greedy_generate(model, input_ids, STEPS)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, input_ids)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_entry_point_no_task_type_is_plain(architecture, vector):
    model = peft_model_without_task_type(make_model(architecture), vector, "all")

    assert type(model).__name__ == "PeftModel"


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_generate_positional_input_ids(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(7)

    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=STEPS, do_sample=False)
    expected_tokens, _ = reference_run(reference, architecture, vector, mode, input_ids)

    assert torch.equal(output[:, 7:], expected_tokens)


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_generate_inputs_embeds(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(7)
    embeddings = model.get_input_embeddings()(input_ids).detach()

    with torch.no_grad():
        output = model.generate(
            inputs_embeds=embeddings,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=STEPS,
            do_sample=False,
        )
    expected_tokens, _ = reference_run(reference, architecture, vector, mode, input_ids)

    # With only inputs_embeds, generate returns the new tokens alone.
    assert torch.equal(output, expected_tokens)


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_generate_without_inputs(architecture, reference, vector, mode):
    # generate starts from the beginning-of-sequence token (id 1) when given no prompt.
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)

    with torch.no_grad():
        output = model.generate(max_new_tokens=STEPS, do_sample=False)
    expected_tokens, _ = reference_run(reference, architecture, vector, mode, torch.tensor([[1]]))

    assert torch.equal(output[:, 1:], expected_tokens)


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_generate_twice_with_new_prompt(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    first, second = prompt_ids(9, seed=6), prompt_ids(5, seed=7)

    greedy_generate(model, first, STEPS)
    tokens, logits = greedy_generate(model, second, STEPS)
    expected_tokens, expected_logits = reference_run(reference, architecture, vector, mode, second)

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


# -- plain forward -------------------------------------------------------------------------------------


def reference_forward(reference, architecture, vector, input_ids, steered, attention_mask=None):
    """Logits of the reference model with the vector added where `steered` (batch, tokens) is true."""
    layer = decoder_layers(reference, architecture)[STEERED_LAYER]
    with torch.no_grad(), reference_steering(layer, STRENGTH * vector, lambda hidden: steered):
        return reference(input_ids, attention_mask=attention_mask).logits


def model_forward(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_forward_without_mask_steers_last(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(6, batch=2)
    steered = torch.tensor([[False] * 5 + [True]] * 2)

    logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, steered)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_forward_all_steers_every_token(architecture, reference, vector):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions="all")
    input_ids = prompt_ids(6, batch=2)

    logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, torch.ones(2, 6, dtype=torch.bool))

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def right_padded_batch():
    input_ids = prompt_ids(6, batch=2)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    input_ids[1, 3:] = PAD_TOKEN_ID
    return input_ids, attention_mask


def test_forward_mask_last_prompt(architecture, reference, vector):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions="last_prompt")
    input_ids, attention_mask = right_padded_batch()
    steered = torch.zeros(2, 6, dtype=torch.bool)
    steered[0, 5] = True
    steered[1, 2] = True

    logits = model_forward(model, input_ids, attention_mask)
    expected = reference_forward(reference, architecture, vector, input_ids, steered, attention_mask)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_forward_mask_generated(architecture, reference, vector):
    # Steers the last real token and everything after it. The padding after it is steered too, but attention
    # masks it out.
    model = steered_model(make_model(architecture), vector, STRENGTH, positions="generated")
    input_ids, attention_mask = right_padded_batch()
    steered = torch.zeros(2, 6, dtype=torch.bool)
    steered[0, 5:] = True
    steered[1, 2:] = True

    logits = model_forward(model, input_ids, attention_mask)
    expected = reference_forward(reference, architecture, vector, input_ids, steered, attention_mask)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_prompt_boundary_int(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(6, batch=2)
    steered = torch.zeros(2, 6, dtype=torch.bool)
    if mode == "last_prompt":
        steered[:, 2] = True
    else:
        steered[:, 2:] = True

    with model.prompt_boundary(3):
        logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, steered)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["last_prompt", "generated"])
def test_prompt_boundary_per_row(architecture, reference, vector, mode):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions=mode)
    input_ids = prompt_ids(6, batch=2)
    steered = torch.zeros(2, 6, dtype=torch.bool)
    if mode == "last_prompt":
        steered[0, 1] = True
        steered[1, 4] = True
    else:
        steered[0, 1:] = True
        steered[1, 4:] = True

    with model.prompt_boundary(torch.tensor([2, 5])):
        logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, steered)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_prompt_boundary_restored_after_block(architecture, reference, vector):
    model = steered_model(make_model(architecture), vector, STRENGTH, positions="last_prompt")
    input_ids = prompt_ids(6)
    steered = torch.tensor([[False] * 5 + [True]])

    with pytest.raises(RuntimeError), model.prompt_boundary(2):
        raise RuntimeError("inside the block")
    logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, steered)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [0, True, 2.5, torch.tensor([[2, 3]])], ids=["zero", "bool", "float", "2d"])
def test_prompt_boundary_invalid_raises(vector, lengths):
    model = steered_model(make_model(), vector, STRENGTH, positions="last_prompt")

    with pytest.raises(ValueError, match="prompt_lengths"), model.prompt_boundary(lengths):
        pass


def test_prompt_boundary_wrong_rows_raises(vector):
    model = steered_model(make_model(), vector, STRENGTH, positions="last_prompt")

    with pytest.raises(ValueError, match="one prompt length per row"), model.prompt_boundary(torch.tensor([2, 3, 4])):
        model_forward(model, prompt_ids(6, batch=2))


def test_forward_after_generate(architecture, reference, vector):
    # State recorded by generate must not leak into a later plain forward call.
    model = steered_model(make_model(architecture), vector, STRENGTH, positions="last_prompt")
    greedy_generate(model, prompt_ids(9, seed=6), STEPS)
    input_ids = prompt_ids(6)
    steered = torch.tensor([[False] * 5 + [True]])

    logits = model_forward(model, input_ids)
    expected = reference_forward(reference, architecture, vector, input_ids, steered)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
