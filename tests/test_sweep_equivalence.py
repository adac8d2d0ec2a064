"""The fast sweep gives exactly the predictions of the one-example-at-a-time reference loop."""

import pytest
import torch
import transformers

from pas_peft.data import MultipleChoiceItem
from pas_peft.extraction.engine import BatchRunner
from pas_peft.extraction.passes import SweepConfig, evaluate_split
from pas_peft.extraction.reference import reference_sweep
from pas_peft.extraction.scoring import EncodedItem

VOCAB = 96
HIDDEN = 64
LAYERS = 4

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(intermediate_size=128, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(intermediate_size=128, num_key_value_heads=2, sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=6)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=6)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2, pad_token_id=0)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(intermediate_size=128)),
}


def tiny_model(name: str) -> torch.nn.Module:
    config_class, model_class, extra = ARCHITECTURES[name]
    settings = {**COMMON, **extra}
    if name == "gpt2":
        settings = {key: value for key, value in settings.items() if key not in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    torch.manual_seed(0)
    return model_class(config_class(**settings)).eval()


def random_tokens(generator: torch.Generator, count: int) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=generator).tolist()


def letter_items(count: int, generator: torch.Generator) -> list[EncodedItem]:
    items = []
    for index in range(count):
        prompt = random_tokens(generator, int(torch.randint(4, 12, (1,), generator=generator)))
        letters = torch.randperm(VOCAB - 3, generator=generator)[:3].add(3).tolist()
        item = MultipleChoiceItem(f"q{index}", ("a", "b", "c"), label=index % 3, source_id=f"row {index}")
        items.append(
            EncodedItem(item, prompt[:-1], [prompt[-1:]], [-1], prompt_position=0, letter_token_ids=letters)
        )
    return items


def likelihood_items(count: int, generator: torch.Generator) -> list[EncodedItem]:
    items = []
    for index in range(count):
        context = random_tokens(generator, int(torch.randint(3, 10, (1,), generator=generator)))
        answers = [random_tokens(generator, length) for length in (1, 3, 2)]
        item = MultipleChoiceItem(f"q{index}", ("a", "b", "c"), label=index % 3, source_id=f"row {index}")
        items.append(
            EncodedItem(
                item,
                prefix=context[:-1],
                continuations=[context[-1:] + answer for answer in answers],
                choice_of_row=[0, 1, 2],
                prompt_position=0,
                answer_starts=[1, 1, 1],
                normalisers=[1.0, 3.0, 2.0],
            )
        )
    return items


def sweep_grid() -> tuple[list[SweepConfig], dict]:
    generator = torch.Generator().manual_seed(1)
    vectors = {
        method: {layer: torch.randn(HIDDEN, generator=generator) for layer in (0, 2, 3)}
        for method in ("pasf", "ipas_all")
    }
    configs = [
        SweepConfig(method, layer, strength)
        for method in vectors
        for layer in (0, 2, 3)
        for strength in (0.5, 2.0, 8.0)
    ]
    return configs, vectors


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("scoring", ["letter", "likelihood"])
def test_fast_sweep_matches_reference(architecture, scoring):
    model = tiny_model(architecture)
    generator = torch.Generator().manual_seed(7)
    encoded = letter_items(5, generator) if scoring == "letter" else likelihood_items(4, generator)
    configs, vectors = sweep_grid()

    fast = evaluate_split(BatchRunner(model), encoded, configs=configs, vectors=vectors, budget_bytes=2**30, batch_size=7)
    reference = reference_sweep(model, encoded, configs, vectors)

    assert torch.equal(fast.config_predictions, reference)


def test_steering_changes_some_predictions():
    # Guards the equivalence test against a sweep where steering does nothing on both sides.
    model = tiny_model("llama")
    encoded = letter_items(5, torch.Generator().manual_seed(7))
    configs, vectors = sweep_grid()

    fast = evaluate_split(BatchRunner(model), encoded, configs=configs, vectors=vectors, budget_bytes=2**30)

    changed = fast.config_predictions != fast.predictions[:, None]
    assert changed.any()


def test_reference_leaves_model_unchanged():
    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    encoded = letter_items(2, torch.Generator().manual_seed(3))
    configs, vectors = sweep_grid()

    reference_sweep(model, encoded, configs[:2], vectors)

    assert set(model.state_dict()) == set(before)
    assert not hasattr(model, "peft_config")


def test_batch_size_does_not_change_predictions():
    model = tiny_model("qwen2")
    encoded = likelihood_items(4, torch.Generator().manual_seed(5))
    configs, vectors = sweep_grid()

    one_row = evaluate_split(BatchRunner(model), encoded, configs=configs, vectors=vectors, budget_bytes=2**30, batch_size=1)
    many_rows = evaluate_split(BatchRunner(model), encoded, configs=configs, vectors=vectors, budget_bytes=2**30)

    assert torch.equal(one_row.config_predictions, many_rows.config_predictions)
    assert torch.equal(one_row.predictions, many_rows.predictions)


def test_sweep_under_device_map_dispatch(tmp_path):
    # Offloading one decoder layer to disk makes accelerate wrap the layers' forward methods with its hooks,
    # as a device_map split across GPUs does; the sweep must keep and restore those wrappers.
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
    }
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    wrapped_forward = dispatched.model.layers[1].__dict__.get("forward")
    encoded = likelihood_items(4, torch.Generator().manual_seed(7))
    configs, vectors = sweep_grid()

    expected = evaluate_split(BatchRunner(plain), encoded, configs=configs, vectors=vectors, budget_bytes=2**30)
    result = evaluate_split(BatchRunner(dispatched), encoded, configs=configs, vectors=vectors, budget_bytes=2**30)

    assert wrapped_forward is not None
    assert dispatched.model.layers[1].__dict__.get("forward") is wrapped_forward
    assert torch.equal(result.predictions, expected.predictions)
    assert torch.equal(result.config_predictions, expected.config_predictions)
