"""kNN in the decision: what embedding mode's neighbour vote would do to the flags and the
relabel of finished embedding audits, without running them again.

For every finished embedding-mode audit under `--work` (the `noise_bench` runs named
`<sample>-embeddings-<hash>` with a predictions.parquet; `--runs` picks by name), it reads the
run's embeddings, finds every image's `knn_k` nearest neighbours with the product's own search
(`tasks.probe.nearest_neighbours`, the search behind `knn_agreement`) and prints, against the
sample's truth, the flags (precision, recall, F1) and, per relabel sensitivity, the moves,
their precision, the correct labels moved and the relabel recall of:

- as merged: `is_label_issue` and the product's relabel rule, as the audit wrote them
  (an audit merged before embedding mode's neighbour gates, `tasks.decide.backed_by_neighbours`
  and `neighbours_vote_for`, has them without them);
- agree<0.5: the same without the neighbours' vote in the relabel rule, kept only where
  fewer than half of the neighbours carry the given label (`knn_agreement` < 0.5: the
  neighbours do not back the label either);
- vote: agree<0.5, and a move only where the label most of the neighbours carry (none on
  a tie) is the suggestion (`tasks.decide.neighbours_vote_for`). Both gates are the
  product's rule since; an audit merged with them has all three rows alike.

Results go to `--out` (default benchmarks/KNN_DECISION.md). Run from the repository root:

    python -m benchmarks.knn_decision --work /work/bench
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

SENSITIVITIES = (80, 90, 95)
VARIANTS = ("as merged", "agree<0.5", "vote")
MAJORITY = 0.5  # the share of neighbours that backs a label: a plain majority, not tuned


def neighbour_votes(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(filenames, share of neighbours with the given label, neighbours' vote: the label most
    of them carry, -1 where none does uniquely) of every image of an embedding-mode run, in
    manifest order, with the product's own search and vote (`tasks.probe`)."""
    from tasks import runs
    from tasks.embeddings import read_embeddings
    from tasks.index import read_manifest
    from tasks.probe import nearest_neighbours, neighbour_vote

    cfg = runs.read_config(run)
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    _, idx = nearest_neighbours(read_embeddings(run, cfg, manifest), min(cfg.knn_k,
                                                                         len(labels) - 1))
    near = labels[idx]
    return manifest["key"].to_numpy(), (near == labels[:, None]).mean(1), neighbour_vote(near)


def variant_lines(name: str, p, agreement: np.ndarray, vote: np.ndarray,
                  min_preds: int) -> list[str]:
    """Markdown rows of each variant for one run (`p`: its `scoring.Predictions`)."""
    from benchmarks.scoring import default_relabel, move_cell

    wrong = p.true != p.given
    backed = agreement < MAJORITY
    lines = []
    for variant in VARIANTS:
        flags = p.is_label_issue & (backed if variant != "as merged" else True)
        tp = int((flags & wrong).sum())
        precision, recall = tp / max(1, flags.sum()), tp / max(1, wrong.sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        cells = [f"{int(flags.sum())}, {precision:.3f} / {recall:.3f} / {f1:.3f}"]
        for s in SENSITIVITIES:
            # The variants start from the relabel rule without the neighbours' vote.
            moved = default_relabel(p if variant == "as merged" else replace(p, knn_label=None),
                                    s, min_preds)
            if variant != "as merged":
                moved &= backed
            if variant == "vote":
                moved &= vote == p.corrected
            cells.append(move_cell(moved, p.corrected, p.true, wrong))
        lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from benchmarks.noise_bench import load_predictions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="noise_bench's --work folder")
    ap.add_argument("--runs", default="", help="comma-separated substrings of run names "
                    "(default: every finished embedding-mode run)")
    ap.add_argument("--min-preds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/KNN_DECISION.md"))
    args = ap.parse_args(argv)
    wanted = [w for w in args.runs.split(",") if w]
    lines = [
        "# kNN in the decision, on finished embedding audits",
        "",
        "Written by `benchmarks/knn_decision.py` (see its docstring); no audit is run again: "
        "each run's own embeddings, results and truth.",
        "",
        f"Command: `python -m benchmarks.knn_decision {' '.join(argv or sys.argv[1:])}`",
        "",
        "Flags cell: flagged, precision / recall / F1. Sensitivity cells: moves, relabel "
        "precision, correct labels moved, relabel recall.",
        "",
        "| run | variant | flags | " + " | ".join(f"sensitivity {s}" for s in SENSITIVITIES)
        + " |",
        "|---|---|---|" + "---|" * len(SENSITIVITIES),
    ]
    found = 0
    for run in sorted((args.work / "work" / "runs").glob("*-embeddings-*")):
        if not (run / "predictions.parquet").exists():
            continue
        if wanted and not any(w in run.name for w in wanted):
            continue
        sample = run.name.split("-embeddings-")[0]
        p = load_predictions(str(run), args.work / "data" / f"{sample}.truth.csv")
        names, agreement, vote = neighbour_votes(str(run))
        order = {f: i for i, f in enumerate(names)}
        at = np.array([order[f] for f in p.filename])
        # The vote is in the run's class order, which `Predictions` keeps first.
        rows = variant_lines(sample, p, agreement[at], vote[at], args.min_preds)
        print("\n".join(rows), flush=True)
        lines += rows
        found += 1
    if not found:
        raise SystemExit(f"no finished embedding-mode audit under {args.work / 'work' / 'runs'}")
    args.out.write_text("\n".join([*lines, ""]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
