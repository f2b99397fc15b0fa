"""benchmarks/knn_decision.py on a real (tiny) embedding audit made by noise_bench."""

from __future__ import annotations

import numpy as np

from benchmarks import knn_decision, noise_bench


def test_knn_variants_on_a_tiny_embedding_audit(tmp_path, capsys):
    work = tmp_path / "bench"
    assert noise_bench.main(["--methods", "embeddings", "--pairs", "digits:sym10", "--n", "200",
                             "--n-repeats", "4", "--work", str(work),
                             "--out", str(tmp_path / "results.md")]) == 0
    run = next((work / "work" / "runs").glob("*-embeddings-*"))
    sample = run.name.split("-embeddings-")[0]
    p = noise_bench.load_predictions(str(run), work / "data" / f"{sample}.truth.csv")
    names, agreement, vote = knn_decision.neighbour_votes(str(run))
    order = {f: i for i, f in enumerate(names)}
    at = np.array([order[f] for f in p.filename])
    # The same neighbours as the product's knn_agreement column.
    assert np.allclose(agreement[at], p.knn_agreement, atol=1e-4)
    assert set(np.unique(vote)) <= set(range(-1, len(p.classes)))  # -1: a tie
    # ... and the same vote as the product's knn_label column (empty on a tie).
    named = np.where(vote[at] >= 0, np.asarray(p.classes, dtype=object)[vote[at]], None)
    assert named.tolist() == p.knn_label.tolist()

    out = tmp_path / "knn.md"
    assert knn_decision.main(["--work", str(work), "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith(f"| {sample} ")]
    assert [r[1].strip() for r in rows] == list(knn_decision.VARIANTS)
    flagged = [int(r[2].split(",")[0]) for r in rows]
    moves = [[int(c.split(",")[0]) for c in r[3:]] for r in rows]
    # The vote keeps a subset of agree<0.5's moves; merged now, the product's rule (both
    # gates) is the vote variant.
    assert flagged[0] == flagged[1] == flagged[2]
    assert all(b >= c for b, c in zip(moves[1], moves[2], strict=True))
    assert rows[0][2:] == rows[2][2:]
