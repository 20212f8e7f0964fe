import pytest
import torch

from slice2vol.ssl.rotation import rotate, rotation_classes
from tests.ssl.conftest import fit_fixed_batch, tiny_config


@pytest.mark.parametrize("dims,n", [(2, 4), (3, 10)])
def test_rotation_classes_are_distinct_rotations(dims, n):
    classes = rotation_classes(dims)
    assert len(classes) == n
    x = torch.randn(1, *(5,) * dims)
    outs = [rotate(x, k, plane) for k, plane in classes]
    assert torch.equal(outs[0], x)
    assert all(o.shape == x.shape for o in outs)
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.equal(outs[i], outs[j]), (classes[i], classes[j])


def test_rotate_matches_hand_case():
    x = torch.tensor([[[1, 2], [3, 4]]])
    assert rotate(x, 1, (0, 1)).tolist() == [[[2, 4], [1, 3]]]


@pytest.mark.parametrize("dims", [3, 2])
def test_rotation_fits_fixed_batch(dims, bank, tmp_path):
    before, after, result = fit_fixed_batch(tiny_config("rotation", dims), bank, tmp_path)
    assert after < before - 0.5, (before, after)
    assert "acc" in result.history[-1]


def test_rotation_refuses_non_cubic_crops():
    from slice2vol.config import from_dict
    from slice2vol.ssl import SSLConfig, build_method

    cfg = from_dict(SSLConfig, {"method": "rotation", "data": {"crop_size": [32, 32, 16]}})
    with pytest.raises(ValueError, match="cubic"):
        build_method(cfg)


def test_each_sample_is_rotated_by_its_own_label(monkeypatch):
    """The rotated batch the backbone sees, against rotate(sample, label's rotation) per sample."""
    import slice2vol.ssl.rotation as rotation_module
    from slice2vol.ssl import build_method
    from slice2vol.ssl.rotation import rotate
    from tests.ssl.conftest import tiny_config

    model = build_method(tiny_config("rotation", 3))
    seen = {}
    model.backbone.register_forward_pre_hook(lambda module, args: seen.update(rotated=args[0]))
    real_loss = rotation_module.classification_loss
    monkeypatch.setattr(rotation_module, "classification_loss",
                        lambda logits, labels: seen.update(labels=labels) or real_loss(logits, labels))
    batch = torch.rand(6, 1, 24, 24, 24)
    torch.manual_seed(3)
    model.training_step(batch)
    labels = seen["labels"].tolist()
    assert len(set(labels)) > 1  # mixed labels: a mix-up between samples would show
    for x, c, got in zip(batch, labels, seen["rotated"]):
        assert torch.equal(got, rotate(x, *model.classes[c]))
