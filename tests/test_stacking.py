"""PAS on top of a trained LoRA: both routes, checked against LoRA-only logits and a hand-written hook."""

import json
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftMixedModel, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import pas_peft
from pas_peft import PASConfig, PASLayer
from pas_peft.stacking import PASStack, attach_pas, merge_lora_and_attach_pas

HIDDEN = 32
VOCAB = 64
STEERED_LAYER = 1
STRENGTH = 2.0


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).state_dict()


@pytest.fixture
def make_base(base_state):
    def make():
        model = LlamaForCausalLM(tiny_config())
        model.load_state_dict(base_state)
        return model.eval()

    return make


@pytest.fixture(scope="module")
def lora_dir(base_state, tmp_path_factory):
    """A LoRA trained for a few steps with a plain torch loop, saved as adapter "default"."""
    torch.manual_seed(1)
    base = LlamaForCausalLM(tiny_config())
    base.load_state_dict(base_state)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # A repeating pattern, so the loss has something to learn.
    input_ids = (torch.arange(12).repeat(4, 1) * 3 + torch.arange(4)[:, None]) % VOCAB
    losses = []
    for _ in range(6):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    directory = tmp_path_factory.mktemp("sft_lora")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vector():
    torch.manual_seed(2)
    return torch.randn(HIDDEN)


@pytest.fixture
def input_ids():
    torch.manual_seed(3)
    return torch.randint(0, VOCAB, (2, 7))


def load_lora(make_base, lora_dir, adapter_name="sft"):
    return PeftModel.from_pretrained(make_base(), lora_dir, adapter_name=adapter_name).eval()


def make_stack(make_base, lora_dir, vector, positions="all", adapter_name="steer") -> PASStack:
    stack = attach_pas(
        load_lora(make_base, lora_dir),
        PASConfig(layers=[STEERED_LAYER], strength=STRENGTH, positions=positions),
        adapter_name=adapter_name,
    )
    stack.pas_model.set_steering_vectors({STEERED_LAYER: vector})
    return stack


