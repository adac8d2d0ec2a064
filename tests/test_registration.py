"""Registration of the PAS type with peft from outside the peft package."""

from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch
from peft import PeftType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import pas_peft
from pas_peft import registration
from conftest import make_model, make_vector, prompt_ids


def test_peft_type_member():
    assert PeftType("PAS") is PeftType.PAS
    assert PeftType["PAS"] is PeftType.PAS
    assert PeftType.PAS.value == "PAS"
    assert "PAS" in list(PeftType)


def test_peft_type_copies():
    config = pas_peft.PASConfig(layers=[1])

    assert pickle.loads(pickle.dumps(config)).peft_type is PeftType.PAS
    assert copy.deepcopy(config).peft_type is PeftType.PAS


def test_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PAS] is pas_peft.PASConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PAS] is pas_peft.PASModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.PAS] == "pas_"


def test_string_key_lookup():
    # adapter_config.json stores the plain string "PAS".
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PAS"] is pas_peft.PASConfig


def test_member_added_once():
    assert registration.add_peft_type_member() is PeftType.PAS
    assert list(PeftType).count(PeftType.PAS) == 1


def test_reload_keeps_registration():
    importlib.reload(pas_peft)
    model = get_peft_model(make_model(), pas_peft.PASConfig(layers=[1], strength=2.0))

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PAS] is pas_peft.PASConfig
    assert list(PeftType).count(PeftType.PAS) == 1
    assert type(model.base_model) is pas_peft.PASModel


def test_register_twice_is_harmless():
    registration.register_pas(pas_peft.PASConfig, pas_peft.PASModel)

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PAS] is pas_peft.PASConfig


def test_foreign_registration_raises(monkeypatch):
    class OtherConfig:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.PAS, OtherConfig)

    with pytest.raises(ImportError, match="already registered"):
        registration.register_pas(pas_peft.PASConfig, pas_peft.PASModel)


def test_foreign_member_raises(monkeypatch):
    # A "PAS" member that pas_peft did not add stands for a peft release with its own PAS method.
    monkeypatch.setitem(PeftType._member_map_, "PAS", "PAS")

    with pytest.raises(ImportError, match="ships its own 'PAS' method"):
        registration.add_peft_type_member()


@pytest.mark.parametrize("version", ["0.21.2", "0.21.9"])
def test_tested_peft_version_passes(version):
    registration.check_peft_version(version)


@pytest.mark.parametrize("version", ["0.30.0", "0.22.0", "0.21.1"])
def test_untested_peft_version_raises(monkeypatch, version):
    monkeypatch.delenv(registration.ALLOW_UNTESTED_PEFT_ENV, raising=False)

    with pytest.raises(ImportError) as error:
        registration.check_peft_version(version)

    assert f"peft {version} is installed" in str(error.value)
    assert ">=0.21.2,<0.22" in str(error.value)
    assert registration.ALLOW_UNTESTED_PEFT_ENV in str(error.value)


def test_untested_peft_version_override_warns(monkeypatch):
    monkeypatch.setenv(registration.ALLOW_UNTESTED_PEFT_ENV, "1")

    with pytest.warns(UserWarning, match="peft 0.30.0 is installed"):
        registration.check_peft_version("0.30.0")


def test_peft_state_dict_helpers():
    source = get_peft_model(make_model(), pas_peft.PASConfig(layers=[1], strength=2.0))
    source.set_steering_vectors({1: make_vector(scale=0.05)})
    target = get_peft_model(make_model(), pas_peft.PASConfig(layers=[1], strength=2.0), adapter_name="other")

    state_dict = get_peft_model_state_dict(source)
    set_peft_model_state_dict(target, state_dict, adapter_name="other")

    assert list(state_dict) == ["base_model.model.model.layers.1.steering.pas_vector"]
    with torch.no_grad():
        torch.testing.assert_close(target(prompt_ids()).logits, source(prompt_ids()).logits, rtol=0, atol=0)


def test_public_api():
    missing = [name for name in pas_peft.__all__ if not hasattr(pas_peft, name)]

    assert missing == []
