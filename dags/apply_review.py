"""
### Apply review: relabel an audited run exactly as a reviewer decided

No retraining: this applies a reviewer's `decisions.csv` (exported from the run's
`report.html`, or made from a Label Studio export by `python -m tasks labelstudio import`)
to the run's dataset. Only the `accept` rows (to the suggestion) and the `other` rows (to
the chosen class) move; `keep` and `skip` rows, and every image without a row, stay where
they are, whatever the thresholds say.

**Flow**: `apply_decisions` checks the whole file against the run first (unknown file
names or classes, repeated rows, a file from another run, a label the dataset no longer
has): a bad file fails the task with one line naming the row, and nothing moves. Then the
same relabel as the audit's: journal first, server-side copy, verify, delete; never
overwriting. The run's `relabel_mode: manifest` writes `corrected-labels.csv` instead.

**Params**: `results` (the run's `results.csv`, or its run folder), `decisions` (the
decisions file; both a local path or an `s3://` URI) and `dry_run` (log the plan only).
The task's XCom holds the journal's URI (`relabel-journal.jsonl` in the run folder); undo
with `python -m tasks undo --journal <that URI>`. Triggering again with the same file
finishes an interrupted apply.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, task

from tasks import airflow_adapter as acl


@task
def apply_decisions(params: dict[str, Any] | None = None) -> str | None:
    """Validate the decisions file, then move exactly the decided images."""
    params = params or {}
    return acl.apply_review(params["results"], params["decisions"], bool(params["dry_run"]))


with DAG(
    dag_id="apply_review",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    params=acl.review_params(),
    tags=["auto-correct-labels", "review"],
):
    apply_decisions()
