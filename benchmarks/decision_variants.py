"""Decision variants on finished benchmark audits: what candidate changes to the posterior
(`tasks.decide.posterior`) would do to the relabel decision, without training.

For every finished training-mode audit under `--work` (the `noise_bench` runs with a
bench.json and predictions.parquet; `--runs` picks by name), it re-pools the run's shards and
prints, per relabel sensitivity, the moves, their precision, the correct labels moved and the
relabel recall of:

- shipped: the product's posterior on the pooled probabilities, as merge computes it (the
  suggestion's clipped backward-corrected share of the other classes);
- temperature: the same after scaling each shard's probabilities by a temperature fitted on
  that shard's own held-out rows against the given labels (one scalar per training, by NLL),
  the calibration a model fitted to noisy labels would get from its validation split;
- q share: the previous release's p_suggestion = p_label_wrong x q_s / (1 - q_g), the
  suggestion's raw share of the other classes' probability, which a model trained at noise
  rate eta keeps below about 1 - eta.

Moves follow the product's rule (an issue, a suggestion other than the label, at least
`min_preds` predictions, p_suggestion above sensitivity / 100); the suggestion here is the
pooled probabilities' argmax (merge takes the majority vote), so the shipped rows can differ
a little from RESULTS.md. Results go to `--out`
(default benchmarks/DECISION_VARIANTS.md). Run from the repository root:

    python -m benchmarks.decision_variants --work /work/bench
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.scoring import move_cell

SENSITIVITIES = (80, 90, 95)
VARIANTS = ("shipped", "temperature", "q share")


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the mean negative log-likelihood of `labels` under
    softmax(log(probs) / T), searched on log T in [-3, 3]."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(probs, 1e-7, 1.0))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[rows, labels]).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature), rows summing to 1."""
    z = np.log(np.clip(probs, 1e-7, 1.0)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@dataclass
class Pooled:
    """One run's pooled out-of-sample probabilities (predicted images only), raw and with a
    temperature per shard, and the truth."""

    raw: np.ndarray
    scaled: np.ndarray
    num_preds: np.ndarray
    given: np.ndarray
    true: np.ndarray
    temperatures: list[float]


def pool_run(run: Path, truth_csv: Path) -> Pooled:
    """Re-pool a run's shards (dense probabilities only) with and without temperatures."""
    from tasks.index import read_manifest
    from tasks.shards import read_shard, shard_rows

    manifest, classes = read_manifest(str(run))
    k, n = len(classes), len(manifest)
    truth = pd.read_csv(truth_csv, dtype=str).set_index("filename")["true_label"]
    index = {c: i for i, c in enumerate(classes)}
    true = truth.loc[manifest["key"]].map(index).to_numpy()
    sums, scaled = np.zeros((n, k)), np.zeros((n, k))
    count = np.zeros(n, dtype=np.int64)
    temperatures = []
    for shard in sorted((run / "shards").glob("*.parquet")):
        rows = shard_rows(read_shard(str(shard)), k, n, str(shard))
        if rows.topk_idx is not None:
            raise SystemExit(f"{shard}: top-k shards are not supported here")
        probs = rows.probs.astype(np.float64)
        probs /= probs.sum(1, keepdims=True)
        temperatures.append(fit_temperature(probs, rows.given))
        np.add.at(sums, rows.ids, probs)
        np.add.at(scaled, rows.ids, with_temperature(probs, temperatures[-1]))
        np.add.at(count, rows.ids, 1)
    has = count > 0
    labels = manifest["label_idx"].to_numpy()
    return Pooled(sums[has] / count[has, None], scaled[has] / count[has, None], count[has],
                  labels[has], true[has], temperatures)


def decide_rows(q: np.ndarray, given: np.ndarray,
                q_share: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(suggested label, is_label_issue, p_suggestion) as merge decides them from pooled
    probabilities (the vote taken as the argmax), or with the previous release's share."""
    from cleanlab.count import compute_confident_joint

    from tasks import decide

    n, k = q.shape
    rows = np.arange(n)
    suggested = q.argmax(1)
    joint = compute_confident_joint(given, q, calibrate=False)
    eta, _ = decide.noise_rates(decide.noise_joint(joint, np.bincount(given, minlength=k)))
    differs = suggested != given
    q_g, q_s = q[rows, given], q[rows, suggested]
    p_wrong, p_sugg = decide.posterior(q_g, q_s, differs, eta, k, n,
                                       *decide.other_classes(q, given, suggested))
    if q_share:
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(q_g < 1, q_s / (1 - q_g), 0.0)
        p_sugg = np.where(differs, p_wrong * np.clip(share, 0, 1), 0.0)
    return suggested, (p_wrong > 0.5) & differs, p_sugg


def variant_lines(name: str, pooled: Pooled, min_preds: int) -> list[str]:
    """Markdown table rows of each variant at each sensitivity for one run."""
    wrong = pooled.true != pooled.given
    lines = []
    for variant in VARIANTS:
        q = pooled.scaled if variant == "temperature" else pooled.raw
        suggested, issue, p_sugg = decide_rows(q, pooled.given, variant == "q share")
        cells = []
        for s in SENSITIVITIES:
            moved = issue & (p_sugg > s / 100) & (pooled.num_preds >= min_preds)
            cells.append(move_cell(moved, suggested, pooled.true, wrong))
        lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="noise_bench's --work folder")
    ap.add_argument("--runs", default="", help="comma-separated substrings of run names "
                    "(default: every finished training-mode run)")
    ap.add_argument("--min-preds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/DECISION_VARIANTS.md"))
    args = ap.parse_args(argv)
    wanted = [w for w in args.runs.split(",") if w]
    lines = [
        "# Decision variants on finished benchmark audits",
        "",
        "Written by `benchmarks/decision_variants.py` (see its docstring); no training: the "
        "runs' own shards, re-pooled.",
        "",
        f"Command: `python -m benchmarks.decision_variants {' '.join(argv or sys.argv[1:])}`",
        "",
        "Each cell: moves, relabel precision, correct labels moved, relabel recall.",
        "",
        "| run | variant | " + " | ".join(f"sensitivity {s}" for s in SENSITIVITIES) + " |",
        "|---|---|" + "---|" * len(SENSITIVITIES),
    ]
    temps = []
    for run in sorted((args.work / "work" / "runs").glob("*-default-*")):
        if not (run / "bench.json").exists() or not (run / "predictions.parquet").exists():
            continue
        if wanted and not any(w in run.name for w in wanted):
            continue
        sample = run.name.split("-default-")[0]
        pooled = pool_run(run, args.work / "data" / f"{sample}.truth.csv")
        rows = variant_lines(sample, pooled, args.min_preds)
        print("\n".join(rows), flush=True)
        lines += rows
        temps.append(f"- {sample}: {min(pooled.temperatures):.2f}–"
                     f"{max(pooled.temperatures):.2f} over {len(pooled.temperatures)} shards")
    lines += ["", "Fitted temperatures per shard (1: the shard's probabilities unchanged):",
              "", *temps, ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
