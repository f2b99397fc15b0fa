"""Detection-quality benchmark: planted label noise, audited by the original method, this
project's default audit, cleanlab's filters and candidate scoring rules, at equal compute.

For every dataset x noise model it writes a sample with known wrong labels
(`tasks.sample.write_sample`), then audits it twice through the real product
(`tasks.audit.run_audit`), with the same config, trainings and epochs:

- original: `split_strategy: random` (a fresh random split per repeat), hard votes only:
  flagged when the majority vote (`corrected_label`) differs from the label and the image has
  a prediction; relabelled when also `%` >= sensitivity. `min_coverage: 0`, since random
  splits leave about (1 - test_split)^n_repeats of the images unpredicted.
- default: the config as it is (`--set` overrides included): flagged = `is_label_issue`,
  relabelled = `tasks.relabel.select_rows` (flagged, `%` and the pooled probability of the
  suggested label above the sensitivity, `num_preds` >= min_preds).

From the default audit's out-of-sample mean probabilities (`predictions.parquet`), with no
extra training, it also scores cleanlab's `find_label_issues` for every `filter_by`, and
candidate flag rules for the default (e.g. a cleanlab filter AND the vote disagrees).

Metrics per row: precision, recall, F1 of the flagged set; AUROC and average precision of
`label_quality` as a ranking (unpredicted images ranked last, tied); correction accuracy
(share of relabelled images whose new label is the true one); coverage; wall time;
trainings and epochs trained. Tables go to stdout and to `--out` (RESULTS.md), with the
command, machine, date, seeds and versions. Run from the repository root:

    python -m benchmarks.noise_bench                       # everything, config defaults
    python -m benchmarks.noise_bench --datasets fmnist20k --noise sym20
    python -m benchmarks.noise_bench --datasets digits --noise sym20 --n 300 \\
        --n-repeats 2 --num-epochs 1 --set test_split=0.5 --out /tmp/smoke.md   # smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from tasks.merge import CONFIDENT_VOTE, confident_vote

if TYPE_CHECKING:
    from tasks.config import AuditConfig

ROOT = Path(__file__).resolve().parent.parent

# name: (tasks.sample source, images)
DATASETS: dict[str, tuple[str, int]] = {
    "fmnist5k": ("fashion-mnist", 5000),
    "fmnist20k": ("fashion-mnist", 20000),
    "digits": ("digits", 1797),
}
# name: (fraction of labels changed, tasks.sample noise kind)
NOISES: dict[str, tuple[float, str]] = {
    "sym10": (0.10, "symmetric"),
    "sym20": (0.20, "symmetric"),
    "sym40": (0.40, "symmetric"),
    "asym20": (0.20, "asymmetric"),
}
CLEANLAB_FILTERS = ("prune_by_class", "prune_by_noise_rate", "both", "confident_learning",
                    "predicted_neq_given", "low_normalized_margin", "low_self_confidence")
QUALITY_THRESHOLDS = (0.5, 0.3, 0.2, 0.1)
# Issue 5's targets, checked on this row at 10 trainings.
TARGET_ROW = ("fmnist20k", "sym20")
TARGET_TRAININGS = 10


# --- scoring (pure; tests/test_noise_bench.py checks it without training) -------------------

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
                 predicted: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 of `flagged`; AUROC and AP of `quality` as a ranking over all
    images (unscored last); correction accuracy of the `relabel` rows moved to `new_label`;
    coverage (share of `predicted`)."""
    wrong = np.asarray(true) != np.asarray(given)
    flagged = np.asarray(flagged, dtype=bool)
    relabel = np.asarray(relabel, dtype=bool)
    tp = int((flagged & wrong).sum())
    precision = tp / flagged.sum() if flagged.any() else float("nan")
    recall = tp / wrong.sum() if wrong.any() else float("nan")
    f1 = (2 * precision * recall / (precision + recall)
          if tp and precision + recall > 0 else 0.0)
    both = wrong.any() and not wrong.all()
    score = ranking_scores(quality)
    return {
        "flagged": int(flagged.sum()),
        "precision": precision, "recall": recall, "f1": f1,
        "auroc": float(roc_auc_score(wrong, score)) if both else float("nan"),
        "ap": float(average_precision_score(wrong, score)) if both else float("nan"),
        "relabelled": int(relabel.sum()),
        "correction_acc": (float((np.asarray(new_label)[relabel] == np.asarray(true)[relabel])
                                 .mean()) if relabel.any() else float("nan")),
        "coverage": float(np.asarray(predicted, dtype=bool).mean()),
    }


