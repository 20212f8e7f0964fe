"""Options every encoder family shares (``--encoder-arg`` / ``encoders.N.kwargs``) are checked when the encoder
is built, in one place (:mod:`slice2vol.encoders.base`), with one line naming the option and its rule."""

from __future__ import annotations

import math

import pytest
import torch

from slice2vol.encoders import ENCODERS, Encoder, EncoderInfo, build_encoder
from slice2vol.encoders.base import apply_preprocess_overrides, check_preprocessing, gem_pool, to_2tuple

# one tiny, random-weight build per family (img_size small, few blocks)
FAMILIES = {
    "tv/mobilenet_v2": dict(img_size=32),
    "timm/resnet18": dict(img_size=32),
    "timm/vit_small_patch16_224": dict(img_size=32, model_kwargs=dict(depth=1)),
    "hf/facebook/dinov2-small": dict(img_size=28, config_overrides=dict(num_hidden_layers=1)),
    "openclip/ViT-B-16:openai": dict(img_size=32, vision_cfg=dict(layers=1, width=64, head_width=32), embed_dim=32),
    "sam/vit_b": dict(img_size=32, embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,), window_size=2),
    "braindino/vit_base": dict(img_size=32, model_kwargs=dict(depth=1, embed_dim=48, num_heads=2)),
}

