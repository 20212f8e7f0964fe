"""Damaged checkpoint files of a run get one line naming the file (they ended in safetensors, torch zip
reader, unpickler or json tracebacks), and a foreign pickle is refused without being run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slice2vol.checkpoint_io import CheckpointError, load_state, read_json, read_safetensors, read_torch_state


def test_damaged_json_and_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"step": 3, "losses"')
    with pytest.raises(CheckpointError, match=r"state.json: damaged \(Expecting .*\); use --no-resume"):
        read_json(tmp_path / "state.json")
    with pytest.raises(CheckpointError, match=r"meta.json: missing from the checkpoint; use --no-resume"):
        read_json(tmp_path / "meta.json")
    assert read_json(_write(tmp_path / "ok.json", '{"step": 3}')) == {"step": 3}


def test_truncated_safetensors_and_torch_files_are_named(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:20])
    with pytest.raises(CheckpointError, match=r"model.safetensors: damaged or not a safetensors file \(.*\); use"):
        read_safetensors(tmp_path / "model.safetensors")
    torch.save({"step": 3, "rng": torch.zeros(2)}, tmp_path / "train_state.pt")
    assert read_torch_state(tmp_path / "train_state.pt")["step"] == 3
    raw = (tmp_path / "train_state.pt").read_bytes()
    (tmp_path / "train_state.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"train_state.pt: damaged, or not a checkpoint this package wrote"):
        read_torch_state(tmp_path / "train_state.pt")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_foreign_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    _Payload.marker = str(tmp_path / "ran")
    with open(tmp_path / "train_state.pt", "wb") as fh:
        pickle.dump({"step": _Payload()}, fh)
    with pytest.raises(CheckpointError, match=r"train_state.pt: damaged, or not a checkpoint this package wrote"):
        read_torch_state(tmp_path / "train_state.pt")
    assert not (tmp_path / "ran").exists()


def test_a_state_of_another_shape_is_a_run_of_another_configuration(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"run/last: saved by a run with another configuration \(size mismatch "
                                              r"for weight.*\); use --no-resume"):
        load_state(torch.nn.Linear(3, 2), {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, "run/last")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
