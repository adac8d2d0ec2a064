"""PEFT adapter behaviours of PAS: named adapters, combining vectors, strength control, disable, merge, unload."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import PeftModel, get_peft_model

import pas_peft
from conftest import (
    HIDDEN_SIZE,
    decoder_layers,
    greedy_generate,
    make_model,
    make_vector,
    prompt_ids,
    reference_greedy,
    reference_steering,
)

INPUT_IDS = prompt_ids()


def logits_of(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def reference_logits(steering: dict[int, torch.Tensor], input_ids=INPUT_IDS, **model_overrides):
    """Logits of an untouched tiny Llama with `delta` added by hand to the output of each layer in `steering`."""
    reference = make_model("llama", **model_overrides)
    layers = decoder_layers(reference)
    with contextlib.ExitStack() as stack:
        for index, delta in steering.items():
            stack.enter_context(reference_steering(layers[index], delta))
        return logits_of(reference, input_ids)


def pas_config(layers, strength=1.0, **kwargs):
    return pas_peft.PASConfig(layers=layers, strength=strength, task_type="CAUSAL_LM", **kwargs)


# Vectors scaled to the size of the tiny Llama's hidden states, so each one changes the logits.
VA, VB, VC = (make_vector(seed, scale=0.05) for seed in (11, 12, 13))


@pytest.fixture
def two_adapters():
    """Adapter "calm" on layer 1 (strength 1.5) and "formal" on layers 1 and 2 (strength 0.5), with "calm" active."""
    model = get_peft_model(make_model(), pas_config([1], 1.5), adapter_name="calm")
    model.set_steering_vectors({1: VA}, adapter_name="calm")
    model.add_adapter("formal", pas_config([1, 2], 0.5))
    model.set_steering_vectors({1: VB, 2: VC}, adapter_name="formal")
    return model


# -- trainable parameters ------------------------------------------------------------------------------


def test_trainable_parameters_are_vectors():
    model = get_peft_model(make_model(), pas_config([0, 2]))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]

    assert trainable == [
        "base_model.model.model.layers.0.steering.pas_vector.default",
        "base_model.model.model.layers.2.steering.pas_vector.default",
    ]


def test_print_trainable_parameters(capsys):
    model = get_peft_model(make_model(), pas_config([0, 2]))
    total = sum(parameter.numel() for parameter in make_model().parameters()) + 2 * HIDDEN_SIZE

    model.print_trainable_parameters()
    printed = capsys.readouterr().out

    assert f"trainable params: {2 * HIDDEN_SIZE} ||" in printed
    assert f"all params: {total:,} ||" in printed


# -- named adapters ------------------------------------------------------------------------------------


def test_active_adapter_steers_alone(two_adapters):
    torch.testing.assert_close(logits_of(two_adapters), reference_logits({1: 1.5 * VA}))


def test_set_adapter_switches(two_adapters):
    two_adapters.set_adapter("formal")

    torch.testing.assert_close(logits_of(two_adapters), reference_logits({1: 0.5 * VB, 2: 0.5 * VC}))


def test_set_adapter_back(two_adapters):
    two_adapters.set_adapter("formal")
    two_adapters.set_adapter("calm")

    torch.testing.assert_close(logits_of(two_adapters), reference_logits({1: 1.5 * VA}))


def test_delete_adapter_removes_vector(two_adapters):
    two_adapters.delete_adapter("formal")
    names = [name for name, _ in two_adapters.named_parameters()]

    assert not [name for name in names if name.endswith(".formal")]
    assert list(two_adapters.peft_config) == ["calm"]
    torch.testing.assert_close(logits_of(two_adapters), reference_logits({1: 1.5 * VA}))


def test_delete_adapter_keeps_others_saved(two_adapters, tmp_path):
    two_adapters.delete_adapter("formal")
    two_adapters.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "calm"), adapter_name="calm")

    torch.testing.assert_close(logits_of(loaded), reference_logits({1: 1.5 * VA}))


def test_active_adapters_add_up(two_adapters):
    pas_peft.set_active_adapters(two_adapters, ["calm", "formal"])

    expected = reference_logits({1: 1.5 * VA + 0.5 * VB, 2: 0.5 * VC})
    torch.testing.assert_close(logits_of(two_adapters), expected)


def test_active_adapters_sum_of_hooks(two_adapters):
    # The same expectation built from two separate hooks on layer 1, one per adapter.
    pas_peft.set_active_adapters(two_adapters, ["calm", "formal"])
    reference = make_model()
    layers = decoder_layers(reference)

    with reference_steering(layers[1], 1.5 * VA), reference_steering(layers[1], 0.5 * VB), reference_steering(
        layers[2], 0.5 * VC
    ):
        expected = logits_of(reference)

    torch.testing.assert_close(logits_of(two_adapters), expected)


def test_active_adapters_generate_own_modes():
    # Each active adapter keeps its own positions: "calm" steers every token, "late" only the generated ones.
    model = get_peft_model(make_model(), pas_config([1], 1.5), adapter_name="calm")
    model.set_steering_vectors({1: VA}, adapter_name="calm")
    model.add_adapter("late", pas_config([2], 2.0, positions="generated"))
    model.set_steering_vectors({2: VC}, adapter_name="late")
    pas_peft.set_active_adapters(model, ["calm", "late"])
    reference = make_model()
    layers = decoder_layers(reference)

    tokens, logits = greedy_generate(model, INPUT_IDS, 6)
    expected_tokens, expected_logits = reference_greedy(
        reference, INPUT_IDS, 6, steerings=[(layers[1], 1.5 * VA, "all"), (layers[2], 2.0 * VC, "generated")]
    )

    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_active_adapters_unknown_raises(two_adapters):
    with pytest.raises(ValueError, match="'mix'"):
        pas_peft.set_active_adapters(two_adapters, ["calm", "mix"])


def test_active_adapters_empty_raises(two_adapters):
    with pytest.raises(ValueError, match="Unknown adapter"):
        pas_peft.set_active_adapters(two_adapters, [])


# peft warns when a second adapter joins the peft_config that load_adapter put on the model.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_active_adapters_on_transformers_model(two_adapters, tmp_path):
    two_adapters.save_pretrained(tmp_path)
    model = make_model()
    model.load_adapter(str(tmp_path / "calm"), adapter_name="calm")
    model.load_adapter(str(tmp_path / "formal"), adapter_name="formal")

    pas_peft.set_active_adapters(model, ["calm", "formal"])

    expected = reference_logits({1: 1.5 * VA + 0.5 * VB, 2: 0.5 * VC})
    torch.testing.assert_close(logits_of(model), expected)


def test_active_adapters_without_pas_raises():
    with pytest.raises(ValueError, match="has no PAS adapters"):
        pas_peft.set_active_adapters(make_model(), ["calm"])


# -- combining vectors ---------------------------------------------------------------------------------


@pytest.fixture
def same_layer_adapters():
    """Adapters "calm" (strength 1.5) and "formal" (strength 0.5), both on layer 1."""
    model = get_peft_model(make_model(), pas_config([1], 1.5), adapter_name="calm")
    model.set_steering_vectors({1: VA}, adapter_name="calm")
    model.add_adapter("formal", pas_config([1], 0.5))
    model.set_steering_vectors({1: VB}, adapter_name="formal")
    return model


def test_weighted_adapter_sum(same_layer_adapters):
    same_layer_adapters.add_weighted_adapter(["calm", "formal"], [2.0, -1.0], "mix")
    same_layer_adapters.set_adapter("mix")

    expected = reference_logits({1: 2.0 * 1.5 * VA - 1.0 * 0.5 * VB})
    torch.testing.assert_close(logits_of(same_layer_adapters), expected)


def test_weighted_adapter_vector(same_layer_adapters):
    same_layer_adapters.add_weighted_adapter(["calm", "formal"], [2.0, -1.0], "mix")

    vectors = same_layer_adapters.get_steering_vectors("mix")

    torch.testing.assert_close(vectors[1], 2.0 * 1.5 * VA - 0.5 * VB)
    assert same_layer_adapters.get_strength("mix") == 1.0


def test_weighted_adapter_other_layers_raises(two_adapters):
    with pytest.raises(ValueError, match="steer different layers"):
        two_adapters.add_weighted_adapter(["calm", "formal"], [1.0, 1.0], "mix")

    assert "mix" not in two_adapters.peft_config


def test_weighted_adapter_other_positions_raises(same_layer_adapters):
    same_layer_adapters.add_adapter("late", pas_config([1], positions="generated"))

    with pytest.raises(ValueError, match="positions differs"):
        same_layer_adapters.add_weighted_adapter(["calm", "late"], [1.0, 1.0], "mix")


def test_weighted_adapter_existing_name_raises(same_layer_adapters):
    with pytest.raises(ValueError, match="already exists"):
        same_layer_adapters.add_weighted_adapter(["calm", "formal"], [1.0, 1.0], "formal")


@pytest.mark.parametrize("weights", [[1.0], [1.0, float("nan")], [1.0, "2"]], ids=["count", "nan", "string"])
def test_weighted_adapter_bad_weights_raise(same_layer_adapters, weights):
    with pytest.raises(ValueError, match="weight"):
        same_layer_adapters.add_weighted_adapter(["calm", "formal"], weights, "mix")


@pytest.fixture
def vectors_ab(same_layer_adapters):
    a = pas_peft.SteeringVectors.from_model(same_layer_adapters, "calm")
    b = pas_peft.SteeringVectors.from_model(same_layer_adapters, "formal")
    return a, b


ARITHMETIC = {
    "add": (lambda a, b: a + b, 1.5 * VA + 0.5 * VB),
    "subtract": (lambda a, b: a - b, 1.5 * VA - 0.5 * VB),
    "scale_left": (lambda a, b: 3.0 * a, 3.0 * 1.5 * VA),
    "scale_right": (lambda a, b: a * -0.5, -0.5 * 1.5 * VA),
    "negate": (lambda a, b: -b, -0.5 * VB),
    "combined": (lambda a, b: a - 0.5 * b, 1.5 * VA - 0.25 * VB),
}


@pytest.mark.parametrize("operation", list(ARITHMETIC))
def test_vector_arithmetic_values(vectors_ab, operation):
    function, expected = ARITHMETIC[operation]
    result = function(*vectors_ab)

    assert result.layers == [1]
    assert result.config.strength == 1.0
    torch.testing.assert_close(result.vectors[1], expected)


@pytest.mark.parametrize("operation", ["subtract", "combined"])
def test_vector_arithmetic_saved_steers(vectors_ab, operation, tmp_path):
    function, expected = ARITHMETIC[operation]
    function(*vectors_ab).save_pretrained(tmp_path / "combined")

    loaded = pas_peft.from_pretrained(make_model(), tmp_path / "combined")

    torch.testing.assert_close(logits_of(loaded), reference_logits({1: expected}))


def test_vectors_from_pretrained(same_layer_adapters, tmp_path):
    same_layer_adapters.save_pretrained(tmp_path)

    loaded = pas_peft.SteeringVectors.from_pretrained(tmp_path / "formal")

    torch.testing.assert_close(loaded.vectors[1], 0.5 * VB)


def test_vectors_other_layers_raise(two_adapters):
    a = pas_peft.SteeringVectors.from_model(two_adapters, "calm")
    b = pas_peft.SteeringVectors.from_model(two_adapters, "formal")

    with pytest.raises(ValueError, match="steer different layers"):
        a + b


def test_vectors_other_hidden_size_raise(vectors_ab):
    small = get_peft_model(make_model(hidden_size=32, intermediate_size=64), pas_config([1]))
    other = pas_peft.SteeringVectors.from_model(small)

    with pytest.raises(ValueError) as error:
        vectors_ab[0] + other

    assert "hidden_size differs" in str(error.value)
    assert "64 vs 32" in str(error.value)


def test_vectors_save_refuses_existing(vectors_ab, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")

    with pytest.raises(FileExistsError):
        vectors_ab[0].save_pretrained(tmp_path / "out")

    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_set_vectors_negative_index():
    model = get_peft_model(make_model(), pas_config([2], 1.5))
    model.set_steering_vectors({-1: VA})

    torch.testing.assert_close(logits_of(model), reference_logits({2: 1.5 * VA}))


def test_set_vectors_wrong_layer_raises():
    model = get_peft_model(make_model(), pas_config([2]))

    with pytest.raises(ValueError, match=r"steers layers \[2\], but vectors were given for layers \[1\]"):
        model.set_steering_vectors({1: VA})


def test_set_vectors_wrong_shape_raises():
    model = get_peft_model(make_model(), pas_config([2]))

    with pytest.raises(ValueError, match=r"shape \(32,\), expected \(64,\)"):
        model.set_steering_vectors({2: torch.zeros(32)})


def test_get_vectors_returns_copy():
    model = get_peft_model(make_model(), pas_config([2]))
    model.get_steering_vectors()[2].add_(1.0)

    assert torch.equal(model.get_steering_vectors()[2], torch.zeros(HIDDEN_SIZE))


# -- strength ------------------------------------------------------------------------------------------


@pytest.fixture
def steered():
    model = get_peft_model(make_model(), pas_config([1], 1.5))
    model.set_steering_vectors({1: VA})
    return model


def test_set_strength(steered):
    pas_peft.set_strength(steered, 4.0)

    assert steered.get_strength() == 4.0
    torch.testing.assert_close(logits_of(steered), reference_logits({1: 4.0 * VA}))


def test_steering_strength_inside(steered):
    with pas_peft.steering_strength(steered, -2.0):
        logits = logits_of(steered)

    torch.testing.assert_close(logits, reference_logits({1: -2.0 * VA}))


def test_steering_strength_restores(steered):
    with pas_peft.steering_strength(steered, -2.0):
        pass

    assert steered.get_strength() == 1.5
    torch.testing.assert_close(logits_of(steered), reference_logits({1: 1.5 * VA}))


def test_steering_strength_restores_after_error(steered):
    with pytest.raises(RuntimeError, match="inside"), pas_peft.steering_strength(steered, -2.0):
        raise RuntimeError("inside the block")

    assert steered.get_strength() == 1.5
    torch.testing.assert_close(logits_of(steered), reference_logits({1: 1.5 * VA}))


def test_steering_strength_invalid_keeps_state(steered):
    with pytest.raises(ValueError, match="Invalid strength"), pas_peft.steering_strength(steered, float("nan")):
        pass

    assert steered.get_strength() == 1.5


def test_steering_strength_one_adapter(two_adapters):
    pas_peft.set_active_adapters(two_adapters, ["calm", "formal"])

    with pas_peft.steering_strength(two_adapters, 2.0, adapter_name="formal"):
        logits = logits_of(two_adapters)

    expected = reference_logits({1: 1.5 * VA + 2.0 * VB, 2: 2.0 * VC})
    torch.testing.assert_close(logits, expected)
    assert two_adapters.get_strength("formal") == 0.5


@pytest.mark.parametrize(
    "strength", [float("inf"), "strong", "2.5", None], ids=["inf", "string", "numeric_string", "none"]
)
def test_set_strength_invalid_raises(steered, strength):
    with pytest.raises(ValueError, match="Invalid strength"):
        pas_peft.set_strength(steered, strength)


def test_set_strength_not_pas_raises():
    with pytest.raises(ValueError, match="not a PAS PeftModel"):
        pas_peft.set_strength(make_model(), 2.0)


def test_set_strength_saved(steered, tmp_path):
    pas_peft.set_strength(steered, 3.0)
    steered.save_pretrained(tmp_path)

    loaded = pas_peft.from_pretrained(make_model(), tmp_path)

    torch.testing.assert_close(logits_of(loaded), reference_logits({1: 3.0 * VA}))


# -- disable, merge, unload ----------------------------------------------------------------------------


def vector_parameter(model, adapter_name="default"):
    return model.get_base_model().model.layers[1].steering.pas_vector[adapter_name]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_disable_keeps_requires_grad(steered, requires_grad):
    vector_parameter(steered).requires_grad_(requires_grad)

    with steered.disable_adapter():
        inside = vector_parameter(steered).requires_grad

    assert inside is requires_grad
    assert vector_parameter(steered).requires_grad is requires_grad


def test_disable_keeps_each_adapter_requires_grad(two_adapters):
    # Only the active adapter ("calm") trains, so its vector requires grad and the other one does not.
    def requires_grad():
        return {name: parameter.requires_grad for name, parameter in two_adapters.named_parameters() if "pas_vector" in name}

    before = requires_grad()
    with two_adapters.disable_adapter():
        inside = requires_grad()

    assert before == {
        "base_model.model.model.layers.1.steering.pas_vector.calm": True,
        "base_model.model.model.layers.1.steering.pas_vector.formal": False,
        "base_model.model.model.layers.2.steering.pas_vector.formal": False,
    }
    assert inside == before
    assert requires_grad() == before


def test_disable_then_enable_steers(steered):
    with steered.disable_adapter():
        disabled = logits_of(steered)

    torch.testing.assert_close(disabled, reference_logits({}), rtol=0, atol=0)
    torch.testing.assert_close(logits_of(steered), reference_logits({1: 1.5 * VA}))


def test_merge_and_unload_raises(steered):
    with pytest.raises(ValueError, match="cannot be merged"):
        steered.merge_and_unload()

    torch.testing.assert_close(logits_of(steered), reference_logits({1: 1.5 * VA}))


def test_merge_adapter_raises(steered):
    with pytest.raises(ValueError, match="cannot be merged"):
        steered.merge_adapter()

    torch.testing.assert_close(logits_of(steered), reference_logits({1: 1.5 * VA}))


def count_hooks(model) -> int:
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._forward_hooks_with_kwargs)
        for module in model.modules()
    )


@pytest.fixture
def unloaded(steered):
    greedy_generate(steered, INPUT_IDS, 3)
    return steered.unload()


def test_unload_logits_exact(unloaded):
    torch.testing.assert_close(logits_of(unloaded), reference_logits({}), rtol=0, atol=0)


def test_unload_returns_transformers_model(unloaded):
    assert type(unloaded).__name__ == "LlamaForCausalLM"


def test_unload_removes_hooks(unloaded):
    assert count_hooks(unloaded) == count_hooks(make_model())


def test_unload_removes_modules(unloaded):
    assert [name for name, _ in unloaded.named_modules() if "steering" in name] == []
    assert [name for name, _ in unloaded.named_parameters() if "pas_vector" in name] == []


def test_unload_removes_generate_wrapper(unloaded):
    assert "generate" not in unloaded.__dict__


def test_unload_removes_state(unloaded):
    assert not hasattr(unloaded, "peft_config")
    assert [name for name in vars(unloaded) if name.startswith("_pas")] == []


def test_unload_generate_is_base(unloaded):
    tokens, _ = greedy_generate(unloaded, INPUT_IDS, 6)
    expected, _ = greedy_generate(make_model(), INPUT_IDS, 6)

    assert torch.equal(tokens, expected)


def test_unload_then_new_adapter(unloaded):
    model = get_peft_model(unloaded, pas_config([2], 2.0))
    model.set_steering_vectors({2: VB})

    torch.testing.assert_close(logits_of(model), reference_logits({2: 2.0 * VB}))


def test_steering_under_device_map_dispatch(tmp_path):
    # Disk offload of one layer makes accelerate wrap forward methods with its hooks, as GPU splits do.
    import transformers

    plain = make_model("llama")
    plain.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu",
    }
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    vector = make_vector()
    input_ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad(), reference_steering(plain.model.layers[1], 2.0 * vector):
        expected = plain(input_ids=input_ids).logits

    model = get_peft_model(dispatched, pas_peft.PASConfig(layers=[1], strength=2.0))
    model.set_steering_vectors({1: vector})
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits

    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_set_vectors_rejects_out_of_range_layer():
    model = get_peft_model(make_model("llama"), pas_peft.PASConfig(layers=[1]))

    with pytest.raises(ValueError, match="out of range"):
        model.set_steering_vectors({4: make_vector()})