def cleanlab_flags(given: np.ndarray, mean_probs: np.ndarray, filter_by: str) -> np.ndarray:
    """cleanlab's `find_label_issues` on the predicted images (rows without nan), over the
    classes present among them; unpredicted images are not flagged."""
    from cleanlab.filter import find_label_issues

    has = ~np.isnan(mean_probs).any(1)
    flags = np.zeros(len(given), dtype=bool)
    if has.sum() < 2:
        return flags
    labels, probs = given[has], mean_probs[has]
    present = np.unique(labels)
    if len(present) < 2:
        return flags
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    sub = probs[:, present]
    sub = sub / sub.sum(1, keepdims=True).clip(min=1e-12)
    flags[has] = find_label_issues(remap[labels], sub, filter_by=filter_by, n_jobs=1)
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

    cls = np.asarray(p.classes, dtype=object)
    frame = pd.DataFrame({"corrected_label": cls[p.corrected], "label": cls[p.given],
                          "%": p.pct, "suggested_quality": p.suggested_quality,
                          "num_preds": p.num_preds,
                          "is_label_issue": p.is_label_issue})
    mask = np.zeros(len(frame), dtype=bool)
    mask[select_rows(frame, sensitivity, min_preds).index.to_numpy()] = True
    return mask


def default_rows(p: Predictions, sensitivity: float,
                 min_preds: int) -> dict[str, dict[str, float]]:
    """The default audit as the product runs it (whatever rule merge uses for
    is_label_issue; the `rule:` rows show which candidate it matches)."""
    relabel = default_relabel(p, sensitivity, min_preds)
    return {"default audit (is_label_issue)": rule_metrics(
        p.true, p.given, p.is_label_issue, p.quality, relabel, p.corrected, p.predicted)}


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
    rules[f"rule: vote ∧ % > {sensitivity:g} ∧ p > {sensitivity / 100:g} ∧ num_preds >= "
          f"{min_preds}"] = relabel_rule
    rows = {name: rule_metrics(p.true, p.given, flag, p.quality, flag & relabel_rule,
                               p.corrected, p.predicted) for name, flag in rules.items()}
    rows[f"relabel by votes only: flagged ∧ % > {sensitivity:g} ∧ num_preds >= {min_preds}"] = (
        votes_only_row(p, sensitivity, min_preds))
    return rows


def votes_only_row(p: Predictions, sensitivity: float, min_preds: int) -> dict[str, float]:
    """The default's flags, relabelled by the relabel rule without its probability condition
    (votes only), to show what that condition buys."""
    votes_only = (p.is_label_issue & p.vote_disagrees & (p.num_preds >= min_preds)
                  & (np.nan_to_num(p.pct, nan=-1) > sensitivity))
    return rule_metrics(p.true, p.given, p.is_label_issue, p.quality, votes_only, p.corrected,
                        p.predicted)


def predictions_from_frames(results: pd.DataFrame, truth: pd.DataFrame, classes: list[str],
                            mean_probs: pd.DataFrame | None = None) -> Predictions:
    """Align a results frame (as merge writes it) and a truth file (filename, true_label,
    given_label); `mean_probs`: predictions.parquet's `filename` and `mean_probs` columns."""
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
    )


# --- targets ---------------------------------------------------------------------------------

