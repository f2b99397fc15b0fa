"""The detection-quality benchmark's output: its tables (markdown and terminal) and
RESULTS.md with the provenance of every number (command, machine, date, seeds, versions)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.scoring import (
    EMBED_SPEEDUP_ROW,
    MIN_EMBED_SPEEDUP,
    BenchTable,
    all_checks,
    format_metric,
    missed_targets,
)
from tasks.config import NO_WEIGHTS

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


COLUMNS = [("method", None), ("trainings", "d"), ("epochs", "d"), ("flagged", "d"),
           ("precision", ".3f"), ("recall", ".3f"), ("f1", ".3f"), ("precision_at_k", ".3f"),
           ("auroc", ".4f"), ("ap", ".4f"), ("relabelled", "d"),
           ("relabel_precision", ".4f"), ("relabel_recall", ".3f"), ("correct_moved", "d"),
           ("correct_moved_share", ".2%"), ("net_acc_change_pp", "+.2f"),
           ("tiers_coverage", ".3f"), ("guard", None), ("coverage", ".2%"), ("wall_s", ".0f")]
HEADERS = {"wall_s": "wall s", "f1": "F1", "auroc": "AUROC", "ap": "AP",
           "precision_at_k": "P@k", "relabel_precision": "relabel prec",
           "relabel_recall": "relabel recall", "correct_moved": "correct moved",
           "correct_moved_share": "correct moved %", "net_acc_change_pp": "Δ acc pp",
           "tiers_coverage": "tiers cov"}


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """One markdown table, a row per method."""
    head = [HEADERS.get(c, c) for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for name, m in rows.items():
        cells = [name] + [format_metric(m.get(c), f) for c, f in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: dict[str, dict[str, float]]) -> str:
    """The same table, aligned for a terminal."""
    head = [HEADERS.get(c, c) for c, _ in COLUMNS]
    body = [[name] + [format_metric(m.get(c), f) for c, f in COLUMNS[1:]]
            for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(head), *map(line, body)])


def embedding_line(args: argparse.Namespace) -> str:
    """What the embedding audit ran with, and what its numbers mean."""
    weights = args.embed_weights.strip()
    if weights.lower() == NO_WEIGHTS:
        what = ("random initialisation: no pretrained weights can be downloaded on these "
                "machines, so its numbers are a weak backbone's, not the mode's ceiling")
    else:
        what = f"{weights!r}"
    size = f"{args.embed_image_size} px" if args.embed_image_size else "the model's default size"
    return (f"Embedding audit: `method: embeddings`, backbone {args.embed_model} with "
            f"model_weights {args.embed_weights_label} ({what}), at {size}; otherwise the "
            "default audit's config. Its wall time is the whole audit (embedding pass, probes, "
            "merge), like the others'; `trainings` counts its probes (0 epochs). Wall times "
            "compare only between audits that ran on the same machine in one run; a table "
            "says which of its audits were reused from an earlier run.")


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
        f"- Sensitivity for relabelling: {args.sensitivity:g} (default audit, on "
        "`p_suggestion`; the original method: `%` >= 60); "
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
        *([f"- {embedding_line(args)}", ""]
          if "embeddings" in getattr(args, "methods", ()) else []),
        "Asymmetric noise maps (each class flips to one neighbour): Fashion-MNIST "
        + ", ".join(f"{a}→{b}" for a, b in FASHION_NEIGHBOUR.items())
        + "; digits " + ", ".join(f"{a}→{b}" for a, b in DIGIT_NEIGHBOUR.items()) + ".",
        "",
        "Columns: `trainings`/`epochs` trained models and epochs in all; `flagged` images "
        "flagged (default audit: `is_label_issue`, tier `issue`); precision, recall, F1 of the "
        "flagged set against the planted wrong labels; `P@k` the share of wrong labels among "
        "the k most suspicious images, k = the number of wrong labels; AUROC and AP of the same "
        "ranking (`label_quality`, lowest first) over all images (unpredicted images ranked "
        "last, tied); `relabelled` the images moved, `relabel prec` the share of "
        "them moved to their true class, `relabel recall` the share of the wrong labels so "
        "fixed, `correct moved` / `correct moved %` the correctly labelled images moved "
        "(count, share of the correctly labelled images), `Δ acc pp` the change of the "
        "dataset's label accuracy after the moves, in percentage points ((correct after - "
        "correct before) / images); `tiers cov` the share of the wrong labels in tier `issue` "
        "or `review`, and `guard` the model-quality guard's verdict (summary.json), both for "
        "the default and embedding audits only (—: not measured); `coverage` the share with "
        "at least one prediction; `wall s` the audit's wall time (cleanlab rows: the default "
        "audit plus the filter). The default audit moves what `relabel` would move at the "
        "sensitivity (forced, if the guard distrusts the run). cleanlab rows and `rule:` rows "
        "reuse the default audit's predictions (no extra training); the `embeddings` row is "
        "scored like the default audit (the same flags and relabel rule); cleanlab rows "
        "relabel flagged images to the argmax of the mean probabilities, `rule:` rows "
        "relabel flagged images that pass the product's relabel rule.",
        "",
    ]
    checks = all_checks(tables)
    if checks:
        passed = sum(ok for _, items in checks for _, _, ok in items)
        total = sum(len(items) for _, items in checks)
        lines += ["## Targets", "",
                  f"{passed} of {total} checks pass (issue 14's on every row's default audit; "
                  "issue 5's on the fmnist20k sym20 row, when it ran; issue 17's there, "
                  f"default audit's wall time / the embedding audit's >= {MIN_EMBED_SPEEDUP:g}, "
                  f"when both ran on {' '.join(EMBED_SPEEDUP_ROW)}).", "",
                  "| row | target | measured | result |", "|---|---|---|---|"]
        lines += [f"| {where} | {t} | {m} | {'PASS' if ok else 'FAIL'} |"
                  for where, items in checks for t, m, ok in items]
        missed = missed_targets(checks)
        lines += ["", "### Where a target is missed", ""]
        lines += [f"- {line}" for line in missed] if missed else ["Every target is met."]
        lines.append("")
    for t in tables:
        reused = (f" Reused from an earlier run (`--reuse`; wall times are from when they ran): "
                  f"the {' and '.join(t.reused)} audit{'s' if len(t.reused) > 1 else ''}."
                  if t.reused else "")
        notes = [f"- {note}" for note in t.notes] + ([""] if t.notes else [])
        lines += [f"## {t.title}", "", f"{t.summary}.{reused}", "", *notes,
                  markdown_table(t.rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))

