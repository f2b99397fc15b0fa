"""The detection-quality benchmark's scoring code on tiny synthetic audits (no training)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from benchmarks.noise_bench import parse_args
from benchmarks.results_md import markdown_table
from benchmarks.score_results import score_against_truth
from benchmarks.scoring import (
    CLEANLAB_FILTERS,
    BenchTable,
    all_checks,
    candidate_rows,
    cleanlab_flags,
    cleanlab_rows,
    default_rows,
    original_rows,
    predictions_from_frames,
    ranking_scores,
    rule_metrics,
    target_checks,
)


def test_rule_metrics_by_hand():
    true = np.array([0, 0, 1, 1, 2, 2])
    given = np.array([1, 0, 1, 0, 2, 2])  # rows 0 and 3 are wrong
    flagged = np.array([1, 1, 0, 1, 0, 0], dtype=bool)  # tp 2, fp 1
    quality = np.array([0.1, 0.3, 0.9, np.nan, 0.8, 0.7])  # row 3 unpredicted: ranked last
    relabel = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    new_label = np.array([0, 2, 1, 0, 2, 2])  # row 0 fixed, row 1 broken
    predicted = ~np.isnan(quality)
    m = rule_metrics(true, given, flagged, quality, relabel, new_label, predicted)
    assert m["flagged"] == 3 and m["relabelled"] == 2
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.8)
    # Wrong rows rank 1st (q 0.1) and last (unscored): of 2 x 4 pairs, 4 + 0 won -> 0.5.
    assert m["auroc"] == pytest.approx(0.5)
    assert m["correction_acc"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(5 / 6)


def test_rule_metrics_nothing_flagged():
    true, given = np.array([0, 1, 1]), np.array([1, 1, 1])
    none = np.zeros(3, dtype=bool)
    m = rule_metrics(true, given, none, np.array([0.2, 0.9, 0.8]), none, given, ~none)
    assert np.isnan(m["precision"]) and m["recall"] == 0 and m["f1"] == 0
    assert np.isnan(m["correction_acc"]) and m["auroc"] == pytest.approx(1.0)


def test_ranking_scores_put_unscored_last_and_tied():
    s = ranking_scores(np.array([0.5, np.nan, 0.1, np.nan]))
    assert s[2] > s[0] > s[1] and s[1] == s[3]


def _synthetic(n: int = 60, k: int = 3, seed: int = 0, unpredicted: int = 0):
    """A results frame, truth and mean probabilities where every wrong label is confidently
    predicted as its true class (pct 100) and clean labels as themselves."""
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(k)]
    true = np.arange(n) % k
    given = true.copy()
    wrong = rng.choice(n, size=n // 5, replace=False)
    given[wrong] = (true[wrong] + 1) % k
    probs = np.full((n, k), 0.05)
    probs[np.arange(n), true] = 1 - 0.05 * (k - 1)
    num_preds = np.full(n, 2)
    pct = np.full(n, 100.0)
    corrected = true.copy()
    gone = np.arange(unpredicted)  # the first rows: no prediction
    probs[gone] = np.nan
    num_preds[gone] = 0
    pct[gone] = np.nan
    corrected[gone] = given[gone]
    quality = probs[np.arange(n), given]
    cls = np.array(classes, dtype=object)
    names = [f"{cls[g]}/img{i:03d}.png" for i, g in enumerate(given)]
    results = pd.DataFrame({
        "filename": names, "label": cls[given], "corrected_label": cls[corrected],
        "num_preds": num_preds, "%": pct, "label_quality": quality,
        "is_label_issue": (corrected != given) & (num_preds > 0),
        "suggested_quality": probs[np.arange(n), corrected],
    })
    truth = pd.DataFrame({"filename": names, "true_label": cls[true], "given_label": cls[given]})
    mean = pd.DataFrame({"filename": names, "mean_probs": list(probs)})
    return results, truth, classes, mean, wrong


def test_perfect_audit_scores_one_everywhere():
    results, truth, classes, mean, _ = _synthetic()
    p = predictions_from_frames(results, truth, classes, mean)
    rows = {**original_rows(p, 60), **default_rows(p, 60, 2)}
    t0 = time.perf_counter()
    cl, flags, seconds = cleanlab_rows(p)
    elapsed = time.perf_counter() - t0
    assert set(flags) == set(seconds) == set(CLEANLAB_FILTERS)
    # Each filter's own duration (not a timestamp or a running total): all fit in the call.
    assert all(s > 0 for s in seconds.values()) and sum(seconds.values()) <= elapsed
    rows |= cl | candidate_rows(p, flags, 60, 2)
    for name in ("original (random splits, hard votes)", "cleanlab confident_learning",
                 "rule: vote disagrees", "rule: confident_learning ∧ vote"):
        m = rows[name]
        assert (m["precision"], m["recall"], m["f1"]) == (1, 1, 1), name
        assert m["auroc"] == 1 and m["ap"] == pytest.approx(1)
        assert m["correction_acc"] == 1 and m["coverage"] == 1
    default = next(v for k, v in rows.items() if k.startswith("default audit"))
    assert default["f1"] == 1 and default["relabelled"] == 12


def test_unpredicted_rows_cost_recall_and_coverage():
    results, truth, classes, mean, wrong = _synthetic(unpredicted=10)
    p = predictions_from_frames(results, truth, classes, mean)
    m = original_rows(p, 60)["original (random splits, hard votes)"]
    missed = int(np.isin(wrong, np.arange(10)).sum())
    assert missed > 0  # the seed puts some wrong labels among the unpredicted rows
    assert m["precision"] == 1 and m["recall"] == pytest.approx(1 - missed / len(wrong))
    assert m["coverage"] == pytest.approx(50 / 60) and m["auroc"] < 1
    flags = cleanlab_flags(p.given, p.mean_probs, "confident_learning")
    assert not flags[:10].any() and flags[10:].sum() == len(wrong) - missed


def test_relabel_threshold_is_ge_for_original_and_gt_for_default():
    results, truth, classes, mean, wrong = _synthetic()
    results.loc[results["filename"].isin(truth["filename"].iloc[wrong]), "%"] = 60.0
    p = predictions_from_frames(results, truth, classes, mean)
    assert original_rows(p, 60)["original (random splits, hard votes)"]["relabelled"] == 12
    assert next(iter(default_rows(p, 60, 2).values()))["relabelled"] == 0
    assert next(iter(default_rows(p, 59, 2).values()))["relabelled"] == 12
    assert next(iter(default_rows(p, 59, 3).values()))["relabelled"] == 0  # min_preds
    # ... and the pooled probability of the suggested label must clear it too
    results["suggested_quality"] = 0.59
    p = predictions_from_frames(results, truth, classes, mean)
    assert next(iter(default_rows(p, 59, 2).values()))["relabelled"] == 0


def test_predictions_from_frames_rejects_mismatched_truth():
    results, truth, classes, mean, _ = _synthetic()
    with pytest.raises(ValueError, match="do not match"):
        predictions_from_frames(results, truth.iloc[1:], classes, mean)
    bad = truth.copy()
    bad.loc[0, "given_label"] = "c9"
    with pytest.raises(ValueError, match="given_label"):
        predictions_from_frames(results, bad, classes, mean)


def test_targets_pass_and_fail():
    def row(f1, auroc=0.99, acc=0.97, cov=1.0):
        return {"f1": f1, "auroc": auroc, "correction_acc": acc, "coverage": cov,
                "trainings": 10}

    rows = {"original (random splits, hard votes)": row(0.70),
            "default audit (x)": row(0.92), "cleanlab both": row(0.91)}
    assert all(ok for _, _, ok in target_checks(rows))
    rows["cleanlab prune_by_class"] = row(0.93)
    rows["default audit (x)"] = row(0.92, auroc=0.97, acc=float("nan"))
    failed = {t for t, _, ok in target_checks(rows) if not ok}
    assert failed == {"F1 >= best cleanlab filter F1", "AUROC >= 0.98",
                      "correction accuracy >= 0.95"}
    checks = all_checks([BenchTable("fmnist20k", "sym20", 300, 60, rows),
                         BenchTable("digits", "asym20", 1797, 359, rows)])
    assert checks[0][0] == "fmnist20k sym20 (capped at 300 images)" and checks[1] == (
        "digits asym20", [("F1 > original F1", "0.920 vs 0.700", True)])


def test_markdown_table_is_well_formed():
    results, truth, classes, mean, _ = _synthetic()
    p = predictions_from_frames(results, truth, classes, mean)
    rows = {k: {**v, "trainings": 2, "epochs": 4, "wall_s": 1.0}
            for k, v in original_rows(p, 60).items()}
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 3 and len({line.count("|") for line in lines}) == 1
    assert "| original (random splits, hard votes) | 2 | 4 | 12 | 1.000 |" in lines[2]


def test_parse_args_validates_names():
    args = parse_args(["--datasets", "digits", "--noise", "sym10,asym20"])
    assert args.datasets == ["digits"] and args.noise == ["sym10", "asym20"]
    with pytest.raises(SystemExit):
        parse_args(["--datasets", "mnist"])


def test_score_results_uses_the_same_metrics():
    results, truth, *_ = _synthetic(unpredicted=10)
    m = score_against_truth(results, truth, sensitivity=60)
    assert m["precision"] == 1 and m["coverage"] == pytest.approx(50 / 60)
    assert m["min_preds"] == 0 and m["relabelled"] == m["flagged"]


def test_recipe_sweep_trains_and_scores_a_tiny_plan(tmp_path, capsys):
    """The recipe sweep runs the product's trainer and scoring end to end (2 trainings of one
    epoch on scikit-learn digits) and reports metrics that are real fractions."""
    import json

    from benchmarks import recipe_sweep

    out = tmp_path / "sweep.json"
    assert recipe_sweep.main(["--pair", "digits:sym20", "--original", "--json", str(out),
                              "--variant", "tiny:n_repeats=2,num_epochs=1,test_split=0.5"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["method"]) for r in rows] == [("tiny", "default"),
                                                          ("tiny", "original")]
    default, original = rows
    assert default["coverage"] == 1.0  # one round of 2 folds predicts every image once
    assert original["coverage"] < 1.0  # two random halves miss about a quarter
    for r in rows:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 < r["pooled_acc_true"] <= 1 and 0 <= r["auroc"] <= 1
    assert "relabelled_votes_only" in default and "tiny  default" in capsys.readouterr().out
