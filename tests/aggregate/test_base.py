"""Bag validation, slice coordinates and estimator parameters."""

import numpy as np
import pytest

from slice2vol.aggregate import AGGREGATORS, BagError, PlaneBag, build_aggregator, check_bags
from slice2vol.aggregate.base import slice_coordinates


def _bag(s=5, d=4, planes=("axial",)):
    return {p: np.ones((s, d), np.float32) for p in planes}


@pytest.mark.parametrize(
    "bags, planes, match",
    [
        ([], None, "no bags"),
        ({"axial": np.ones((3, 2))}, None, "list of bags"),
        ([{"axial": np.ones((0, 4))}], None, "empty bag"),
        ([{"axial": np.ones((3,))}], None, r"shape \(S, D\)"),
        ([{"axial": np.full((3, 4), np.nan)}], None, "non-finite"),
        ([{"axial": np.ones((3, 4))}, {"axial": np.ones((3, 5))}], None, "dimension differs"),
        ([{"axial": np.ones((3, 4))}], ["coronal"], "missing plane"),
        ([{"axial": np.ones((3, 4))}], ["oblique"], "unknown plane"),
        ([{"diagonal": np.ones((3, 4))}], None, "unknown plane"),
        ([{"axial": np.ones((3, 4))}, {"coronal": np.ones((3, 4))}], None, "share no plane"),
        ([{"axial": PlaneBag(np.ones((3, 4)), positions=np.zeros((2, 3)))}], None, "positions"),
        ([{"axial": PlaneBag(np.ones((3, 4)), tokens=np.zeros((3, 4, 2)), token_grid=(3, 3))}], None, "tokens"),
        ([{"axial": {"feats": np.ones((3, 4))}}], None, "needs 'features'"),
    ],
)
def test_check_bags_errors(bags, planes, match):
    with pytest.raises(BagError, match=match):
        check_bags(bags, planes)


def test_check_bags_resolves_common_planes_in_canonical_order():
    bags = [_bag(planes=("sagittal", "axial", "coronal")), _bag(planes=("coronal", "sagittal"))]
    norm, planes, dim = check_bags(bags)
    assert planes == ["coronal", "sagittal"] and dim == 4
    assert isinstance(norm[0]["axial"], PlaneBag) and norm[0]["axial"].features.dtype == np.float32


def test_slice_coordinates_prefer_mm_then_indices_and_are_centred():
    pos = np.zeros((4, 3))
    pos[:, 2] = [10.0, 14.0, 18.0, 22.0]
    pb = PlaneBag(np.zeros((4, 2)), positions=pos, indices=np.array([5, 7, 9, 11]))
    np.testing.assert_allclose(slice_coordinates(pb, "axial"), [-6, -2, 2, 6])
    pb = PlaneBag(np.zeros((3, 2)), indices=np.array([2, 4, 8]))
    np.testing.assert_allclose(slice_coordinates(pb, "coronal"), [-3, -1, 3])
    np.testing.assert_allclose(slice_coordinates(PlaneBag(np.zeros((3, 2))), "coronal"), [-1, 0, 1])


def test_registry_and_params():
    assert {"mean", "max", "gem", "mil", "transformer", "fusion", "head3d"} <= set(AGGREGATORS.names())
    mil = build_aggregator("mil", hidden=8, epochs=3)
    params = mil.get_params()
    assert params["hidden"] == 8 and params["epochs"] == 3 and "planes" in params and "lr" in params
    assert mil.set_params(hidden=16).hidden == 16
    with pytest.raises(ValueError, match="unknown parameter"):
        mil.set_params(hiden=3)
    with pytest.raises(KeyError, match="unknown aggregator"):
        build_aggregator("attention-pooling")
    assert not AGGREGATORS.get("mean").requires_fit and AGGREGATORS.get("mil").requires_fit
    assert build_aggregator("fusion").requires_fit is False
    assert build_aggregator("fusion", mode="attention").requires_fit is True
    assert build_aggregator("fusion", base="mil").requires_fit is True
