"""The opt-in .pth hook imports pas_peft after peft, so plain PEFT code loads PAS adapters."""

import subprocess
import sys
import textwrap

import pytest
from peft import get_peft_model

import pas_peft
from pas_peft.autoload import PTH_NAME, autoload_path, disable_autoload, enable_autoload
from pas_peft.cli import main
from conftest import make_model

LOAD_WITHOUT_IMPORT = textwrap.dedent(
    """
    import site, sys
    site.addsitedir(sys.argv[1])
    assert "torch" not in sys.modules, "the .pth hook must not import torch at start-up"
    from peft import PeftConfig
    config = PeftConfig.from_pretrained(sys.argv[2])
    print(type(config).__name__, "pas_peft" in sys.modules)
    """
)


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(make_model("llama"), pas_peft.PASConfig(layers=[1]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def run_fresh(site_dir, adapter_dir):
    return subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(site_dir), str(adapter_dir)],
        capture_output=True, text=True, timeout=300,
    )


def test_enabled_hook_loads_pas_config(tmp_path, saved_adapter):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    enable_autoload(site_dir)

    completed = run_fresh(site_dir, saved_adapter)

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["PASConfig", "True"]


def test_without_hook_peft_fails(tmp_path, saved_adapter):
    site_dir = tmp_path / "site"
    site_dir.mkdir()

    completed = run_fresh(site_dir, saved_adapter)

    assert completed.returncode != 0
    assert "KeyError: 'PAS'" in completed.stderr


def test_disable_removes_file(tmp_path):
    path = enable_autoload(tmp_path)
    assert autoload_path(tmp_path) == path
    assert path.name == PTH_NAME

    assert disable_autoload(tmp_path) == path
    assert autoload_path(tmp_path) is None
    assert disable_autoload(tmp_path) is None


def test_cli_autoload_status(tmp_path, capsys):
    assert main(["autoload", "status", "--site-dir", str(tmp_path)]) == 0
    assert "Disabled" in capsys.readouterr().out
    assert main(["autoload", "enable", "--site-dir", str(tmp_path)]) == 0
    assert (tmp_path / PTH_NAME).exists()
    assert main(["autoload", "disable", "--site-dir", str(tmp_path)]) == 0
    assert not (tmp_path / PTH_NAME).exists()
