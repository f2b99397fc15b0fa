"""Probes and neighbours on a run's embeddings (method: embeddings).

    python -m tasks.probe --run <run uri>

runs after every embedding chunk is written (`tasks.embed`). For each repeat of the plan
(`tasks.plan`, the same rounds, folds and seeds as training mode) it fits a probe on the
embeddings of the repeat's training and validation rows and writes the probabilities of
its held-out rows as an ordinary shard (`tasks.shards`), so merge, report and relabel work
unchanged. A probe has no early stopping, so it uses the validation rows for fitting too.
Then it searches every image's `knn_k` nearest neighbours (exact inner product on the
mean-centred, L2-normalised embeddings, with faiss, in blocks so memory stays bounded) and
writes `neighbours.parquet`: knn_agreement, outlier_score and near-duplicate groups
(`tasks.embeddings`). Shards and neighbours whose fingerprint matches are kept, so a re-run
only does what changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks import runs, shards
from tasks.config import AuditConfig
from tasks.embeddings import (
    existing_neighbours_fingerprint,
    neighbours_fingerprint,
    read_embeddings,
    write_neighbours,
)
from tasks.errors import run_step
from tasks.index import read_manifest
from tasks.plan import RepeatSpec, plan_repeats, split_for_repeat

log = logging.getLogger("tasks.probe")

LOGISTIC_C = 1.0  # inverse L2 strength on standardised features
LOGISTIC_MAX_ITER = 300
MLP_HIDDEN = 512
MLP_EPOCHS = 30
MLP_BATCH = 256
MLP_LR = 1e-3
DB_BLOCK = 131072  # database rows per exact-search index: bounds the float32 copy in memory
QUERY_BATCH = 16384
DUPLICATE_EPS = 1e-4  # float rounding: exact copies may score a hair below 1
LARGE_GROUP_SHARE = 0.01  # a duplicate group this large a share of the images is suspicious


# --- probes ---------------------------------------------------------------------------------

def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both parts scaled by the training part's per-dimension mean and spread."""
    mean = train.mean(0, dtype=np.float64).astype(np.float32)
    std = train.std(0, dtype=np.float64).astype(np.float32) + np.float32(1e-6)
    return (train - mean) / std, (test - mean) / std  # float32: no float64 copy of N x dim


def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   num_classes: int, seed: int) -> np.ndarray:
    """Multinomial logistic regression (scikit-learn, lbfgs): class probabilities of
    `x_test`, N x num_classes (0 for classes without a training row)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=LOGISTIC_C, max_iter=LOGISTIC_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    probs = np.zeros((len(x_test), num_classes), dtype=np.float32)
    probs[:, clf.classes_] = clf.predict_proba(x_test)
    return probs


def mlp_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
              num_classes: int, seed: int) -> np.ndarray:
    """One hidden layer (torch, Adam, on the CPU): class probabilities of `x_test`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(x_train.shape[1], MLP_HIDDEN), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(MLP_HIDDEN, num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=MLP_LR, weight_decay=1e-2)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    model.train()
    for _ in range(MLP_EPOCHS):
        for batch in torch.randperm(len(x), generator=gen).split(MLP_BATCH):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x_test)).softmax(1).numpy().astype(np.float32)


PROBES = {"logistic": logistic_probe, "mlp": mlp_probe}


def run_probe(cfg: AuditConfig, spec: RepeatSpec, features: np.ndarray, labels: np.ndarray,
              ids: np.ndarray, num_classes: int, fingerprint: str) -> pa.Table:
    """One repeat's probe: fitted on its training and validation rows, the shard table of
    its held-out rows."""
    t0 = time.perf_counter()
    split = split_for_repeat(cfg, spec, labels)
    fit_rows = np.sort(np.concatenate([split.train, split.val]))
    x_train, x_test = _standardise(features[fit_rows], features[split.test])
    probs = PROBES[cfg.probe](x_train, labels[fit_rows], x_test, num_classes, spec.seed)
    agreement = float((probs.argmax(1) == labels[split.test]).mean())
    stats = {"train_rows": len(fit_rows), "test_agreement": agreement,
             "seconds": time.perf_counter() - t0}
    log.info("%s: %s probe on %d rows, held-out agreement with given labels %.3f (%.1fs)",
             spec.label, cfg.probe, len(fit_rows), agreement, stats["seconds"])
    return shards.shard_table(ids[split.test], labels[split.test], probs, spec, fingerprint,
                              stats)


# --- neighbours -----------------------------------------------------------------------------

