"""Runner details: the result cache never executes code, optional encoders skip missing weights."""

from __future__ import annotations

import os
import pickle

import numpy as np

from slice2vol.eval.runner import Encoder2DEntry, _Cache, _weights_file_missing


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cache_round_trips_plain_values_and_refuses_code(tmp_path):
    cache = _Cache(tmp_path)
    value = {"auc": np.float64(0.9), "pred": np.arange(4.0), "folds": [(0, "a"), (1, "b")]}
    cache.put("probe", "k1", value)
    back = cache.get("probe", "k1")
    np.testing.assert_array_equal(back["pred"], value["pred"])
    assert back["folds"] == value["folds"]
    (tmp_path / "probe-evil.pkl").write_bytes(pickle.dumps(_Evil()))
    assert cache.get("probe", "evil") is None  # treated as a miss, nothing executed


def test_optional_encoder_weights_detection(tmp_path):
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert not _weights_file_missing(Encoder2DEntry("a", "tv/mobilenet_v2", weights=str(present)), tmp_path)
    assert _weights_file_missing(Encoder2DEntry("b", "tv/mobilenet_v2", weights=str(tmp_path / "no.pth")), tmp_path)
    assert not _weights_file_missing(Encoder2DEntry("c", "tv/mobilenet_v2", weights="random"), tmp_path)
    assert not _weights_file_missing(Encoder2DEntry("d", "tv/mobilenet_v2", weights="hub"), tmp_path)
