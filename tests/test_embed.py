"""Embedding mode (method: embeddings) with real torch, scikit-learn and faiss on tiny data:
the backbone without its head, embedding chunks written and resumed, a torchvision backbone
with the run's staged weights and its own preprocessing, probe shards that merge reads
unchanged, the neighbour columns merge appends by id (in memory and bucketed), the blocked
neighbour search against brute force, planted duplicates under two classes listed as a
label conflict, and one audit through the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image

from tasks import runs, shards
from tasks.audit import prepare_run
from tasks.config import parse_config
from tasks.embed import ChunkError, backbone, run_chunk
from tasks.embeddings import NEIGHBOUR_COLUMNS, EmbeddingsError, neighbour_sections
from tasks.images import decode_for
from tasks.merge import RESULT_COLUMNS, MissingShardsError, merge_run, read_results
from tasks.models import SmallCNN, model_transform
from tasks.plan import plan_repeats
from tasks.probe import (
    duplicate_groups,
    nearest_neighbours,
    neighbour_frame,
    neighbour_vote,
    run_probes,
)
from tasks.weights import staged_weights
from tests.datasets import tiny_config

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def colour_image(rgb: tuple[int, int, int], seed: int) -> bytes:
    """A 16 px image of one colour with noise: a random CNN's features separate colours."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def colour_dataset(root: Path, per_class: int = 12, wrong: int = 0) -> list[str]:
    """`per_class` images per colour class; the first `wrong` classes each get one image of
    the next class's colour (a planted wrong label). Returns the planted keys."""
    names = list(COLOURS)
    planted, seed = [], 0
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"img-{i:03d}.png").write_bytes(colour_image(COLOURS[name], seed))
            seed += 1
        if c < wrong:
            key = f"{name}/planted.png"
            (root / key).write_bytes(colour_image(COLOURS[names[(c + 1) % 3]], 1000 + c))
            planted.append(key)
    return planted


@pytest.fixture
def weights(tmp_path: Path) -> str:
    """A small_cnn state dict (random init, seeded) saved by the test."""
    torch.manual_seed(0)
    path = tmp_path / "small_cnn.pt"
    torch.save(SmallCNN(7).state_dict(), path)  # another head size: load_weights skips it
    return str(path)


def embedding_run(tmp_path: Path, weights: str, **extra) -> str:
    data = tmp_path / "data"
    colour_dataset(data)
    cfg = tiny_config(data, tmp_path / "work", method="embeddings", model_weights=weights,
                      image_size=16, embed_chunk_size=15, knn_k=5, **extra)
    return prepare_run(cfg, "r1")


def test_backbone_maps_images_to_features_without_the_head() -> None:
    x = torch.rand(2, 3, 32, 32)
    assert backbone("small_cnn", None, 5)(x).shape == (2, 128)
    assert backbone("resnet18", None, 5)(x).shape == (2, 512)


