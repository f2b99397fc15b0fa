"""tasks/merge.py on a real run folder (prepare_run on a tiny dataset) fed with synthetic
shards written by tasks.shards' writer (the trainer's own): votes, majority with ties broken
by the mean probability, `%`, label_quality, the CSV contract, the suspicion order, coverage
and missing shards, the top-k shards of datasets with more than 256 classes; and that the
merge side (shards, images, merge) imports without torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks import merge, runs
from tasks.audit import prepare_run
from tasks.index import DatasetIndex, read_manifest, write_index
from tasks.merge import MissingShardsError, merge_run, read_results, score
from tasks.plan import RepeatSpec, plan_repeats, split_for_repeat
from tasks.shards import (
    FULL_PROBS_MAX_CLASSES,
    TOP_K,
    shard_fingerprint,
    shard_metadata,
    shard_table,
    write_shard,
)
from tests.datasets import tiny_config, write_classes

REQUIRED = ["filename", "label", "corrected_label", "num_preds", "%", "label_quality",
            "is_label_issue"]
CLASSES = ["cat", "dog", "owl"]

Probs = Callable[[str, RepeatSpec], list[float]]


def write_shards(run: str, probs_of: Probs, skip: tuple[int, ...] = ()) -> None:
    """A shard per planned repeat (except `skip`), holding `probs_of(key, spec)` for every
    image of the repeat's test fold."""
    cfg = runs.read_config(run)
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    for spec in plan_repeats(cfg):
        if spec.repeat in skip:
            continue
        test = split_for_repeat(cfg, spec, labels).test
        probs = np.array([probs_of(k, spec) for k in manifest["key"].to_numpy()[test]])
        table = shard_table(manifest["id"].to_numpy()[test], labels[test], probs, spec,
                            shard_fingerprint(cfg, manifest, spec), {"epoch": 1})
        write_shard(runs.shard_uri(run, spec.repeat), table)


def confident(label: str, p: float = 0.8) -> list[float]:
    rest = (1 - p) / (len(CLASSES) - 1)
    return [p if c == label else rest for c in CLASSES]


# Per image, one probability vector per round (each image is in one test fold per round).
SCRIPT: dict[str, list[list[float]]] = {
    # planted: a 'cat' every model calls a dog
    "cat/img-000.png": [[0.05, 0.9, 0.05]] * 3,
    # majority (2 dog votes) wins over a higher mean probability of owl
    "cat/img-001.png": [[0.15, 0.45, 0.40], [0.15, 0.45, 0.40], [0.01, 0.01, 0.98]],
    # three-way tie: dog has the highest mean probability
    "owl/img-002.png": [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.4, 0.5]],
}


def scripted(key: str, spec: RepeatSpec) -> list[float]:
    if key in SCRIPT:
        return SCRIPT[key][spec.round]
    return confident(key.split("/")[0])


def make_run(tmp_path: Path, **extra) -> str:
    data = tmp_path / "data"
    if not data.exists():
        write_classes(data, {"cat": 10, "dog": 10, "owl": 10})
    values = {"n_repeats": 6, "test_split": 0.5, "val_split": 0.1, **extra}
    return prepare_run(tiny_config(data, tmp_path / "work", **values), "merge")


def set_config(run: str, **changes) -> None:
    runs.write_config(run, runs.read_config(run).model_copy(update=changes))


