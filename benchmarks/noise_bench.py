"""Detection-quality benchmark: planted label noise, audited by the original method, this
project's default audit, embedding mode, cleanlab's filters and candidate scoring rules.

For every dataset x noise model it writes a sample with known wrong labels
(`tasks.sample.write_sample`), then audits it through the real product
(`tasks.audit.run_audit`) with each of `--methods`; original and default run the same
config, trainings and epochs:

- original: `split_strategy: random` (a fresh random split per repeat), hard votes only:
  flagged when the majority vote (`corrected_label`) differs from the label and the image has
  a prediction; relabelled when also `%` >= 60 (the original tool's default sensitivity).
  `min_coverage: 0`, since random
  splits leave about (1 - test_split)^n_repeats of the images unpredicted.
- default: the config as it is (`--set` overrides included): flagged = `is_label_issue`,
  relabelled = `tasks.relabel.select_rows` (flagged, `p_suggestion` above the sensitivity,
  `num_preds` >= min_preds) at the config's default sensitivity unless `--sensitivity`.
- embeddings: the default config plus `method: embeddings`, with the backbone
  `--embed-model` (weights `--embed-weights`, default none: random init, since these
  machines cannot download pretrained weights) at `--embed-image-size`: one embedding pass,
  then a probe per repeat; scored like the default (the same flag and relabel rule), with
  the mean knn_agreement of wrong and correct labels under the table.

From the default audit's out-of-sample mean probabilities (`predictions.parquet`), with no
extra training, it also scores cleanlab's `find_label_issues` for every `filter_by`, and
candidate flag rules for the default (e.g. a cleanlab filter AND the vote disagrees).

Metrics per row (`benchmarks.scoring.rule_metrics`): precision, recall, F1 of the flagged
set; precision at k (k = the number of wrong labels), AUROC and average precision of a
ranking (`label_quality`, lowest first; unpredicted images last, tied); relabel precision
and recall, correctly labelled images moved, the net change of the label accuracy; for the
default and embedding audits the share of wrong labels in the issue and review tiers and the
guard's verdict (`<run>/summary.json`); coverage; wall time; trainings and epochs trained
(embeddings: probes fitted, 0 epochs). Every row's default audit is checked against issue
14's targets (the target row also against issue 5's, and against issue 17's: the embedding
audit at least 10x faster than the default one). Tables (`benchmarks.results_md`) go to
stdout and to `--out` (RESULTS.md), with the command, machine, date, seeds and versions. Run
from the repository root:

    python -m benchmarks.noise_bench                       # everything, config defaults
    python -m benchmarks.noise_bench --datasets fmnist20k --noise sym20
    python -m benchmarks.noise_bench --datasets digits --noise sym20 --n 300 \\
        --n-repeats 2 --num-epochs 1 --set test_split=0.5 --out /tmp/smoke.md   # smoke test
    python -m benchmarks.noise_bench --pairs fmnist20k:sym20 --methods default,embeddings
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from benchmarks.results_md import (
    RESULTS_MD,
    embedding_line,
    machine_info,
    text_table,
    write_results,
)
from benchmarks.scoring import (
    DATASETS,
    DEFAULT_SENSITIVITY,
    NOISES,
    ORIGINAL_SENSITIVITY,
    BenchTable,
    Predictions,
    all_checks,
    candidate_rows,
    cleanlab_rows,
    default_metrics,
    default_rows,
    embedding_row_name,
    knn_note,
    original_rows,
    predictions_from_frames,
)
from tasks.config import MODEL_NAMES, NO_WEIGHTS, weights_path_like

if TYPE_CHECKING:
    from tasks.config import AuditConfig


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
SCORING_ONLY_KEYS = ("max_label_quality", "min_preds", "sensitivity", "autocorrect",
                     "relabel_mode", "report_top_n", "merge_memory_gb", "force_relabel")


# Training keys added after audits were benchmarked, with the value that trains as before:
# left out of the hash at that value, so --reuse still finds those audits.
LATER_KEYS = {"recipe": "auto", "backbone_lr_mult": 0.1, "method": "train",
              "embed_chunk_size": 50000, "probe": "logistic", "knn_k": 10,
              "duplicate_threshold": 0.98}


def config_hash(cfg_dict: dict) -> str:
    import hashlib

    from tasks.config import parse_config

    skip = ("work_uri", "results_path", *SCORING_ONLY_KEYS)
    data = {k: v for k, v in cfg_dict.items() if k not in skip
            and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    if data.get("image_size") is None:  # the model's default size, as before it was optional
        data["image_size"] = parse_config(cfg_dict).input_size
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _progress_emitter(prefix: str, tail: collections.deque) -> Callable[[str], None]:
    """Keep the trainer's log for errors; print one line per finished training."""
    def emit(line: str) -> None:
        tail.append(line)
        if " done in " in line or " done: " in line or "stopping early" in line:
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
        if cfg.method == "embeddings":  # keeps the probes that match; redoes stale neighbours
            from tasks.probe import run_probes

            run_probes(run)
        merge_run(run)
        print(f"{prefix} reusing {run} ({record['wall_s']:.0f}s when it ran), re-merged",
              flush=True)
        return run, record
    shutil.rmtree(run, ignore_errors=True)  # a fresh audit, so its wall time is honest
    if cfg.method == "embeddings":
        print(f"{prefix} auditing: an embedding pass with {cfg.model_name} (model_weights "
              f"{cfg.model_weights}) at {cfg.input_size} px, then {cfg.n_repeats} {cfg.probe} "
              f"probes; run {run}", flush=True)
    else:
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
    """(trainings, epochs trained in all) from the run's shards (embedding mode: probes,
    0 epochs)."""
    from tasks import shards, storage

    trainings = epochs = 0
    for info in storage.list_objects(storage.join(run, "shards")):
        meta = shards.shard_metadata(storage.join(run, "shards", info.key)) or {}
        trainings += 1
        epochs += int(meta.get("stats", {}).get("epoch", 0))
    return trainings, epochs