def test_embed_chunks_are_written_normalised_and_resumed(tmp_path, weights) -> None:
    run = embedding_run(tmp_path, weights)  # 36 images, chunks of 15: 15 + 15 + 6
    for c in range(3):
        run_chunk(run, c)
    files = sorted(Path(run, "embeddings").iterdir())
    assert [f.name for f in files] == [f"chunk-{c:05d}.parquet" for c in range(3)]
    ids, emb = [], []
    for f in files:
        table = pq.read_table(f)
        kind = table.schema.field("embedding").type
        assert str(kind) == "fixed_size_list<element: halffloat>[128]"
        ids += table.column("id").to_pylist()
        emb.append(table.column("embedding").combine_chunks().values.to_numpy(
            zero_copy_only=False).reshape(len(table), 128).astype(np.float32))
    assert ids == list(range(36))
    np.testing.assert_allclose(np.linalg.norm(np.concatenate(emb), axis=1), 1, atol=2e-3)
    # Re-running is a no-op; a corrupt or truncated chunk is embedded again, identically.
    stamps = [f.stat().st_mtime_ns for f in files]
    run_chunk(run, 1)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    before = files[2].read_bytes()
    files[2].write_bytes(before[:100])
    run_chunk(run, 2)
    assert pq.read_table(files[2]).equals(pq.read_table(io.BytesIO(before)))
    with pytest.raises(ChunkError, match=r"chunk 3 is out of range: the run has 0\.\.2"):
        run_chunk(run, 3)
    # The entrypoint, as a pod or a subprocess runs it.
    proc = subprocess.run([sys.executable, "-m", "tasks.embed", "--run", run, "--chunk", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chunk 1/3 already done" in proc.stdout


def test_a_torchvision_backbone_embeds_with_the_staged_weights_and_its_preprocessing(
        tmp_path, caplog) -> None:
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    data = tmp_path / "data"
    colour_dataset(data, per_class=4)
    cfg = tiny_config(data, tmp_path / "work", method="embeddings", model_name="resnet18",
                      model_weights=str(path), image_size=32)
    run = prepare_run(cfg, "r1")
    caplog.set_level("INFO", logger="tasks.embed")
    run_chunk(run, 0)
    assert "random weights" not in caplog.text
    table = pq.read_table(runs.embedding_chunk_uri(run, 0))
    emb = table.column("embedding").combine_chunks().values.to_numpy(
        zero_copy_only=False).reshape(12, 512).astype(np.float32)
    # What the trainers see: resnet18's resize and centre crop, its weights' mean and std.
    prep = model_transform("resnet18", 32)
    assert prep.resize == 37 and prep.crop == 32
    keys = pd.read_parquet(Path(run, "manifest.parquet"))["key"]
    x = torch.stack([torch.from_numpy(decode_for(str(data / k), prep)).permute(2, 0, 1)
                     for k in keys]).float() / 255
    x = (x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    model = backbone("resnet18", staged_weights(runs.read_config(run), run), 3, 32)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(model(x), dim=1).numpy()
    np.testing.assert_allclose(emb, want, atol=3e-3)
    # model_weights none: random weights, and the embedder says so.
    plain = prepare_run(cfg.model_copy(update={"model_weights": "none",
                                                "work_uri": str(tmp_path / "w2")}), "r2")
    run_chunk(plain, 0)
    assert "resnet18 embeds with random weights" in caplog.text


def test_probe_shards_are_ordinary_shards_that_merge_reads(tmp_path, weights) -> None:
    run = embedding_run(tmp_path, weights, n_repeats=4)
    with pytest.raises(EmbeddingsError, match=r"3 of 3 embedding chunks are missing or stale"):
        run_probes(run)
    for c in range(3):
        run_chunk(run, c)
    written = run_probes(run)
    cfg = runs.read_config(run)
    manifest = pd.read_parquet(Path(run, "manifest.parquet"))
    assert written == [runs.shard_uri(run, r) for r in range(4)]
    for spec in plan_repeats(cfg):
        uri = runs.shard_uri(run, spec.repeat)
        assert shards.existing_fingerprint(uri) == shards.shard_fingerprint(cfg, manifest, spec)
        assert shards.shard_metadata(uri)["spec"] == spec.to_dict()
    results = read_results(merge_run(run))
    assert len(results) == 36 and (results["num_preds"] == 2).all()  # 2 rounds of 2 folds
    assert set(NEIGHBOUR_COLUMNS) <= set(results.columns)
    # Colours separate under a random CNN: neighbours agree with the labels.
    assert pd.to_numeric(results["knn_agreement"]).mean() > 0.9
    # A second call keeps every shard and the neighbours file.
    stamps = {p: p.stat().st_mtime_ns for p in Path(run).rglob("*.parquet")}
    run_probes(run)
    assert {p: p.stat().st_mtime_ns for p in Path(run).rglob("*.parquet")} == stamps
    # knn_k changes the neighbours, not the shards.
    runs.write_config(run, cfg.model_copy(update={"knn_k": 3}))
    run_probes(run)
    changed = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {Path(runs.neighbours_uri(run))}


def test_merge_appends_the_neighbour_columns_by_id_in_memory_and_bucketed(
        tmp_path, weights) -> None:
    run = embedding_run(tmp_path, weights, n_repeats=2)
    for c in range(3):
        run_chunk(run, c)
    run_probes(run)
    cfg = runs.read_config(run)
    csv = Path(merge_run(run)).read_bytes()
    header = csv.split(b"\n", 1)[0].decode().split(",")
    assert header == RESULT_COLUMNS + NEIGHBOUR_COLUMNS
    results = read_results(runs.results_uri(run))
    want = pd.read_parquet(runs.neighbours_uri(run)).set_index("id").loc[results["id"]]
    np.testing.assert_allclose(results["knn_agreement"].astype(float),
                               want["knn_agreement"], rtol=0, atol=0)
    np.testing.assert_allclose(results["outlier_score"].astype(float),
                               want["outlier_score"], rtol=0, atol=0)
    group = results["duplicate_group"].to_numpy(float, na_value=np.nan)  # parsed: Int64
    np.testing.assert_array_equal(group, want["duplicate_group"].to_numpy(float))
    assert results["duplicate_conflict"].tolist() == want["duplicate_conflict"].tolist()
    assert np.isnan(group).any() and (group > 0).any()  # empty and numbered groups both
    preds = pd.read_parquet(Path(run, "predictions.parquet"))
    assert preds.columns[-len(NEIGHBOUR_COLUMNS):].tolist() == NEIGHBOUR_COLUMNS
    # Bucketed (one image a bucket, rows routed and sorted part by part): the same bytes.
    runs.write_config(run, cfg.model_copy(update={"merge_memory_gb": 1e-6}))
    assert Path(merge_run(run)).read_bytes() == csv
    # A stale neighbours.parquet (knn_k changed, probes not re-run): no neighbour columns.
    runs.write_config(run, cfg.model_copy(update={"knn_k": 3}))
    stale = Path(merge_run(run)).read_bytes()
    assert stale.split(b"\n", 1)[0].decode().split(",") == RESULT_COLUMNS
    # Missing probe shards: the hint names the probe entrypoint, not the trainer.
    runs.write_config(run, cfg)
    Path(runs.shard_uri(run, 1)).unlink()
    with pytest.raises(MissingShardsError, match=r"python -m tasks\.probe --run"):
        merge_run(run)


def test_images_whose_neighbours_back_their_label_are_not_flagged(tmp_path, weights) -> None:
    """Embedding mode's gate: an image is an issue only where fewer than half of its nearest
    neighbours carry its label. The same run with neighbours rewritten to back every label
    (the fingerprint kept) flags nothing; p_label_wrong does not change."""
    import pyarrow as pa

    data = tmp_path / "data"
    planted = colour_dataset(data, per_class=12, wrong=2)
    cfg = tiny_config(data, tmp_path / "work", method="embeddings", model_weights=weights,
                      image_size=16, embed_chunk_size=20, knn_k=5, n_repeats=10)
    run = prepare_run(cfg, "r1")
    for c in range(2):
        run_chunk(run, c)
    run_probes(run)
    results = read_results(merge_run(run))
    issues = results[results["is_label_issue"]]
    assert set(planted) <= set(issues["filename"]) and (issues["knn_agreement"] < 0.5).all()
    uri = runs.neighbours_uri(run)
    table = pq.read_table(uri)
    backed = table.set_column(table.schema.get_field_index("knn_agreement"), "knn_agreement",
                              pa.array(np.ones(table.num_rows)))
    pq.write_table(backed.replace_schema_metadata(table.schema.metadata), uri)
    again = read_results(merge_run(run))
    assert not again["is_label_issue"].any() and (again["knn_agreement"] == 1.0).all()
    both = results.merge(again, on="filename", suffixes=("", "_backed"))
    assert (both["p_label_wrong"] == both["p_label_wrong_backed"]).all()
    assert set(planted) <= set(again.loc[again["tier"] == "review", "filename"])


def test_the_neighbours_vote_decides_what_relabel_and_the_summary_would_move(
        tmp_path, weights) -> None:
    """knn_label is the neighbours' vote, in the results by id; a run whose neighbours are
    rewritten to vote for no class flags the same images, and relabel (and the summary's
    would-relabel count) moves none of them."""
    import json

    import pyarrow as pa

    from tasks.relabel import select_rows

    data = tmp_path / "data"
    planted = colour_dataset(data, per_class=12, wrong=2)
    cfg = tiny_config(data, tmp_path / "work", method="embeddings", model_weights=weights,
                      image_size=16, embed_chunk_size=20, knn_k=5, n_repeats=10,
                      sensitivity=50)
    run = prepare_run(cfg, "r1")
    for c in range(2):
        run_chunk(run, c)
    run_probes(run)
    results = read_results(merge_run(run))
    summary = json.loads(Path(run, "summary.json").read_text())
    moves = select_rows(results, cfg.sensitivity, cfg.min_preds)
    assert set(planted) <= set(moves["filename"])  # colours separate: the vote backs them
    assert (moves["knn_label"] == moves["corrected_label"]).all()
    assert summary["would_relabel"] == len(moves)
    uri = runs.neighbours_uri(run)
    table = pq.read_table(uri)
    none = table.set_column(table.schema.get_field_index("knn_label"), "knn_label",
                            pa.nulls(table.num_rows, pa.string()))
    pq.write_table(none.replace_schema_metadata(table.schema.metadata), uri)
    again = read_results(merge_run(run))
    assert (again["knn_label"].fillna("") == "").all()
    assert again["is_label_issue"].sum() == results["is_label_issue"].sum()
    assert select_rows(again, cfg.sensitivity, cfg.min_preds).empty
    assert json.loads(Path(run, "summary.json").read_text())["would_relabel"] == 0


def test_mlp_probe_writes_shards_too(tmp_path, weights) -> None:
    run = embedding_run(tmp_path, weights, probe="mlp")
    for c in range(3):
        run_chunk(run, c)
    run_probes(run)
    results = read_results(merge_run(run))
    assert (results["num_preds"] == 1).all()
    assert (results["corrected_label"] == results["label"]).mean() > 0.9


def test_blocked_neighbour_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(53, 16)).astype(np.float16)
    sims, idx = nearest_neighbours(emb, 4, db_block=7, query_batch=5)
    x = emb.astype(np.float32) - emb.astype(np.float64).mean(0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    want = np.argsort(-full, axis=1)[:, :4]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), atol=1e-5)
    assert not (idx == np.arange(53)[:, None]).any()


def test_duplicate_groups_join_transitively_and_need_the_threshold() -> None:
    # 0-1 and 1-2 above the threshold, 3-4 just below it, 5 alone.
    sims = np.array([[0.99, 0.1], [0.99, 0.985], [0.985, 0.2], [0.97, 0.1], [0.97, 0.1],
                     [0.3, 0.1]], dtype=np.float32)
    idx = np.array([[1, 5], [0, 2], [1, 0], [4, 0], [3, 0], [0, 1]])
    assert duplicate_groups(sims, idx, 0.98).tolist() == [1, 1, 1, 0, 0, 0]
    assert duplicate_groups(sims, idx, 0.95).tolist() == [1, 1, 1, 2, 2, 0]


def test_the_neighbour_vote_is_the_unique_most_common_label() -> None:
    near = np.array([[2, 2, 1, 0, 2],    # 2 three times
                     [1, 0, 1, 0, 3],    # 1 and 0 tie: no vote
                     [3, -1, -1, 3, 1],  # missing neighbours do not count
                     [-1, -1, -1, -1, -1],
                     [4, 0, 1, 2, 3]])   # all different: a five-way tie
    assert neighbour_vote(near).tolist() == [2, -1, 3, -1, -1]
    assert neighbour_vote(np.array([[5]])).tolist() == [5]


def test_relabel_in_embedding_mode_moves_only_where_the_neighbours_vote_for_it() -> None:
    from tasks.decide import neighbours_vote_for
    from tasks.relabel import relabel_ceiling

    results = pd.DataFrame({
        "label": ["a", "a", "a", "a", "a"], "corrected_label": ["b", "b", "b", "b", "b"],
        "knn_label": ["b", "c", "", None, np.nan], "is_label_issue": True, "num_preds": 4,
        "p_suggestion": 0.99})
    assert neighbours_vote_for(results["knn_label"], results["corrected_label"]).tolist() == [
        True, False, False, False, False]
    assert relabel_ceiling(results, 2).notna().tolist() == [True, False, False, False, False]
    # Training mode's results have no knn_label: no neighbour gate.
    assert relabel_ceiling(results.drop(columns="knn_label"), 2).notna().all()


def test_an_exact_duplicate_under_two_classes_is_a_label_conflict() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 32)).astype(np.float16)
    emb[25] = emb[3]  # the same image filed under another class
    emb[30] = emb[7]  # and one copied within its class
    labels = np.arange(40) % 4
    labels[30] = labels[7]
    frame = neighbour_frame(emb, labels, np.arange(40), 5, 0.98, list("abcd"))
    groups = frame["duplicate_group"]
    assert groups[3] == groups[25] and groups[7] == groups[30] and groups[3] != groups[7]
    assert groups.notna().sum() == 4
    assert frame.index[frame["duplicate_conflict"]].tolist() == [3, 25]
    assert frame.loc[25, "outlier_score"] > 0  # the k-th neighbour is not the copy
    results = pd.DataFrame({"filename": [f"f{i}.png" for i in range(40)],
                            "label": [f"c{v}" for v in labels]}).join(frame)
    sections = neighbour_sections(results.astype(str).replace("<NA>", ""))
    assert sections["n_groups"] == 2 and sections["n_conflicts"] == 1
    first = sections["groups"][0]
    assert first["conflict"] and first["labels"] == ["c1", "c3"]
    assert [m["name"] for m in first["members"]] == ["f25.png", "f3.png"]