def test_votes_majority_ties_and_scores(tmp_path):
    run = make_run(tmp_path, results_path=str(tmp_path / "copy" / "results.csv"))
    write_shards(run, scripted)
    out = merge_run(run)
    assert out == runs.results_uri(run)
    text = Path(out).read_text()
    header = text.splitlines()[0].split(",")
    assert header[:7] == REQUIRED
    assert Path(tmp_path / "copy" / "results.csv").read_text() == text
    res = read_results(out).set_index("filename", drop=False)
    assert len(res) == 30 and (res["num_preds"] == 3).all()

    planted = res.loc["cat/img-000.png"]
    assert planted["corrected_label"] == "dog" and planted["%"] == 100
    assert planted["label_quality"] == pytest.approx(0.05, abs=1e-5)
    assert planted["votes"] == "dog:3"
    assert bool(planted["is_label_issue"])

    majority = res.loc["cat/img-001.png"]
    assert majority["corrected_label"] == "dog"  # 2 votes beat owl's mean 0.59
    assert majority["%"] == pytest.approx(66.67)
    assert majority["label_quality"] == pytest.approx(0.31 / 3, abs=1e-5)
    assert majority["votes"] == "dog:2;owl:1"

    tie = res.loc["owl/img-002.png"]
    assert tie["corrected_label"] == "dog"  # 1-1-1: dog's mean 0.4 > owl 0.33 > cat 0.27
    assert tie["%"] == pytest.approx(33.33)
    assert tie["label_quality"] == pytest.approx(1 / 3, abs=1e-5)

    clean = res.drop(index=list(SCRIPT))
    assert (clean["corrected_label"] == clean["label"]).all()
    assert (clean["%"] == 100).all() and not clean["is_label_issue"].any()
    assert np.allclose(clean["label_quality"], 0.8, atol=1e-5)
    # Never flagged where the vote agrees with the given label.
    assert not (res["is_label_issue"] & (res["corrected_label"] == res["label"])).any()

    # Most suspicious first: flagged rows, then lowest label quality.
    order = read_results(out)
    assert order["filename"].iloc[0] == "cat/img-000.png"
    flags = order["is_label_issue"].to_numpy()
    assert (flags[:-1] >= flags[1:]).all()
    for part in (order[order["is_label_issue"]], order[~order["is_label_issue"]]):
        assert part["label_quality"].is_monotonic_increasing

    preds = pd.read_parquet(Path(run) / "predictions.parquet").set_index("filename")
    assert np.allclose(preds.loc["owl/img-002.png", "mean_probs"], [0.8 / 3, 0.4, 1 / 3],
                       atol=1e-6)


def test_merging_twice_gives_the_same_csv(tmp_path):
    run = make_run(tmp_path)
    write_shards(run, scripted)
    first = Path(merge_run(run)).read_bytes()
    assert Path(merge_run(run)).read_bytes() == first


def test_missing_shard_below_min_coverage_names_the_repeat(tmp_path):
    run = make_run(tmp_path, n_repeats=2)
    write_shards(run, scripted, skip=(1,))
    with pytest.raises(MissingShardsError) as err:
        merge_run(run)
    assert err.value.missing == [1]
    message = str(err.value)
    assert "only 50.0% of images have a prediction (min_coverage 100%)" in message
    assert "missing repeats: [1]" in message
    assert f"python -m tasks.train --run {run} --repeat N" in message
    assert not Path(runs.results_uri(run)).exists()


def test_a_stale_shard_counts_as_missing(tmp_path):
    run = make_run(tmp_path, n_repeats=2)
    write_shards(run, scripted)
    # A shard written under another training config must not be merged.
    other = runs.read_config(run).model_copy(update={"seed": 99})
    manifest, _ = read_manifest(run)
    spec = plan_repeats(other)[0]
    table = pq.read_table(runs.shard_uri(run, 0))
    meta = dict(table.schema.metadata)
    meta[b"fingerprint"] = shard_fingerprint(other, manifest, spec).encode()
    pq.write_table(table.replace_schema_metadata(meta), runs.shard_uri(run, 0))
    with pytest.raises(MissingShardsError) as err:
        merge_run(run)
    assert err.value.missing == [0]


def test_one_missing_shard_is_fine_with_lower_min_coverage(tmp_path):
    run = make_run(tmp_path, n_repeats=2)
    write_shards(run, scripted, skip=(1,))
    set_config(run, min_coverage=0.5)
    res = read_results(merge_run(run))
    assert len(res) == 30
    cfg = runs.read_config(run)
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy()
    fold1 = set(manifest["key"].to_numpy()[split_for_repeat(cfg, plan_repeats(cfg)[1],
                                                            labels).test])
    unpredicted = res[res["num_preds"] == 0]
    assert set(unpredicted["filename"]) == fold1
    assert unpredicted["%"].isna().all() and unpredicted["label_quality"].isna().all()
    assert (unpredicted["corrected_label"] == unpredicted["label"]).all()
    assert not unpredicted["is_label_issue"].any()
    assert (res["num_preds"].to_numpy()[-len(fold1):] == 0).all()  # unpredicted last
    assert (res[res["num_preds"] > 0]["num_preds"] == 1).all()


def test_a_missing_shard_of_a_later_round_keeps_full_coverage(tmp_path):
    run = make_run(tmp_path, n_repeats=4)
    write_shards(run, scripted, skip=(3,))
    res = read_results(merge_run(run))
    assert (res["num_preds"] >= 1).all()
    assert sorted(res["num_preds"].unique()) == [1, 2]