def add_hook(model, vector, positions=None):
    """Add STRENGTH * vector to the output of the steered decoder layer; `positions` selects absolute indices."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        delta = torch.zeros_like(hidden)
        if positions is None:
            delta[:] = STRENGTH * vector
        else:
            for index in positions:
                delta[:, index] = STRENGTH * vector
        return (hidden + delta,) + tuple(output[1:]) if isinstance(output, tuple) else hidden + delta

    transformers_model = model.get_base_model() if isinstance(model, PeftModel) else model
    return transformers_model.model.layers[STEERED_LAYER].register_forward_hook(hook)


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits


@torch.no_grad()
def lora_only_logits(make_base, lora_dir, input_ids):
    return logits_of(load_lora(make_base, lora_dir), input_ids)


@torch.no_grad()
def reference_logits(make_base, lora_dir, vector, input_ids, with_lora=True):
    model = load_lora(make_base, lora_dir) if with_lora else make_base()
    handle = add_hook(model, vector)
    try:
        return logits_of(model, input_ids)
    finally:
        handle.remove()


# -- route: attach_pas ---------------------------------------------------------------------------------


def test_stack_forward_matches_lora_plus_hook(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)

    expected = reference_logits(make_base, lora_dir, vector, input_ids)
    lora_only = lora_only_logits(make_base, lora_dir, input_ids)
    base_only = logits_of(make_base(), input_ids)

    assert not torch.allclose(lora_only, base_only)
    assert not torch.allclose(expected, lora_only)
    torch.testing.assert_close(logits_of(stack, input_ids), expected, rtol=0, atol=1e-6)
    # Every entry point runs the same combined model.
    torch.testing.assert_close(logits_of(stack.lora_model, input_ids), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack.pas_model, input_ids), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack.model, input_ids), expected, rtol=0, atol=1e-6)


def test_stack_keeps_configs_apart(make_base, lora_dir, vector):
    stack = make_stack(make_base, lora_dir, vector)

    assert list(stack.lora_model.peft_config) == ["sft"]
    assert list(stack.pas_model.peft_config) == ["steer"]
    assert list(stack.model.peft_config) == ["sft"]
    assert "PASStack" in repr(stack)


def test_pas_disabled_leaves_lora_on(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)
    lora_only = lora_only_logits(make_base, lora_dir, input_ids)
    both = reference_logits(make_base, lora_dir, vector, input_ids)

    with stack.pas_disabled():
        torch.testing.assert_close(logits_of(stack, input_ids), lora_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack, input_ids), both, rtol=0, atol=1e-6)

    with stack.pas_model.disable_adapter():
        torch.testing.assert_close(logits_of(stack, input_ids), lora_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack, input_ids), both, rtol=0, atol=1e-6)


def test_lora_disabled_leaves_pas_on(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)
    pas_only = reference_logits(make_base, lora_dir, vector, input_ids, with_lora=False)
    both = reference_logits(make_base, lora_dir, vector, input_ids)

    with stack.lora_disabled():
        torch.testing.assert_close(logits_of(stack, input_ids), pas_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack, input_ids), both, rtol=0, atol=1e-6)

    with stack.lora_model.disable_adapter():
        torch.testing.assert_close(logits_of(stack, input_ids), pas_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(stack, input_ids), both, rtol=0, atol=1e-6)


def test_disabling_keeps_requires_grad(make_base, lora_dir, vector):
    stack = make_stack(make_base, lora_dir, vector)
    before = {name: p.requires_grad for name, p in stack.model.named_parameters()}

    with stack.lora_disabled(), stack.pas_disabled():
        pass

    after = {name: p.requires_grad for name, p in stack.model.named_parameters()}
    assert after == before
    # The LoRA was loaded for inference and PAS was created for training.
    assert not any(flag for name, flag in after.items() if "lora_" in name)
    assert after[f"model.layers.{STEERED_LAYER}.steering.pas_vector.steer"]


def test_freeze_lora(make_base, lora_dir, vector):
    lora = PeftModel.from_pretrained(make_base(), lora_dir, adapter_name="sft", is_trainable=True)
    stack = attach_pas(lora, PASConfig(layers=[STEERED_LAYER]))
    assert any(p.requires_grad for name, p in stack.model.named_parameters() if "lora_" in name)

    stack.freeze_lora()

    trainable = [name for name, p in stack.model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.layers.{STEERED_LAYER}.steering.pas_vector.steer"]


def greedy_reference(make_base, lora_dir, vector, prompt, new_tokens, positions):
    """Greedy decoding without a cache, recomputing the whole sequence, with the hook at absolute positions."""
    model = load_lora(make_base, lora_dir)
    prompt_length = prompt.shape[1]
    sequence = prompt
    for _ in range(new_tokens):
        length = sequence.shape[1]
        if positions == "all":
            steered = list(range(length))
        elif positions == "last_prompt":
            steered = [prompt_length - 1]
        else:
            steered = list(range(prompt_length - 1, length))
        handle = add_hook(model, vector, steered)
        try:
            with torch.no_grad():
                logits = model(input_ids=sequence).logits
        finally:
            handle.remove()
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    return sequence


@pytest.mark.parametrize("positions", ["all", "last_prompt", "generated"])
def test_stack_generate_honours_positions(make_base, lora_dir, input_ids, positions):
    # A larger vector, so that the position modes give different greedy tokens.
    torch.manual_seed(4)
    strong = 6.0 * torch.randn(HIDDEN)
    stack = make_stack(make_base, lora_dir, strong, positions=positions)
    prompt = input_ids[:1]

    expected = greedy_reference(make_base, lora_dir, strong, prompt, 6, positions)
    # An explicit mask, so that generate does not mistake a prompt token for padding.
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=VOCAB - 1)

    torch.testing.assert_close(stack.generate(input_ids=prompt, **settings), expected, rtol=0, atol=0)
    torch.testing.assert_close(stack.pas_model.generate(input_ids=prompt, **settings), expected, rtol=0, atol=0)
    torch.testing.assert_close(stack.model.generate(input_ids=prompt, **settings), expected, rtol=0, atol=0)


def test_generate_modes_differ(make_base, lora_dir, input_ids):
    torch.manual_seed(4)
    strong = 6.0 * torch.randn(HIDDEN)
    prompt = input_ids[:1]
    outputs = {
        positions: greedy_reference(make_base, lora_dir, strong, prompt, 6, positions)
        for positions in ("all", "last_prompt", "generated")
    }
    lora_only = greedy_reference(make_base, lora_dir, torch.zeros(HIDDEN), prompt, 6, "all")

    # Otherwise the generate test above could not tell the modes apart.
    assert len({tuple(sequence[0].tolist()) for sequence in outputs.values()} | {tuple(lora_only[0].tolist())}) >= 3


def test_stack_saves_to_separate_directories(make_base, lora_dir, vector, tmp_path):
    stack = make_stack(make_base, lora_dir, vector)

    stack.lora_model.save_pretrained(tmp_path / "lora")
    stack.pas_model.save_pretrained(tmp_path / "pas")

    # PEFT writes adapters not named "default" into a subfolder named after the adapter.
    lora_saved = load_file(tmp_path / "lora" / "sft" / "adapter_model.safetensors")
    lora_original = load_file(lora_dir / "adapter_model.safetensors")
    assert set(lora_saved) == set(lora_original)
    for key, value in lora_original.items():
        assert torch.equal(lora_saved[key], value), key
    assert not (tmp_path / "lora" / "steer").exists()

    pas_saved = load_file(tmp_path / "pas" / "steer" / "adapter_model.safetensors")
    assert list(pas_saved) == [f"base_model.model.model.layers.{STEERED_LAYER}.steering.pas_vector"]
    assert torch.equal(pas_saved[f"base_model.model.model.layers.{STEERED_LAYER}.steering.pas_vector"], vector)
    assert not (tmp_path / "pas" / "sft").exists()

    assert json.loads((tmp_path / "lora" / "sft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "pas" / "steer" / "adapter_config.json").read_text())["peft_type"] == "PAS"


def test_stack_reloads_onto_fresh_base(make_base, lora_dir, vector, input_ids, tmp_path):
    stack = make_stack(make_base, lora_dir, vector, positions="last_prompt")
    stack.lora_model.save_pretrained(tmp_path / "lora")
    stack.pas_model.save_pretrained(tmp_path / "pas")
    expected = logits_of(stack, input_ids)

    reloaded = attach_pas(load_lora(make_base, tmp_path / "lora" / "sft"), tmp_path / "pas" / "steer")

    torch.testing.assert_close(logits_of(reloaded, input_ids), expected, rtol=0, atol=0)
    assert reloaded.pas_model.peft_config["steer"].positions == "last_prompt"
    assert not any(p.requires_grad for p in reloaded.model.parameters())
    with reloaded.pas_disabled():
        torch.testing.assert_close(
            logits_of(reloaded, input_ids), lora_only_logits(make_base, lora_dir, input_ids), rtol=0, atol=0
        )


def test_stack_reload_is_trainable_on_request(make_base, lora_dir, vector, tmp_path):
    make_stack(make_base, lora_dir, vector).pas_model.save_pretrained(tmp_path / "pas")

    stack = attach_pas(load_lora(make_base, lora_dir), tmp_path / "pas" / "steer", is_trainable=True)

    trainable = [name for name, p in stack.model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.layers.{STEERED_LAYER}.steering.pas_vector.steer"]


def test_unload_pas_restores_lora_model(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)

    lora = stack.unload_pas()

    assert lora is stack.lora_model
    assert not any(isinstance(module, PASLayer) for module in lora.modules())
    assert "generate" not in lora.get_base_model().__dict__
    assert list(lora.get_base_model().peft_config) == ["sft"]
    lora_only = lora_only_logits(make_base, lora_dir, input_ids)
    torch.testing.assert_close(logits_of(lora, input_ids), lora_only, rtol=0, atol=0)
    # peft's own disable_adapter() works as before.
    with lora.disable_adapter():
        torch.testing.assert_close(logits_of(lora, input_ids), logits_of(make_base(), input_ids), rtol=0, atol=0)


def test_second_pas_adapter_through_stack(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)
    stack.pas_model.add_adapter("other", PASConfig(layers=[STEERED_LAYER], strength=STRENGTH))
    stack.pas_model.set_steering_vectors({STEERED_LAYER: vector}, adapter_name="other")

    pas_peft.set_active_adapters(stack.pas_model, ["steer", "other"])

    # Two identical adapters active add the vector twice.
    expected = reference_logits(make_base, lora_dir, 2 * vector, input_ids)
    torch.testing.assert_close(logits_of(stack, input_ids), expected, rtol=0, atol=1e-5)


# -- extraction on the stacked model --------------------------------------------------------------------


def test_stack_model_exposes_lora_activations(make_base, lora_dir, vector, input_ids):
    stack = make_stack(make_base, lora_dir, vector)
    lora = load_lora(make_base, lora_dir)

    with torch.no_grad(), stack.pas_disabled():
        stacked = stack.model(input_ids=input_ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        lora_hidden = lora(input_ids=input_ids, output_hidden_states=True).hidden_states
        base_hidden = make_base()(input_ids=input_ids, output_hidden_states=True).hidden_states

    for index in range(len(stacked)):
        torch.testing.assert_close(stacked[index], lora_hidden[index], rtol=0, atol=0)
    assert not torch.allclose(stacked[STEERED_LAYER + 1], base_hidden[STEERED_LAYER + 1])


def test_vector_extracted_on_stack_steers_stack(make_base, lora_dir, input_ids):
    stack = attach_pas(load_lora(make_base, lora_dir), PASConfig(layers=[STEERED_LAYER], strength=STRENGTH))
    positive, negative = input_ids[:1], input_ids[1:]

    # A mean-difference vector read from the LoRA-adapted residual stream at the steered layer's output.
    with torch.no_grad(), stack.pas_disabled():
        hidden_positive = stack.model(input_ids=positive, output_hidden_states=True).hidden_states[STEERED_LAYER + 1]
        hidden_negative = stack.model(input_ids=negative, output_hidden_states=True).hidden_states[STEERED_LAYER + 1]
    extracted = hidden_positive.mean(dim=(0, 1)) - hidden_negative.mean(dim=(0, 1))
    stack.pas_model.set_steering_vectors({STEERED_LAYER: extracted})

    with torch.no_grad():
        lora_hidden = load_lora(make_base, lora_dir)(input_ids=positive, output_hidden_states=True).hidden_states
    expected_vector = lora_hidden[STEERED_LAYER + 1].mean(dim=(0, 1)) - hidden_negative.mean(dim=(0, 1))
    torch.testing.assert_close(extracted, expected_vector, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logits_of(stack, input_ids), reference_logits(make_base, lora_dir, extracted, input_ids), rtol=0, atol=1e-5
    )


# -- route: merge, then PAS -----------------------------------------------------------------------------


def test_merged_route_matches_references(make_base, lora_dir, vector, input_ids):
    merged_pas = merge_lora_and_attach_pas(
        load_lora(make_base, lora_dir),
        PASConfig(layers=[STEERED_LAYER], strength=STRENGTH),
        vectors={STEERED_LAYER: vector},
    )

    both = reference_logits(make_base, lora_dir, vector, input_ids)
    lora_only = lora_only_logits(make_base, lora_dir, input_ids)

    # Merging changes the floating-point summation order, hence the tolerance.
    torch.testing.assert_close(logits_of(merged_pas, input_ids), both, rtol=0, atol=1e-4)
    with merged_pas.disable_adapter():
        torch.testing.assert_close(logits_of(merged_pas, input_ids), lora_only, rtol=0, atol=1e-4)
    assert not any("lora_" in name for name, _ in merged_pas.named_parameters())


def test_merged_route_loads_saved_adapter(make_base, lora_dir, vector, input_ids, tmp_path):
    make_stack(make_base, lora_dir, vector).pas_model.save_pretrained(tmp_path / "pas")

    merged_pas = merge_lora_and_attach_pas(load_lora(make_base, lora_dir), tmp_path / "pas" / "steer")

    both = reference_logits(make_base, lora_dir, vector, input_ids)
    torch.testing.assert_close(logits_of(merged_pas, input_ids), both, rtol=0, atol=1e-4)


# -- routes that cannot work ----------------------------------------------------------------------------


def test_attach_rejects_plain_model(make_base):
    with pytest.raises(TypeError, match="get_peft_model"):
        attach_pas(make_base(), PASConfig(layers=[1]))


def test_attach_rejects_mixed_model(make_base):
    mixed = PeftMixedModel(make_base(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="sft")

    with pytest.raises(ValueError, match="PeftMixedModel cannot hold PAS") as error:
        attach_pas(mixed, PASConfig(layers=[1]))
    assert "merge_lora_and_attach_pas" in str(error.value)


def test_attach_rejects_pas_model(make_base):
    pas_model = get_peft_model(make_base(), PASConfig(layers=[1]))

    with pytest.raises(ValueError, match="contains PAS adapters, not LoRA"):
        attach_pas(pas_model, PASConfig(layers=[2]))


def test_attach_rejects_other_adapter_types(make_base):
    ia3 = get_peft_model(make_base(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))

    with pytest.raises(ValueError, match="supports LoRA PeftModels.*IA3"):
        attach_pas(ia3, PASConfig(layers=[1]))


def test_attach_twice_is_rejected(make_base, lora_dir, vector):
    stack = make_stack(make_base, lora_dir, vector)

    with pytest.raises(ValueError, match="already has PAS adapters"):
        attach_pas(stack.lora_model, PASConfig(layers=[2]), adapter_name="again")


def test_attach_rejects_lora_directory_as_pas(make_base, lora_dir):
    lora = load_lora(make_base, lora_dir)

    with pytest.raises(ValueError, match="not a PAS adapter"):
        attach_pas(lora, lora_dir)
    # The failed attach leaves the LoRA model as it was.
    assert list(lora.get_base_model().peft_config) == ["sft"]
    assert not any(isinstance(module, PASLayer) for module in lora.modules())


def test_attach_rejects_wrong_pas_argument(make_base, lora_dir):
    with pytest.raises(TypeError, match="PASConfig or the path"):
        attach_pas(load_lora(make_base, lora_dir), 3)


def test_attach_rejects_bad_layer_and_leaves_lora_intact(make_base, lora_dir, input_ids):
    lora = load_lora(make_base, lora_dir)

    with pytest.raises(ValueError, match="out of range"):
        attach_pas(lora, PASConfig(layers=[7]))

    assert list(lora.get_base_model().peft_config) == ["sft"]
    torch.testing.assert_close(
        logits_of(lora, input_ids), lora_only_logits(make_base, lora_dir, input_ids), rtol=0, atol=0
    )


def test_peft_rejects_pas_in_lora_model(make_base, lora_dir):
    """One PeftModel cannot hold both types; attach_pas is the route to use instead."""
    lora = load_lora(make_base, lora_dir)

    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        lora.add_adapter("steer", PASConfig(layers=[1]))
    assert list(lora.peft_config) == ["sft"]


def test_attach_emits_no_shared_config_warning(make_base, lora_dir):
    lora = load_lora(make_base, lora_dir)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_pas(lora, PASConfig(layers=[1]))

    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "peft_config" in message or "second time" in message], messages


def test_attach_with_vectors(make_base, lora_dir, vector, input_ids):
    stack = attach_pas(
        load_lora(make_base, lora_dir),
        PASConfig(layers=[STEERED_LAYER], strength=STRENGTH),
        vectors={STEERED_LAYER: vector},
    )

    expected = reference_logits(make_base, lora_dir, vector, input_ids)
    torch.testing.assert_close(logits_of(stack, input_ids), expected, rtol=0, atol=1e-6)


def test_attach_with_wrong_vectors_leaves_lora_intact(make_base, lora_dir, vector, input_ids):
    lora = load_lora(make_base, lora_dir)

    with pytest.raises(ValueError, match="steers layers"):
        attach_pas(lora, PASConfig(layers=[STEERED_LAYER]), vectors={2: vector})

    assert not any(isinstance(module, PASLayer) for module in lora.modules())
    assert list(lora.get_base_model().peft_config) == ["sft"]
    torch.testing.assert_close(
        logits_of(lora, input_ids), lora_only_logits(make_base, lora_dir, input_ids), rtol=0, atol=0
    )


def test_merged_route_rejects_wrong_pas_argument(make_base, lora_dir):
    lora = load_lora(make_base, lora_dir)

    with pytest.raises(TypeError, match="PASConfig or the path"):
        merge_lora_and_attach_pas(lora, 3)
    # Nothing was merged.
    assert any("lora_" in name for name, _ in lora.named_parameters())


def test_get_peft_model_on_lora_model_raises(make_base, lora_dir):
    lora_model = PeftModel.from_pretrained(make_base(), lora_dir)
    with pytest.raises(ValueError, match="attach_pas"):
        get_peft_model(lora_model, PASConfig(layers=[1]))
    assert not any(isinstance(module, PASLayer) for module in lora_model.modules())