def target_checks(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """(target, measured, passed) for issue 5's targets on one (dataset, noise) table."""
    default = next(v for k, v in rows.items() if k.startswith("default audit"))
    original = next(v for k, v in rows.items() if k.startswith("original"))
    best_name, best = max(((k, v) for k, v in rows.items() if k.startswith("cleanlab ")),
                          key=lambda kv: np.nan_to_num(kv[1]["f1"], nan=-1))
    f1, f1o = default["f1"], original["f1"]
    return [
        ("F1 >= 0.90", f"{f1:.3f}", f1 >= 0.90),
        ("F1 >= best cleanlab filter F1", f"{f1:.3f} vs {best['f1']:.3f} ({best_name})",
         f1 >= best["f1"]),
        ("F1 >= 1.2 x original F1", f"{f1:.3f} vs 1.2 x {f1o:.3f} = {1.2 * f1o:.3f}",
         f1 >= 1.2 * f1o),
        ("AUROC >= 0.98", f"{default['auroc']:.4f}", default["auroc"] >= 0.98),
        ("correction accuracy >= 0.95", _cell(default["correction_acc"], ".4f"),
         default["correction_acc"] >= 0.95),
        ("coverage 100%", f"{default['coverage']:.2%}", default["coverage"] >= 1.0),
    ]


def beats_original(rows: dict[str, dict[str, float]]) -> tuple[str, str, bool]:
    """The asymmetric-noise target: the default audit's F1 above the original method's."""
    default = next(v for k, v in rows.items() if k.startswith("default audit"))
    original = next(v for k, v in rows.items() if k.startswith("original"))
    return ("F1 > original F1", f"{default['f1']:.3f} vs {original['f1']:.3f}",
            default["f1"] > original["f1"])


@dataclass
class BenchTable:
    """The scored rows of one (dataset, noise) pair."""

    dataset: str
    noise: str
    n_images: int
    n_wrong: int
    rows: dict[str, dict[str, float]]
    reused: int = 0  # audits taken from an earlier run (--reuse)

    @property
    def title(self) -> str:
        return f"{self.dataset} · {self.noise}"

    @property
    def summary(self) -> str:
        return f"{self.n_images} images, {self.n_wrong} wrong labels"


def all_checks(tables: list[BenchTable]) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    """(where, checks) for the target row and every asymmetric-noise row present. A row run
    with fewer images or other trainings than the targets assume says so."""
    checks = []
    for t in tables:
        notes = []
        if t.n_images != DATASETS[t.dataset][1]:
            notes.append(f"capped at {t.n_images} images")
        trainings = next(v for k, v in t.rows.items() if k.startswith("default"))["trainings"]
        if trainings != TARGET_TRAININGS:
            notes.append(f"{trainings} trainings; targets are set for {TARGET_TRAININGS}")
        where = f"{t.dataset} {t.noise}" + (f" ({'; '.join(notes)})" if notes else "")
        if (t.dataset, t.noise) == TARGET_ROW:
            checks.append((where, target_checks(t.rows)))
        if t.noise == "asym20":
            checks.append((where, [beats_original(t.rows)]))
    return checks


# --- tables ----------------------------------------------------------------------------------

COLUMNS = [("method", None), ("trainings", "d"), ("epochs", "d"), ("flagged", "d"),
           ("precision", ".3f"), ("recall", ".3f"), ("f1", ".3f"), ("auroc", ".4f"),
           ("ap", ".4f"), ("relabelled", "d"), ("correction_acc", ".4f"),
           ("coverage", ".2%"), ("wall_s", ".0f")]
HEADERS = {"correction_acc": "corr. acc", "wall_s": "wall s", "f1": "F1", "auroc": "AUROC",
           "ap": "AP"}


def _cell(value: object, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return str(value) if fmt is None else format(value, fmt)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """One markdown table, a row per method."""
    head = [HEADERS.get(c, c) for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for name, m in rows.items():
        cells = [name] + [_cell(m.get(c), f) for c, f in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: dict[str, dict[str, float]]) -> str:
    """The same table, aligned for a terminal."""
    head = [HEADERS.get(c, c) for c, _ in COLUMNS]
    body = [[name] + [_cell(m.get(c), f) for c, f in COLUMNS[1:]] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(head), *map(line, body)])


# --- running audits --------------------------------------------------------------------------

def make_sample(work: Path, dataset: str, noise: str, seed: int, n: int | None) -> Path:
    """The noisy sample's folder (written once; its truth file is written last, so its
    existence means the sample is complete). Returns the folder."""
    from tasks.sample import write_sample

    source, size = DATASETS[dataset]
    n = min(n or size, size)
    folder = work / "data" / f"{dataset}-n{n}-{noise}-s{seed}"
    truth = folder.with_name(folder.name + ".truth.csv")
    if not truth.exists():
        shutil.rmtree(folder, ignore_errors=True)
        fraction, kind = NOISES[noise]
        write_sample(folder, n, fraction, seed, kind, source)
    return folder


# Keys that only change how merge scores the pooled predictions: --reuse re-merges with
# their current values instead of retraining.
SCORING_ONLY_KEYS = ("max_label_quality",)


def config_hash(cfg_dict: dict) -> str:
    import hashlib

    skip = ("work_uri", "results_path", *SCORING_ONLY_KEYS)
    data = {k: v for k, v in cfg_dict.items() if k not in skip}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _progress_emitter(prefix: str, tail: collections.deque) -> Callable[[str], None]:
    """Keep the trainer's log for errors; print one line per finished training."""
    def emit(line: str) -> None:
        tail.append(line)
        if " done in " in line or "stopping early" in line:
            text = line.split(" INFO ", 1)[-1].split("; wrote")[0]  # drop time and path
            print(f"{prefix}   {text}", flush=True)
    return emit


def run_method(cfg: AuditConfig, run_id: str, reuse: bool, prefix: str) -> tuple[str, dict]:
    """Audit with `cfg` under `run_id` (fresh unless `reuse` and finished before); returns the
    run URI and its bench record (wall seconds, trainings, epochs)."""
    from tasks import runs, storage
    from tasks.audit import TrainerError, run_audit

    run = runs.run_uri(cfg.work_uri, run_id)
    record_uri = storage.join(run, "bench.json")
    if reuse and storage.exists(record_uri) and storage.exists(
            storage.join(run, "predictions.parquet")):
        from tasks.merge import merge_run

        record = {**json.loads(storage.read_text(record_uri)), "reused": True}
        runs.write_config(run, cfg)  # same training keys; scoring keys as they are now
        merge_run(run)
        print(f"{prefix} reusing {run} ({record['wall_s']:.0f}s when it ran), re-merged",
              flush=True)
        return run, record
    shutil.rmtree(run, ignore_errors=True)  # a fresh audit, so its wall time is honest
    print(f"{prefix} auditing: {cfg.n_repeats} trainings, up to {cfg.num_epochs} epochs, "
          f"split_strategy {cfg.split_strategy}; run {run}", flush=True)
    tail: collections.deque = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    try:
        run_audit(cfg, run_id=run_id, emit=_progress_emitter(prefix, tail))
    except TrainerError:
        print("\n".join(tail), file=sys.stderr)
        raise
    wall = time.perf_counter() - t0
    trainings, epochs = shard_counts(run)
    record = {"wall_s": wall, "trainings": trainings, "epochs": epochs,
              "finished": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_text(record_uri, json.dumps(record, indent=2))
    print(f"{prefix} audit done in {wall:.0f}s ({trainings} trainings, {epochs} epochs)",
          flush=True)
    return run, record


def shard_counts(run: str) -> tuple[int, int]:
    """(trainings, epochs trained in all) from the run's shards."""
    import ast
    import io

    import pyarrow.parquet as pq

    from tasks import storage

    trainings = epochs = 0
    for info in storage.list_objects(storage.join(run, "shards")):
        uri = storage.join(run, "shards", info.key)
        meta = pq.read_schema(io.BytesIO(storage.read_bytes(uri))).metadata or {}
        stats = ast.literal_eval(meta.get(b"stats", b"{}").decode() or "{}")
        trainings += 1
        epochs += int(stats.get("epoch", 0))
    return trainings, epochs


def load_predictions(run: str, truth_path: Path) -> Predictions:
    """A finished run's predictions.parquet (results columns + mean_probs), with the truth."""
    import io

    from tasks import storage
    from tasks.index import read_manifest

    preds = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(run,
                                                                       "predictions.parquet"))))
    _, classes = read_manifest(run)
    truth = pd.read_csv(truth_path, dtype=str)
    return predictions_from_frames(preds.drop(columns=["mean_probs"]), truth, classes,
                                   preds[["filename", "mean_probs"]])


