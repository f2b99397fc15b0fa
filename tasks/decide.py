"""The decision layer over the pooled out-of-sample predictions: cleanlab's noise estimate,
the per-image probabilities that the label is wrong and that the suggestion is right, the
tiers, the model-quality guard, the relabel rule and the run summary.

- Noise: cleanlab's confident joint (rows: given label, columns: the class the pooled
  prediction confidently names), counted exactly as `cleanlab.count.compute_confident_joint`
  by `tasks.merge._BatchedFilter.count`, calibrated as `calibrate_confident_joint` does (each
  row scaled to its class's image count) into the joint distribution of (given, true)
  labels. Its off-diagonal mass is the estimated noise rate `eta`, overall and per class.
  With weak models it counts model errors as label noise, so it is an upper estimate.
- Posterior (`posterior`): the pooled probabilities `q` are read as what they are, a model
  fitted to the given (noisy) labels, i.e. q = P(given label | image). Under a noise model
  that replaces a label by any other class with probability eta (no pair is favoured, so a
  weak model's own look-alike confusions cannot raise the prior of exactly the pairs it
  confuses), Bayes' rule with the backward-corrected class probability
  p_g = (q_g - eta / (K - 1)) / (1 - eta K / (K - 1)) gives
  P(label right) = (1 - eta) p_g / q_g, so `p_label_wrong` = 1 - that (clipped to [0, 1]).
  Given that the label is wrong, the true class is j with probability proportional to its
  backward-corrected p_j = (q_j - eta / (K - 1)) / scale, clipped at 0 class by class, so
  `p_suggestion` = p_label_wrong x max(q_s - f, 0) / sum over j != given of max(q_j - f, 0)
  with the floor f = eta / (K - 1) (`other_classes` keeps the `OTHERS` largest q_j of each
  image besides the label and the suggestion; the rest's probability counts in full, which
  can only lower the share).
- Issues: `is_label_issue` is p_label_wrong > 1/2 (the label is more likely wrong than
  right) with a suggestion that differs from the label.
- Tiers: `issue` is `is_label_issue`; `review` the next most suspicious images (lowest label
  quality first) until issue + review hold `REVIEW_FACTOR` times cleanlab's estimated number
  of wrong labels, so that the wrong labels the issue tier misses are in front of a reviewer;
  `ok` the rest.
- Guard: whether the models are good enough for their flags to mean anything (`guard`).
- Relabel: an issue with at least `min_preds` predictions whose `p_suggestion` is above
  sensitivity / 100 (`relabel_ceiling_values`); in embedding mode, also only where the
  label most of its nearest neighbours carry is the suggestion (`neighbours_vote_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

TIERS = ("issue", "review", "ok")
# issue + review hold this many times the estimated number of wrong labels.
REVIEW_FACTOR = 2.0
# The guard: models whose agreement with the given labels is this share of the way from
# chance (the largest class's share) to perfect, or less, are too weak to audit with.
MIN_SKILL = 0.3
# ... per class, with at least MIN_CLASS_IMAGES predicted images.
MIN_CLASS_SKILL = 0.1
MIN_CLASS_IMAGES = 10
# The posterior's prior noise rate stays below this share of (K - 1) / K, where the backward
# correction's scale 1 - eta K / (K - 1) reaches 0 (the guard distrusts such runs anyway).
PRIOR_MAX = 0.9
# p_suggestion uses this many of the other classes' probabilities per image exactly; the
# remaining classes' probability counts in full (exact up to OTHERS + 1 classes).
OTHERS = 16
# Embedding mode: the share of an image's nearest neighbours with its label that backs it.
KNN_MAJORITY = 0.5
# Above this estimated noise rate the confident joint no longer tells labels from errors.
MAX_NOISE = 0.5
# Probes on a randomly initialised backbone's features are too weak and too sure of themselves
# for the posterior (benchmarks/EMBED_RESULTS.md): such an audit is never trusted to relabel.
RANDOM_EMBEDDINGS = ("method embeddings with a randomly initialised backbone (model_weights "
                     "none, or small_cnn): its features are too weak to decide on labels")
REMEDY = ("train longer (num_epochs), add images per class, or use a stronger or pretrained "
          "model (model_name, model_weights)")


def noise_joint(confident_joint: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """The joint distribution of (given, true) labels, summing to 1, from cleanlab's confident
    joint (K x K counts, rows given) and the images per given class: cleanlab's calibration
    (at least one image on each diagonal cell, rows scaled to the class counts), without its
    integer rounding."""
    cj = np.asarray(confident_joint, dtype=np.float64).copy()
    counts = np.asarray(label_counts, dtype=np.float64)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1.0))  # as compute_confident_joint does
    scaled = cj / cj.sum(1, keepdims=True) * counts[:, None]
    return scaled / max(scaled.sum(), 1e-12)


def noise_rates(joint: np.ndarray) -> tuple[float, np.ndarray]:
    """(overall, per given class) estimated share of wrong labels; NaN for a class without
    images."""
    rows = joint.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(rows > 0, 1.0 - joint.diagonal() / rows, np.nan)
    return float(1.0 - np.trace(joint)), per_class


def other_classes(probs: np.ndarray, labels: np.ndarray,
                  suggested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (image) of mean probabilities: the `OTHERS` largest probabilities of the
    classes other than its label and its suggestion (in no particular order; those two count
    as 0) and the sum of the remaining classes' probabilities. NaN (no prediction) counts
    as 0."""
    p = np.nan_to_num(np.asarray(probs, dtype=np.float32), nan=0.0)
    rows = np.arange(len(p))
    p[rows, np.asarray(labels)] = 0.0
    p[rows, np.asarray(suggested)] = 0.0
    keep = min(OTHERS, p.shape[1])
    top = np.partition(p, p.shape[1] - keep, axis=1)[:, p.shape[1] - keep:]
    rest = np.maximum(p.sum(1, dtype=np.float64) - top.sum(1, dtype=np.float64), 0.0)
    return top, rest


