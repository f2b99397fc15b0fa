"""Score an audit's results CSV against a sample's truth file with the benchmark's metrics
(`benchmarks.scoring.default_metrics`, the default audit's row of `noise_bench`): flag
precision, recall, F1; precision at k, AUROC, AP of the audit's ranking; relabel precision and
recall, correctly labelled images moved, net change of the label accuracy; the tiers' share of
the wrong labels and the guard's verdict (from the run's summary.json, when the CSV sits in
its run folder); coverage.

    python -m benchmarks.score_results RESULTS.csv TRUTH.csv [--sensitivity 90] [--min-preds 2]

`--demo` scores the README demo (`scripts/demo.sh`: the sample `data/sample`, its truth file
`data/sample.truth.csv`) from the newest run of `data/sample` under `work/runs/` (or `--run
RUN`), at that run's sensitivity and min_preds, and prints the README's two demo numbers,
flag precision and relabel precision (with recall and the correctly labelled images moved):

    bash scripts/demo.sh && python -m benchmarks.score_results --demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from benchmarks.scoring import DEFAULT_SENSITIVITY, default_metrics, predictions_from_frames

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = Path("data/sample")
DEMO_WORK = Path("work")


def score_against_truth(results: pd.DataFrame, truth: pd.DataFrame,
                        sensitivity: float = DEFAULT_SENSITIVITY, min_preds: int = 2,
                        guard: dict | None = None) -> dict[str, object]:
    """The default audit's metrics of one results frame (rows matched on filename; moved: the
    product's relabel rule at `sensitivity`, `min_preds`; `guard`: the run summary's)."""
    classes = sorted(set(results["label"].astype(str)) | set(results["corrected_label"]
                                                             .astype(str)))
    p = predictions_from_frames(results, truth.astype(str), classes, guard=guard)
    return {**default_metrics(p, sensitivity, min_preds), "min_preds": int(p.num_preds.min())}


def run_guard(run: Path) -> dict | None:
    """The guard's verdict in a run folder's summary.json, or None."""
    from tasks.merge import read_summary

    summary = read_summary(str(run)) if (run / "summary.json").exists() else None
    return summary["guard"] if summary else None


def demo_run(root: Path = ROOT) -> Path:
    """The newest run (by its results.csv) under `<root>/work/runs/` whose data_path is the
    demo's `data/sample`."""
    from tasks.runs import read_config

    sample = (root / DEMO_DATA).resolve()
    found = []
    for results in (root / DEMO_WORK / "runs").glob("*/results.csv"):
        data = Path(read_config(str(results.parent)).data_path)
        if (data if data.is_absolute() else root / data).resolve() == sample:
            found.append((results.stat().st_mtime, results.parent))
    if not found:
        raise FileNotFoundError(f"no run of {DEMO_DATA} with a results.csv under "
                                f"{root / DEMO_WORK / 'runs'}; run `bash scripts/demo.sh` "
                                "first, or pass --run")
    return max(found)[1]


def demo_lines(run: Path, truth_path: Path) -> list[str]:
    """The README demo's numbers for one run of `data/sample`."""
    from tasks.runs import read_config

    cfg = read_config(str(run))
    truth = pd.read_csv(truth_path, dtype=str)
    m = score_against_truth(read_results(run / "results.csv"), truth, cfg.sensitivity,
                            cfg.min_preds, run_guard(run))
    n_wrong = int((truth["true_label"] != truth["given_label"]).sum())
    return [
        f"README demo: {run} ({len(truth):,} images, {n_wrong} wrong labels; relabel at "
        f"sensitivity {cfg.sensitivity:g}, min_preds {cfg.min_preds}; guard: "
        f"{m['guard'] or 'not measured'})",
        f"flag precision {m['precision']:.3f} ({m['flagged']} flagged; recall "
        f"{m['recall']:.3f})",
        f"relabel precision {m['relabel_precision']:.3f} ({m['relabelled']} moved; relabel "
        f"recall {m['relabel_recall']:.3f}; correct labels moved {m['correct_moved']} "
        f"({m['correct_moved_share']:.2%}); label accuracy {m['net_acc_change_pp']:+.2f} pp)",
    ]


def read_results(path: Path) -> pd.DataFrame:
    """A results CSV with its names as text (class folders such as `0` or `01` stay names)."""
    return pd.read_csv(path, dtype={"filename": str, "label": str, "corrected_label": str})


def metrics_line(m: dict[str, object]) -> str:
    """`key=value` pairs, floats to 4 decimals."""
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in m.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="a results CSV (merge writes <run>/results.csv)")
    p.add_argument("truth", nargs="?", help="the sample's truth CSV (tasks sample writes it)")
    p.add_argument("--sensitivity", type=float, default=DEFAULT_SENSITIVITY)
    p.add_argument("--min-preds", type=int, default=2)
    p.add_argument("--demo", action="store_true",
                   help="score the README demo (data/sample) and print its two numbers")
    p.add_argument("--run", help="with --demo: the run folder (default: the newest)")
    a = p.parse_args(argv)
    if not a.demo and not (a.results and a.truth):
        p.error("give RESULTS.csv and TRUTH.csv, or --demo")
    try:
        if a.demo:
            run = Path(a.run) if a.run else demo_run()
            print("\n".join(demo_lines(run, ROOT / DEMO_DATA.with_name("sample.truth.csv"))))
            return 0
        results = Path(a.results)
        m = score_against_truth(read_results(results), pd.read_csv(a.truth, dtype=str),
                                a.sensitivity,
                                a.min_preds, run_guard(results.parent))
    except (ValueError, FileNotFoundError) as err:  # mismatched files, a missing run
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(metrics_line(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
