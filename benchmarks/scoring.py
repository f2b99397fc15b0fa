"""The detection-quality benchmark's scoring: its planted-noise cases, the metrics, the
rows it compares (the original method, the default audit, embedding mode, cleanlab's
filters, candidate flag rules) and its targets. Pure functions of an audit's per-image
outcome and the truth; `noise_bench` runs the audits, `score_results` and `recipe_sweep`
score with the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from tasks.config import AuditConfig

# The benchmark's cases. name: (tasks.sample source, images)
DATASETS: dict[str, tuple[str, int]] = {
    "fmnist2k": ("fashion-mnist", 2000),
    "fmnist5k": ("fashion-mnist", 5000),
    "fmnist20k": ("fashion-mnist", 20000),
    "digits": ("digits", 1797),
}
# name: (fraction of labels changed, tasks.sample noise kind)
NOISES: dict[str, tuple[float, str]] = {
    "sym2": (0.02, "symmetric"),
    "sym5": (0.05, "symmetric"),
    "sym10": (0.10, "symmetric"),
    "sym20": (0.20, "symmetric"),
    "sym40": (0.40, "symmetric"),
    "asym10": (0.10, "asymmetric"),
    "asym20": (0.20, "asymmetric"),
}
CLEANLAB_FILTERS = ("prune_by_class", "prune_by_noise_rate", "both", "confident_learning",
                    "predicted_neq_given", "low_normalized_margin", "low_self_confidence")
QUALITY_THRESHOLDS = (0.5, 0.3, 0.2, 0.1)
# Issue 5's targets, checked on this row at 10 trainings.
TARGET_ROW = ("fmnist20k", "sym20")
TARGET_TRAININGS = 10
# Issue 17's target: on this row, embedding mode's whole audit (embedding pass, probes, merge)
# at least this many times faster than training mode's, on the same machine.
EMBED_SPEEDUP_ROW = TARGET_ROW
MIN_EMBED_SPEEDUP = 10.0


# The original tool's relabel threshold on the vote share `%` (its default sensitivity); the
# product's own default is AuditConfig's `sensitivity`, on p_suggestion.
ORIGINAL_SENSITIVITY = 60.0
DEFAULT_SENSITIVITY: float = AuditConfig.model_fields["sensitivity"].default
# Mean probability above which a unanimous vote for another class flagged an image by itself
# (a part of the product's rule before tasks.decide.posterior; kept as a candidate row).
CONFIDENT_VOTE = 0.7


def confident_vote(pct: np.ndarray, num_preds: np.ndarray,
                   suggested_quality: np.ndarray) -> np.ndarray:
    """Images whose predictions (at least two) all chose the suggested label (`pct` 100) with
    a mean probability above `CONFIDENT_VOTE`."""
    return ((np.nan_to_num(pct, nan=0.0) == 100) & (num_preds >= 2)
            & (np.nan_to_num(suggested_quality, nan=0.0) > CONFIDENT_VOTE))


def cleanlab_filter(labels: np.ndarray, probs: np.ndarray,
                    filter_by: str = "low_self_confidence") -> np.ndarray:
    """cleanlab's `find_label_issues(filter_by=...)` over the classes present in `labels`
    (rows: predicted images; `probs` renormalised over those classes); a flag per row."""
    from cleanlab.filter import find_label_issues

    present = np.unique(labels)
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    sub = probs[:, present]
    sub = sub / sub.sum(1, keepdims=True).clip(min=1e-12)
    return find_label_issues(remap[labels], sub, filter_by=filter_by, n_jobs=1)


@dataclass
class Predictions:
    """One audit's per-image outcome, aligned with the truth (class indices into `classes`)."""

    filename: np.ndarray
    given: np.ndarray
    true: np.ndarray
    corrected: np.ndarray          # majority vote (the given label where unpredicted)
    pct: np.ndarray                # vote share of `corrected`, 0-100 (nan: unpredicted)
    num_preds: np.ndarray
    quality: np.ndarray            # label_quality (nan: unpredicted)
    suggested_quality: np.ndarray  # pooled probability of `corrected` (nan: unpredicted)
    is_label_issue: np.ndarray
    mean_probs: np.ndarray | None  # N x K out-of-sample mean probabilities (nan rows allowed)
    classes: list[str] = field(default_factory=list)
    # The decision layer (`tasks.decide`); None for an audit merged before it existed.
    tier: np.ndarray | None = None  # "issue" / "review" / "ok"
    guard: dict | None = None       # summary.json's "guard": {"trusted", "reasons", ...}
    p_suggestion: np.ndarray | None = None  # the posterior that `corrected` is the true class
    # Embedding mode's share of an image's nearest neighbours with its label (nan: none).
    knn_agreement: np.ndarray | None = None
    # ... and the label most of them carry (None: no unique one), which gates its relabel.
    knn_label: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.num_preds > 0

    @property
    def vote_disagrees(self) -> np.ndarray:
        return self.predicted & (self.corrected != self.given)


