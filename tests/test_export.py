"""Export of PAS adapters to llama.cpp control-vector GGUF files, read back with gguf.GGUFReader."""

import logging
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pas_peft import PASConfig, SteeringVectors
from pas_peft.export import export_control_vector
from pas_peft.stacking import attach_pas

gguf = pytest.importorskip("gguf")

HIDDEN = 32
NUM_LAYERS = 4


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


def random_vectors(layers, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(HIDDEN, generator=generator) for layer in layers}


def steered_model(layers=(1, 3), strength=2.5, **config_kwargs):
    model = get_peft_model(tiny_model(), PASConfig(layers=list(layers), strength=strength, **config_kwargs))
    vectors = random_vectors(layers)
    model.set_steering_vectors(vectors)
    return model, vectors


def read_file(path):
    """Return (architecture, fields by name, tensors by name) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field for name, field in reader.fields.items()}
    architecture = fields["general.architecture"].contents()
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    return architecture, fields, tensors


def test_export_writes_llama_cpp_layout(tmp_path):
    model, vectors = steered_model(layers=(1, 3), strength=2.5)

    path = export_control_vector(model, tmp_path / "steer.gguf")

    architecture, fields, tensors = read_file(path)
    assert architecture == "controlvector"
    assert fields["controlvector.layer_count"].contents() == 2
    assert fields["controlvector.layer_count"].types == [gguf.GGUFValueType.INT32]
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert sorted(tensors) == ["direction.1", "direction.3"]
    for layer, vector in vectors.items():
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN]
        # The strength is folded into the stored direction.
        np.testing.assert_allclose(np.asarray(tensor.data), 2.5 * vector.numpy(), rtol=0, atol=1e-6)


def test_export_file_follows_umask(tmp_path):
    model, _ = steered_model(layers=(1,), strength=1.0)
    previous = os.umask(0o022)
    try:
        path = export_control_vector(model, tmp_path / "steer.gguf")
    finally:
        os.umask(previous)

    assert path.stat().st_mode & 0o777 == 0o644


def test_export_from_directory_matches_model(tmp_path):
    model, vectors = steered_model(layers=(2,), strength=-1.5)
    model.save_pretrained(tmp_path / "adapter")

    path = export_control_vector(tmp_path / "adapter", tmp_path / "from_dir.gguf", model_hint="llama")

    _, fields, tensors = read_file(path)
    assert list(tensors) == ["direction.2"]
    assert fields["controlvector.model_hint"].contents() == "llama"
    np.testing.assert_allclose(np.asarray(tensors["direction.2"].data), -1.5 * vectors[2].numpy(), rtol=0, atol=1e-6)


def test_export_named_adapter_and_tuner(tmp_path):
    model, _ = steered_model(layers=(1,), strength=1.0)
    model.add_adapter("other", PASConfig(layers=[2], strength=3.0))
    other = random_vectors([2], seed=5)
    model.set_steering_vectors(other, adapter_name="other")

    path = export_control_vector(model.base_model, tmp_path / "other.gguf", adapter_name="other")

    _, _, tensors = read_file(path)
    assert list(tensors) == ["direction.2"]
    np.testing.assert_allclose(np.asarray(tensors["direction.2"].data), 3.0 * other[2].numpy(), rtol=0, atol=1e-6)


def test_export_combined_steering_vectors(tmp_path):
    model, vectors = steered_model(layers=(1, 2), strength=2.0)
    combined = -0.5 * SteeringVectors.from_model(model)

    path = export_control_vector(combined, tmp_path / "combined.gguf")

    _, _, tensors = read_file(path)
    for layer in (1, 2):
        np.testing.assert_allclose(
            np.asarray(tensors[f"direction.{layer}"].data), -1.0 * vectors[layer].numpy(), rtol=0, atol=1e-6
        )


def test_export_stack_uses_pas_vectors(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    stack = attach_pas(lora, PASConfig(layers=[3], strength=0.5))
    vector = random_vectors([3])[3]
    stack.pas_model.set_steering_vectors({3: vector})

    path = export_control_vector(stack, tmp_path / "stack.gguf")

    _, _, tensors = read_file(path)
    assert list(tensors) == ["direction.3"]
    np.testing.assert_allclose(np.asarray(tensors["direction.3"].data), 0.5 * vector.numpy(), rtol=0, atol=1e-6)


def test_export_layer_index_is_the_hidden_states_offset(tmp_path):
    """direction.L must be the vector added to the output of decoder layer L, which is hidden_states[L + 1]."""
    model, vectors = steered_model(layers=(2,), strength=1.0)
    input_ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        steered = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            plain = model(input_ids=input_ids, output_hidden_states=True).hidden_states

    path = export_control_vector(model, tmp_path / "offset.gguf")

    _, _, tensors = read_file(path)
    direction = torch.from_numpy(np.asarray(tensors["direction.2"].data).copy())
    torch.testing.assert_close(steered[3] - plain[3], direction.expand_as(plain[3]), rtol=0, atol=1e-5)
    torch.testing.assert_close(steered[2], plain[2], rtol=0, atol=0)


def test_export_rejects_non_residual_activation(tmp_path):
    model, _ = steered_model(layers=(1,), activation="mlp_output")

    with pytest.raises(ValueError, match="activation='mlp_output'"):
        export_control_vector(model, tmp_path / "mlp.gguf")
    assert not (tmp_path / "mlp.gguf").exists()


def test_export_rejects_layer_zero(tmp_path):
    model, _ = steered_model(layers=(0, 2))

    with pytest.raises(ValueError, match="layer 0"):
        export_control_vector(model, tmp_path / "zero.gguf")


@pytest.mark.parametrize("positions", ["last_prompt", "generated"])
def test_export_position_modes_need_opt_in(tmp_path, caplog, positions):
    model, vectors = steered_model(layers=(1,), positions=positions)

    with pytest.raises(ValueError, match="ignore_positions=True"):
        export_control_vector(model, tmp_path / "positions.gguf")

    with caplog.at_level(logging.WARNING, logger="pas_peft.export"):
        path = export_control_vector(model, tmp_path / "positions.gguf", ignore_positions=True)
    assert "every token" in caplog.text
    _, _, tensors = read_file(path)
    assert list(tensors) == ["direction.1"]


def test_export_refuses_to_overwrite(tmp_path):
    model, _ = steered_model(layers=(1,), strength=1.0)
    target = tmp_path / "steer.gguf"
    target.write_bytes(b"keep me")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_control_vector(model, target)
    assert target.read_bytes() == b"keep me"

    export_control_vector(model, target, overwrite=True)
    assert read_file(target)[0] == "controlvector"
    assert [path.name for path in tmp_path.iterdir()] == ["steer.gguf"]


def test_export_rejects_other_models(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))

    with pytest.raises(TypeError, match="PAS PeftModel"):
        export_control_vector(lora, tmp_path / "lora.gguf")


def test_export_rejects_lora_directory(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")

    with pytest.raises(ValueError, match="not a PAS adapter"):
        export_control_vector(tmp_path / "lora", tmp_path / "lora.gguf")


def test_exported_vector_reproduces_steering(tmp_path):
    """Adding the exported directions by hand to the unsteered model reproduces the adapter's logits."""
    model, _ = steered_model(layers=(1, 3), strength=2.0)
    input_ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits

    path = export_control_vector(model, tmp_path / "steer.gguf")
    _, _, tensors = read_file(path)
    directions = {
        int(name.split(".")[1]): torch.from_numpy(np.asarray(tensor.data).copy()) for name, tensor in tensors.items()
    }

    base = model.unload()
    handles = [
        base.model.layers[layer].register_forward_hook(lambda module, args, output, d=direction: output + d)
        for layer, direction in directions.items()
    ]
    try:
        with torch.no_grad():
            actual = base(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
