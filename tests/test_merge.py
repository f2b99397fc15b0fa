"""tasks/merge.py on a real run folder (prepare_run on a tiny dataset) fed with synthetic
shards written by tasks.shards' writer (the trainer's own): votes, majority with ties broken
by the mean probability, `%`, label_quality, the CSV contract, the suspicion order, coverage
and missing shards, the top-k shards of datasets with more than 256 classes; that the
merge side (shards, images, merge) imports without torch; and at scale: the same bytes as the
dense in-memory merge it replaced, in memory and bucketed within a tiny `merge_memory_gb`,
cleanlab's filter in batches, fingerprints unchanged, each shard read once, S3 too."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import decide, merge, runs
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
    "cat/img-000.png": [[0.005, 0.99, 0.005]] * 3,
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
    assert planted["label_quality"] == pytest.approx(0.005, abs=1e-5)
    assert planted["votes"] == "dog:3"
    assert bool(planted["is_label_issue"]) and planted["tier"] == "issue"
    # below the prior's noise floor (eta / 2, eta >= 1 / 30) the label is surely wrong, and
    # dog holds all of the other classes' probability above the floor (owl has 0.005)
    assert planted["p_label_wrong"] == 1.0
    assert planted["p_suggestion"] == 1.0

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


def test_flags_are_the_labels_more_likely_wrong_than_right():
    """`score` (in memory, cleanlab's own confident joint) flags exactly the images whose
    `p_label_wrong` is above 1/2 and whose vote names another class; a clean image the models
    are merely unsure of is not flagged, a confident flip is."""
    n, k = 300, 3
    labels = np.arange(n) % k
    probs = np.where(np.arange(k) == labels[:, None], 0.9, 0.05)
    probs[0] = [0.001, 0.99, 0.009]  # labelled 0: every model says 1
    probs[1] = [0.6, 0.35, 0.05]     # labelled 1: the models lean to 0, unsure
    votes = np.zeros((n, k), dtype=int)
    votes[np.arange(n), probs.argmax(1)] = 3
    s = score(labels, votes, probs, np.full(n, 3))
    assert s["flagged"].tolist() == (s["p_label_wrong"] > 0.5).tolist()
    assert s["flagged"][0] and not s["flagged"][1] and s["flagged"].sum() == 1
    assert s["p_suggestion"][0] > 0.95 and s["p_suggestion"][2] == 0  # 2: vote = label
    assert 0 < s["p_label_wrong"][1] < 0.5


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


# --- at scale: bounded memory, bucketed, streamed, the same results --------------------------

def synthetic_run(root: Path, n: int, n_classes: int, seed: int = 0, n_repeats: int = 6,
                  odd_names: bool = False, unsorted: bool = False, skip: tuple[int, ...] = (),
                  work: str | None = None, **extra) -> str:
    """A run folder of `n` images in `n_classes` classes whose shards hold softmax
    probabilities of noisy logits (rounded, so that ties occur) favouring a "true" class that
    differs from the given label for about a fifth of the images."""
    from tasks.shards import fingerprint_base, repeat_fingerprint

    rng = np.random.default_rng(seed)
    classes = [f"c{i:03d}" for i in range(n_classes)]
    lab = rng.integers(0, n_classes, n)
    keys = [f"{classes[c]}/img-{i:05d}.png" for i, c in enumerate(lab)]
    if odd_names:  # names the CSV must quote, and others (the index refuses control characters)
        for i, odd in enumerate(['a,b"c', 'say "hi"', "comma,", "é ü", " x"]):
            keys[i] = keys[i].replace("img", odd)
    order = np.arange(n) if unsorted else np.argsort(keys, kind="stable")
    keys, lab = [keys[i] for i in order], lab[order]
    manifest = pd.DataFrame({"id": range(n), "key": keys, "label": [classes[c] for c in lab],
                             "label_idx": lab.astype("int32"), "size": 1,
                             "etag": [f"e{i}" for i in range(n)]})
    run = runs.run_uri(work or str(root / "work"), "synthetic")
    write_index(DatasetIndex(manifest, classes, pd.DataFrame(columns=["filename", "reason"])),
                run)
    cfg = tiny_config(root / "data", work or root / "work", n_repeats=n_repeats,
                      test_split=0.5, **extra)
    runs.write_config(run, cfg)
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    true = np.where(rng.random(n) < 0.2, rng.integers(0, n_classes, n), labels)
    base = fingerprint_base(cfg, manifest)
    for spec in plan_repeats(cfg):
        if spec.repeat in skip:
            continue
        test = split_for_repeat(cfg, spec, labels).test
        logits = rng.normal(0, 1.0, (len(test), n_classes))
        logits[np.arange(len(test)), true[test]] += 3.0
        p = np.exp(np.round(logits, 1))
        table = shard_table(test, labels[test], p / p.sum(1, keepdims=True), spec,
                            repeat_fingerprint(base, spec), {})
        write_shard(runs.shard_uri(run, spec.repeat), table)
    return run


def reference_merge(run: str) -> tuple[bytes, np.ndarray]:
    """results.csv as the merge wrote it before bucketing (dense N x classes matrices, shards
    densified row by row, cleanlab's `find_label_issues` itself, pandas' `to_csv`), and the
    mean probabilities in the results' order."""
    from cleanlab.count import compute_confident_joint

    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    n, k = len(manifest), len(classes)
    votes, prob_sum = np.zeros((n, k), dtype=np.int32), np.zeros((n, k))
    for spec in plan_repeats(cfg):
        uri = Path(runs.shard_uri(run, spec.repeat))
        if not uri.exists():
            continue
        table = pq.read_table(uri)
        if table.schema.metadata[b"fingerprint"].decode() != shard_fingerprint(cfg, manifest,
                                                                                spec):
            continue
        df = table.to_pandas()
        probs = (np.stack(df["probs"].to_numpy()) if "probs" in df
                 else np.zeros((len(df), k), dtype=np.float32))
        if "probs" not in df:
            for i, (idx, p) in enumerate(zip(df["topk_idx"], df["topk_prob"], strict=True)):
                probs[i, idx] = p
            probs[np.arange(len(df)), df["given"].to_numpy()] = df["p_given"].to_numpy()
        ids = df["id"].to_numpy()
        np.add.at(votes, (ids, df["pred"].to_numpy()), 1)
        np.add.at(prob_sum, ids, probs)
    num_preds = votes.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probs = prob_sum / num_preds[:, None]
    predicted = num_preds > 0
    safe = np.nan_to_num(mean_probs, nan=0.0)
    corrected = np.argmax(votes + safe * 1e-3, axis=1)
    corrected[~predicted] = labels[~predicted]
    rows = np.arange(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(predicted, votes[rows, corrected] / num_preds * 100, np.nan)
    quality = np.where(predicted, safe[rows, labels], np.nan)
    suggested = np.where(predicted, safe[rows, corrected], np.nan)
    sub_labels, sub = labels[predicted], safe[predicted]
    sub = sub / sub.sum(1, keepdims=True).clip(min=1e-12)
    present = np.unique(sub_labels)
    remap = np.full(k, -1)
    remap[present] = np.arange(len(present))
    sub = sub[:, present]
    sub = sub / sub.sum(1, keepdims=True).clip(min=1e-12)
    # cleanlab's own confident joint, its noise rate, the posterior and the tiers
    label_counts = np.bincount(sub_labels, minlength=k)
    cj = np.diag(label_counts)
    if len(present) >= 2:
        cj = np.zeros((k, k), dtype=np.int64)
        cj[np.ix_(present, present)] = compute_confident_joint(remap[sub_labels], sub,
                                                               calibrate=False)
    noise, _ = decide.noise_rates(decide.noise_joint(cj, label_counts))
    p_wrong, p_sugg = decide.posterior(np.round(quality, 5), np.round(suggested, 5),
                                       corrected != labels, noise, k, int(predicted.sum()),
                                       *decide.other_classes(safe, labels, corrected))
    p_wrong, p_sugg = np.round(p_wrong, 5), np.round(p_sugg, 5)
    flagged = ((np.nan_to_num(p_wrong) > 0.5) & (corrected != labels)
               & (np.nan_to_num(quality, nan=1.0) < cfg.max_label_quality))
    tier = decide.tiers(flagged, np.round(quality, 5), noise * predicted.sum())

    def votes_text(row: np.ndarray) -> str:
        nz = np.flatnonzero(row)
        return ";".join(f"{classes[i]}:{row[i]}"
                        for i in nz[np.argsort(-row[nz], kind="stable")])

    results = merge.sort_most_suspicious(pd.DataFrame({
        "filename": manifest["key"], "label": manifest["label"],
        "corrected_label": np.asarray(classes, dtype=object)[corrected],
        "num_preds": num_preds, "%": np.round(pct, 2), "label_quality": np.round(quality, 5),
        "is_label_issue": flagged, "suggested_quality": np.round(suggested, 5),
        "votes": [votes_text(v) for v in votes], "id": manifest["id"],
        "tier": np.asarray(decide.TIERS, dtype=object)[tier],
        "p_label_wrong": p_wrong, "p_suggestion": p_sugg}))
    order = results["id"].to_numpy()
    return results.to_csv(index=False).encode(), mean_probs[order].astype(np.float32)


CASES = {
    "3 classes": {"n": 120, "n_classes": 3},
    "file names to quote, manifest not sorted": {"n": 120, "n_classes": 3, "odd_names": True,
                                                 "unsorted": True},
    "40 classes (more than TOP_K)": {"n": 300, "n_classes": 40},
    "300 classes (top-k shards)": {"n": 900, "n_classes": 300, "n_repeats": 4},
    "a missing shard": {"n": 120, "n_classes": 3, "n_repeats": 2, "skip": (1,),
                        "min_coverage": 0.5},
    "random splits, unpredicted images": {"n": 200, "n_classes": 5, "n_repeats": 3,
                                          "split_strategy": "random", "min_coverage": 0.0},
}


def merged(run: str, memory_gb: float) -> tuple[bytes, pd.DataFrame]:
    set_config(run, merge_memory_gb=memory_gb)
    csv = Path(merge_run(run)).read_bytes()
    return csv, pd.read_parquet(Path(run) / "predictions.parquet")


@pytest.mark.parametrize("case", list(CASES))
def test_results_are_those_of_the_dense_merge(tmp_path, case, monkeypatch):
    """The same bytes as the dense, in-memory merge with cleanlab itself: flags, columns,
    order, number formatting and quoting; and the same mean probabilities (the posterior
    computed a few dozen images at a time)."""
    monkeypatch.setattr(merge, "POSTERIOR_CHUNK", 37)
    run = synthetic_run(tmp_path, **CASES[case])
    want_csv, want_probs = reference_merge(run)
    csv, preds = merged(run, 2.0)
    assert csv == want_csv
    assert read_results(runs.results_uri(run))["is_label_issue"].sum() > 0
    if "mean_probs" in preds:
        assert np.array_equal(np.stack(preds["mean_probs"].to_numpy()), want_probs,
                              equal_nan=True)
    else:  # beyond 256 classes: each image's top TOP_K pooled classes, highest first
        top = np.stack(preds["topk_idx"].to_numpy())
        prob = np.stack(preds["topk_prob"].to_numpy())
        assert top.shape == (len(preds), TOP_K)
        assert np.array_equal(prob, np.take_along_axis(want_probs, top, 1))
        assert (np.diff(prob, axis=1) <= 0).all()
        assert np.allclose(prob[:, 0], np.nanmax(want_probs, axis=1))


@pytest.mark.parametrize("case", list(CASES))
def test_bucketed_merge_gives_the_in_memory_results(tmp_path, case, caplog, monkeypatch):
    """A budget too small for one bucket: shards spilled to many buckets, cleanlab's filter
    in passes over them, the results sorted part by part; byte-identical results.csv and the
    same predictions.parquet."""
    run = synthetic_run(tmp_path, **CASES[case])
    spills = tmp_path / "tmp"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    caplog.set_level("INFO", logger="tasks.merge")
    in_memory, preds = merged(run, 2.0)
    assert "in 1 bucket(s)" in caplog.text
    caplog.clear()
    bucketed, preds_b = merged(run, 1e-6)
    n = len(preds)
    per_bucket = max(1, -(-n // merge.MAX_BUCKETS))  # one image each, at most 256 buckets
    assert f"in {-(-n // per_bucket)} bucket(s) of up to {per_bucket} images" in caplog.text
    assert bucketed == in_memory
    pd.testing.assert_frame_equal(preds_b, preds)
    assert not list(spills.iterdir())  # the spill files are removed


def test_the_batched_filter_is_cleanlabs_confident_joint():
    """`_BatchedFilter` over batches counts cleanlab's `compute_confident_joint` on the same
    probabilities: ties, classes without images, and batches of any size."""
    from cleanlab.count import compute_confident_joint
    from cleanlab.internal import constants

    assert merge._CL_THRESHOLD_FLOOR == constants.CONFIDENT_THRESHOLDS_LOWER_BOUND
    rng = np.random.default_rng(3)
    for n, k, batch in [(500, 4, 7), (2000, 12, 300), (800, 40, 800), (300, 3, 1)]:
        labels = rng.integers(0, k, n)
        labels[labels == 1] = 0  # class 1 has no images
        logits = rng.normal(0, 1.5, (n, k))
        logits[np.arange(n), labels] += rng.choice([0, 3], n, p=[0.3, 0.7])
        probs = np.exp(np.round(logits, 0))  # coarse: many tied probabilities
        probs = merge._scaled(probs)
        present = np.unique(labels)
        remap = np.full(k, -1)
        remap[present] = np.arange(len(present))
        want = compute_confident_joint(remap[labels], merge._scaled(probs[:, present]),
                                       calibrate=False)
        filt = merge._BatchedFilter(present, k)
        parts = [slice(a, a + batch) for a in range(0, n, batch)]
        conf = np.concatenate([filt.self_confidence(labels[s], filt.scaled(probs[s]))
                               for s in parts])
        filt.set_thresholds(labels, conf)
        for s in parts:
            filt.count(labels[s], filt.scaled(probs[s]))
        assert (want - np.diag(np.diag(want))).sum() > 0
        assert np.array_equal(filt.joint, want), (n, k, batch)
        assert np.array_equal(filt.full_joint()[np.ix_(present, present)], want)


def test_csv_text_is_what_pandas_writes():
    rng = np.random.default_rng(0)
    n = 4000
    floats = np.concatenate([
        np.round(rng.random(n), 5), np.round(rng.random(n) * 100, 2), rng.random(n) * 1e-3,
        10 ** rng.uniform(-9, 18, n) * rng.choice([-1, 1], n),
        [0.0, -0.0, 1.0, 100.0, 1e-4, 9.9999e-5, 1e6, 999999.5, 1e16, np.nan, np.inf]])
    m = len(floats)
    names = rng.choice(["plain", 'a,b', 'say "hi"', "two\nlines", "cr\rx", "", " sp ", "é"], m)
    frame = pd.DataFrame({"filename": names, "label": "cat", "corrected_label": names[::-1],
                          "num_preds": rng.integers(0, 1000, m), "%": floats,
                          "label_quality": floats[::-1], "is_label_issue": rng.random(m) < 0.5,
                          "suggested_quality": np.round(floats, 3), "votes": names,
                          "id": np.arange(m),
                          "tier": rng.choice(["issue", "review", "ok"], m),
                          "p_label_wrong": np.round(floats, 5)[::-1],
                          "p_suggestion": np.round(floats, 5)})
    want = frame.to_csv(index=False).encode().split(b"\n", 1)[1]
    assert bytes(merge._csv_bytes(pa.Table.from_pandas(frame, preserve_index=False))) == want
    # A missing string (embedding mode's knn_label on a tie) is an empty field, not a lost row.
    frame["votes"] = pd.array(np.where(rng.random(m) < 0.3, None, names), dtype="string")
    want = frame.to_csv(index=False).encode().split(b"\n", 1)[1]
    assert bytes(merge._csv_bytes(pa.Table.from_pandas(frame, preserve_index=False))) == want


def test_fingerprints_keep_their_values(tmp_path):
    """Hashed once per merge, from the manifest's Arrow batches or its DataFrame, in chunks:
    the same fingerprints as hashing the whole DataFrame per repeat (existing runs resume)."""
    import hashlib

    from tasks.shards import fingerprint_base, repeat_fingerprint

    run = make_run(tmp_path, n_repeats=3)
    cfg = runs.read_config(run)
    manifest, _ = read_manifest(run)
    manifest.loc[3, "etag"] = None  # a missing value hashes as before too

    def before(spec: RepeatSpec) -> str:
        h = hashlib.sha256(cfg.training_fingerprint().encode())
        h.update(pd.util.hash_pandas_object(manifest[["key", "label", "etag"]], index=False)
                 .to_numpy().tobytes())
        h.update(repr(spec.to_dict()).encode())
        return h.hexdigest()[:24]

    table = pa.Table.from_pandas(manifest, preserve_index=False)
    bases = [fingerprint_base(cfg, manifest), fingerprint_base(cfg, table),
             fingerprint_base(cfg, iter(table.to_batches(max_chunksize=7)))]
    for spec in plan_repeats(cfg):
        assert shard_fingerprint(cfg, manifest, spec) == before(spec)
        assert {repeat_fingerprint(base, spec) for base in bases} == {before(spec)}


@pytest.mark.parametrize("extra", [{"n_repeats": 5, "test_split": 0.25},
                                   {"n_repeats": 3, "split_strategy": "random"}])
def test_planned_test_is_the_union_of_the_test_parts(extra):
    from tasks.config import AuditConfig
    from tasks.plan import planned_test

    cfg = AuditConfig(val_split=0.1, **extra)
    labels = np.random.default_rng(1).integers(0, 4, 101)
    union = np.zeros(len(labels), dtype=bool)
    for spec in plan_repeats(cfg):
        union[split_for_repeat(cfg, spec, labels).test] = True
    assert np.array_equal(planned_test(cfg, labels), union)
    assert not union.all() or extra["n_repeats"] >= 4


def test_each_shard_is_read_once(tmp_path, monkeypatch):
    """One read per shard (metadata and data together), in memory and bucketed."""
    from tasks import storage

    run = synthetic_run(tmp_path, 90, 3, n_repeats=4)
    reads: list[str] = []
    real = storage.read_bytes

    def counting(uri: str) -> bytes:
        reads.append(uri)
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    for memory_gb in (2.0, 1e-6):
        reads.clear()
        merged(run, memory_gb)
        shard_reads = sorted(u for u in reads if "/shards/" in u)
        assert shard_reads == [runs.shard_uri(run, r) for r in range(4)]


def test_bucket_size_follows_the_budget():
    from tasks.merge import MAX_BUCKETS, bucket_size

    assert bucket_size(1000, 10, 2.0) == 1000  # in memory
    assert bucket_size(5_000_000, 10, 1.5) < 5_000_000
    small = bucket_size(1_000_000, 1000, 2.0)
    assert 1_000_000 / small <= MAX_BUCKETS and small > 10_000
    assert bucket_size(1_000_000, 1000, 4.0) > small
    assert bucket_size(10, 3, 1e-9) == 1


def test_a_shard_of_the_wrong_width_is_named(tmp_path):
    run = synthetic_run(tmp_path, 60, 3, n_repeats=2)
    other = synthetic_run(tmp_path / "other", 60, 4, n_repeats=2)
    table = pq.read_table(runs.shard_uri(other, 1))
    meta = dict(table.schema.metadata)
    meta[b"fingerprint"] = pq.read_schema(runs.shard_uri(run, 1)).metadata[b"fingerprint"]
    pq.write_table(table.replace_schema_metadata(meta), runs.shard_uri(run, 1))
    with pytest.raises(ValueError, match=r"shard .*repeat-0001.parquet: column 'probs' holds "
                                         r"4 to 4 values per row, expected 3; re-run that"):
        merge_run(run)


def test_a_bucketed_merge_in_the_bucket_matches_local(s3, tmp_path):
    """Run folder on S3: the manifest fetched once, each shard downloaded once, spilled to
    local buckets, results uploaded by streaming; the same bytes as the local merge."""
    from tasks import storage

    local = synthetic_run(tmp_path, 150, 4, n_repeats=4)
    remote = synthetic_run(tmp_path, 150, 4, n_repeats=4, work=f"{s3.root}/work")
    want, _ = merged(local, 2.0)
    set_config(remote, merge_memory_gb=1e-6)
    out = merge_run(remote)
    assert storage.read_bytes(out) == want
    preds = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(remote,
                                                                       "predictions.parquet"))))
    assert len(preds) == 150
    assert [c for c in preds.columns if c in merge.RESULT_COLUMNS] == merge.RESULT_COLUMNS


NEIGHBOUR_CSV = ("filename,label,knn_agreement,outlier_score,duplicate_group,duplicate_conflict\n"
                 "a/1.png,a,0.9,0.25,,False\n"
                 "a/2.png,a,0.1,0.5,3,True\n")


def test_read_results_parses_the_neighbour_columns(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(NEIGHBOUR_CSV)
    res = read_results(str(path))
    assert res["knn_agreement"].tolist() == [0.9, 0.1]
    assert res["duplicate_group"].isna().tolist() == [True, False]
    assert int(res["duplicate_group"].iloc[1]) == 3
    assert res["duplicate_conflict"].tolist() == [False, True]


@pytest.mark.parametrize(("column", "bad", "expected"), [
    ("knn_agreement", "most", "is not a number from 0 to 1"),
    ("outlier_score", "3", "is not a number from 0 to 2"),
    ("duplicate_group", "x7", "is not a whole number of at least 0 (or empty)"),
    ("duplicate_group", "1.5", "is not a whole number"),
    ("duplicate_conflict", "perhaps", "is not true or false"),
])
def test_read_results_rejects_a_bad_neighbour_cell(tmp_path, column, bad, expected):
    frame = pd.read_csv(io.StringIO(NEIGHBOUR_CSV), dtype=str, keep_default_na=False)
    frame.loc[1, column] = bad
    path = tmp_path / "results.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(merge.ResultsError) as err:
        read_results(str(path))
    assert f"line 3 (a/2.png): {column} '{bad}' {expected}" in str(err.value)