def test_more_than_256_classes_use_top_k_shards(tmp_path):
    n_classes, per_class = FULL_PROBS_MAX_CLASSES + 44, 3
    classes = [f"c{i:03d}" for i in range(n_classes)]
    keys = [f"{c}/{j}.png" for c in classes for j in range(per_class)]
    manifest = pd.DataFrame({"id": range(len(keys)), "key": keys,
                             "label": [k.split("/")[0] for k in keys],
                             "label_idx": np.repeat(np.arange(n_classes), per_class)
                             .astype("int32"),
                             "size": 1, "etag": [f"e{i}" for i in range(len(keys))]})
    run = runs.run_uri(str(tmp_path / "work"), "many")
    write_index(DatasetIndex(manifest, classes, pd.DataFrame(columns=["filename", "reason"])),
                run)
    runs.write_config(run, tiny_config(tmp_path / "data", tmp_path / "work"))
    planted = "c007/0.png"

    def probs_of(key: str, spec: RepeatSpec) -> list[float]:
        given = classes.index(key.split("/")[0])
        logits = np.random.default_rng(len(key) + spec.repeat).normal(0, 0.1, n_classes)
        if key == planted:  # given label far outside the top k; class c299 wins
            logits[299] += 3
            logits[given] = logits.min() - 1
        else:
            logits[given] += 9
        p = np.exp(logits - logits.max())
        return list(p / p.sum())

    write_shards(run, probs_of)
    shard = pq.read_table(runs.shard_uri(run, 0))
    assert {"topk_idx", "topk_prob", "p_given"} <= set(shard.column_names)
    assert "probs" not in shard.column_names
    assert len(shard.column("topk_idx")[0]) == TOP_K
    held = pd.concat([pq.read_table(runs.shard_uri(run, r)).to_pandas() for r in (0, 1)])
    planted_row = held[held["id"] == keys.index(planted)].iloc[0]
    assert planted_row["given"] not in planted_row["topk_idx"]

    res = read_results(merge_run(run)).set_index("filename")
    row = res.loc[planted]
    assert row["corrected_label"] == "c299" and row["%"] == 100 and row["num_preds"] == 1
    # label_quality is the given label's probability even when it is not in the top k.
    assert planted_row["p_given"] > 5e-4
    assert row["label_quality"] == pytest.approx(planted_row["p_given"], abs=1e-5)
    assert json.loads((Path(run) / "classes.json").read_text()) == classes
    others = res.drop(index=planted)
    assert (others["corrected_label"] == others["label"]).all()


def test_a_confident_unanimous_vote_flags_by_itself(monkeypatch):
    from tasks.merge import CONFIDENT_VOTE, confident_vote

    # rows: unanimous and confident; unanimous but unsure; split vote; a single prediction
    votes = np.array([[0, 2, 0], [0, 2, 0], [0, 1, 1], [0, 1, 0]])
    num_preds = votes.sum(1)
    pct = votes[:, 1] / num_preds * 100  # vote share of the suggested label, class 1
    sq = np.array([CONFIDENT_VOTE + 0.01, CONFIDENT_VOTE, 0.9, 0.95])
    assert confident_vote(pct, num_preds, sq).tolist() == [True, False, False, False]
    # cleanlab's count alone would miss it: many confident clean images, one confident flip
    n = 200
    labels = np.arange(n) % 2
    probs = np.where(np.arange(2) == labels[:, None], 0.95, 0.05)
    probs[0] = [0.2, 0.8]  # labelled 0, both predictions say 1 at 0.8
    votes = np.zeros((n, 2), dtype=int)
    votes[np.arange(n), probs.argmax(1)] = 2
    s = score(labels, votes, probs, np.full(n, 2))
    assert s["flagged"][0] and s["flagged"].sum() == 1
    monkeypatch.setattr(merge, "CONFIDENT_VOTE", 1.0)  # cleanlab's part alone
    assert not score(labels, votes, probs, np.full(n, 2))["flagged"].any()


def test_shard_metadata_is_json(tmp_path):
    run = make_run(tmp_path, n_repeats=2)
    write_shards(run, scripted)
    cfg = runs.read_config(run)
    manifest, _ = read_manifest(run)
    spec = plan_repeats(cfg)[1]
    uri = runs.shard_uri(run, 1)
    raw = pq.read_schema(uri).metadata
    assert json.loads(raw[b"stats"]) == {"epoch": 1}
    assert json.loads(raw[b"spec"]) == spec.to_dict()
    meta = shard_metadata(uri)
    assert meta == {"fingerprint": shard_fingerprint(cfg, manifest, spec),
                    "spec": spec.to_dict(), "num_classes": "3", "stats": {"epoch": 1}}
    assert shard_metadata(runs.shard_uri(run, 5)) is None
