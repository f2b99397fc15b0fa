"""report.html: the most suspicious images of a run, for a reviewer's browser."""

from __future__ import annotations

import html
import logging

from tasks import runs, storage
from tasks.merge import read_results

log = logging.getLogger(__name__)


def write_report(run: str, seconds: float | None = None) -> str:
    """Write `<run>/report.html` from the run's results; returns its URI."""
    cfg = runs.read_config(run)
    results = read_results(runs.results_uri(run))
    top = results.head(cfg.report_top_n)
    rows = "\n".join(
        f"<tr><td>{html.escape(str(r.filename))}</td><td>{html.escape(str(r.label))}</td>"
        f"<td>{html.escape(str(r.corrected_label))}</td><td>{r.num_preds}</td>"
        f"<td>{r.label_quality}</td><td>{r.is_label_issue}</td></tr>"
        for r in top.itertuples(index=False)
    )
    page = (f"<!doctype html><meta charset=utf-8><title>auto-correct-labels report</title>"
            f"<h1>{int(results['is_label_issue'].sum())} suspected label issues in "
            f"{len(results)} images</h1><table><tr><th>filename<th>label<th>suggested"
            f"<th>predictions<th>label quality<th>issue</tr>{rows}</table>")
    out = storage.join(run, "report.html")
    storage.write_text(out, page)
    return out