def bench_one(args: argparse.Namespace, base: dict, dataset: str, noise: str,
              prefix: str) -> BenchTable:
    """Audit one (dataset, noise) both ways and score every row."""
    from tasks.config import parse_config

    folder = make_sample(Path(args.work), dataset, noise, args.seed, args.n)
    truth_path = folder.with_name(folder.name + ".truth.csv")
    truth = pd.read_csv(truth_path, dtype=str)
    n_wrong = int((truth["true_label"] != truth["given_label"]).sum())
    print(f"{prefix} sample: {len(truth)} images, {n_wrong} wrong labels in {folder}",
          flush=True)
    common = {"data_path": str(folder), "work_uri": str(Path(args.work) / "work"),
              "seed": args.seed, "results_path": None}
    cfg_default = parse_config({**base, **common})
    cfg_original = parse_config({**base, **common, "split_strategy": "random",
                                 "min_coverage": 0.0})
    out: dict[str, dict[str, float]] = {}
    audits = {}
    for method, cfg in (("original", cfg_original), ("default", cfg_default)):
        run_id = f"{folder.name}-{method}-{config_hash(cfg.model_dump())}"
        run, record = run_method(cfg, run_id, args.reuse, f"{prefix} {method}:")
        audits[method] = (load_predictions(run, truth_path), record, cfg)

    p_orig, rec_orig, _ = audits["original"]
    p_def, rec_def, cfg = audits["default"]

    def cost(rec: dict, extra: float = 0.0) -> dict[str, float]:
        return {"trainings": rec["trainings"], "epochs": rec["epochs"],
                "wall_s": rec["wall_s"] + extra}

    for name, m in original_rows(p_orig, args.sensitivity).items():
        out[name] = {**m, **cost(rec_orig)}
    for name, m in default_rows(p_def, args.sensitivity, cfg.min_preds).items():
        out[name] = {**m, **cost(rec_def)}
    cl_rows, flags, seconds = cleanlab_rows(p_def)
    for name, m in cl_rows.items():
        out[name] = {**m, **cost(rec_def, seconds[name.removeprefix("cleanlab ")])}
    for name, m in candidate_rows(p_def, flags, args.sensitivity, cfg.min_preds).items():
        out[name] = {**m, **cost(rec_def)}
    reused = sum(rec.get("reused", False) for _, rec, _ in audits.values())
    return BenchTable(dataset, noise, len(truth), n_wrong, out, reused)