# refused from the option values alone, before a model is built (the H4 fuzzing cases and their kin)
BEFORE_BUILD = [
    (dict(img_size=100000), r"img_size must be a whole number of pixels 1-4096.*got 100000"),
    (dict(img_size=0), r"img_size must be a whole number of pixels 1-4096.*got 0"),
    (dict(img_size=[32, 5000]), r"img_size must be a whole number of pixels 1-4096"),
    (dict(img_size="abc"), r"img_size must be a whole number of pixels"),
    (dict(std=[0, 0, 0]), r"std values must be finite numbers > 0"),
    (dict(std=[1, 1, math.inf]), r"std values must be finite numbers > 0"),
    (dict(mean=[0.5, math.nan, 0.5]), r"mean values must be finite numbers"),
    (dict(mean="abc"), r"mean values must be finite numbers"),
    (dict(channel_mode="foo"), r"channel_mode must be one of replicate, stack, mean, got 'foo'"),
    (dict(interpolation=5), r"interpolation must be a name such as 'bicubic', got 5"),
    (dict(crop_pct=math.nan), r"crop_pct must be a number in \(0, 1\]"),
    (dict(pooling="gem", gem_p=0), r"gem_p must be a finite number > 0, got 0"),
    (dict(pooling="gem", gem_p=-1), r"gem_p must be a finite number > 0, got -1"),
    (dict(pooling="gem", gem_p=math.nan), r"gem_p must be a finite number > 0, got nan"),
    (dict(pooling="gem", gem_p="nan"), r"gem_p must be a finite number > 0, got 'nan'"),
]


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails a test that builds a model: the options must be refused before."""
    import slice2vol.encoders

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(ENCODERS, "build", refuse)
    monkeypatch.setattr(slice2vol.encoders, "open_builder", refuse)


@pytest.mark.parametrize("key", FAMILIES)
@pytest.mark.parametrize("options, message", BEFORE_BUILD, ids=[str(o) for o, _ in BEFORE_BUILD])
def test_bad_option_values_are_refused_before_any_build(key, options, message, nothing_built):
    with pytest.raises(ValueError, match=f"^{key}: {message}") as err:
        build_encoder(key, "random", **{**FAMILIES[key], **options})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", FAMILIES)
@pytest.mark.parametrize("options, message", [
    (dict(mean=[1, 2]), r"mean: 2 values for 3 input channels"),
    (dict(std=[0.2, 0.2, 0.2, 0.2]), r"std: 4 values for 3 input channels"),
    (dict(interpolation="cubic"), r"interpolation must be one of bicubic, bilinear, torch-bilinear, nearest, "
                                  r"got 'cubic'"),
    (dict(interpolation="cubic-spline"), r"interpolation must be one of bicubic, bilinear, torch-bilinear"),
])
def test_options_that_depend_on_the_network_are_refused_once_built(key, options, message):
    with pytest.raises(ValueError, match=f"^{key}: {message}"):
        build_encoder(key, "random", **{**FAMILIES[key], **options})


def test_medsam_knows_its_own_resize_only():
    tiny = FAMILIES["sam/vit_b"]
    assert build_encoder("medsam/vit_b", "random", **tiny).info.interpolation == "cubic-spline"
    assert build_encoder("medsam/vit_b", "random", interpolation="nearest", **tiny).info.interpolation == "nearest"
    with pytest.raises(ValueError, match=r"^medsam/vit_b: interpolation must be one of cubic-spline, bicubic, "
                                         r"bilinear, nearest, got 'torch-bilinear'"):
        build_encoder("medsam/vit_b", "random", interpolation="torch-bilinear", **tiny)


@pytest.mark.parametrize("key", ["tv/resnet18", "timm/resnet18"])
def test_gem_p_is_used_with_gem_pooling_only(key):
    torch.manual_seed(0)
    images = torch.rand(2, 1, 40, 40)
    gem3 = build_encoder(key, "random", pooling="gem", img_size=128)  # a 4x4 map: p matters
    gem8 = build_encoder(key, "random", pooling="gem", gem_p=8, img_size=128)
    gem8.load_state_dict(gem3.state_dict())
    assert gem3.gem_p == 3.0 and gem8.gem_p == 8.0
    with torch.no_grad():
        low, high = gem3.encode(images), gem8.encode(images)
    assert (high >= low - 1e-5).all() and (high - low).abs().max() > 1e-2  # a power mean grows with p
    with pytest.raises(ValueError, match=rf"^{key}: gem_p applies to pooling=gem only, pooling is 'avg'"):
        build_encoder(key, "random", pooling="avg", gem_p=8, img_size=32)


def test_tv_pooling_is_checked_when_built():
    with pytest.raises(ValueError, match=r"^tv/mobilenet_v2: pooling must be one of avg, gem, max, got 'foo'"):
        build_encoder("tv/mobilenet_v2", "random", pooling="foo", img_size=32)


@pytest.mark.parametrize("key", ["openclip/ViT-B-16:openai", "sam/vit_b"])
def test_square_only_families_refuse_a_rectangle(key):
    with pytest.raises(ValueError, match=f"^{key}: img_size must be square, got 32x48"):
        build_encoder(key, "random", **{**FAMILIES[key], "img_size": [32, 48]})


def test_good_values_still_work():
    one = build_encoder("tv/mobilenet_v2", "random", img_size=[32, 48], mean=0.5, std=[0.25], channel_mode="mean")
    assert one.info.input_size == (32, 48) and one.info.mean == (0.5,) and one.info.std == (0.25,)
    assert one.info.channel_mode == "mean"
    x = one.preprocess(torch.full((2, 3, 20, 20), 0.75))
    assert x.shape == (2, 3, 32, 48) and torch.allclose(x, torch.ones_like(x))  # (0.75 - 0.5) / 0.25
    assert build_encoder("timm/resnet18", "random", img_size=[4096, 4096]).info.input_size == (4096, 4096)


def test_builders_called_directly_check_too():
    from slice2vol.encoders.torchvision import build_torchvision

    with pytest.raises(ValueError, match=r"^tv/mobilenet_v2: img_size must be a whole number"):
        build_torchvision("mobilenet_v2", img_size=0)  # was silently the default, 224
    info = EncoderInfo(key="test/x", embed_dim=4, input_size=(32, 32))
    with pytest.raises(ValueError, match=r"^test/x: mean: 2 values for 3 input channels"):
        apply_preprocess_overrides(info, mean=[1, 2])
    with pytest.raises(ValueError, match=r"^test/x: channel_mode must be one of"):
        apply_preprocess_overrides(info, channel_mode="foo")
    with pytest.raises(ValueError, match=r"^test/x: std values must be finite numbers > 0"):
        apply_preprocess_overrides(info, std=(0.0, 0.0, 0.0))
    assert info.mean == EncoderInfo.mean and info.channel_mode == "replicate"  # nothing half-applied
    with pytest.raises(ValueError, match=r"gem_p must be a finite number > 0, got 0"):
        gem_pool(torch.ones(1, 2, 3, 3), p=0)
    with pytest.raises(ValueError, match=r"1-4096"):
        to_2tuple(4097)


class _Family(Encoder):
    def __init__(self, info: EncoderInfo) -> None:
        super().__init__()
        self.info = info
        self.proj = torch.nn.Linear(1, 1)


@pytest.mark.parametrize("field, value, message", [
    ("mean", (0.5, 0.5), r"mean: 2 values for 3 input channels"),
    ("std", (0.0, 1.0, 1.0), r"std values must be finite numbers > 0"),
    ("channel_mode", "foo", r"channel_mode must be one of"),
    ("interpolation", "cubic", r"interpolation must be one of"),
    ("input_size", (0, 32), r"img_size must be a whole number of pixels 1-4096"),
])
def test_a_new_family_gets_the_checks_without_calling_them(monkeypatch, field, value, message):
    """A family whose builder checks nothing is still refused by ``build_encoder``."""
    def builder(weights="random", **kwargs):
        return _Family(EncoderInfo(**{"key": "test/family", "embed_dim": 1, "input_size": (32, 32), field: value}))

    monkeypatch.setitem(ENCODERS._entries, "test/family", builder)
    with pytest.raises(ValueError, match=f"^test/family: {message}"):
        build_encoder("test/family")
    check_preprocessing(_Family(EncoderInfo(key="test/family", embed_dim=1, input_size=(32, 32))))  # defaults pass


def test_cache_refuses_an_option_before_reading_a_volume(tmp_path, monkeypatch, capsys):
    """``slice2vol cache --encoder-arg`` with a bad value: exit 2, one line, no volume read, no store."""
    import slice2vol.extract
    from slice2vol.cli import main
    from slice2vol.data.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "cohort", n_subjects=2, spacing=8.0, progress=False)
    read = []
    real = slice2vol.extract.load_subject
    monkeypatch.setattr(slice2vol.extract, "load_subject", lambda *a, **k: read.append(a) or real(*a, **k))
    store = tmp_path / "x.h5"
    base = ["cache", "--manifest", str(manifest), "--encoder", "tv/mobilenet_v2", "--weights", "random",
            "--size", "32", "--stride", "8", "--no-progress", "--store", str(store)]
    for options in (["mean=[1,2]"], ["pooling=gem", "gem_p=0"], ["img_size=100000"], ["std=[0,0,0]"],
                    ["channel_mode=foo"], ["img_size=0"]):
        argv = base + [arg for option in options for arg in ("--encoder-arg", option)]
        assert main(argv) == 2, options
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("slice2vol cache: error: tv/mobilenet_v2: "), err
        assert "Traceback" not in "\n".join(err)
    assert read == [] and not store.exists()