def ranking_scores(quality: np.ndarray) -> np.ndarray:
    """Suspicion score (higher = more suspicious) from label_quality; unscored images (nan)
    rank last, tied with each other."""
    score = -np.asarray(quality, dtype=float)
    has = ~np.isnan(score)
    floor = (score[has].min() if has.any() else 0.0) - 1.0
    return np.where(has, score, floor)


def rule_metrics(true: np.ndarray, given: np.ndarray, flagged: np.ndarray,
                 quality: np.ndarray, relabel: np.ndarray, new_label: np.ndarray,
                 predicted: np.ndarray, *, tier: np.ndarray | None = None,
                 guard: dict | None = None) -> dict[str, object]:
    """One row's metrics against the truth.

    Flags: precision, recall, F1 of `flagged`. Ranking by `quality` (`ranking_scores`) over
    all images, unscored last: AUROC, AP, and precision at k = the number of wrong labels.
    Moves (the `relabel` rows whose `new_label` differs from the given one): relabel
    precision (share moved to their true class), relabel recall (wrong labels so fixed /
    wrong labels), correct labels moved (count, and share of the correctly labelled
    images), the net change of the label
    accuracy in percentage points ((correct after - correct before) / N x 100). Coverage:
    share of `predicted`. With `tier` (the default audit's tiers): the share of wrong labels
    in tier issue or review; with `guard` (summary.json's): "trusted" or "untrusted". Missing
    values are nan or None."""
    true, given = np.asarray(true), np.asarray(given)
    new_label = np.asarray(new_label)
    wrong = true != given
    flagged = np.asarray(flagged, dtype=bool)
    moved = np.asarray(relabel, dtype=bool) & (new_label != given)
    tp = int((flagged & wrong).sum())
    precision = tp / flagged.sum() if flagged.any() else float("nan")
    recall = tp / wrong.sum() if wrong.any() else float("nan")
    f1 = (2 * precision * recall / (precision + recall)
          if tp and precision + recall > 0 else 0.0)
    both = wrong.any() and not wrong.all()
    score = ranking_scores(quality)
    k = int(wrong.sum())
    top = np.argsort(-score, kind="stable")[:k]
    fixed = int((moved & (new_label == true)).sum())
    broken = int((moved & ~wrong).sum())  # correctly labelled images moved away
    n_right = int((~wrong).sum())
    kept_tiers = None if tier is None else np.isin(np.asarray(tier, dtype=str),
                                                   ("issue", "review"))
    return {
        "flagged": int(flagged.sum()),
        "precision": precision, "recall": recall, "f1": f1,
        "precision_at_k": float(wrong[top].mean()) if k else float("nan"),
        "auroc": float(roc_auc_score(wrong, score)) if both else float("nan"),
        "ap": float(average_precision_score(wrong, score)) if both else float("nan"),
        "relabelled": int(moved.sum()),
        "relabel_precision": fixed / moved.sum() if moved.any() else float("nan"),
        "relabel_recall": fixed / k if k else float("nan"),
        "correct_moved": broken,
        "correct_moved_share": broken / n_right if n_right else float("nan"),
        "net_acc_change_pp": 100 * (fixed - broken) / len(true) if len(true) else float("nan"),
        "tiers_coverage": (float(kept_tiers[wrong].mean()) if kept_tiers is not None and k
                           else float("nan")),
        "guard": None if guard is None else ("trusted" if guard.get("trusted") else "untrusted"),
        "guard_reasons": None if guard is None else "; ".join(guard.get("reasons", [])),
        "coverage": float(np.asarray(predicted, dtype=bool).mean()),
    }


