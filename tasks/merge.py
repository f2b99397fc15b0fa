"""Pool the shards' out-of-sample predictions per image and score every label.

Per image: `num_preds`, the votes per class, `corrected_label` (majority vote, ties broken
by mean probability), `%` (vote share of `corrected_label`, 0-100), `label_quality` (mean
out-of-sample probability of the given label) and `is_label_issue`.

`is_label_issue` rule: [cleanlab's `find_label_issues(filter_by="low_self_confidence")` on
the mean out-of-sample probabilities (it estimates from the confident joint how many labels of
each class are wrong and flags that many, those with the lowest probability of their given
label, so the count adapts to the noise rate) OR a confident unanimous vote (every one of at
least two predictions chose the same other class and its mean probability is above
`CONFIDENT_VOTE`)] AND the majority vote names another class (so every flag has a suggested
label) AND `label_quality < max_label_quality` (default 1: off).
In `benchmarks/RESULTS.md` cleanlab's part beats its `prune_by_noise_rate` AND vote (F1 0.938
vs 0.881 on Fashion-MNIST 20k with 20% symmetric noise). The confident-vote part is there
because cleanlab's count falls short when the models are accurate: on scikit-learn digits it
found about 0.8 of the wrong labels although they ranked first (AUROC 0.9995). A
`max_label_quality` of 0.1 cut recall to about a third on asymmetric noise, hence off by
default.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd

from tasks import runs, storage
from tasks.config import AuditConfig
from tasks.embeddings import neighbour_columns
from tasks.errors import MissingFileError, UserError
from tasks.index import read_manifest
from tasks.plan import plan_repeats, split_for_repeat
from tasks.shards import read_shards

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["filename", "label", "corrected_label", "num_preds", "%", "label_quality",
                  "is_label_issue", "suggested_quality", "votes", "id"]
FILTER_BY = "low_self_confidence"
# Mean probability above which a unanimous vote for another class flags an image by itself.
CONFIDENT_VOTE = 0.7


class MissingShardsError(UserError, RuntimeError):
    """Too few repeats produced shards; the message lists the missing repeats."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


def aggregate(n_images: int, labels: np.ndarray, frames: list[pd.DataFrame],
              num_classes: int) -> dict[str, np.ndarray]:
    """Per-image vote counts, mean probabilities and prediction counts."""
    votes = np.zeros((n_images, num_classes), dtype=np.int32)
    prob_sum = np.zeros((n_images, num_classes), dtype=np.float64)
    for df in frames:
        ids = df["id"].to_numpy()
        np.add.at(votes, (ids, df["pred"].to_numpy()), 1)
        np.add.at(prob_sum, ids, np.stack(df["probs"].to_numpy()))
    num_preds = votes.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probs = prob_sum / num_preds[:, None]
    return {"votes": votes, "mean_probs": mean_probs, "num_preds": num_preds}


def score(labels: np.ndarray, votes: np.ndarray, mean_probs: np.ndarray,
          num_preds: np.ndarray, max_label_quality: float = 1.0) -> dict[str, np.ndarray]:
    """corrected label, vote share, label quality and the label-issue flag per image."""
    n = len(labels)
    predicted = num_preds > 0
    # Majority vote; ties broken by the mean probability (tiny weight, below one vote).
    safe_probs = np.nan_to_num(mean_probs, nan=0.0)
    corrected = np.argmax(votes + safe_probs * 1e-3, axis=1)
    corrected[~predicted] = labels[~predicted]
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(predicted, votes[np.arange(n), corrected] / num_preds * 100, np.nan)
    quality = np.where(predicted, safe_probs[np.arange(n), labels], np.nan)
    suggested_quality = np.where(predicted, safe_probs[np.arange(n), corrected], np.nan)
    flagged = np.zeros(n, dtype=bool)
    if predicted.sum() > 0:
        sub_labels, sub_probs = labels[predicted], safe_probs[predicted]
        sub_probs = sub_probs / sub_probs.sum(1, keepdims=True).clip(min=1e-12)
        flagged[predicted] = cleanlab_filter(sub_labels, sub_probs)
    flagged |= confident_vote(pct, num_preds, suggested_quality)
    flagged &= (corrected != labels) & (np.nan_to_num(quality, nan=1.0) < max_label_quality)
    return {"corrected": corrected, "pct": pct, "quality": quality,
            "suggested_quality": suggested_quality, "flagged": flagged}