def test_embedding_config_is_checked_and_fingerprinted_apart() -> None:
    base = parse_config({})
    assert base.method == "train"
    emb = parse_config({"method": "embeddings"})
    assert emb.training_fingerprint() != base.training_fingerprint()
    assert emb.training_fingerprint() != parse_config(
        {"method": "embeddings", "probe": "mlp"}).training_fingerprint()
    # knn_k and duplicate_threshold change the neighbours only, not the shards
    assert emb.training_fingerprint() == parse_config(
        {"method": "embeddings", "knn_k": 3, "duplicate_threshold": 1}).training_fingerprint()
    with pytest.raises(ValueError, match="ffcv is not used by method embeddings"):
        parse_config({"method": "embeddings", "ffcv": True}, check_installed=False)


def test_embedding_audit_through_the_cli_flags_planted_labels_and_a_duplicate(
        tmp_path, weights) -> None:
    data = tmp_path / "data"
    planted = colour_dataset(data, per_class=12, wrong=2)
    (data / "blue" / "copy-of-red-3.png").write_bytes((data / "red" / "img-003.png").read_bytes())
    work = tmp_path / "work"
    args = ["audit", "--set", f"data_path={data}", "--set", f"work_uri={work}",
            "--set", "method=embeddings", "--set", f"model_weights={weights}",
            "--set", "n_repeats=10", "--set", "embed_chunk_size=20", "--set", "knn_k=5",
            # a random backbone makes same-colour images alike: only copies clear 0.995
            "--set", "duplicate_threshold=0.995",
            "--set", "image_size=16", "--set", "num_workers=0", "--set", "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert out.name == "results.csv"
    run = out.parent
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == [
        "chunk-00000.parquet", "chunk-00001.parquet"]  # 39 images in chunks of 20
    assert len(list((run / "shards").iterdir())) == 10
    results = read_results(str(out))
    assert len(results) == 39
    assert (results["num_preds"] == 2).all()
    assert set(NEIGHBOUR_COLUMNS) <= set(results.columns)
    flagged = set(results.loc[results["is_label_issue"], "filename"])
    assert set(planted) <= flagged
    low = results.set_index("filename")["knn_agreement"].astype(float)
    assert (low[planted] <= 0.2).all()
    conflict = results[results["duplicate_conflict"]]  # parsed as booleans
    assert sorted(conflict["filename"]) == ["blue/copy-of-red-3.png", "red/img-003.png"]
    assert conflict["duplicate_group"].nunique() == 1
    page = (run / "report.html").read_text()
    assert "Duplicates and label conflicts (1 conflicting of" in page
    assert "blue/copy-of-red-3.png (blue), red/img-003.png (red)" in page
    assert '<section id="outliers">' in page
    # Running it again resumes: nothing is embedded or fitted again.
    again = subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "chunk 1/2 already done" in again.stderr + again.stdout
    assert "all 10 probe shards and the neighbours are done" in again.stderr + again.stdout
