"""The benchmark: subject-level splits, k-NN and linear probes, dense segmentation probe, anomaly
detection, metrics with intervals and paired tests, figures, report, and the experiment runner.

Every probe works on plain arrays (rows = subjects), so any volume-embedding set of a feature store
(2D encoder + aggregator, or a native-3D encoder) is evaluated the same way:

    >>> from slice2vol.eval import make_splits, KNNProbe, LinearProbe
"""

from slice2vol.eval.knn import KNNConfig, KNNProbe, cosine_neighbours, l2_normalize
from slice2vol.eval.linear import LinearConfig, LinearProbe
from slice2vol.eval.metrics import (bootstrap_ci, classification_metrics, mean_sd, metric_fn, paired_test,
                                    regression_metrics)
from slice2vol.eval.splits import Fold, SplitConfig, SplitError, SubjectSplits, load_or_make_splits, make_splits

__all__ = [
    "KNNConfig", "KNNProbe", "cosine_neighbours", "l2_normalize", "LinearConfig", "LinearProbe", "bootstrap_ci",
    "classification_metrics", "mean_sd", "metric_fn", "paired_test", "regression_metrics", "Fold", "SplitConfig",
    "SplitError", "SubjectSplits", "load_or_make_splits", "make_splits",
]
