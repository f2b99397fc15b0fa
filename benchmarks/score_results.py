"""Score a results CSV against a sample's truth file: precision, recall, F1 of the flagged
set, AUROC and average precision of label_quality, correction accuracy, coverage. The
metrics are `benchmarks.scoring.rule_metrics`, so they match the benchmark's tables.

    python -m benchmarks.score_results RESULTS.csv TRUTH.csv [--sensitivity 60]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from benchmarks.scoring import default_relabel, predictions_from_frames, rule_metrics


def score_against_truth(results: pd.DataFrame, truth: pd.DataFrame,
                        flagged: np.ndarray | None = None,
                        sensitivity: float = 60.0, min_preds: int = 2) -> dict[str, float]:
    """Detection and correction metrics of one audit (rows matched on filename; `flagged`,
    when given, is in the results' row order). Relabelled: the product's rule
    (`tasks.relabel.select_rows`)."""
    classes = sorted(set(results["label"].astype(str)) | set(results["corrected_label"]
                                                             .astype(str)))
    p = predictions_from_frames(results, truth.astype(str), classes)
    move = default_relabel(p, sensitivity, min_preds)
    flag = p.is_label_issue if flagged is None else np.asarray(flagged, dtype=bool)
    metrics = rule_metrics(p.true, p.given, flag, p.quality, move, p.corrected, p.predicted)
    return {**metrics, "min_preds": int(p.num_preds.min())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("truth")
    p.add_argument("--sensitivity", type=float, default=60.0)
    a = p.parse_args()
    m = score_against_truth(pd.read_csv(a.results), pd.read_csv(a.truth), sensitivity=a.sensitivity)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
