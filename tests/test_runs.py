"""tasks/runs.py: the run folder layout and the recorded config."""

from __future__ import annotations

import pytest

from tasks import runs
from tasks.config import AuditConfig


@pytest.mark.parametrize(("run_id", "folder"), [
    ("sample-abc123", "sample-abc123"),
    ("manual__2026-11-28T03:44:48.123+00:00", "manual__2026-11-28T03_44_48.123_00_00"),
    ("../../etc", "etc"),
    ("...", "run"),
    ("a b/c", "a_b_c"),
])
def test_run_ids_become_one_safe_folder(run_id, folder):
    assert runs.run_uri("s3://bucket/work/", run_id) == f"s3://bucket/work/runs/{folder}"
    assert runs.run_uri("/w", run_id) == f"/w/runs/{folder}"


def test_layout_and_config_round_trip(tmp_path):
    run = runs.run_uri(str(tmp_path), "r1")
    assert runs.shard_uri(run, 7) == f"{run}/shards/repeat-0007.parquet"
    assert runs.results_uri(run) == f"{run}/results.csv"
    assert runs.journal_uri(run) == f"{run}/relabel-journal.jsonl"
    with pytest.raises(FileNotFoundError, match=r"config.json does not exist: is .*r1 a run "
                                                r"folder\?"):
        runs.read_config(run)
    cfg = AuditConfig(data_path="/d", work_uri=str(tmp_path), n_repeats=3, model_weights="/w.pt")
    runs.write_config(run, cfg)
    assert runs.read_config(run) == cfg
