"""Damaged checkpoint files of a run get one line naming the file (they ended in safetensors, torch zip
reader, unpickler or json tracebacks), and a foreign pickle is refused without being run."""

from __future__ import annotations

import pickle
import re
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
    import warnings

    for name, words in expected.items():
        with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as err:
            warnings.simplefilter("always")
            read_weights(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: {words}"), message
        assert "\n" not in message and "\x1b" not in message
        # fuzz round 12: torch's "Detected pickle protocol 4" warning put two more lines on stderr
        assert not [str(w.message) for w in caught], name
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError):
        warnings.simplefilter("always")
        read_torch_state(tmp_path / "plain.pkl")
    assert not caught


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


def _unblock_later(fifo: Path, after: float = 5.0):
    """A process that, after ``after`` s, keeps opening ``fifo`` for writing, so that a reader blocked on it
    (the bug) gets a byte and end-of-file and the test fails instead of hanging. A process, not a thread:
    a reader blocked in C code may hold the GIL. Kill it when done."""
    import subprocess

    return subprocess.Popen(["sh", "-c", f"sleep {after}; while :; do printf x > '{fifo}'; done"])


@pytest.mark.parametrize("reader, name", [
    ("read_weights", "w.pt"), ("read_weights", "w.safetensors"), ("read_json", "state.json"),
    ("read_safetensors", "model.safetensors"), ("read_torch_state", "train_state.pt"),
])
def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path, reader: str, name: str) -> None:
    """Fuzz round 7 (G2): a FIFO given as --weights (or in a checkpoint folder) blocked for ever, waiting
    for a writer; it is one line naming the file, as NIfTI inputs are."""
    import os

    from slice2vol import checkpoint_io

    os.mkfifo(tmp_path / name)
    writer = _unblock_later(tmp_path / name)
    try:
        with pytest.raises(ValueError) as err:
            getattr(checkpoint_io, reader)(tmp_path / name)
    finally:
        writer.kill()
        writer.wait()
    assert str(err.value).startswith(f"{tmp_path / name}: a named pipe (FIFO), not a regular file")


def test_a_directory_in_a_checkpoint_folder_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "meta.json").mkdir()
    with pytest.raises(CheckpointError, match=r"meta.json: a directory, not a file; use --no-resume"):
        read_json(tmp_path / "meta.json")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


@pytest.mark.parametrize("dtype, words", [
    (torch.int32, "5 tensor(s) are int32 where the model has float32 (first: 0.weight)"),
    (torch.int64, "5 tensor(s) are int64 where the model has float32 (first: 0.weight)"),
    (torch.bool, "5 tensor(s) are bool where the model has float32 (first: 0.weight)"),
    (torch.complex64, "5 tensor(s) are complex64 where the model has float32 (first: 0.weight)"),
    (torch.float16, None), (torch.bfloat16, None), (torch.float64, None),
])
def test_tensors_of_a_non_floating_dtype_are_refused_not_cast(tmp_path: Path, dtype, words) -> None:
    """Fuzz round 7 (G4): int32 copies of the weights were cast into the float parameters (a random init
    truncates to zeros) and every slice got the same features, blamed on "one scan under 2 IDs".
    Integer buffers of the model itself (BatchNorm's num_batches_tracked) stay integers and pass; the
    running statistics (float buffers) count. Half-precision checkpoints load as before."""
    from slice2vol.checkpoint_io import check_dtypes, dtype_problem, read_weights

    # 0.weight, 0.bias, 1.weight, 1.bias, 1.running_mean, 1.running_var, 3.weight, 3.bias: 6 float
    # tensors of a conv/linear layer and BatchNorm's affine, +2 float running statistics
    state = {k: (v.to(dtype) if k.startswith(("0.", "3.")) or k == "1.running_var" else v)
             for k, v in _net().state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    loaded = read_weights(tmp_path / "w.safetensors")
    if words is None:
        assert dtype_problem(_net(), loaded) is None
        load_state(_net(), loaded, "w.safetensors")
        return
    with pytest.raises(ValueError) as err:
        check_dtypes(_net(), loaded, "w.safetensors")
    assert str(err.value) == f"w.safetensors: {words}"
    with pytest.raises(CheckpointError, match=re.escape(f"run/last: {words}; use --no-resume")):
        load_state(_net(), loaded, "run/last")


@pytest.mark.parametrize("change, words", [
    ("zeros", "every weight tensor is constant (all 0.0): not trained weights"),
    ("ones", "every weight tensor is constant (all 1.0): not trained weights"),
    ("each_its_own", "every weight tensor is constant (2 tensors, each of a single value, e.g. state_dict.0.weight "
                     "all 0.5): not trained weights"),
    ("half_zeros", "every weight tensor is constant (all 0.0): not trained weights"),
    ("one_zero_matrix", None),  # a zero-initialised layer (LoRA B, a fresh head) among trained ones
    ("trained", None),
])
def test_a_checkpoint_of_constant_weights_is_refused(tmp_path: Path, change: str, words) -> None:
    """Fuzz round 7 (G4): a state dict of zeros loaded, gave every slice the same features and the
    cache job blamed the data ("one scan under 2 IDs?"). Biases and BatchNorm vectors (1-D, often
    constant at init) do not count; weight matrices and kernels do."""
    from slice2vol.checkpoint_io import read_weights

    state = _net().state_dict()
    kernels = ["0.weight", "3.weight"]
    if change in ("zeros", "half_zeros"):
        state.update({k: torch.zeros_like(state[k]) for k in kernels})
        if change == "half_zeros":
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    elif change == "ones":
        state.update({k: torch.ones_like(state[k]) for k in kernels})
    elif change == "each_its_own":
        state.update({"0.weight": torch.full_like(state["0.weight"], 0.5),
                      "3.weight": torch.zeros_like(state["3.weight"])})
    elif change == "one_zero_matrix":
        state["3.weight"] = torch.zeros_like(state["3.weight"])
    torch.save({"state_dict": state}, tmp_path / "w.pth")  # nested, as Lightning writes it
    if words is None:
        assert set(read_weights(tmp_path / "w.pth")["state_dict"]) == set(state)
        return
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path / "w.pth")
    assert str(err.value) == f"{tmp_path / 'w.pth'}: {words}"


def test_constant_weights_stop_the_cache_job_before_any_subject(tmp_path: Path, monkeypatch, capsys) -> None:
    import torchvision

    from slice2vol.cli import main
    from tests.conftest import blob_volume, write_nifti

    monkeypatch.chdir(tmp_path)
    torch.save({k: torch.zeros_like(v) for k, v in torchvision.models.resnet18().state_dict().items()},
               tmp_path / "zeros.pth")
    write_nifti(tmp_path / "a.nii.gz", blob_volume())
    (tmp_path / "m.csv").write_text("subject_id,t1\na,a.nii.gz\n")
    assert main(["cache", "--manifest", "m.csv", "--encoder", "tv/resnet18", "--weights", "zeros.pth", "--store",
                 "s.h5", "--size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("slice2vol cache: error: zeros.pth: every weight tensor is constant (all 0.0): not trained "
                       "weights")
    assert not (tmp_path / "s.h5").exists()
