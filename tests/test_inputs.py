"""Small input files named on the command line (manifest, config, ID list) read once, from a file or
a pipe; a named pipe without a writer is refused after a short wait instead of hanging the job."""

from __future__ import annotations

import os
import threading
import time

import pytest

from slice2vol import inputs
from slice2vol.config import ConfigError, load_config, read_yaml
from slice2vol.data import ManifestError, load_manifest
from slice2vol.data.manifest import read_id_list
from slice2vol.inputs import InputFileError, read_input_bytes, special_file_problem
from tests.conftest import blob_volume, write_nifti


@pytest.fixture
def quick_pipes(monkeypatch):
    """A silent pipe is given up on after 0.3 s instead of the default."""
    monkeypatch.setattr(inputs, "PIPE_WAIT_S", 0.3)


def _anonymous_pipe(data: bytes) -> str:
    """The /proc/self/fd path of a pipe holding ``data`` with its writer closed, as the shell's
    ``<(printf ...)`` gives a program (Linux)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return f"/proc/self/fd/{read_fd}"


def _fifo_with_late_writer(path, data: bytes, delay: float = 0.1) -> threading.Thread:
    os.mkfifo(path)

    def write():
        time.sleep(delay)
        with open(path, "wb") as fh:  # blocks until the reader has opened the pipe
            fh.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_regular_file_and_pipes_give_the_same_bytes(tmp_path, quick_pipes):
    data = b"subject_id,t1\na,x.nii.gz\n" * 1000
    (tmp_path / "f.csv").write_bytes(data)
    assert read_input_bytes(tmp_path / "f.csv", "manifest") == data
    assert read_input_bytes(_anonymous_pipe(data[:4096]), "manifest") == data[:4096]
    writer = _fifo_with_late_writer(tmp_path / "fifo", data)
    assert read_input_bytes(tmp_path / "fifo", "manifest") == data  # a writer slower than the open
    writer.join(5)


def test_a_named_pipe_without_writer_is_refused_quickly(tmp_path, quick_pipes):
    os.mkfifo(tmp_path / "fifo")
    start = time.monotonic()
    with pytest.raises(InputFileError) as err:
        read_input_bytes(tmp_path / "fifo", "manifest")
    assert time.monotonic() - start < 3
    assert str(err.value).startswith(f"{tmp_path / 'fifo'}: a named pipe (FIFO) that nothing was written to")
    assert "\n" not in str(err.value)


def test_directories_missing_files_and_special_files(tmp_path):
    with pytest.raises(InputFileError, match="a directory, not a regular file; the config must be a file"):
        read_input_bytes(tmp_path, "config")
    with pytest.raises(FileNotFoundError, match="manifest file not found"):
        read_input_bytes(tmp_path / "nope.csv", "manifest")
    with pytest.raises(InputFileError, match="/dev/null: a device"):
        read_input_bytes("/dev/null", "manifest")
    os.mkfifo(tmp_path / "fifo")
    assert special_file_problem(tmp_path / "fifo") == "a named pipe (FIFO)"
    (tmp_path / "f").write_text("x")
    assert special_file_problem(tmp_path / "f") is None and special_file_problem(tmp_path / "nope") is None


def test_a_manifest_from_a_pipe_reads_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    """Encoding, separator and table used to be three reads of the file: a pipe gave the second an
    empty stream. A pipe lives in /proc/self/fd, so its relative paths are the shell's."""
    for i, name in enumerate(["a", "b"]):
        write_nifti(tmp_path / "img" / f"{name}.nii.gz", blob_volume(seed=i))
    monkeypatch.chdir(tmp_path)
    text = "subject_id;t1;age\na;img/a.nii.gz;61,5\nb;img/b.nii.gz;70\n".encode()
    cohort = load_manifest(_anonymous_pipe(text))
    assert cohort.ids == ["a", "b"] and not cohort.failures
    assert cohort.subjects[0].images["t1"] == tmp_path / "img" / "a.nii.gz"
    assert cohort.labels()["age"].tolist() == [61.5, 70.0]
    utf16 = "subject_id,t1\na,img/a.nii.gz\n".encode("utf-16")
    assert load_manifest(_anonymous_pipe(utf16)).ids == ["a"]


def test_a_silent_named_pipe_as_manifest_id_list_or_config_is_one_line(tmp_path, quick_pipes):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for call, error in ((lambda: load_manifest(fifo), ManifestError),
                        (lambda: read_id_list(fifo, "--train-ids"), ValueError),
                        (lambda: read_yaml(fifo), ConfigError)):
        with pytest.raises(error) as err:
            call()
        assert str(err.value).startswith(f"{fifo}: a named pipe (FIFO) that nothing was written to")


def test_id_list_and_config_from_pipes(tmp_path):
    assert read_id_list(_anonymous_pipe(b"# train\nsub-1\n sub-2 \n"), "--train-ids") == ["sub-1", "sub-2"]
    assert read_yaml(_anonymous_pipe(b"batch_size: 8\n")) == {"batch_size": 8}
    with pytest.raises(ConfigError, match="cannot read config"):
        read_yaml(_anonymous_pipe(b"a: [1,\n"))


def test_load_config_reads_a_pipe(tmp_path):
    from slice2vol.data.io import VolumeConfig

    cfg = load_config(VolumeConfig, _anonymous_pipe(b"crop_foreground: true\n"))
    assert cfg.crop_foreground is True