def load_predictions(run: str, truth_path: Path) -> Predictions:
    """A finished run's predictions.parquet (results columns + mean_probs) and the guard's
    verdict from its summary.json (none for a run merged before summaries), with the truth;
    an embedding-mode run's knn_agreement comes with them."""
    import io

    from tasks import storage
    from tasks.index import read_manifest
    from tasks.merge import read_summary

    preds = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(run,
                                                                       "predictions.parquet"))))
    _, classes = read_manifest(run)
    truth = pd.read_csv(truth_path, dtype=str)
    summary = read_summary(run)
    return predictions_from_frames(preds.drop(columns=["mean_probs"]), truth, classes,
                                   preds[["filename", "mean_probs"]],
                                   guard=summary["guard"] if summary else None)


def embedding_overrides(args: argparse.Namespace) -> dict:
    """The config keys the embedding audit sets over the default config."""
    return {"method": "embeddings", "model_name": args.embed_model,
            "model_weights": args.embed_weights, "image_size": args.embed_image_size or None,
            "ffcv": False}  # the embedding pass reads each image once; the mode refuses ffcv


def bench_one(args: argparse.Namespace, base: dict, dataset: str, noise: str,
              prefix: str) -> BenchTable:
    """Audit one (dataset, noise) with each of `args.methods` and score every row."""
    from tasks.config import parse_config

    folder = make_sample(Path(args.work), dataset, noise, args.seed, args.n)
    truth_path = folder.with_name(folder.name + ".truth.csv")
    truth = pd.read_csv(truth_path, dtype=str)
    n_wrong = int((truth["true_label"] != truth["given_label"]).sum())
    print(f"{prefix} sample: {len(truth)} images, {n_wrong} wrong labels in {folder}",
          flush=True)
    common = {"data_path": str(folder), "work_uri": str(Path(args.work) / "work"),
              "seed": args.seed, "results_path": None}
    overrides = {"original": {"split_strategy": "random", "min_coverage": 0.0},
                 "default": {}, "embeddings": embedding_overrides(args)}
    out: dict[str, dict[str, float]] = {}
    audits = {}
    for method in METHODS:
        if method not in args.methods:
            continue
        cfg = parse_config({**base, **common, **overrides[method]})
        run_id = f"{folder.name}-{method}-{config_hash(cfg.model_dump())}"
        run, record = run_method(cfg, run_id, args.reuse, f"{prefix} {method}:")
        audits[method] = (load_predictions(run, truth_path), record, cfg)

    def cost(rec: dict, extra: float = 0.0) -> dict[str, float]:
        return {"trainings": rec["trainings"], "epochs": rec["epochs"],
                "wall_s": rec["wall_s"] + extra, "finished": rec.get("finished")}

    if "original" in audits:
        p_orig, rec_orig, _ = audits["original"]
        for name, m in original_rows(p_orig, ORIGINAL_SENSITIVITY).items():
            out[name] = {**m, **cost(rec_orig)}
    if "default" in audits:
        p_def, rec_def, cfg = audits["default"]
        min_preds = cfg.min_preds
        for name, m in default_rows(p_def, args.sensitivity, min_preds).items():
            out[name] = {**m, **cost(rec_def)}
    notes = []
    if "embeddings" in audits:
        p_emb, rec_emb, cfg = audits["embeddings"]
        name = embedding_row_name(cfg.model_name, args.embed_weights_label)
        out[name] = {**default_metrics(p_emb, args.sensitivity, cfg.min_preds),
                     **cost(rec_emb)}
        note = knn_note(p_emb)
        notes += [f"{name}: {note}"] if note else []
    if "default" in audits:  # rows on the default audit's predictions, no extra training
        cl_rows, flags, seconds = cleanlab_rows(p_def)
        for name, m in cl_rows.items():
            out[name] = {**m, **cost(rec_def, seconds[name.removeprefix("cleanlab ")])}
        for name, m in candidate_rows(p_def, flags, args.sensitivity, min_preds).items():
            out[name] = {**m, **cost(rec_def)}
    reused = tuple(method for method, (_, rec, _) in audits.items() if rec.get("reused"))
    return BenchTable(dataset, noise, len(truth), n_wrong, out, reused, tuple(notes))


