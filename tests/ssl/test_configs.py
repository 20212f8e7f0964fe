"""Every packaged SSL config loads into its dataclass and builds; the docs-table helper of the reproduce scripts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slice2vol.config import load_config
from slice2vol.ssl import SSLConfig, build_method

REPO = Path(__file__).resolve().parents[2]
CPU_CONFIGS = sorted(p.name for p in (REPO / "configs" / "ssl").glob("*.yaml") if "_gpu" not in p.name)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_config_builds_and_embeds(name):
    cfg = load_config(SSLConfig, REPO / "configs" / "ssl" / name, [])
    model = build_method(cfg).eval()
    with torch.no_grad():
        z = model.encoder(torch.rand(2, cfg.in_channels, *cfg.input_size))  # MAE: fixed input size
    assert z.shape == (2, model.encoder.embed_dim) and torch.isfinite(z).all()


def test_cpu_budget_config_is_what_the_docs_describe():
    cfg = load_config(SSLConfig, REPO / "configs" / "ssl" / "cpu_budget.yaml", [])
    assert cfg.method == "simclr" and cfg.method_params["positives"] == "subject"
    assert cfg.data.crops_per_subject == 2 and cfg.train.batch_size % 2 == 0
    assert cfg.train.keep_every > 0  # the learning curve needs kept checkpoints
    assert build_method(cfg).encoder.embed_dim == 8 + 16 + 32 + 64  # readout: stages


def test_write_block_replaces_only_its_block(tmp_path):
    sys.path.insert(0, str(REPO / "scripts" / "reproduce"))
    from ssl_common import write_block

    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- BEGIN t1 -->\nold\n<!-- END t1 -->\nb\n<!-- BEGIN t2 -->\nkeep\n<!-- END t2 -->\n")
    write_block(doc, "t1", "new | table\n")
    assert doc.read_text() == ("a\n<!-- BEGIN t1 -->\nnew | table\n<!-- END t1 -->\nb\n<!-- BEGIN t2 -->\nkeep\n"
                               "<!-- END t2 -->\n")
    with pytest.raises(SystemExit, match="no '<!-- BEGIN t3 -->'"):
        write_block(doc, "t3", "x")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "ssl").glob("*_gpu.yaml")))
def test_gpu_config_loads_and_builds(name):
    """The GPU configs are never trained here: at least they load and build (no forward: 96^3 crops)."""
    cfg = load_config(SSLConfig, REPO / "configs" / "ssl" / name, [])
    assert cfg.train.amp and cfg.train.keep_every > 0
    model = build_method(cfg)
    assert model.encoder.embed_dim > 0 and tuple(model.input_size) == cfg.input_size