def cleanlab_flags(given: np.ndarray, mean_probs: np.ndarray, filter_by: str) -> np.ndarray:
    """cleanlab's filter (`cleanlab_filter`) with `filter_by` on the
    predicted images (rows without nan); unpredicted images are not flagged."""
    has = ~np.isnan(mean_probs).any(1)
    flags = np.zeros(len(given), dtype=bool)
    if has.sum() < 2 or len(np.unique(given[has])) < 2:
        return flags
    flags[has] = cleanlab_filter(given[has], mean_probs[has], filter_by)
    return flags


def original_rows(p: Predictions, sensitivity: float) -> dict[str, dict[str, float]]:
    """The original method: flag a disagreeing majority vote, relabel at `%` >= sensitivity."""
    flagged = p.vote_disagrees
    relabel = flagged & (np.nan_to_num(p.pct, nan=-1) >= sensitivity)
    return {"original (random splits, hard votes)": rule_metrics(
        p.true, p.given, flagged, p.quality, relabel, p.corrected, p.predicted)}


def default_relabel(p: Predictions, sensitivity: float, min_preds: int) -> np.ndarray:
    """The product's relabel rule (`tasks.relabel.select_rows`) as a mask."""
    from tasks.relabel import select_rows

    if p.p_suggestion is None:
        raise ValueError("these results have no p_suggestion column (merged before "
                         "tasks.decide.posterior): merge the run again")
    cls = np.asarray(p.classes, dtype=object)
    frame = pd.DataFrame({"corrected_label": cls[p.corrected], "label": cls[p.given],
                          "p_suggestion": p.p_suggestion, "num_preds": p.num_preds,
                          "is_label_issue": p.is_label_issue})
    if p.knn_label is not None:
        frame["knn_label"] = p.knn_label
    mask = np.zeros(len(frame), dtype=bool)
    mask[select_rows(frame, sensitivity, min_preds).index.to_numpy()] = True
    return mask


def default_metrics(p: Predictions, sensitivity: float, min_preds: int) -> dict[str, object]:
    """The default audit's metrics as the product runs it: flagged = `is_label_issue` (tier
    issue), moved = the product's relabel rule, ranked by label_quality, with its tiers and
    guard (none for an audit from before them)."""
    relabel = default_relabel(p, sensitivity, min_preds)
    return {**rule_metrics(p.true, p.given, p.is_label_issue, p.quality, relabel, p.corrected,
                           p.predicted, tier=p.tier, guard=p.guard),
            "relabel_recall_ceiling": relabel_recall_ceiling(p, min_preds,
                                                             MIN_RELABEL_PRECISION)}


def relabel_recall_ceiling(p: Predictions, min_preds: int, precision: float) -> float:
    """The most relabel recall that any sensitivity reaches with relabel precision at least
    `precision`, by the truth: what the models' p_suggestion ranking allows, whatever the
    threshold (0 when no threshold is that precise)."""
    if p.p_suggestion is None:
        return float("nan")
    n_wrong = int((p.true != p.given).sum())
    eligible = (np.asarray(p.is_label_issue, dtype=bool) & (p.corrected != p.given)
                & (p.num_preds >= min_preds) & ~np.isnan(p.p_suggestion))
    prob = p.p_suggestion[eligible]
    fixed = (p.corrected == p.true)[eligible]
    if not n_wrong or not len(prob):
        return float("nan") if not n_wrong else 0.0
    order = np.argsort(-prob, kind="stable")
    prob, hits = prob[order], np.cumsum(fixed[order])
    cut = np.flatnonzero(np.r_[prob[1:] != prob[:-1], True])  # a threshold moves whole ties
    ok = hits[cut] / (cut + 1) >= precision
    return float(hits[cut][ok].max() / n_wrong) if ok.any() else 0.0


def embedding_row_name(model_name: str, model_weights: str) -> str:
    """The embedding audit's row name: its backbone and what model_weights gave it."""
    return f"embeddings ({model_name}, {model_weights})"


def knn_note(p: Predictions) -> str | None:
    """The mean knn_agreement of the wrong and of the correct labels (embedding mode's
    neighbour signal), as a line; None without the column."""
    if p.knn_agreement is None:
        return None
    wrong = p.true != p.given
    means = [np.nanmean(p.knn_agreement[m]) if m.any() and not np.isnan(
        p.knn_agreement[m]).all() else float("nan") for m in (wrong, ~wrong)]
    return (f"mean knn_agreement {format_metric(means[0], '.3f')} on the wrong labels, "
            f"{format_metric(means[1], '.3f')} on the correct ones")