def confident_vote(pct: np.ndarray, num_preds: np.ndarray,
                   suggested_quality: np.ndarray) -> np.ndarray:
    """Images whose predictions (at least two) all chose the suggested label (`pct` 100) with
    a mean probability above `CONFIDENT_VOTE`."""
    return ((np.nan_to_num(pct, nan=0.0) == 100) & (num_preds >= 2)
            & (np.nan_to_num(suggested_quality, nan=0.0) > CONFIDENT_VOTE))


def cleanlab_filter(labels: np.ndarray, probs: np.ndarray,
                    filter_by: str = FILTER_BY) -> np.ndarray:
    """cleanlab's `find_label_issues(filter_by=...)` over the classes present in `labels`
    (rows: predicted images; `probs` renormalised over those classes); a flag per row."""
    from cleanlab.filter import find_label_issues

    present = np.unique(labels)
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    sub = probs[:, present]
    sub = sub / sub.sum(1, keepdims=True).clip(min=1e-12)
    return find_label_issues(remap[labels], sub, filter_by=filter_by, n_jobs=1)


def _votes_text(row_votes: np.ndarray, classes: list[str]) -> str:
    nz = np.flatnonzero(row_votes)
    order = nz[np.argsort(-row_votes[nz], kind="stable")]
    return ";".join(f"{classes[i]}:{row_votes[i]}" for i in order)


def too_few_predictions(num_preds: np.ndarray, cfg: AuditConfig) -> str | None:
    """Why no image can be relabelled when none reaches `min_preds` predictions, else None."""
    most = int(np.max(num_preds, initial=0))
    if most >= cfg.min_preds:
        return None
    if cfg.split_strategy == "rounds":
        more = (f"n_repeats to at least {cfg.folds * cfg.min_preds} ({cfg.min_preds} rounds "
                f"of {cfg.folds} folds)")
    else:
        more = f"n_repeats (each repeat predicts about {cfg.test_split:.0%} of the images)"
    return (f"no image can be relabelled: every image has at most {most} "
            f"prediction{'' if most == 1 else 's'}, fewer than min_preds {cfg.min_preds}; "
            f"raise {more} or lower min_preds")


def merge_run(run: str) -> str:
    """Merge the shards of a run into predictions.parquet and results.csv; returns the
    results URI. Raises MissingShardsError when coverage is below `min_coverage`."""
    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    _, frames, missing = read_shards(run, cfg, manifest, len(classes))
    planned = np.zeros(len(manifest), dtype=bool)
    specs = plan_repeats(cfg)
    for spec in specs:
        planned[split_for_repeat(cfg, spec, labels).test] = True
    agg = aggregate(len(manifest), labels, frames, len(classes))
    covered = (agg["num_preds"] > 0) & planned
    coverage = covered.sum() / max(1, planned.sum())
    if missing:
        log.warning("missing shards for repeats %s (%d of %d)", missing, len(missing), len(specs))
    if coverage < cfg.min_coverage or not frames:
        raise MissingShardsError(
            f"only {coverage:.1%} of images have a prediction (min_coverage "
            f"{cfg.min_coverage:.0%}); missing repeats: {missing}. Re-run those repeats "
            f"(python -m tasks.train --run {run} --repeat N) and merge again", missing)
    if why := too_few_predictions(agg["num_preds"], cfg):
        log.warning("%s", why)
    s = score(labels, agg["votes"], agg["mean_probs"], agg["num_preds"], cfg.max_label_quality)
    cls = np.asarray(classes, dtype=object)
    results = pd.DataFrame({
        "filename": manifest["key"],
        "label": manifest["label"],
        "corrected_label": cls[s["corrected"]],
        "num_preds": agg["num_preds"],
        "%": np.round(s["pct"], 2),
        "label_quality": np.round(s["quality"], 5),
        "is_label_issue": s["flagged"],
        "suggested_quality": np.round(s["suggested_quality"], 5),
        "votes": [_votes_text(v, classes) for v in agg["votes"]],
        "id": manifest["id"],
    })
    results = results.join(neighbour_columns(results, run))  # method embeddings: kNN columns
    results = sort_most_suspicious(results)
    out = runs.results_uri(run)
    csv = results.to_csv(index=False)
    storage.write_text(out, csv)
    if cfg.results_path:  # a copy, and beside it the run it came from (relabel reads it)
        storage.write_text(cfg.results_path, csv)
        storage.write_text(run_sidecar_uri(cfg.results_path), json.dumps({"run": run}) + "\n")
    preds = results.assign(mean_probs=list(agg["mean_probs"][results["id"].to_numpy()]
                                          .astype(np.float32)))
    buf = io.BytesIO()
    preds.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(run, "predictions.parquet"), buf.getvalue())
    log.info("merged %d shards (%d missing): %d images, %d with a prediction (%.1f%% of all "
             "images, %.1f%% of the %d the plan holds out), %d flagged as label issues; "
             "wrote %s", len(frames), len(missing), len(results), int(covered.sum()),
             100 * covered.sum() / max(1, len(results)), 100 * coverage, int(planned.sum()),
             int(s["flagged"].sum()), out)
    return out


