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


class _Recipe:
    """A class of this module: pickling it stores a reference to code."""


def test_read_weights_says_what_a_file_is_instead_in_one_line(tmp_path: Path) -> None:
    """Fuzz round 6: a text .safetensors gave a traceback; random bytes, a text .pth and a pickled class
    gave torch's multi-line weights_only text cut mid-sentence or with terminal escape codes."""
    import os

    from slice2vol.checkpoint_io import read_weights

    good = {"w": torch.arange(3.0)}
    torch.save(good, tmp_path / "good.pth")
    torch.save(good, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(good, str(tmp_path / "st.pth"))  # safetensors under another suffix: read by its content
    for name in ("good.pth", "legacy.pth", "st.pth"):
        assert torch.equal(read_weights(tmp_path / name)["w"], good["w"])
    (tmp_path / "text.safetensors").write_text("hello\n")
    (tmp_path / "text.pth").write_text("hello\n")
    (tmp_path / "noise.pth").write_bytes(bytes([0x42]) + os.urandom(999))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"x": _Recipe()}, tmp_path / "evil.pth")
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump({"a": 1}, fh, protocol=4)
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    torch.save({"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(1)}, tmp_path / "nan.pth")
    expected = {
        "text.safetensors": "not a readable safetensors file (Error while deserializing header: header too small)",
        "text.pth": "not a checkpoint (neither safetensors, a PyTorch zip archive nor a pickle; it starts with "
                    "b'hello\\n')",
        "noise.pth": "not a checkpoint (neither safetensors, a PyTorch zip archive nor a pickle; it starts with b'B",
        "empty.pth": "empty file (0 bytes); not a checkpoint",
        "evil.pth": "holds Python objects other than tensors (tests.test_checkpoint_io._Recipe); refused",
        "plain.pkl": "a pickle that the safe loader refuses (Unsupported operand 149): not written by torch.save",
        "cut.pth": "damaged PyTorch zip archive, truncated or cut (PytorchStreamReader failed reading zip archive",
        "nan.pth": "1 tensor(s) hold NaN values (first: w); a diverged or damaged checkpoint cannot give features",
    }
    for name, words in expected.items():
        with pytest.raises(ValueError) as err:
            read_weights(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: {words}"), message
        assert "\n" not in message and "\x1b" not in message


def test_a_torchscript_archive_is_refused_without_running_it(tmp_path: Path) -> None:
    from slice2vol.checkpoint_io import read_weights

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match=r"ts.pt: a TorchScript archive \(compiled code, not a state dict\); refused"):
        read_weights(tmp_path / "ts.pt")


def test_nan_weights_stop_the_cache_job_before_any_subject(tmp_path: Path, monkeypatch, capsys) -> None:
    import torchvision

    from slice2vol.cli import main
    from tests.conftest import blob_volume, write_nifti

    monkeypatch.chdir(tmp_path)
    state = {k: v * float("nan") if v.is_floating_point() else v
             for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save(state, tmp_path / "nan.pth")
    write_nifti(tmp_path / "a.nii.gz", blob_volume())
    (tmp_path / "m.csv").write_text("subject_id,t1\na,a.nii.gz\n")
    assert main(["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--weights", "nan.pth", "--store",
                 "s.h5", "--size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slice2vol cache: error: nan.pth: ") and "tensor(s) hold NaN values" in err[-1]
    assert not (tmp_path / "s.h5").exists()
