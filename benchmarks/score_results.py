"""Score a results CSV against a sample's truth file: precision, recall, F1 of the flagged
set, AUROC and average precision of label_quality, correction accuracy, coverage.

    python benchmarks/score_results.py RESULTS.csv TRUTH.csv [--sensitivity 60]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score


def score_against_truth(results: pd.DataFrame, truth: pd.DataFrame,
                        flagged: np.ndarray | None = None,
                        sensitivity: float = 60.0, min_preds: int = 1) -> dict[str, float]:
    """Detection and correction metrics of one audit (rows matched on filename)."""
    df = results.merge(truth, on="filename", how="inner", validate="one_to_one")
    if len(df) != len(truth):
        raise ValueError(f"{len(truth) - len(df)} truth rows have no result row")
    wrong = (df["true_label"] != df["given_label"]).to_numpy()
    flag = df["is_label_issue"].to_numpy(bool) if flagged is None else flagged
    tp = int((flag & wrong).sum())
    precision = tp / max(1, flag.sum())
    recall = tp / max(1, wrong.sum())
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    quality = df["label_quality"].to_numpy(float)
    has = ~np.isnan(quality)
    auroc = roc_auc_score(wrong[has], -quality[has]) if wrong[has].any() else float("nan")
    ap = average_precision_score(wrong[has], -quality[has]) if wrong[has].any() else float("nan")
    pct = pd.to_numeric(df["%"], errors="coerce").fillna(-1).to_numpy()
    move = ((df["corrected_label"] != df["label"]).to_numpy() & (pct > sensitivity)
            & (df["num_preds"].to_numpy() >= min_preds))
    correct = (df["corrected_label"] == df["true_label"]).to_numpy()
    return {
        "precision": precision, "recall": recall, "f1": f1, "auroc": auroc, "ap": ap,
        "flagged": int(flag.sum()), "relabelled": int(move.sum()),
        "correction_acc": float(correct[move].mean()) if move.any() else float("nan"),
        "coverage": float((df["num_preds"] > 0).mean()),
        "min_preds": int(df["num_preds"].min()),
    }


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
