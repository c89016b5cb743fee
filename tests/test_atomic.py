"""Atomic writes: all or nothing, and files with the permissions a plain write would give."""

from __future__ import annotations

import os

import pytest

from wren.atomic import atomic_directory, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_directories_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "hello")
    with atomic_directory(tmp_path / "ckpt") as staging:
        (staging / "w.bin").write_bytes(b"x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


def test_checkpoint_files_are_readable_by_others(tmp_path, umask_022):
    import torch

    from wren.checkpoint import save_checkpoint
    from wren.model import CausalLM, preset_config

    torch.manual_seed(0)
    model = CausalLM(preset_config("micro", vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    save_checkpoint(model, tmp_path / "ckpt")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes  # safetensors alone would write 0600


def test_a_failed_directory_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "v").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