def sort_most_suspicious(results: pd.DataFrame) -> pd.DataFrame:
    """Flagged first, then by label quality (lowest first); unpredicted images last."""
    key = results["label_quality"].fillna(2.0)
    return (results.assign(_flag=~results["is_label_issue"], _q=key)
            .sort_values(["_flag", "_q", "filename"], kind="stable")
            .drop(columns=["_flag", "_q"]).reset_index(drop=True))


class ResultsError(UserError, ValueError):
    """A results CSV that cannot be read; the message names the file, and the row and column
    of a bad value."""


# Column -> how it is parsed: "bool" (true/false, 1/0, yes/no, any case), "int" (a count),
# or the (low, high) range of a number (empty is missing).
_TYPED_COLUMNS: dict[str, str | tuple[float, float]] = {
    "is_label_issue": "bool", "num_preds": "int", "%": (0, 100), "label_quality": (0, 1),
    "suggested_quality": (0, 1)}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _parse_column(frame: pd.DataFrame, column: str, kind: str | tuple[float, float],
                  uri: str) -> pd.Series:
    """One typed column, strictly: the first bad value is an error naming its line (the header
    is line 1) and filename."""
    text = frame[column].astype(str).str.strip()
    if kind == "bool":
        lower = text.str.lower()
        bad = ~lower.isin(_TRUE | _FALSE)
        value = lower.isin(_TRUE)
        expected = "true or false (or 1/0, yes/no)"
    else:
        number = pd.to_numeric(text.where(text != "", None), errors="coerce")
        if kind == "int":
            bad = number.isna() | ~np.isfinite(number) | (number < 0) | (number % 1 != 0)
            value = number.where(~bad, 0).astype(np.int64)
            expected = "a whole number of at least 0"
        else:
            low, high = kind
            bad = ((number.isna() & ~text.str.lower().isin(["", "nan"]))
                   | (number < low) | (number > high))
            value = number.astype(np.float64)
            expected = f"a number from {low} to {high} (or empty)"
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        name = frame["filename"].iloc[pos] if "filename" in frame.columns else ""
        raise ResultsError(f"{uri} line {pos + 2} ({name or 'no filename'}): {column} "
                           f"{frame[column].iloc[pos]!r} is not {expected}; fix that cell")
    return value


def read_results(uri: str) -> pd.DataFrame:
    """A results CSV as written by `merge_run` (or edited by hand): `is_label_issue`,
    `num_preds`, `%`, `label_quality` and `suggested_quality` are parsed strictly, and a
    value that is not of its column's kind is a ResultsError naming its line."""
    if not storage.exists(uri):
        raise MissingFileError(f"results CSV {uri} does not exist")
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), keep_default_na=False,
                            dtype=str, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as err:  # UnicodeDecodeError is a ValueError
        raise ResultsError(f"{uri} is not a results CSV ({type(err).__name__}); pass the "
                           "results.csv of an audit") from None
    if "filename" not in frame.columns:
        raise ResultsError(f"{uri} is not a results CSV (no filename column); pass the "
                           "results.csv of an audit")
    for column, kind in _TYPED_COLUMNS.items():
        if column in frame.columns:
            frame[column] = _parse_column(frame, column, kind, uri)
    if "id" in frame.columns:
        frame["id"] = _parse_column(frame, "id", "int", uri)
    frame.attrs["source"] = uri  # how later checks name this file
    return frame


def run_sidecar_uri(results_copy: str) -> str:
    """Where a results copy (`results_path`) records the run it came from."""
    return f"{results_copy}.run.json"


def read_run_sidecar(results_copy: str) -> str | None:
    """The run URI recorded beside a results copy, or None when there is no record."""
    uri = run_sidecar_uri(results_copy)
    if not storage.exists(uri):
        return None
    try:
        run = json.loads(storage.read_text(uri))["run"]
    except (ValueError, TypeError, KeyError):
        run = None
    if not isinstance(run, str) or not run:
        raise ResultsError(f"{uri} does not name a run (expected {{\"run\": \"<folder>\"}}); "
                           "delete it and pass the results.csv inside the run folder")
    return run
