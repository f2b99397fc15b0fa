"""The decision layer (tasks/decide.py): cleanlab's noise estimate, the tiers, the relabel
rule's ceiling, the model-quality guard and the run summary; and, end to end, an undertrained
audit that the guard stops (the report says so, relabel refuses, --force still relabels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import decide
from tasks.config import AuditConfig
from tests.datasets import snapshot


def noisy_case(n: int, k: int, noise: float, skill: float, seed: int = 0):
    """Given labels with a `noise` share flipped at random, and model votes that name the true
    class with probability `skill` (another class otherwise)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    flip = rng.random(n) < noise
    labels = np.where(flip, (true + rng.integers(1, k, n)) % k, true)
    right = rng.random(n) < skill
    vote = np.where(right, true, (true + rng.integers(1, k, n)) % k)
    return labels, vote


def test_noise_joint_is_cleanlabs_calibrated_joint():
    from cleanlab.count import compute_confident_joint, estimate_joint

    rng = np.random.default_rng(1)
    n, k = 3000, 4
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cj = compute_confident_joint(labels, probs, calibrate=False)
    ours = decide.noise_joint(cj, np.bincount(labels, minlength=k))
    theirs = estimate_joint(labels, probs)  # with cleanlab's integer rounding of each row
    assert ours.sum() == pytest.approx(1.0)
    assert np.abs(ours - theirs).max() < 2 / n
    rate, per_class = decide.noise_rates(ours)
    assert rate == pytest.approx(1 - np.trace(theirs), abs=2 * k / n)
    assert per_class.shape == (k,) and ((per_class >= 0) & (per_class <= 1)).all()