def default_rows(p: Predictions, sensitivity: float,
                 min_preds: int) -> dict[str, dict[str, float]]:
    """The default audit as the product runs it (whatever rule merge uses for
    is_label_issue; the `rule:` rows show which candidate it matches)."""
    return {"default audit (is_label_issue)": default_metrics(p, sensitivity, min_preds)}


def cleanlab_rows(p: Predictions) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray],
                                           dict[str, float]]:
    """Each cleanlab filter on the default audit's mean probabilities. A flagged image is
    relabelled to the argmax of its mean probabilities (when that differs from the label).
    Returns (rows, flags per filter, seconds per filter)."""
    assert p.mean_probs is not None
    argmax = np.argmax(np.nan_to_num(p.mean_probs, nan=-1.0), axis=1)
    rows, flags, seconds = {}, {}, {}
    for name in CLEANLAB_FILTERS:
        t0 = time.perf_counter()
        flags[name] = cleanlab_flags(p.given, p.mean_probs, name)
        seconds[name] = time.perf_counter() - t0
        relabel = flags[name] & (argmax != p.given)
        rows[f"cleanlab {name}"] = rule_metrics(p.true, p.given, flags[name], p.quality,
                                                relabel, argmax, p.predicted)
    return rows, flags, seconds


def candidate_rows(p: Predictions, flags: dict[str, np.ndarray], sensitivity: float,
                   min_preds: int) -> dict[str, dict[str, float]]:
    """Candidate `is_label_issue` rules on the default audit's predictions. Relabelled: the
    flagged rows that also pass the product's relabel rule."""
    vote = p.vote_disagrees
    quality = np.nan_to_num(p.quality, nan=np.inf)
    rules = {"rule: vote disagrees": vote}
    for name in ("low_self_confidence", "prune_by_noise_rate", "both", "confident_learning",
                 "prune_by_class"):
        rules[f"rule: {name} ∧ vote"] = flags[name] & vote
    for t in QUALITY_THRESHOLDS:
        rules[f"rule: vote ∧ label_quality < {t}"] = vote & (quality < t)
    rules[f"rule: unanimous vote ∧ p > {CONFIDENT_VOTE:g} ∧ num_preds >= 2"] = (
        vote & confident_vote(p.pct, p.num_preds, p.suggested_quality))
    rules["rule: low_self_confidence ∧ vote ∧ label_quality < 0.1"] = (
        flags["low_self_confidence"] & vote & (quality < 0.1))
    relabel_rule = default_relabel(p, sensitivity, min_preds)
    rules[f"rule: is_label_issue ∧ p_suggestion > {sensitivity / 100:g} ∧ num_preds >= "
          f"{min_preds}"] = relabel_rule
    rows = {name: rule_metrics(p.true, p.given, flag, p.quality, flag & relabel_rule,
                               p.corrected, p.predicted) for name, flag in rules.items()}
    rows[f"relabel by votes only: flagged ∧ % > {sensitivity:g} ∧ num_preds >= {min_preds}"] = (
        votes_only_row(p, sensitivity, min_preds))
    return rows


def votes_only_row(p: Predictions, sensitivity: float, min_preds: int) -> dict[str, float]:
    """The default's flags, relabelled by vote share (`%`, the original tool's rule) instead of
    `p_suggestion`, to show what the probability buys."""
    votes_only = (p.is_label_issue & p.vote_disagrees & (p.num_preds >= min_preds)
                  & (np.nan_to_num(p.pct, nan=-1) > sensitivity))
    return rule_metrics(p.true, p.given, p.is_label_issue, p.quality, votes_only, p.corrected,
                        p.predicted)


