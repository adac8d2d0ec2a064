"""Atomic output directories: a failed write never loses the previous directory."""

import os

import pytest

from pas_peft.io import atomic_directory


def test_failed_swap_restores_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("previous run")
    real_replace = os.replace
    calls = []

    def replace_failing_second(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(source, destination)

    monkeypatch.setattr("pas_peft.io.os.replace", replace_failing_second)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new run")

    assert [path.name for path in target.iterdir()] == ["old.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_error_in_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "run") as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("crash")

    assert list(tmp_path.iterdir()) == []


def test_non_empty_target_needs_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("keep")

    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_directory(tmp_path / "run"):
            pass

    assert (tmp_path / "run" / "keep.txt").read_text() == "keep"


def test_written_directory_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "adapter") as staging:
            (staging / "adapter_config.json").write_text("{}")
            (staging / "nested").mkdir()
    finally:
        os.umask(previous)

    target = tmp_path / "adapter"
    assert target.stat().st_mode & 0o777 == 0o755
    assert (target / "adapter_config.json").stat().st_mode & 0o777 == 0o644
    assert (target / "nested").stat().st_mode & 0o777 == 0o755