# --- command line ----------------------------------------------------------------------------

METHODS = ("original", "default", "embeddings")  # in the order they run
# The embedding audit's default image size: the backbone's 224 px costs a CPU about 12x more,
# and Fashion-MNIST's 28 px images gain nothing from it with random weights.
EMBED_IMAGE_SIZE = 64

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--noise", default=",".join(NOISES),
                   help=f"comma-separated, from {', '.join(NOISES)}")
    p.add_argument("--pairs", help="comma-separated dataset:noise pairs, in this order, "
                   "instead of every dataset x noise (e.g. fmnist20k:sym20,digits:asym20)")
    p.add_argument("--methods", default="original,default",
                   help=f"audits to run per pair, comma-separated from {', '.join(METHODS)} "
                   "(default original,default; original needs default). embeddings adds "
                   "embedding mode's row (and, with default, issue 17's speed-up check)")
    p.add_argument("--embed-model", default="resnet18", choices=MODEL_NAMES,
                   help="embeddings: the backbone (default resnet18, the cheapest torchvision "
                   "one on a CPU)")
    p.add_argument("--embed-weights", default=NO_WEIGHTS,
                   help="embeddings: its model_weights: none (default: random init, as "
                   "nothing can be downloaded here; a weak backbone), a state-dict file, or "
                   "a torchvision weights name where they can be downloaded. --reuse keys on "
                   "the value, not a file's content")
    p.add_argument("--embed-image-size", type=int, default=EMBED_IMAGE_SIZE,
                   help=f"embeddings: image_size in px (default {EMBED_IMAGE_SIZE}, affordable "
                   "on a CPU; 0: the model's default, 224 for resnet18, which pretrained "
                   "weights expect)")
    p.add_argument("--n-repeats", type=int, default=10, help="trainings per audit")
    p.add_argument("--num-epochs", type=int, help="epochs per training (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="data (subset and noise) and audit seed")
    p.add_argument("--n", type=int, help="cap every dataset at N images (smoke tests)")
    p.add_argument("--sensitivity", type=float, default=DEFAULT_SENSITIVITY,
                   help="the default audit's relabel threshold on p_suggestion, in %% "
                   "(default: the config's); the original method keeps its own (%% >= 60)")
    p.add_argument("--config", help="base config YAML (default configs/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override (repeatable), e.g. to try other defaults")
    p.add_argument("--out", default=str(RESULTS_MD),
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
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if (not args.methods or set(args.methods) - set(METHODS)
            or ("original" in args.methods and "default" not in args.methods)):
        p.error(f"--methods: {args.methods}; choose from {', '.join(METHODS)} (original "
                "only with default), e.g. default,embeddings")
    weights = args.embed_weights.strip()
    args.embed_weights_label = Path(weights).name if weights_path_like(weights) else weights
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
    if "embeddings" in args.methods:
        print(embedding_line(args))
    combos = args.pairs
    tables = []
    for i, (dataset, noise) in enumerate(combos, 1):
        prefix = f"[{i}/{len(combos)} {dataset} {noise}]"
        t = bench_one(args, base, dataset, noise, prefix)
        tables.append(t)
        notes = "".join(f"{note}\n" for note in t.notes)
        print(f"\n{t.title}: {t.summary}\n{notes}{text_table(t.rows)}\n", flush=True)
    checks = all_checks(tables)
    for where, items in checks:
        for target, measured, ok in items:
            print(f"{'PASS' if ok else 'FAIL'}  {where}: {target}: {measured}")
    failed = sum(not ok for _, items in checks for _, _, ok in items)
    print(f"{failed} of {sum(len(items) for _, items in checks)} target checks fail")
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