def predictions_from_frames(results: pd.DataFrame, truth: pd.DataFrame, classes: list[str],
                            mean_probs: pd.DataFrame | None = None,
                            guard: dict | None = None) -> Predictions:
    """Align a results frame (as merge writes it) and a truth file (filename, true_label,
    given_label); `mean_probs`: predictions.parquet's `filename` and `mean_probs` columns;
    `guard`: the run summary's verdict. The `tier`, `knn_agreement` and `knn_label`
    columns are read when the results have them."""
    df = results.merge(truth, on="filename", how="inner", validate="one_to_one")
    if len(df) != len(truth) or len(df) != len(results):
        raise ValueError(f"results ({len(results)} rows) and truth ({len(truth)} rows) do not "
                         f"match on filename ({len(df)} in common)")
    if (df["label"] != df["given_label"]).any():
        bad = df.loc[df["label"] != df["given_label"], "filename"].iloc[0]
        raise ValueError(f"{bad}: the audited label differs from the truth file's given_label")
    names = list(classes) + sorted(set(df["true_label"]) - set(classes))
    idx = {c: i for i, c in enumerate(names)}
    probs = None
    if mean_probs is not None:
        by_name = mean_probs.set_index("filename")["mean_probs"]
        probs = np.stack([np.asarray(v, dtype=float) for v in by_name.loc[df["filename"]]])
        if probs.shape[1] < len(names):  # true classes absent from the audited folders
            pad = np.zeros((len(probs), len(names) - probs.shape[1]))
            probs = np.hstack([probs, np.where(np.isnan(probs[:, :1]), np.nan, pad)])
    return Predictions(
        filename=df["filename"].to_numpy(),
        given=df["label"].map(idx).to_numpy(np.int64),
        true=df["true_label"].map(idx).to_numpy(np.int64),
        corrected=df["corrected_label"].map(idx).to_numpy(np.int64),
        pct=pd.to_numeric(df["%"], errors="coerce").to_numpy(float),
        num_preds=df["num_preds"].to_numpy(np.int64),
        quality=pd.to_numeric(df["label_quality"], errors="coerce").to_numpy(float),
        suggested_quality=pd.to_numeric(df["suggested_quality"], errors="coerce").to_numpy(float),
        is_label_issue=df["is_label_issue"].astype(str).str.lower().eq("true").to_numpy(),
        mean_probs=probs,
        classes=names,
        tier=df["tier"].astype(str).to_numpy() if "tier" in df.columns else None,
        guard=guard,
        p_suggestion=(pd.to_numeric(df["p_suggestion"], errors="coerce").to_numpy(float)
                      if "p_suggestion" in df.columns else None),
        knn_agreement=(pd.to_numeric(df["knn_agreement"], errors="coerce").to_numpy(float)
                       if "knn_agreement" in df.columns else None),
        knn_label=(df["knn_label"].astype(object).where(df["knn_label"].notna(), None)
                   .to_numpy() if "knn_label" in df.columns else None),
    )


def move_cell(moved: np.ndarray, suggested: np.ndarray, true: np.ndarray,
              wrong: np.ndarray) -> str:
    """A relabel cell of the decision tables (decision_variants, knn_decision): moves, their
    precision (share landing in the true class), correct labels moved, relabel recall."""
    fixed = int((moved & (suggested == true)).sum())
    precision = f"{fixed / moved.sum():.3f}" if moved.any() else "–"
    return (f"{int(moved.sum())}, {precision}, {int((moved & ~wrong).sum())}, "
            f"{fixed / max(1, wrong.sum()):.2f}")


def format_metric(value: object, fmt: str | None) -> str:
    """A metric as table text; "—" for a missing one (None or nan)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return str(value) if fmt is None else format(value, fmt)


# --- targets ---------------------------------------------------------------------------------

def target_checks(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """(target, measured, passed) for issue 5's targets on one (dataset, noise) table."""
    default = next(v for k, v in rows.items() if k.startswith("default audit"))
    original = next((v for k, v in rows.items() if k.startswith("original")), None)
    best_name, best = max(((k, v) for k, v in rows.items() if k.startswith("cleanlab ")),
                          key=lambda kv: np.nan_to_num(kv[1]["f1"], nan=-1))
    f1 = default["f1"]
    vs_original = [] if original is None else [
        ("F1 >= 1.2 x original F1",
         f"{f1:.3f} vs 1.2 x {original['f1']:.3f} = {1.2 * original['f1']:.3f}",
         f1 >= 1.2 * original["f1"])]
    return [
        ("F1 >= 0.90", f"{f1:.3f}", f1 >= 0.90),
        ("F1 >= best cleanlab filter F1", f"{f1:.3f} vs {best['f1']:.3f} ({best_name})",
         f1 >= best["f1"]),
        *vs_original,
        ("AUROC >= 0.98", f"{default['auroc']:.4f}",
         default["auroc"] >= 0.98),
        ("relabel precision >= 0.95", format_metric(default["relabel_precision"], ".4f"),
         default["relabel_precision"] >= 0.95),
        ("coverage 100%", f"{default['coverage']:.2%}", default["coverage"] >= 1.0),
    ]