# --- the report ------------------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, load, software versions, git commit."""
    import cleanlab
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "machine": f"{cpu}, {cores} cores{mem}, GPU: {gpu}, {platform.platform()}",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"cleanlab {cleanlab.__version__}, numpy {np.__version__}",
        "commit": commit,
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def write_results(path: Path, args: argparse.Namespace, argv: list[str], info: dict[str, str],
                  base: dict, tables: list[BenchTable], started: datetime,
                  seconds: float) -> None:
    """RESULTS.md: provenance, targets, then a table per (dataset, noise)."""
    import yaml

    from tasks.sample import DIGIT_NEIGHBOUR, FASHION_NEIGHBOUR

    shown = {k: v for k, v in base.items() if k not in ("data_path", "work_uri", "results_path")}
    cmd = shlex.join(["python", "-m", "benchmarks.noise_bench", *argv])
    lines = [
        "# Detection-quality benchmark results",
        "",
        "Generated by `benchmarks/noise_bench.py` (see README, \"Detection-quality "
        "benchmark\"); every number below is computed by the script. Do not edit by hand.",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {started.isoformat(timespec='seconds')} (UTC), took {seconds / 60:.1f} min",
        f"- Machine: {info['machine']}; load average at start {info['load']}",
        f"- Software: {info['software']}; commit {info['commit']}",
        f"- Seeds: data (subset and noise) {args.seed}, audit seed {args.seed}",
        f"- Sensitivity for relabelling: {args.sensitivity:g}; "
        f"trainings per audit: {base['n_repeats']}; epochs per training: up to "
        f"{base['num_epochs']} (early stopping with patience {base['patience']})",
        "",
        "Default audit config (the original method differs only in `split_strategy: random` "
        "and `min_coverage: 0`):",
        "",
        "```yaml",
        yaml.safe_dump(shown, sort_keys=False).rstrip(),
        "```",
        "",
        "Asymmetric noise maps (each class flips to one neighbour): Fashion-MNIST "
        + ", ".join(f"{a}→{b}" for a, b in FASHION_NEIGHBOUR.items())
        + "; digits " + ", ".join(f"{a}→{b}" for a, b in DIGIT_NEIGHBOUR.items()) + ".",
        "",
        "Columns: `trainings`/`epochs` trained models and epochs in all; `flagged` images "
        "flagged; precision, recall, F1 of the flagged set against the planted wrong labels; "
        "AUROC and AP of `label_quality` as a ranking of all images (unpredicted images ranked "
        "last, tied); `relabelled` and `corr. acc` the images moved and the share moved to "
        "their true label; `coverage` the share with at least one prediction; `wall s` the "
        "audit's wall time (cleanlab rows: the default audit plus the filter). cleanlab rows "
        "and `rule:` rows reuse the default audit's predictions (no extra training); cleanlab "
        "rows relabel flagged images to the argmax of the mean probabilities, `rule:` rows "
        "relabel flagged images that pass the product's relabel rule.",
        "",
    ]
    checks = all_checks(tables)
    if checks:
        lines += ["## Targets", "", "| row | target | measured | result |", "|---|---|---|---|"]
        lines += [f"| {where} | {t} | {m} | {'PASS' if ok else 'FAIL'} |"
                  for where, items in checks for t, m, ok in items]
        lines.append("")
    for t in tables:
        which = "Both audits" if t.reused == 2 else "One audit"
        reused = (f" {which} reused from an earlier run (`--reuse`; wall times are from when "
                  "they ran)." if t.reused else "")
        lines += [f"## {t.title}", "", f"{t.summary}.{reused}", "", markdown_table(t.rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--noise", default=",".join(NOISES),
                   help=f"comma-separated, from {', '.join(NOISES)}")
    p.add_argument("--pairs", help="comma-separated dataset:noise pairs, in this order, "
                   "instead of every dataset x noise (e.g. fmnist20k:sym20,digits:asym20)")
    p.add_argument("--n-repeats", type=int, default=10, help="trainings per audit")
    p.add_argument("--num-epochs", type=int, help="epochs per training (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="data (subset and noise) and audit seed")
    p.add_argument("--n", type=int, help="cap every dataset at N images (smoke tests)")
    p.add_argument("--sensitivity", type=float, default=60.0,
                   help="relabel threshold on %% (original: >=, default audit: >)")
    p.add_argument("--config", help="base config YAML (default configs/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override (repeatable), e.g. to try other defaults")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                   help="where to write the results markdown")
    p.add_argument("--work", default="/tmp/acl-bench", help="scratch folder (samples, runs)")
    p.add_argument("--reuse", action="store_true",
                   help="skip audits whose results exist (regenerate the tables)")
    args = p.parse_args(argv)
    for key, allowed in (("datasets", DATASETS), ("noise", NOISES)):
        items = [s.strip() for s in getattr(args, key).split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            p.error(f"--{key}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
        setattr(args, key, items)
    args.pairs = ([tuple(x.strip().split(":", 1)) for x in args.pairs.split(",") if x.strip()]
                  if args.pairs else [(d, n) for d in args.datasets for n in args.noise])
    bad = [f"{d}:{n}" for d, n in args.pairs if d not in DATASETS or n not in NOISES]
    if bad:
        p.error(f"--pairs: unknown {bad}; datasets {DATASETS}, noise {NOISES}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from tasks.config import load_config

    overrides = [*args.set, f"n_repeats={args.n_repeats}"]
    if args.num_epochs is not None:
        overrides.append(f"num_epochs={args.num_epochs}")
    base = load_config(args.config, overrides).model_dump()
    started, t0 = datetime.now(UTC), time.perf_counter()
    info = machine_info()
    print(f"noise bench: {info['machine']}\n  {info['software']}; load {info['load']}")
    print("config:", json.dumps({k: v for k, v in base.items()
                                 if k not in ("data_path", "work_uri", "results_path")}))
    combos = args.pairs
    tables = []
    for i, (dataset, noise) in enumerate(combos, 1):
        prefix = f"[{i}/{len(combos)} {dataset} {noise}]"
        t = bench_one(args, base, dataset, noise, prefix)
        tables.append(t)
        print(f"\n{t.title}: {t.summary}\n{text_table(t.rows)}\n", flush=True)
    for where, items in all_checks(tables):
        for target, measured, ok in items:
            print(f"{'PASS' if ok else 'FAIL'}  {where}: {target}: {measured}")
    out = Path(args.out)
    write_results(out, args, argv, info, base, tables, started, time.perf_counter() - t0)
    print(f"wrote {out} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def cli() -> int:
    """main() with the product CLI's handling of errors a user can fix: one line, exit 2."""
    from tasks.errors import UserError

    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
