"""The detection-quality benchmark's scoring code on tiny synthetic audits (no training)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from benchmarks.noise_bench import config_hash, embedding_overrides, parse_args
from benchmarks.results_md import markdown_table, write_results
from benchmarks.score_results import demo_lines, demo_run, score_against_truth
from benchmarks.score_results import main as score_main
from benchmarks.scoring import (
    CLEANLAB_FILTERS,
    BenchTable,
    all_checks,
    candidate_rows,
    cleanlab_flags,
    cleanlab_rows,
    decision_checks,
    default_metrics,
    default_rows,
    knn_note,
    missed_targets,
    original_rows,
    predictions_from_frames,
    ranking_scores,
    relabel_recall_ceiling,
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
    assert m["relabel_precision"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(5 / 6)


def test_rule_metrics_nothing_flagged():
    true, given = np.array([0, 1, 1]), np.array([1, 1, 1])
    none = np.zeros(3, dtype=bool)
    m = rule_metrics(true, given, none, np.array([0.2, 0.9, 0.8]), none, given, ~none)
    assert np.isnan(m["precision"]) and m["recall"] == 0 and m["f1"] == 0
    assert np.isnan(m["relabel_precision"]) and m["auroc"] == pytest.approx(1.0)
    assert m["relabel_recall"] == 0 and m["correct_moved"] == 0 and m["net_acc_change_pp"] == 0


def test_ranking_scores_put_unscored_last_and_tied():
    s = ranking_scores(np.array([0.5, np.nan, 0.1, np.nan]))
    assert s[2] > s[0] > s[1] and s[1] == s[3]


def _ten_images():
    """10 images, rows 0-2 wrong; row 0 moved to its true class, row 5 (correct) moved away."""
    true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    given = np.array([1, 2, 0, 0, 1, 2, 0, 1, 2, 0])
    new_label = given.copy()
    new_label[0], new_label[5] = 0, 0
    relabel = np.zeros(10, dtype=bool)
    relabel[[0, 5]] = True
    flagged = relabel.copy()
    flagged[1] = True
    quality = np.array([0.1, 0.2, 0.6, 0.9, 0.8, 0.3, 0.9, 0.9, 0.9, 0.9])
    return true, given, flagged, quality, relabel, new_label


def test_relabel_metrics_by_hand():
    true, given, flagged, quality, relabel, new_label = _ten_images()
    m = rule_metrics(true, given, flagged, quality, relabel, new_label, np.ones(10, bool))
    assert m["relabelled"] == 2 and m["relabel_precision"] == pytest.approx(0.5)
    assert m["relabel_recall"] == pytest.approx(1 / 3)
    assert m["correct_moved"] == 1 and m["correct_moved_share"] == pytest.approx(1 / 7)
    assert m["net_acc_change_pp"] == pytest.approx(0.0)
    # k = 3; by label_quality the top 3 are rows 0, 1 and 5 (correct): 2 of 3
    assert m["precision_at_k"] == pytest.approx(2 / 3)
    assert np.isnan(m["tiers_coverage"]) and m["guard"] is None  # no tiers, no guard
    # Also fix row 1; move row 2 to a class that is wrong too (not fixed, accuracy unchanged).
    relabel[[1, 2]] = True
    new_label[1], new_label[2] = 1, 1
    m = rule_metrics(true, given, flagged, quality, relabel, new_label, np.ones(10, bool))
    assert m["relabelled"] == 4 and m["relabel_precision"] == pytest.approx(0.5)
    assert m["relabel_recall"] == pytest.approx(2 / 3) and m["correct_moved"] == 1
    assert m["net_acc_change_pp"] == pytest.approx(10.0)  # (2 fixed - 1 broken) / 10
    # A row "moved" to its own label moves nothing.
    relabel[:] = False
    relabel[3] = True
    m = rule_metrics(true, given, flagged, quality, relabel, given, np.ones(10, bool))
    assert m["relabelled"] == 0 and m["correct_moved"] == 0


def test_decision_metrics_with_tiers_and_guard():
    true, given, flagged, quality, relabel, new_label = _ten_images()
    tier = np.array(["issue", "issue", "review"] + ["ok"] * 7)
    m = rule_metrics(true, given, flagged, quality, relabel, new_label, np.ones(10, bool),
                     tier=tier, guard={"trusted": True, "reasons": []})
    assert m["tiers_coverage"] == 1 and m["guard"] == "trusted"
    tier[2] = "ok"
    m = rule_metrics(true, given, flagged, quality, relabel, new_label, np.ones(10, bool),
                     tier=tier,
                     guard={"trusted": False, "reasons": ["the models are near chance"]})
    assert m["tiers_coverage"] == pytest.approx(2 / 3)
    assert m["guard"] == "untrusted" and m["guard_reasons"] == "the models are near chance"


def _synthetic(n: int = 60, k: int = 3, seed: int = 0, unpredicted: int = 0,
               decision: bool = False):
    """A results frame, truth and mean probabilities where every wrong label is confidently
    predicted as its true class (pct 100) and clean labels as themselves, with the posterior's
    columns as merge computes them (`tasks.decide.posterior` at a 20% noise rate: every wrong
    label's p_suggestion is above 0.9); with `decision`, the tier column too (every wrong
    label an issue, no review tier)."""
    from tasks.decide import other_classes, posterior

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
    p_wrong, p_sugg = posterior(quality, results["suggested_quality"].to_numpy(),
                                corrected != given, 0.2, k, n - unpredicted,
                                *other_classes(probs, given, corrected))
    results["p_label_wrong"], results["p_suggestion"] = np.round(p_wrong, 5), np.round(p_sugg, 5)
    if decision:
        results["tier"] = np.where(results["is_label_issue"], "issue", "ok")
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
        assert m["relabel_precision"] == 1 and m["coverage"] == 1
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
    """The original method relabels at `%` >= its sensitivity; the default audit at
    `p_suggestion` > sensitivity / 100, reading neither `%` nor `suggested_quality`."""
    results, truth, classes, mean, wrong = _synthetic()
    wrong_rows = results["filename"].isin(truth["filename"].iloc[wrong])
    results.loc[wrong_rows, ["%", "p_suggestion"]] = [60.0, 0.6]
    p = predictions_from_frames(results, truth, classes, mean)
    assert original_rows(p, 60)["original (random splits, hard votes)"]["relabelled"] == 12
    assert next(iter(default_rows(p, 60, 2).values()))["relabelled"] == 0
    assert next(iter(default_rows(p, 59, 2).values()))["relabelled"] == 12
    assert next(iter(default_rows(p, 59, 3).values()))["relabelled"] == 0  # min_preds
    # Low votes and pooled probabilities stop the original method, not the default.
    results.loc[wrong_rows, ["%", "suggested_quality"]] = [10.0, 0.01]
    p = predictions_from_frames(results, truth, classes, mean)
    assert original_rows(p, 60)["original (random splits, hard votes)"]["relabelled"] == 0
    assert next(iter(default_rows(p, 59, 2).values()))["relabelled"] == 12


def test_predictions_from_frames_rejects_mismatched_truth():
    results, truth, classes, mean, _ = _synthetic()
    with pytest.raises(ValueError, match="do not match"):
        predictions_from_frames(results, truth.iloc[1:], classes, mean)
    bad = truth.copy()
    bad.loc[0, "given_label"] = "c9"
    with pytest.raises(ValueError, match="given_label"):
        predictions_from_frames(results, bad, classes, mean)


def _row(**over):
    """A default-audit row that meets every target."""
    return {"trainings": 10, "flagged": 100, "precision": 0.9, "recall": 0.9, "f1": 0.95,
            "precision_at_k": 0.9, "auroc": 0.99, "ap": 0.95,
            "relabelled": 50,
            "relabel_precision": 0.97, "relabel_recall": 0.7, "correct_moved": 1,
            "correct_moved_share": 0.001, "net_acc_change_pp": 1.5, "tiers_coverage": 0.97,
            "guard": "trusted", "guard_reasons": "", "coverage": 1.0, **over}


def test_targets_pass_and_fail():
    rows = {"original (random splits, hard votes)": _row(f1=0.70),
            "default audit (x)": _row(f1=0.92), "cleanlab both": _row(f1=0.91)}
    assert all(ok for _, _, ok in target_checks(rows))
    rows["cleanlab prune_by_class"] = _row(f1=0.93)
    rows["default audit (x)"] = _row(f1=0.92, auroc=0.97, relabel_precision=float("nan"))
    failed = {t for t, _, ok in target_checks(rows) if not ok}
    assert failed == {"F1 >= best cleanlab filter F1", "AUROC >= 0.98",
                      "relabel precision >= 0.95"}
    checks = all_checks([BenchTable("fmnist20k", "sym20", 300, 60, rows),
                         BenchTable("digits", "asym20", 1797, 359, rows)])
    assert checks[0][0] == "fmnist20k sym20 (capped at 300 images)"
    assert checks[1][0] == "digits asym20"
    assert checks[1][1][-1] == ("F1 > original F1", "0.920 vs 0.700", True)
    # Issue 5's checks join issue 14's on the target row, without a second relabel precision.
    targets = [t for t, _, _ in checks[0][1]]
    assert targets.count("relabel precision >= 0.95") == 1
    assert {"F1 >= 0.938", "F1 >= 0.90", "F1 >= 1.2 x original F1", "coverage 100%"} <= set(
        targets)
    # ... and the original-method comparisons only when the original audit ran.
    del rows["original (random splits, hard votes)"]
    (_, items), (_, asym) = all_checks([BenchTable("fmnist20k", "sym20", 20000, 4000, rows),
                                        BenchTable("digits", "asym20", 1797, 359, rows)])
    assert not any("original" in t for t, _, _ in items + asym)


def test_decision_checks_by_row():
    targets = {t for t, _, ok in decision_checks("fmnist5k", "sym10", _row()) if ok}
    assert targets == {"relabel precision >= 0.95", "correct labels moved <= 0.5%",
                       "net label accuracy change > 0", "relabel recall >= 0.6",
                       "flag precision >= 0.85", "flag recall >= 0.8",
                       "issue + review tiers hold >= 95% of the wrong labels",
                       "the guard trusts the audit"}
    # Asymmetric noise: no tiers target; a row outside the lists: no recall/flag targets.
    targets = {t for t, _, _ in decision_checks("fmnist2k", "asym10", _row())}
    assert targets == {"relabel precision >= 0.95", "correct labels moved <= 0.5%",
                       "net label accuracy change > 0", "the guard trusts the audit"}
    bad = _row(relabel_precision=0.9, correct_moved=18, correct_moved_share=0.01,
               net_acc_change_pp=0.0, recall=0.75, tiers_coverage=float("nan"),
               guard="untrusted", guard_reasons="the models are near chance")
    got = {t: (m, ok) for t, m, ok in decision_checks("fmnist5k", "sym5", bad)}
    assert got["relabel precision >= 0.95"] == ("0.9000 (misses by 0.0500)", False)
    assert got["correct labels moved <= 0.5%"] == ("18 (1.00%) (misses by 0.50%)", False)
    assert got["net label accuracy change > 0"] == ("+0.00 pp (must be above 0)", False)
    assert got["flag recall >= 0.8"] == ("0.750 (misses by 0.050)", False)
    assert got["flag precision >= 0.85"] == ("0.900", True)
    assert got["issue + review tiers hold >= 95% of the wrong labels"] == ("not measured",
                                                                          False)
    assert got["the guard trusts the audit"] == (
        "untrusted: the models are near chance", False)
    nothing = decision_checks("digits", "sym2", _row(relabelled=0,
                                                     relabel_precision=float("nan")))
    assert nothing[0] == ("relabel precision >= 0.95 (where anything moves)", "nothing moved",
                          True)
    missed = missed_targets([("fmnist5k sym5", decision_checks("fmnist5k", "sym5", bad))])
    assert "fmnist5k sym5: relabel precision >= 0.95: 0.9000 (misses by 0.0500)" in missed
    assert len(missed) == 6


def test_relabel_recall_ceiling_by_hand():
    """Eight wrong labels, all suggested right; the ceiling is the longest prefix of the
    p_suggestion ranking (ties move together) that is precise enough."""
    results, truth, classes, mean, _ = _synthetic(n=40, k=2)  # 8 wrong labels
    p = predictions_from_frames(results, truth, classes, mean)
    assert relabel_recall_ceiling(p, 2, 0.95) == 1.0
    issues = np.flatnonzero(p.is_label_issue)
    assert len(issues) == 8
    p.p_suggestion = p.p_suggestion.copy()
    p.p_suggestion[issues] = [0.99, 0.98, 0.97, 0.96, 0.96, 0.95, 0.94, 0.93]
    p.true = p.true.copy()
    p.true[issues[3]] = p.given[issues[3]]  # 4th: correctly labelled, but moved away
    # Cuts (7 wrong labels): 1/1, 2/2, 3/3 right, then 4/5 with the tie, 5/6, 6/7, 7/8.
    assert relabel_recall_ceiling(p, 2, 0.95) == pytest.approx(3 / 7)
    assert relabel_recall_ceiling(p, 2, 0.86) == pytest.approx(7 / 7)  # 7/8 = 0.875
    p.true[issues[7]] = p.given[issues[7]]  # the last one too: 6 wrong labels
    assert relabel_recall_ceiling(p, 2, 0.86) == pytest.approx(3 / 6)  # 6/8 and 5/7 < 0.86
    assert relabel_recall_ceiling(p, 3, 0.5) == 0.0  # no image has 3 predictions
    row = _row(relabel_recall=0.3, relabel_recall_ceiling=0.54)
    got = {t: m for t, m, _ in decision_checks("fmnist5k", "sym10", row)}
    assert got["relabel recall >= 0.6"] == (
        "0.300 (misses by 0.300); at relabel precision >= 0.95 no sensitivity gets above "
        "0.540 with these models")


def test_results_md_lists_checks_and_misses(tmp_path):
    import argparse

    rows = {"default audit (x)": _row(precision=0.8, wall_s=1.0, epochs=20),
            "cleanlab both": _row(wall_s=1.0, epochs=20, tiers_coverage=float("nan"),
                                  guard=None)}
    out = tmp_path / "RESULTS.md"
    info = {"machine": "m", "software": "s", "commit": "c", "load": "0"}
    base = {"n_repeats": 10, "num_epochs": 8, "patience": 2}
    write_results(out, argparse.Namespace(seed=0, sensitivity=60.0), ["--reuse"], info, base,
                  [BenchTable("fmnist5k", "sym10", 5000, 500, rows)], pd.Timestamp.now(), 1.0)
    text = out.read_text()
    assert "7 of 8 checks pass" in text
    assert "| fmnist5k sym10 | flag precision >= 0.85 | 0.800 (misses by 0.050) | FAIL |" in text
    missed = text.split("### Where a target is missed")[1].split("\n## ")[0]
    assert missed.strip() == "- fmnist5k sym10: flag precision >= 0.85: 0.800 (misses by 0.050)"
    table = next(line for line in text.splitlines() if line.startswith("| cleanlab both |"))
    assert table.split(" | ").count("—") == 2  # no tiers, no guard


def test_predictions_read_the_tiers_and_the_guard():
    results, truth, classes, mean, wrong = _synthetic(decision=True, unpredicted=3)
    guard = {"trusted": False, "reasons": ["a class the models never learnt"]}
    p = predictions_from_frames(results, truth, classes, mean, guard=guard)
    assert (p.tier == np.where(p.is_label_issue, "issue", "ok")).all() and p.guard is guard
    m = default_metrics(p, 60, 2)
    assert m["guard"] == "untrusted"
    missed = int(np.isin(wrong, np.arange(3)).sum())  # unpredicted wrong labels: tier ok
    assert m["tiers_coverage"] == pytest.approx(1 - missed / len(wrong))
    assert m["relabelled"] == len(wrong) - missed and m["relabel_precision"] == 1
    # An audit from before the tiers: nothing derived, the metrics missing.
    old = results.drop(columns=["tier"])
    p = predictions_from_frames(old, truth, classes, mean)
    assert p.tier is None
    m = default_metrics(p, 60, 2)
    assert np.isnan(m["tiers_coverage"])
    assert m["guard"] is None and m["relabelled"] == len(wrong) - missed
    cells = markdown_table({"default audit": {**m, "trainings": 2, "epochs": 2,
                                              "wall_s": 1.0}}).splitlines()[2].split(" | ")
    assert cells.count("—") == 2


def test_score_results_demo_prints_the_readme_numbers(tmp_path, capsys):
    from tasks import runs
    from tasks.config import parse_config

    results, truth, *_ = _synthetic(decision=True)
    results.loc[results.index[:2], "is_label_issue"] = True  # flag the first two rows too
    results.loc[results.index[:2], "tier"] = "issue"
    n_wrong = int((truth["true_label"] != truth["given_label"]).sum())
    (tmp_path / "data" / "sample").mkdir(parents=True)
    truth.to_csv(tmp_path / "data" / "sample.truth.csv", index=False)
    for name, data in (("other", "data/other"), ("sample-abc", "data/sample")):
        run = tmp_path / "work" / "runs" / name
        run.mkdir(parents=True)
        runs.write_config(str(run), parse_config({"data_path": data, "work_uri": "work"},
                                                 check_installed=False))
        results.to_csv(run / "results.csv", index=False)
    run = demo_run(tmp_path)
    assert run.name == "sample-abc"
    (run / "summary.json").write_text('{"guard": {"trusted": true, "reasons": []}}')
    lines = demo_lines(run, tmp_path / "data" / "sample.truth.csv")
    flagged = n_wrong + int((truth["true_label"] == truth["given_label"]).iloc[:2].sum())
    cfg = runs.read_config(str(run))  # the run's own thresholds (the defaults here)
    assert lines[0].endswith(f"relabel at sensitivity {cfg.sensitivity:g}, min_preds "
                             f"{cfg.min_preds}; guard: trusted)")
    assert lines[1] == f"flag precision {n_wrong / flagged:.3f} ({flagged} flagged; recall 1.000)"
    assert lines[2].startswith(f"relabel precision 1.000 ({n_wrong} moved; relabel recall 1.000; "
                               "correct labels moved 0 (0.00%)")
    # The CSV mode reads the guard beside the results, and says what is wrong in one line.
    assert score_main([str(run / "results.csv"), str(tmp_path / "data" / "sample.truth.csv")]) == 0
    out = capsys.readouterr().out
    assert "relabel_precision=1.0000" in out and "guard=trusted" in out
    assert score_main(["--demo", "--run", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


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


def test_score_results_keeps_numeric_class_names(tmp_path, capsys):
    results, truth, *_ = _synthetic()
    for frame, columns in ((results, ["label", "corrected_label"]),
                           (truth, ["true_label", "given_label"])):
        for c in columns:
            frame[c] = frame[c].str.replace("c", "0")  # class folders 00, 01, 02
    results.to_csv(tmp_path / "results.csv", index=False)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    assert score_main([str(tmp_path / "results.csv"), str(tmp_path / "truth.csv")]) == 0
    out = capsys.readouterr().out
    assert "precision=1.0000" in out and "guard=None" in out  # no summary.json beside it


def test_speedup_check_on_the_target_row_only():
    rows = {"default audit (x)": _row(wall_s=1000.0),
            "embeddings (resnet18, none)": _row(wall_s=50.0, f1=0.5),
            "cleanlab both": _row(f1=0.9)}
    (_, items), (_, other) = all_checks([BenchTable("fmnist20k", "sym20", 20000, 4000, rows),
                                         BenchTable("digits", "sym20", 1797, 359, rows)])
    target = "embedding audit >= 10x faster than training mode"
    assert items[-1] == (target, "20.0x (training 1000 s / embeddings 50 s)", True)
    assert not any(t == target for t, _, _ in other)
    # The embedding row's quality is shown, not checked: the default's checks all pass.
    assert all(ok for _, _, ok in items)
    rows["embeddings (resnet18, none)"]["wall_s"] = 200.0
    rows["default audit (x)"]["finished"] = "2026-12-01T21:45:00+00:00"
    (_, items), = all_checks([BenchTable("fmnist20k", "sym20", 20000, 4000, rows,
                                         reused=("default",))])
    assert items[-1] == (target, "5.0x (training 1000 s / embeddings 200 s; default reused, "
                         "so the wall times may be from different runs: training finished "
                         "2026-12-01T21:45:00+00:00; embeddings finished at an unrecorded "
                         "time) (misses by 5.0)", False)
    # Embedding mode alone: its rows, no targets.
    assert all_checks([BenchTable("fmnist20k", "sym20", 20000, 4000,
                                  {"embeddings (resnet18, none)": _row()})]) == []


def test_parse_args_methods_and_embedding_options(tmp_path):
    args = parse_args(["--methods", "embeddings"])
    assert args.methods == ["embeddings"] and args.embed_model == "resnet18"
    assert args.embed_weights_label == "none" and args.embed_image_size == 64
    state = tmp_path / "backbone.pt"
    args = parse_args(["--methods", "default,embeddings", "--embed-weights", str(state),
                       "--embed-image-size", "0"])
    assert args.embed_weights_label == "backbone.pt"
    assert embedding_overrides(args)["image_size"] is None
    for bad in ("original,embeddings", "default,knn", ""):
        with pytest.raises(SystemExit):
            parse_args(["--methods", bad])


def test_embedding_audit_has_its_own_run_id():
    base = {"data_path": "/data/s", "work_uri": "/work/w"}
    default = config_hash(base)
    args = parse_args(["--methods", "default,embeddings"])
    embed = config_hash({**base, **embedding_overrides(args)})
    assert embed != default
    # The model's default size and that size named are the same audit (so --reuse finds it).
    at_224 = parse_args(["--methods", "embeddings", "--embed-image-size", "224"])
    at_default = parse_args(["--methods", "embeddings", "--embed-image-size", "0"])
    assert (config_hash({**base, **embedding_overrides(at_224)})
            == config_hash({**base, **embedding_overrides(at_default)}) != embed)


def test_knn_note_from_the_results_column():
    results, truth, classes, mean, wrong = _synthetic()
    assert knn_note(predictions_from_frames(results, truth, classes, mean)) is None
    knn = np.full(len(results), 0.8)
    knn[wrong] = 0.2
    knn[wrong[0]] = np.nan  # an image without neighbours
    results["knn_agreement"] = knn
    p = predictions_from_frames(results, truth, classes, mean)
    assert knn_note(p) == ("mean knn_agreement 0.200 on the wrong labels, 0.800 on the "
                           "correct ones")


def test_results_md_names_the_backbone_and_the_reused_audits(tmp_path):
    args = parse_args(["--methods", "default,embeddings", "--sensitivity", "90"])
    rows = {"default audit (x)": _row(wall_s=900.0, epochs=20),
            "embeddings (resnet18, none)": _row(wall_s=100.0, epochs=0),
            "cleanlab both": _row(f1=0.9, wall_s=900.0, epochs=20)}
    out = tmp_path / "RESULTS.md"
    info = {"machine": "m", "software": "s", "commit": "c", "load": "0"}
    base = {"n_repeats": 10, "num_epochs": 8, "patience": 2}
    table = BenchTable("fmnist20k", "sym20", 20000, 4000, rows, reused=("embeddings",),
                       notes=("embeddings (resnet18, none): mean knn_agreement 0.2",))
    write_results(out, args, [], info, base, [table], pd.Timestamp.now(), 1.0)
    text = out.read_text()
    assert ("backbone resnet18 with model_weights none (random initialisation" in text
            and "at 64 px" in text and "not the mode's ceiling" in text)
    assert "the same machine in one run" in text
    assert "Reused from an earlier run (`--reuse`; wall times are from when they ran): the " \
        "embeddings audit." in text
    assert "- embeddings (resnet18, none): mean knn_agreement 0.2" in text
    assert ("| fmnist20k sym20 | embedding audit >= 10x faster than training mode | 9.0x "
            "(training 900 s / embeddings 100 s; embeddings reused, so the wall times may be "
            "from different runs: training finished at an unrecorded time; embeddings "
            "finished at an unrecorded time) (misses by 1.0) | FAIL |") in text