def beats_original(rows: dict[str, dict[str, float]]) -> tuple[str, str, bool]:
    """The asymmetric-noise target: the default audit's F1 above the original method's."""
    default = next(v for k, v in rows.items() if k.startswith("default audit"))
    original = next(v for k, v in rows.items() if k.startswith("original"))
    return ("F1 > original F1", f"{default['f1']:.3f} vs {original['f1']:.3f}",
            default["f1"] > original["f1"])


# Issue 14's targets: on the default audit of every row run, and on these rows.
MIN_RELABEL_PRECISION = 0.95
MAX_CORRECT_MOVED_SHARE = 0.005
MIN_RELABEL_RECALL = 0.6
RELABEL_RECALL_ROWS = (("fmnist5k", "sym10"), ("fmnist5k", "sym20"), ("fmnist20k", "sym5"),
                       ("fmnist20k", "sym20"))
MIN_FLAG_PRECISION, MIN_FLAG_RECALL = 0.85, 0.8
FLAG_ROWS = (("fmnist2k", "sym10"), ("fmnist5k", "sym5"), ("fmnist5k", "sym10"))
MIN_F1 = {("fmnist20k", "sym20"): 0.938}  # no regression on the 20% rows
MIN_TIERS_COVERAGE = 0.95  # on every symmetric-noise row