def centred(embeddings: np.ndarray,
            block: int = DB_BLOCK) -> Callable[[int, int], np.ndarray]:
    """A function giving rows [a, b) of the embeddings as float32, centred on their mean
    (computed here in blocks, in float64) and L2-normalised."""
    mean = np.zeros(embeddings.shape[1], dtype=np.float64)
    for a in range(0, len(embeddings), block):
        mean += embeddings[a:a + block].astype(np.float64).sum(0)
    mean /= max(1, len(embeddings))

    def rows(a: int, b: int) -> np.ndarray:
        x = embeddings[a:b].astype(np.float32) - mean.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        return np.ascontiguousarray(x)

    return rows


def nearest_neighbours(embeddings: np.ndarray, k: int, db_block: int = DB_BLOCK,
                       query_batch: int = QUERY_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `k` nearest other rows by cosine similarity of the centred embeddings:
    (similarities N x k float32, row positions N x k int64), most similar first. Exact
    (faiss IndexFlatIP), one database block at a time, so memory holds one block's float32
    copy and the running top k, whatever N."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing
    import faiss

    n, dim = embeddings.shape
    rows = centred(embeddings, db_block)
    keep = k + 1  # the row itself is among its own nearest
    best_s = np.full((n, keep), -np.inf, dtype=np.float32)
    best_i = np.full((n, keep), -1, dtype=np.int64)
    for a in range(0, n, db_block):
        b = min(n, a + db_block)
        index = faiss.IndexFlatIP(dim)
        index.add(rows(a, b))
        kk = min(keep, b - a)
        for q in range(0, n, query_batch):
            r = min(n, q + query_batch)
            s, i = index.search(rows(q, r), kk)
            cand_s = np.concatenate([best_s[q:r], s], axis=1)
            cand_i = np.concatenate([best_i[q:r], i + a], axis=1)
            top = np.argsort(-cand_s, axis=1, kind="stable")[:, :keep]
            best_s[q:r] = np.take_along_axis(cand_s, top, 1)
            best_i[q:r] = np.take_along_axis(cand_i, top, 1)
    own = best_i == np.arange(n)[:, None]
    best_s[own] = -np.inf  # drop the row itself (or, if not found, the k+1-th)
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
    sims, idx = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    idx[~np.isfinite(sims)] = -1
    return sims, idx


def duplicate_groups(sims: np.ndarray, idx: np.ndarray, threshold: float) -> np.ndarray:
    """Group number per row (1, 2, ... by smallest member; 0: none) of the near-duplicate
    groups: rows joined, transitively, when a neighbour's similarity is >= threshold."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sims)
    close = (sims >= threshold - DUPLICATE_EPS) & (idx >= 0)
    src = np.repeat(np.arange(n), close.sum(1))
    graph = coo_matrix((np.ones(len(src)), (src, idx[close])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    in_group = sizes[comp] > 1
    out = np.zeros(n, dtype=np.int64)
    if in_group.any():
        _, first = np.unique(comp[in_group], return_index=True)  # smallest row of each group
        starts = np.flatnonzero(in_group)[first]
        number = {c: g + 1 for g, c in enumerate(comp[np.sort(starts)])}
        out[in_group] = [number[c] for c in comp[in_group]]
    return out


def neighbour_vote(near: np.ndarray) -> np.ndarray:
    """Per row of `near` (the labels of an image's k >= 1 neighbours; -1: no neighbour there)
    the label most of them carry, or -1 where none does uniquely (a tie, or no neighbours).
    Never a dense image x class matrix: k comparisons of the k columns."""
    valid = near >= 0
    counts = np.zeros(near.shape, dtype=np.int32)  # per position: how many carry its label
    for j in range(near.shape[1]):
        counts[:, j] = ((near == near[:, j:j + 1]) & valid).sum(1)  # 0 where j is missing
    best = counts.max(1)
    # A label counted c times sits at c positions: it is the only winner exactly when the
    # positions holding the best count number that count.
    unique = (best > 0) & ((counts == best[:, None]).sum(1) == best)
    return np.where(unique, near[np.arange(len(near)), counts.argmax(1)], -1)


def neighbour_frame(embeddings: np.ndarray, labels: np.ndarray, ids: np.ndarray, k: int,
                    threshold: float, classes: list[str]) -> pd.DataFrame:
    """`id` and the neighbour columns of every image (`tasks.embeddings.NEIGHBOUR_COLUMNS`);
    `labels` index `classes`."""
    n = len(labels)
    k = min(k, n - 1)
    if k < 1:  # a single image has no neighbours
        return pd.DataFrame({"id": ids, "knn_agreement": np.nan,
                             "knn_label": pd.array([None] * n, dtype="string"),
                             "outlier_score": np.nan,
                             "duplicate_group": pd.array([None] * n, dtype="Int64"),
                             "duplicate_conflict": False})
    sims, idx = nearest_neighbours(embeddings, k)
    near = np.where(idx >= 0, labels[np.maximum(idx, 0)], -1)
    agreement = (near == labels[:, None]).mean(1)
    vote = neighbour_vote(near)
    names = np.asarray(classes, dtype=object)[np.maximum(vote, 0)]
    knn_label = pd.array(np.where(vote >= 0, names, None), dtype="string")
    group = duplicate_groups(sims, idx, threshold)
    frame = pd.DataFrame({"group": group, "label": labels})
    n_labels = frame[group > 0].groupby("group")["label"].nunique()
    conflict = (group > 0) & (frame["group"].map(n_labels).fillna(0).to_numpy() > 1)
    return pd.DataFrame({
        "id": ids,
        "knn_agreement": np.round(agreement, 4),
        "knn_label": knn_label,
        "outlier_score": np.round(1 - sims[:, -1].astype(np.float64), 4),
        "duplicate_group": pd.array(np.where(group > 0, group, None), dtype="Int64"),
        "duplicate_conflict": conflict,
    })


# --- the entrypoint -------------------------------------------------------------------------

def run_probes(run: str, force: bool = False) -> list[str]:
    """Write every repeat's probe shard and neighbours.parquet of the run at `run` (those
    whose fingerprint matches are kept unless `force`); returns the shard URIs."""
    t0 = time.perf_counter()
    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    ids = manifest["id"].to_numpy()
    specs = plan_repeats(cfg)
    base = shards.fingerprint_base(cfg, manifest)  # the manifest hashed once
    todo = [s for s in specs if force or shards.existing_fingerprint(runs.shard_uri(
        run, s.repeat)) != shards.repeat_fingerprint(base, s)]
    nb_fingerprint = neighbours_fingerprint(cfg, manifest)
    nb_todo = force or existing_neighbours_fingerprint(run) != nb_fingerprint
    if not todo and not nb_todo:
        log.info("all %d probe shards and the neighbours are done", len(specs))
        return [runs.shard_uri(run, s.repeat) for s in specs]
    embeddings = read_embeddings(run, cfg, manifest)
    log.info("read %d embeddings of %d dimensions; %d of %d probes to fit", len(embeddings),
             embeddings.shape[1], len(todo), len(specs))
    if todo:
        features = centred(embeddings)(0, len(embeddings))
        for spec in todo:
            table = run_probe(cfg, spec, features, labels, ids, len(classes),
                              shards.repeat_fingerprint(base, spec))
            shards.write_shard(runs.shard_uri(run, spec.repeat), table)
        del features
    if nb_todo:
        t1 = time.perf_counter()
        frame = neighbour_frame(embeddings, labels, ids, cfg.knn_k, cfg.duplicate_threshold,
                                classes)
        uri = write_neighbours(run, frame, nb_fingerprint)
        groups = frame["duplicate_group"].dropna()
        largest = int(groups.value_counts().max()) if len(groups) else 0
        if largest > max(10, LARGE_GROUP_SHARE * len(frame)):
            log.warning("the largest near-duplicate group holds %d of %d images: "
                        "duplicate_threshold %g is too low for these embeddings (weak or "
                        "random weights make unrelated images look alike); raise it",
                        largest, len(frame), cfg.duplicate_threshold)
        conflicts = frame.loc[frame["duplicate_conflict"], "duplicate_group"].nunique()
        log.info("neighbours (k=%d) in %.1fs: median knn_agreement %.2f, %d near-duplicate "
                 "groups (%d images), %d of them label conflicts; wrote %s", cfg.knn_k,
                 time.perf_counter() - t1, frame["knn_agreement"].median(), groups.nunique(),
                 len(groups), conflicts, uri)
    log.info("probes done in %.1fs", time.perf_counter() - t0)
    return [runs.shard_uri(run, s.repeat) for s in specs]


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tasks.probe --run URI [--force]."""
    parser = argparse.ArgumentParser(prog="python -m tasks.probe",
                                     description="Fit the probes on a run's embeddings and "
                                     "score its neighbours.")
    parser.add_argument("--run", required=True, help="run folder URI (local or s3://)")
    parser.add_argument("--force", action="store_true", help="redo what is already written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    return run_step(lambda: run_probes(args.run, force=args.force), "probes", log,
                    "finished shards are kept")


if __name__ == "__main__":
    sys.exit(main())