def posterior(label_quality: np.ndarray, suggested_quality: np.ndarray, differs: np.ndarray,
              noise_rate: float, num_classes: int, predicted: int, others: np.ndarray,
              rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (p_label_wrong, p_suggestion), see the module docstring (`others`, `rest`:
    `other_classes` of the mean probabilities, labels and suggestions); NaN where there is
    no prediction, p_suggestion 0 where the suggestion is the label. The prior noise rate is
    cleanlab's estimate, at least one wrong label in `predicted` images and at most
    `PRIOR_MAX` of the rate at which the backward correction breaks down."""
    q_g = np.asarray(label_quality, dtype=np.float64)
    q_s = np.asarray(suggested_quality, dtype=np.float64)
    if num_classes < 2:
        wrong = np.where(np.isnan(q_g), np.nan, 0.0)
        return wrong, wrong.copy()
    k = num_classes
    eta = min(max(float(noise_rate), 1.0 / max(1, predicted)), PRIOR_MAX * (k - 1) / k)
    floor, scale = eta / (k - 1), 1.0 - eta * k / (k - 1)
    mine = np.maximum(q_s - floor, 0.0)
    above = mine + (np.maximum(np.asarray(others, dtype=np.float64) - floor, 0.0).sum(1)
                    + np.asarray(rest, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        right = (1.0 - eta) * np.maximum(q_g - floor, 0.0) / (scale * q_g)
        right = np.where(q_g > 0, right, 0.0)
        wrong = 1.0 - np.clip(right, 0.0, 1.0)
        share = np.where(above > 0, mine / above, 0.0)
    sugg = np.where(np.asarray(differs, dtype=bool), wrong * np.clip(share, 0.0, 1.0), 0.0)
    missing = np.isnan(q_g)
    return np.where(missing, np.nan, wrong), np.where(missing | np.isnan(q_s), np.nan, sugg)


def backed_by_neighbours(knn_agreement: np.ndarray) -> np.ndarray:
    """Where at least KNN_MAJORITY of an image's nearest neighbours carry its given label
    (NaN: unknown, not backed). Embedding mode flags no such image: on its benchmark the gate
    raised flag and relabel precision on every row (benchmarks/KNN_DECISION.md)."""
    agreement = np.nan_to_num(np.asarray(knn_agreement, dtype=np.float64), nan=0.0)
    return agreement >= KNN_MAJORITY


def neighbours_vote_for(knn_label: np.ndarray, corrected_label: np.ndarray) -> np.ndarray:
    """Where the label most of an image's nearest neighbours carry (`knn_label`; missing or
    empty: none does uniquely) is its suggestion. Embedding mode moves no other image: on
    its benchmark the vote raised relabel precision on every row
    (benchmarks/KNN_DECISION.md)."""
    vote = pd.Series(knn_label, dtype="string").fillna("").to_numpy(str)
    return (vote != "") & (vote == pd.Series(corrected_label, dtype="string").to_numpy(str))


def tiers(issue: np.ndarray, quality: np.ndarray, expected_wrong: float) -> np.ndarray:
    """Per image 0 (issue), 1 (review) or 2 (ok): the `issue` images, then the predicted
    images of lowest label quality (`quality`; NaN: no prediction) until the first two tiers
    hold `REVIEW_FACTOR` x `expected_wrong` images (ties at the boundary: lower id first)."""
    tier = np.full(len(issue), 2, dtype=np.int8)
    tier[issue] = 0
    room = math.ceil(REVIEW_FACTOR * expected_wrong) - int(issue.sum())
    candidates = np.flatnonzero(~issue & ~np.isnan(quality))
    if room > 0 and len(candidates):
        if len(candidates) > room:
            order = np.lexsort((candidates, quality[candidates]))
            candidates = candidates[order[:room]]
        tier[candidates] = 1
    return tier


def relabel_ceiling_values(issue: np.ndarray, differs: np.ndarray, num_preds: np.ndarray,
                           min_preds: int, p_suggestion: np.ndarray,
                           voted: np.ndarray | None = None) -> np.ndarray:
    """Per image the sensitivity below which it is relabelled (NaN: never): an issue whose
    suggestion differs from its label, with at least `min_preds` predictions (and, where
    `voted` is given, embedding mode's `neighbours_vote_for`); the least `s` at which
    `p_suggestion > s / 100` fails (a missing value counts as -1). At sensitivity `s` an
    image moves exactly when `s < ceiling`."""
    share = lowest_share_reached(np.nan_to_num(np.asarray(p_suggestion, dtype=np.float64),
                                               nan=-1.0))
    eligible = issue & differs & (np.asarray(num_preds) >= min_preds)
    if voted is not None:
        eligible &= np.asarray(voted, dtype=bool)
    return np.where(eligible, share, np.nan)


def lowest_share_reached(prob: np.ndarray) -> np.ndarray:
    """Per probability p, the least float s with `s / 100 >= p` (as floats), so that
    `p > s / 100` holds exactly when `s` is below it. `100 * p` alone can be an ulp off
    (0.55 > 55 / 100 is false, but 55 < 100 * 0.55 is true); nudge it to the exact boundary."""
    prob = np.asarray(prob, dtype=np.float64)
    ceil = _share_guess(prob)
    with np.errstate(over="ignore"):
        at = np.flatnonzero((ceil / 100 < prob) | (np.nextafter(ceil, -np.inf) / 100 >= prob))
    if at.size:  # each distinct value once (p = 0, common, takes dozens of subnormal steps)
        values, inverse = np.unique(prob[at], return_inverse=True)
        ceil[at] = _share_stepped(values)[inverse]
    return ceil


def _share_guess(prob: np.ndarray) -> np.ndarray:
    big = np.finfo(np.float64).max
    with np.errstate(over="ignore"):  # only for absurd p: an infinite bound is then right
        return np.clip(prob * 100, -big, big)  # finite, so the steps below can start


def _share_stepped(prob: np.ndarray) -> np.ndarray:
    """`lowest_share_reached` by stepping `100 * p` one float at a time."""
    ceil = _share_guess(prob)
    with np.errstate(over="ignore"):
        while (up := np.isfinite(ceil) & (ceil / 100 < prob)).any():
            ceil = np.where(up, np.nextafter(ceil, np.inf), ceil)
        while (down := np.isfinite(ceil) & (np.nextafter(ceil, -np.inf) / 100 >= prob)).any():
            ceil = np.where(down, np.nextafter(ceil, -np.inf), ceil)
    return ceil


@dataclass
class Verdict:
    """Whether the audit can be trusted, and why not."""

    trusted: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"trusted": self.trusted, "reasons": self.reasons, "remedy": REMEDY}


def guard(labels: np.ndarray, corrected: np.ndarray, predicted: np.ndarray,
          noise_rate: float, classes: list[str],
          random_embeddings: bool = False) -> tuple[Verdict, dict[str, float]]:
    """The model-quality guard: (verdict, per-class agreement of the vote with the given
    labels). Untrusted when the models are near chance overall (`MIN_SKILL`), the estimated
    noise rate is above `MAX_NOISE`, a class's images are almost never voted into it
    (`MIN_CLASS_SKILL`), or the predictions are probes on a randomly initialised backbone's
    embeddings (`random_embeddings`)."""
    k = len(classes)
    lab, vote = labels[predicted], corrected[predicted]
    reasons: list[str] = []
    per_class: dict[str, float] = {}
    if len(lab) == 0:
        return Verdict(False, ["no image has a prediction"]), per_class
    counts = np.bincount(lab, minlength=k)
    agree_k = np.bincount(lab[vote == lab], minlength=k)
    chance = counts.max() / len(lab)
    agree = float((vote == lab).mean())
    skill = (agree - chance) / max(1e-12, 1.0 - chance)
    if skill <= MIN_SKILL:
        reasons.append(f"the models are near chance: their vote agrees with {agree:.0%} of the "
                       f"given labels, where always naming the largest class would agree with "
                       f"{chance:.0%}")
    if noise_rate > MAX_NOISE:
        reasons.append(f"the estimated noise rate is {noise_rate:.0%}, above half: the models "
                       "disagree with most labels, which is more likely the models' fault")
    unlearnt = []
    for c in np.flatnonzero(counts):
        share = agree_k[c] / counts[c]
        per_class[classes[c]] = float(share)
        c_chance = counts[c] / len(lab)
        c_skill = (share - c_chance) / max(1e-12, 1.0 - c_chance)
        if counts[c] >= MIN_CLASS_IMAGES and c_skill <= MIN_CLASS_SKILL:
            unlearnt.append(f"{classes[c]} ({share:.0%} of {counts[c]})")
    if unlearnt:
        reasons.append("the models never learnt class(es) " + ", ".join(unlearnt[:5])
                       + (f" and {len(unlearnt) - 5} more" if len(unlearnt) > 5 else "")
                       + ": the vote rarely keeps their images' labels")
    if random_embeddings:
        reasons.append(RANDOM_EMBEDDINGS)
    return Verdict(not reasons, reasons), per_class


def summary(cfg, classes: list[str], *, labels: np.ndarray, num_preds: np.ndarray,
            corrected: np.ndarray, p_label_wrong: np.ndarray, p_suggestion: np.ndarray,
            tier: np.ndarray, joint: np.ndarray, voted: np.ndarray | None = None) -> dict:
    """The run summary (`<run>/summary.json`): sizes, the models' agreement, cleanlab's noise
    estimate overall and per class, the posterior's expected number of wrong labels, the
    tiers, what relabel would move at the run's sensitivity, and the guard's verdict. `cfg`:
    the run's AuditConfig; `voted`: embedding mode's `neighbours_vote_for`."""
    k = len(classes)
    predicted = num_preds > 0
    noise, per_class_noise = noise_rates(joint)
    verdict, agreement = guard(labels, corrected, predicted, noise, classes,
                               cfg.method == "embeddings" and cfg.weights_request is None)
    issue = tier == 0
    ceiling = relabel_ceiling_values(issue, corrected != labels, num_preds, cfg.min_preds,
                                     p_suggestion, voted)
    expected = np.bincount(labels[predicted], weights=np.nan_to_num(p_label_wrong[predicted]),
                           minlength=k)
    moves = np.nan_to_num(ceiling, nan=-np.inf) > cfg.sensitivity
    counts = np.bincount(labels, minlength=k)
    flagged = np.bincount(labels[issue], minlength=k)
    review = np.bincount(labels[tier == 1], minlength=k)
    per_class = [
        {"class": classes[c], "images": int(counts[c]),
         "estimated_noise_rate": _num(per_class_noise[c]),
         "expected_wrong_labels": round(float(expected[c]), 1),
         "flagged": int(flagged[c]), "flagged_share": _num(flagged[c] / counts[c]),
         "review": int(review[c]), "agreement": _num(agreement.get(classes[c]))}
        for c in range(k) if counts[c]]
    npred = num_preds[predicted]
    return {
        "images": len(labels), "classes": k, "predicted": int(predicted.sum()),
        "predictions_per_image": {
            "mean": _num(npred.mean()) if len(npred) else 0.0,
            "min": int(npred.min()) if len(npred) else 0,
            "max": int(npred.max()) if len(npred) else 0},
        "pooled_accuracy": _num((corrected[predicted] == labels[predicted]).mean())
        if predicted.any() else None,
        "estimated_noise_rate": _num(noise),
        "estimated_wrong_labels": round(float(noise) * int(predicted.sum())),
        "expected_wrong_labels": round(float(expected.sum()), 1),
        "flagged": int(issue.sum()), "review": int((tier == 1).sum()),
        "sensitivity": float(cfg.sensitivity), "min_preds": int(cfg.min_preds),
        "would_relabel": int(moves.sum()),
        "guard": verdict.to_dict(),
        "per_class": per_class,
    }


def _num(x) -> float | None:
    """A finite float rounded for JSON, or None."""
    if x is None:
        return None
    x = float(x)
    return round(x, 4) if math.isfinite(x) else None


def summary_lines(s: dict) -> list[str]:
    """A few lines for the CLI and the task log."""
    lines = [
        f"{s['images']:,} images in {s['classes']} classes, "
        f"{s['predictions_per_image']['mean']:.1f} predictions per image; the models' vote "
        f"agrees with {s['pooled_accuracy'] or 0:.1%} of the given labels",
        f"estimated wrong labels: {s['estimated_wrong_labels']:,} "
        f"({s['estimated_noise_rate'] or 0:.1%}, cleanlab), {s['expected_wrong_labels']:,.0f} "
        f"(the per-image probabilities); flagged as issues: {s['flagged']:,}; "
        f"to review: {s['review']:,}; would relabel at sensitivity {s['sensitivity']:g}: "
        f"{s['would_relabel']:,}"]
    g = s["guard"]
    if not g["trusted"]:
        lines.append("WARNING: this audit cannot be trusted: " + "; ".join(g["reasons"])
                     + f". Remedy: {g['remedy']}. relabel refuses this run unless --force.")
    return lines