def test_noise_rates_of_a_known_joint_and_an_empty_class():
    joint = np.array([[0.4, 0.1, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    rate, per_class = decide.noise_rates(joint)
    assert rate == pytest.approx(0.1)
    assert per_class[0] == pytest.approx(0.2) and per_class[1] == 0.0 and np.isnan(per_class[2])


def test_tiers_issue_then_lowest_quality_up_to_twice_the_estimate():
    issue = np.array([True, False, False, False, False, False, True, False])
    quality = np.array([0.0, 0.5, 0.1, np.nan, 0.2, 0.9, 0.05, 0.1])
    tier = decide.tiers(issue, quality, expected_wrong=2.0)  # room for 4 - 2 = 2 more
    assert tier.tolist() == [0, 2, 1, 2, 2, 2, 0, 1]  # 0.1 twice: both; NaN never reviewed
    assert decide.tiers(issue, quality, expected_wrong=0.5).tolist() == [0, 2, 2, 2, 2, 2, 0, 2]
    everything = decide.tiers(np.zeros(8, bool), quality, expected_wrong=100)
    assert (everything[~np.isnan(quality)] == 1).all() and everything[3] == 2


def test_relabel_ceiling_is_the_probability_of_the_suggestion():
    ceiling = decide.relabel_ceiling_values(
        issue=np.array([True, True, True, False, True, True]),
        differs=np.array([True, True, True, True, False, True]),
        num_preds=np.array([2, 2, 1, 2, 2, 2]), min_preds=2,
        p_suggestion=np.array([0.55, 0.9, 0.9, 0.9, 0.9, np.nan]))
    assert ceiling[1] == pytest.approx(90.0) and np.isnan(ceiling[2:5]).all()
    assert ceiling[5] < 0  # a missing probability never moves
    # 0.55 > s / 100 exactly for s below the ceiling, also at the float boundary
    below = np.nextafter(ceiling[0], 0)
    assert below / 100 < 0.55 and not ceiling[0] / 100 < 0.55
    assert decide.lowest_share_reached(np.array([0.55]))[0] == ceiling[0]


def test_the_lowest_share_reached_is_the_exact_boundary_for_every_float():
    """s / 100 >= p at s, and not one float below, for ordinary, zero, subnormal and huge p
    (zero takes dozens of subnormal steps; only the values still off are stepped)."""
    rng = np.random.default_rng(0)
    p = np.concatenate([np.round(rng.random(20_000), 5), rng.random(20_000),
                        [0.0, -0.0, 1.0, -1.0, 0.55, 1e-300, 5e-324, -5e-324, 1e308, -1e308],
                        rng.uniform(-1e300, 1e300, 200), 10.0 ** rng.uniform(-320, -300, 200)])
    with np.errstate(all="ignore"):
        s = decide.lowest_share_reached(p)
        finite = np.isfinite(s)
        assert finite[:40_000].all()  # a huge p can have an infinite bound
        assert (s[finite] / 100 >= p[finite]).all()
        assert (np.nextafter(s[finite], -np.inf) / 100 < p[finite]).all()


def test_posterior_by_hand():
    """eta 0.1, K 10: the prior noise floor is 0.1 / 9 per class, the backward scale 8/9."""
    q_g = np.array([0.005, 0.02, 0.5, 0.9, np.nan, 0.05])
    q_s = np.array([0.99, 0.9, 0.45, 0.05, np.nan, 0.9])
    differs = np.array([True, True, True, True, False, False])
    # the other classes: the suggestion and the rest spread evenly over 8 classes
    probs = np.zeros((6, 10))
    probs[:, 0], probs[:, 1] = q_g, q_s
    probs[:, 2:] = ((1 - np.nan_to_num(q_g) - np.nan_to_num(q_s)) / 8)[:, None]
    others = decide.other_classes(probs, np.zeros(6, dtype=int), np.ones(6, dtype=int))
    wrong, sugg = decide.posterior(q_g, q_s, differs, 0.1, 10, 1000, *others)
    floor, scale = 0.1 / 9, 8 / 9
    right = 0.9 * (q_g - floor) / (scale * q_g)
    assert wrong[0] == 1.0  # below the floor: surely wrong
    assert wrong[1:4] == pytest.approx(1 - right[1:4])
    assert wrong[1] > 0.5 > wrong[2] > wrong[3] >= 0  # 0.02 flags, 0.5 does not
    spread = np.maximum(probs[:, 2] - floor, 0)
    share = np.maximum(q_s - floor, 0) / (np.maximum(q_s - floor, 0) + 8 * spread)
    assert sugg[:4] == pytest.approx(wrong[:4] * share[:4])
    assert share[0] == 1.0  # the others (0.000625 each) are below the floor
    assert sugg[5] == 0.0 and np.isnan(wrong[4]) and np.isnan(sugg[4])
    # the prior: at least one wrong label in the predicted images, and capped
    none, _ = decide.posterior(q_g, q_s, differs, 0.0, 10, 1000, *others)
    assert none[1] == pytest.approx(1 - 0.999 * (0.02 - 0.001 / 9)
                                    / ((1 - 0.001 * 10 / 9) * 0.02))
    capped, _ = decide.posterior(q_g, q_s, differs, 0.99, 2, 1000, *others)
    assert np.isfinite(capped[:4]).all() and (capped[:4] <= 1).all()
    one, _ = decide.posterior(q_g, q_s, differs, 0.1, 1, 1000, *others)
    assert (np.nan_to_num(one) == 0).all()


def test_other_classes_keeps_the_largest_and_sums_the_rest():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(40), size=5)
    labels, suggested = np.array([0, 3, 39, 7, 7]), np.array([1, 2, 0, 7, 8])
    top, rest = decide.other_classes(probs, labels, suggested)
    assert top.shape == (5, decide.OTHERS)
    for i, (g, s) in enumerate(zip(labels, suggested, strict=True)):
        other = np.sort(np.delete(probs[i], sorted({g, s})))
        assert np.sort(top[i]) == pytest.approx(other[-decide.OTHERS:], abs=1e-7)
        assert rest[i] == pytest.approx(other[:-decide.OTHERS].sum(), abs=1e-6)
    ten = probs[:, :10] / probs[:, :10].sum(1, keepdims=True)
    small, rest = decide.other_classes(ten, np.zeros(5, dtype=int), np.ones(5, dtype=int))
    assert small.shape == (5, 10) and (rest < 1e-6).all()  # every class kept: exact


@pytest.mark.parametrize(("noise", "skill", "fires"), [
    (0.1, 0.95, False), (0.2, 0.9, False), (0.4, 0.9, False), (0.1, 0.15, True)])
def test_the_guard_fires_on_near_chance_models_only(noise, skill, fires):
    labels, vote = noisy_case(2000, 10, noise, skill)
    predicted = np.ones(len(labels), bool)
    verdict, agreement = decide.guard(labels, vote, predicted, noise, [f"c{i}" for i in range(10)])
    assert verdict.trusted is not fires
    assert set(agreement) == {f"c{i}" for i in range(10)}
    if fires:
        assert "near chance" in verdict.reasons[0]


def test_the_guard_names_a_class_never_learnt_and_a_noise_rate_above_half():
    labels, vote = noisy_case(2000, 10, 0.1, 0.95)
    vote[labels == 3] = 4  # the models put every image of class 3 in class 4
    classes = [f"c{i}" for i in range(10)]
    verdict, _ = decide.guard(labels, vote, np.ones(len(labels), bool), 0.1, classes)
    assert not verdict.trusted and len(verdict.reasons) == 1
    assert "never learnt class(es) c3 (0% of" in verdict.reasons[0]
    verdict, _ = decide.guard(labels, labels, np.ones(len(labels), bool), 0.6, classes)
    assert verdict.reasons == [
        "the estimated noise rate is 60%, above half: the models disagree with most labels, "
        "which is more likely the models' fault"]
    none, _ = decide.guard(labels, vote, np.zeros(len(labels), bool), 0.1, classes)
    assert not none.trusted and none.reasons == ["no image has a prediction"]


def test_summary_counts_and_lines(tmp_path):
    cfg = AuditConfig(data_path=str(tmp_path), sensitivity=60, min_preds=2)
    labels = np.array([0, 0, 1, 1, 1, 2])
    corrected = np.array([1, 0, 1, 1, 0, 2])
    tier = np.array([0, 2, 2, 1, 0, 2], dtype=np.int8)
    joint = np.diag([2.0, 3.0, 1.0]) / 6
    s = decide.summary(cfg, ["a", "b", "c"], labels=labels, num_preds=np.array([2, 2, 2, 2, 1, 0]),
                       corrected=corrected,
                       p_label_wrong=np.array([0.9, 0.1, 0.0, 0.3, 0.7, np.nan]),
                       p_suggestion=np.array([0.9, 0.0, 0.0, 0.0, 0.7, np.nan]),
                       tier=tier, joint=joint)
    assert s["images"] == 6 and s["predicted"] == 5 and s["flagged"] == 2 and s["review"] == 1
    assert s["would_relabel"] == 1  # the second issue has one prediction, below min_preds
    assert s["pooled_accuracy"] == pytest.approx(0.6) and s["estimated_noise_rate"] == 0.0
    assert [c["class"] for c in s["per_class"]] == ["a", "b", "c"]
    assert s["per_class"][1]["flagged"] == 1 and s["per_class"][1]["review"] == 1
    assert s["expected_wrong_labels"] == pytest.approx(2.0)
    assert [c["expected_wrong_labels"] for c in s["per_class"]] == pytest.approx([1.0, 1.0, 0.0])
    json.dumps(s)  # JSON as it is
    lines = decide.summary_lines(s)
    assert len(lines) == 3 and lines[-1].startswith("WARNING: this audit cannot be trusted")


def tasks_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_an_undertrained_audit_is_stopped_by_the_guard(tmp_path):
    """600 images, 4 repeats of 2 epochs: the models barely learn. The audit warns, its
    summary says why, the report shows the banner, relabel refuses with one line, and
    --force relabels (and undo restores)."""
    data = tmp_path / "data"
    proc = tasks_cli("sample", "--out", str(data), "--n", "600", "--noise", "0.1", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = tasks_cli("audit", "--set", f"data_path={data}", "--set",
                      f"work_uri={tmp_path / 'work'}", "--set", "n_repeats=4", "--set",
                      "num_epochs=2", "--set", "device=cpu")
    assert audit.returncode == 0, audit.stderr[-3000:]
    out = audit.stdout.strip().splitlines()
    results = Path(out[-1])
    assert results.name == "results.csv"
    assert out[-2].startswith("WARNING: this audit cannot be trusted")
    assert "WARNING this audit cannot be trusted" in audit.stderr  # the log says so too
    summary = json.loads((results.parent / "summary.json").read_text())
    assert summary["guard"]["trusted"] is False and summary["guard"]["reasons"]
    res = pd.read_csv(results)
    assert set(res["tier"]) <= {"issue", "review", "ok"}
    assert (res["is_label_issue"] == (res["tier"] == "issue")).all()

    before = snapshot(data)
    loose = ["--sensitivity", "0", "--min-preds", "1"]
    refused = tasks_cli("relabel", "--results", str(results), *loose)
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: relabel refused: the audit cannot be "
                                               "trusted (")
    assert "--force" in err[0] and snapshot(data) == before
    forced = tasks_cli("relabel", "--results", str(results), "--force", *loose)
    assert forced.returncode == 0, forced.stderr[-2000:]
    journal = Path(forced.stdout.strip().splitlines()[-1])
    assert journal.name == "relabel-journal.jsonl" and snapshot(data) != before
    assert tasks_cli("undo", "--journal", str(journal)).returncode == 0
    assert snapshot(data) == before


def test_embeddings_on_random_weights_are_never_trusted(tmp_path):
    """A probe on a random backbone's features: untrusted whatever its agreement."""
    labels = np.array([0, 0, 1, 1, 2, 2] * 20)
    args = dict(labels=labels, num_preds=np.full(len(labels), 3), corrected=labels,
                p_label_wrong=np.zeros(len(labels)), p_suggestion=np.zeros(len(labels)),
                tier=np.full(len(labels), 2, dtype=np.int8), joint=np.diag([1.0, 1, 1]) / 3)
    classes = ["a", "b", "c"]
    trained = decide.summary(AuditConfig(data_path=str(tmp_path)), classes, **args)
    assert trained["guard"]["trusted"] is True
    for weights in ("none", None):
        cfg = AuditConfig(data_path=str(tmp_path), method="embeddings", model_name="resnet18",
                          model_weights=weights)
        s = decide.summary(cfg, classes, **args)
        assert (s["guard"]["trusted"], s["guard"]["reasons"]) == (
            (True, []) if weights is None else (False, [decide.RANDOM_EMBEDDINGS]))