def bound_check(target: str, value: object, bound: float, op: str, fmt: str,
                shown: str | None = None) -> tuple[str, str, bool]:
    """(target, measured, passed) for `value op bound` (op: ">=", ">" or "<="); a failed
    check's measured text says by how much it misses; a missing value fails as "not
    measured". `shown`: the measured text instead of the formatted value."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return target, shown or "not measured", False
    v = float(value)  # type: ignore[arg-type]
    ok = {">=": v >= bound, ">": v > bound, "<=": v <= bound}[op]
    measured = shown or format(v, fmt)
    if not ok:
        gap = abs(v - bound)
        measured += (f" (misses by {format(gap, fmt)})" if gap
                     else f" (must be above {bound:g})")
    return target, measured, ok


def decision_checks(dataset: str, noise: str,
                    default: dict[str, object]) -> list[tuple[str, str, bool]]:
    """(target, measured, passed) for issue 14's targets on one row's default audit."""
    d = default
    checks = []
    if d["relabelled"]:
        checks.append(bound_check(f"relabel precision >= {MIN_RELABEL_PRECISION}",
                                  d["relabel_precision"], MIN_RELABEL_PRECISION, ">=", ".4f"))
    else:
        checks.append((f"relabel precision >= {MIN_RELABEL_PRECISION} (where anything moves)",
                       "nothing moved", True))
    share = d["correct_moved_share"]
    checks += [
        bound_check(f"correct labels moved <= {MAX_CORRECT_MOVED_SHARE:.1%}", share,
                    MAX_CORRECT_MOVED_SHARE, "<=", ".2%",
                    shown=f"{d['correct_moved']} ({format_metric(share, '.2%')})"),
        bound_check("net label accuracy change > 0", d["net_acc_change_pp"], 0.0, ">", "+.2f",
                    shown=f"{format_metric(d['net_acc_change_pp'], '+.2f')} pp"),
    ]
    if (dataset, noise) in RELABEL_RECALL_ROWS:
        target, measured, ok = bound_check(f"relabel recall >= {MIN_RELABEL_RECALL}",
                                           d["relabel_recall"], MIN_RELABEL_RECALL, ">=", ".3f")
        ceiling = d.get("relabel_recall_ceiling")
        if not ok and ceiling is not None and not np.isnan(ceiling):
            measured += (f"; at relabel precision >= {MIN_RELABEL_PRECISION} no sensitivity "
                         f"gets above {ceiling:.3f} with these models")
        checks.append((target, measured, ok))
    if (dataset, noise) in FLAG_ROWS:
        checks += [bound_check(f"flag precision >= {MIN_FLAG_PRECISION}", d["precision"],
                               MIN_FLAG_PRECISION, ">=", ".3f"),
                   bound_check(f"flag recall >= {MIN_FLAG_RECALL}", d["recall"],
                               MIN_FLAG_RECALL, ">=", ".3f")]
    if (dataset, noise) in MIN_F1:
        checks.append(bound_check(f"F1 >= {MIN_F1[dataset, noise]}", d["f1"],
                                  MIN_F1[dataset, noise], ">=", ".3f"))
    if NOISES[noise][1] == "symmetric":
        checks.append(bound_check(f"issue + review tiers hold >= {MIN_TIERS_COVERAGE:.0%} of "
                                  "the wrong labels", d["tiers_coverage"], MIN_TIERS_COVERAGE,
                                  ">=", ".3f"))
    verdict = d["guard"]
    shown = f"{verdict}: {d['guard_reasons']}" if verdict == "untrusted" else verdict
    checks.append(("the guard trusts the audit", shown or "not measured", verdict == "trusted"))
    return checks


def speedup_check(training: dict[str, object], embedding: dict[str, object],
                  reused: tuple[str, ...] = ()) -> tuple[str, str, bool]:
    """Issue 17's target on one row: (target, measured, passed) for training mode's wall
    time over embedding mode's >= MIN_EMBED_SPEEDUP; `reused` names the audits taken from
    an earlier run, whose wall times may come from another machine or load."""
    t, e = float(training["wall_s"]), float(embedding["wall_s"])  # type: ignore[arg-type]
    ratio = t / e if e > 0 else float("nan")
    shown = f"{format_metric(ratio, '.1f')}x (training {t:.0f} s / embeddings {e:.0f} s"
    if reused:  # when each finished says whether they ran back to back, in one run
        when = "; ".join(f"{name} finished {row.get('finished') or 'at an unrecorded time'}"
                         for name, row in (("training", training), ("embeddings", embedding)))
        shown += (f"; {' and '.join(reused)} reused, so the wall times may be from different "
                  f"runs: {when})")
    else:
        shown += ")"
    return bound_check(f"embedding audit >= {MIN_EMBED_SPEEDUP:g}x faster than training mode",
                       ratio, MIN_EMBED_SPEEDUP, ">=", ".1f", shown=shown)


@dataclass
class BenchTable:
    """The scored rows of one (dataset, noise) pair."""

    dataset: str
    noise: str
    n_images: int
    n_wrong: int
    rows: dict[str, dict[str, float]]
    reused: tuple[str, ...] = ()  # the audits (methods) taken from an earlier run (--reuse)
    notes: tuple[str, ...] = ()  # lines shown under the title (e.g. embedding mode's kNN)

    @property
    def title(self) -> str:
        return f"{self.dataset} · {self.noise}"

    @property
    def summary(self) -> str:
        return f"{self.n_images} images, {self.n_wrong} wrong labels"

    def row(self, prefix: str) -> dict[str, float] | None:
        """The first row whose name starts with `prefix`, or None."""
        return next((v for k, v in self.rows.items() if k.startswith(prefix)), None)


def all_checks(tables: list[BenchTable]) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    """(where, checks) for every row with a default audit: issue 14's targets on it; on the
    target row also issue 5's (those not already checked; the original-method ones only when
    the original audit ran); on an asymmetric-noise row with the original audit, beating it;
    on EMBED_SPEEDUP_ROW with an embedding audit, issue 17's speed-up. A row run with fewer
    images or other trainings than the targets assume says so."""
    checks = []
    for t in tables:
        default = t.row("default audit")
        if default is None:  # embedding mode alone: its rows, no targets
            continue
        notes = []
        if t.n_images != DATASETS[t.dataset][1]:
            notes.append(f"capped at {t.n_images} images")
        trainings = default["trainings"]
        if trainings != TARGET_TRAININGS:
            notes.append(f"{trainings} trainings; targets are set for {TARGET_TRAININGS}")
        where = f"{t.dataset} {t.noise}" + (f" ({'; '.join(notes)})" if notes else "")
        items = decision_checks(t.dataset, t.noise, default)
        if (t.dataset, t.noise) == TARGET_ROW:
            seen = {target.split(" (")[0] for target, _, _ in items}
            items += [c for c in target_checks(t.rows) if c[0] not in seen]
        if t.noise == "asym20" and t.row("original") is not None:
            items.append(beats_original(t.rows))
        embedding = t.row("embeddings (")
        if (t.dataset, t.noise) == EMBED_SPEEDUP_ROW and embedding is not None:
            reused = tuple(m for m in ("default", "embeddings") if m in t.reused)
            items.append(speedup_check(default, embedding, reused))
        checks.append((where, items))
    return checks


def missed_targets(checks: list[tuple[str, list[tuple[str, str, bool]]]]) -> list[str]:
    """One line per failed check: where, the target, what was measured and by how much it
    misses."""
    return [f"{where}: {target}: {measured}" for where, items in checks
            for target, measured, ok in items if not ok]
