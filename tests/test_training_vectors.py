"""Training PAS vectors as ordinary parameters with transformers' Trainer and trl's SFTTrainer."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from pas_peft import PASConfig
from pas_peft.stacking import attach_pas

HIDDEN = 32
VOCAB = 64
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in tall green trees".split()


def tiny_model(vocab_size=VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of a repeating pattern, so steering the residual stream can lower the loss."""

    def __init__(self, count=16, length=10):
        self.rows = [((torch.arange(length) * 5 + start) % (VOCAB - 3)) + 3 for start in range(count)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


def training_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=6,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed_parameters(before, model):
    return sorted(name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter))


def extracted_vector(model, layer):
    """A mean-difference vector from the residual stream, standing in for one made by extraction."""
    dataset = TokenDataset()
    first = torch.stack([dataset[i]["input_ids"] for i in range(0, 8)])
    second = torch.stack([dataset[i]["input_ids"] for i in range(8, 16)])
    with torch.no_grad():
        hidden_first = model(input_ids=first, output_hidden_states=True).hidden_states[layer + 1]
        hidden_second = model(input_ids=second, output_hidden_states=True).hidden_states[layer + 1]
    return hidden_first.mean(dim=(0, 1)) - hidden_second.mean(dim=(0, 1))


VECTOR_NAMES = [f"base_model.model.model.layers.{layer}.steering.pas_vector.default" for layer in (1, 2)]


def test_trainer_trains_only_vectors_from_extraction(tmp_path):
    base = tiny_model()
    initial = {layer: extracted_vector(base, layer) for layer in (1, 2)}
    model = get_peft_model(base, PASConfig(layers=[1, 2], strength=1.0, method="trained", task_type="CAUSAL_LM"))
    model.set_steering_vectors(initial)
    before = snapshot(model)

    trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert trainable == VECTOR_NAMES

    trainer = Trainer(model=model, args=training_args(tmp_path / "run"), train_dataset=TokenDataset())
    trainer.train()

    assert changed_parameters(before, model) == VECTOR_NAMES
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]

    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained = model.get_steering_vectors()
    for layer in (1, 2):
        assert not torch.equal(trained[layer], initial[layer])
        assert torch.equal(saved[f"base_model.model.model.layers.{layer}.steering.pas_vector"], trained[layer])

    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
    for layer, vector in reloaded.get_steering_vectors().items():
        assert torch.equal(vector, trained[layer])
    input_ids = TokenDataset()[3]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_trainer_trains_zero_initialised_vector(tmp_path):
    model = get_peft_model(tiny_model(), PASConfig(layers=[1], task_type="CAUSAL_LM"))
    assert torch.count_nonzero(model.get_steering_vectors()[1]) == 0
    before = snapshot(model)

    Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3), train_dataset=TokenDataset()).train()

    assert changed_parameters(before, model) == ["base_model.model.model.layers.1.steering.pas_vector.default"]
    assert torch.count_nonzero(model.get_steering_vectors()[1]) > 0


def test_trainer_with_gradient_checkpointing(tmp_path):
    model = get_peft_model(tiny_model(), PASConfig(layers=[1], task_type="CAUSAL_LM"))
    before = snapshot(model)

    args = training_args(tmp_path / "run", max_steps=2, activation_checkpointing=True)
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()

    assert changed_parameters(before, model) == ["base_model.model.model.layers.1.steering.pas_vector.default"]


def test_frozen_vector_does_not_train(tmp_path):
    model = get_peft_model(tiny_model(), PASConfig(layers=[1], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")

    assert not any(parameter.requires_grad for parameter in reloaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True)
    assert [name for name, p in trainable.named_parameters() if p.requires_grad] == [
        "base_model.model.model.layers.1.steering.pas_vector.default"
    ]


def test_trainer_trains_pas_on_top_of_lora(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    stack = attach_pas(
        PeftModel.from_pretrained(tiny_model(), tmp_path / "lora", adapter_name="sft"),
        PASConfig(layers=[1], task_type="CAUSAL_LM"),
    )
    before = snapshot(stack.model)

    Trainer(model=stack.pas_model, args=training_args(tmp_path / "run", max_steps=3), train_dataset=TokenDataset()).train()

    assert changed_parameters(before, stack.model) == ["model.layers.1.steering.pas_vector.steer"]

    stack.pas_model.save_pretrained(tmp_path / "pas")
    assert list(load_file(tmp_path / "pas" / "steer" / "adapter_model.safetensors")) == [
        "base_model.model.model.layers.1.steering.pas_vector"
    ]
    reloaded = attach_pas(
        PeftModel.from_pretrained(tiny_model(), tmp_path / "lora", adapter_name="sft"), tmp_path / "pas" / "steer"
    )
    input_ids = TokenDataset()[0]["input_ids"][None]
    stack.lora_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, stack(input_ids=input_ids).logits)


# -- trl -----------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, built here so the test needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocabulary = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def test_sft_trainer_with_pas_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    base = tiny_model(vocab_size=len(tokenizer))
    base_weights = {name: parameter.detach().clone() for name, parameter in base.named_parameters()}
    texts = [" ".join(WORDS[start:] + WORDS[:start]) for start in range(8)]

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        max_length=32,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=base,
        peft_config=PASConfig(layers=[1], strength=1.0),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.layers.1.steering.pas_vector.default"
    ]

    trainer.train()

    trained = model.get_steering_vectors()[1]
    assert torch.count_nonzero(trained) > 0
    for name, parameter in model.get_base_model().named_parameters():
        if "pas_vector" not in name:
            assert torch.equal(parameter, base_weights[name]), name

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_model(vocab_size=len(tokenizer)), tmp_path / "adapter")
    assert torch.equal(reloaded.get_steering_vectors()[1], trained)
    input_ids = tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
