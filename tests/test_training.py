"""Training PAS vectors with transformers' Trainer, and steering in bf16."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

import pas_peft
from conftest import STEERED_LAYER, VOCAB_SIZE, decoder_layers, make_model, make_vector, prompt_ids, reference_steering

LAYERS = [1, 2]
STEPS = 5


def tiny_dataset(size: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    # A fixed pattern gives the vectors something to learn.
    ids = torch.randint(3, VOCAB_SIZE, (size, length), generator=generator)
    ids[:, 1::2] = 7
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def train(output_dir, checkpointing: bool):
    """Train for a few steps; return the model, the logged losses and how often the MLP of layer 1 ran."""
    model = get_peft_model(make_model(), pas_peft.PASConfig(layers=LAYERS, task_type="CAUSAL_LM"))
    forward_calls = []
    mlp = decoder_layers(model.get_base_model())[1].mlp
    mlp_forward = mlp.forward

    def counting_forward(*args, **kwargs):
        forward_calls.append(1)
        return mlp_forward(*args, **kwargs)

    # Counted in `forward` itself, because forward hooks on the MLP did not fire again during the recompute
    # (torch 2.13, transformers 5.25).
    mlp.forward = counting_forward
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        # The current name of `gradient_checkpointing`, which transformers 5.25 keeps as a deprecated alias.
        activation_checkpointing=checkpointing,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=tiny_dataset(), data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(str(output_dir / "adapter"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses, len(forward_calls)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train")
    model, losses, forward_calls = train(output_dir, checkpointing=False)
    return model, losses, output_dir / "adapter", forward_calls


@pytest.fixture(scope="module")
def trained_checkpointing(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train_checkpointing")
    model, losses, forward_calls = train(output_dir, checkpointing=True)
    return model, losses, output_dir / "adapter", forward_calls


def test_training_changes_vectors(trained):
    model, _, _, _ = trained
    vectors = model.get_steering_vectors()

    assert sorted(vectors) == LAYERS
    for vector in vectors.values():
        assert vector.abs().sum() > 0


def test_training_keeps_base_weights(trained):
    model, _, _, _ = trained
    untouched = make_model().state_dict()
    trained_weights = {
        name: value for name, value in model.get_base_model().state_dict().items() if "pas_vector" not in name
    }

    assert sorted(trained_weights) == sorted(untouched)
    changed = [name for name, value in untouched.items() if not torch.equal(value, trained_weights[name])]
    assert changed == []


def test_training_lowers_loss(trained):
    _, losses, _, _ = trained

    assert len(losses) == STEPS
    assert losses[-1] < losses[0]


def test_training_keeps_fp32(trained):
    model, _, _, _ = trained
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters() if "pas_vector" in name}

    assert len(dtypes) == len(LAYERS)
    assert set(dtypes.values()) == {torch.float32}


def test_trained_adapter_reloads(trained):
    model, _, adapter_dir, _ = trained
    loaded = PeftModel.from_pretrained(make_model(), str(adapter_dir))

    trained_vectors = model.get_steering_vectors()
    for index, vector in loaded.get_steering_vectors().items():
        assert torch.equal(vector, trained_vectors[index])


def test_trained_adapter_matches_hook(trained):
    model, _, adapter_dir, _ = trained
    loaded = PeftModel.from_pretrained(make_model(), str(adapter_dir))
    vectors = model.get_steering_vectors()
    reference = make_model()
    layers = decoder_layers(reference)

    with torch.no_grad(), reference_steering(layers[1], vectors[1]), reference_steering(layers[2], vectors[2]):
        expected = reference(prompt_ids()).logits
    with torch.no_grad():
        logits = loaded(input_ids=prompt_ids()).logits

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_checkpointing_recomputes_layers(trained, trained_checkpointing):
    # Guards the comparisons below: with checkpointing on, backward runs each layer's forward again.
    assert trained[3] == STEPS
    assert trained_checkpointing[3] == 2 * STEPS


def test_checkpointing_same_losses(trained, trained_checkpointing):
    _, losses, _, _ = trained
    _, checkpointed_losses, _, _ = trained_checkpointing

    assert checkpointed_losses == pytest.approx(losses, rel=1e-6)


def test_checkpointing_same_vectors(trained, trained_checkpointing):
    vectors = trained[0].get_steering_vectors()
    checkpointed = trained_checkpointing[0].get_steering_vectors()

    for index in LAYERS:
        torch.testing.assert_close(checkpointed[index], vectors[index], rtol=1e-5, atol=1e-6)


def test_checkpointing_keeps_base_weights(trained_checkpointing):
    model, _, _, _ = trained_checkpointing
    untouched = make_model().state_dict()
    weights = model.get_base_model().state_dict()

    changed = [name for name, value in untouched.items() if not torch.equal(value, weights[name])]
    assert changed == []


def test_vector_gradient_is_hidden_state_gradient():
    # For residual steering at every position, d loss / d vector = strength * sum of d loss / d output of the layer.
    model = get_peft_model(make_model(), pas_peft.PASConfig(layers=[STEERED_LAYER], strength=2.0))
    reference = make_model()
    input_ids = prompt_ids()
    captured = {}

    def keep_output(_module, _args, output):
        output.retain_grad()
        captured["output"] = output

    model(input_ids=input_ids, labels=input_ids).loss.backward()
    handle = decoder_layers(reference)[STEERED_LAYER].register_forward_hook(keep_output)
    reference(input_ids=input_ids, labels=input_ids).loss.backward()
    handle.remove()

    gradient = model.get_base_model().model.layers[STEERED_LAYER].steering.pas_vector["default"].grad
    torch.testing.assert_close(gradient, 2.0 * captured["output"].grad.sum(dim=(0, 1)), rtol=1e-4, atol=1e-7)


# -- bf16 ----------------------------------------------------------------------------------------------


@pytest.fixture
def bf16_steered():
    vector = make_vector(scale=0.05)
    model = get_peft_model(
        make_model(dtype=torch.bfloat16),
        pas_peft.PASConfig(layers=[STEERED_LAYER], strength=1.5, task_type="CAUSAL_LM"),
    )
    model.set_steering_vectors({STEERED_LAYER: vector})
    return model, vector


def test_bf16_vector_stays_fp32(bf16_steered):
    model, _ = bf16_steered
    parameter = model.get_base_model().model.layers[STEERED_LAYER].steering.pas_vector["default"]

    assert parameter.dtype == torch.float32


def test_bf16_logits_match_hook(bf16_steered):
    model, vector = bf16_steered
    reference = make_model(dtype=torch.bfloat16)

    with torch.no_grad():
        logits = model(input_ids=prompt_ids()).logits
        # The reference adds the fp32 product cast to bf16, which is what PASLayer documents.
        with reference_steering(decoder_layers(reference)[STEERED_LAYER], (1.5 * vector).to(torch.bfloat16)):
            expected = reference(prompt_ids()).logits

    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_bf16_generate(bf16_steered):
    model, _ = bf16_steered

    with torch.no_grad():
        output = model.generate(input_ids=prompt_ids(), max_new_tokens=4, do_sample=False)

    assert output.shape == (1, 11)


def test_bf16_backward_gives_fp32_gradient(bf16_steered):
    model, _ = bf16_steered
    model.train()

    model(input_ids=prompt_ids(), labels=prompt_ids()).loss.backward()
    gradient = model.get_base_model().model.layers[STEERED_LAYER].steering.pas_vector["default"].grad

    assert gradient.dtype == torch.float32
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0
