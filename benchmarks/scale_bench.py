"""Scale benchmark: the steps around training on synthetic run folders of up to millions of
images, no training.

Per case (N images x C classes, 5 predictions per image) it builds a run folder with the
project's own writers: the manifest and classes through `tasks.index.write_index`, the
config through `tasks.runs.write_config` (`n_repeats: 25`, `test_split: 0.2`: five rounds of
five folds, so every image is predicted five times), and one shard per repeat through
`tasks.shards.shard_table` and `write_shard`, holding softmax probabilities of random logits
that favour a "true" class (10% of the given labels are wrong). Then it runs each stage in
its own child process and records wall time, CPU time (user + system) and peak RSS of that
process (`os.wait4`):

- merge: `tasks.merge.merge_run` within the case's memory budget (`merge_memory_gb`);
- merge_bucketed: the same merge with a smaller budget, so about twice the buckets (at least
  4), whose results.csv must be byte-identical to the merge's (the benchmark fails
  otherwise);
- report: `tasks.report.write_report` (the dataset holds no images: thumbnails are
  placeholders, so this is the cost of reading the results and rendering);
- relabel (cases of at most RELABEL_MAX images and RELABEL_CLASSES classes: a move's cost
  does not depend on the audit's classes): on the SeaweedFS test server
  (tests/s3server.py, telemetry off) N small objects of distinct content in the case's class
  folders (uploaded beside them and moved in by `_bare_moves`, plain copies and batched
  deletes from as many threads as the relabel uses: the rate the relabel is compared with,
  as this machine's speed varies from run to run), a run folder whose results.csv moves
  every one to the next class, then `tasks.relabel.relabel_results` and
  `tasks.relabel.undo`, each timed on its own (moves/s; planning and moving apart), with the
  MD5 of every object read back before, after the relabel (the same content under the new
  keys, nothing lost) and after the undo (all as before); the benchmark fails otherwise. Its
  wall, CPU and RSS columns include starting the server, the upload and the checks; the
  server's own CPU is in the notes.
- index: `tasks.index.list_dataset`, `index_dataset` and `write_index` over a local tree of
  real files (one 8x8 PNG's bytes copied to N paths across the case's class folders, written
  by a child first, not measured), for cases of up to 1M images x 10 classes; CPU time and
  peak RSS include the check workers (peak RSS: the largest of the processes, not the sum);
- index_s3: the same over a SeaweedFS test server (`tests/s3server.py`, telemetry off)
  holding that tree, with a fresh object cache, for cases of up to 100k images x 10 classes.

Stages plug in: add a `Stage` to `STAGES` (a name and a function of the run folder and the
case, run in the child). Results go to `--out` (benchmarks/SCALE_RESULTS.md) with the growth
ratios between sizes and the issue's targets. Run from the repository root:

    python -m benchmarks.scale_bench                          # every case (long: 5M images)
    python -m benchmarks.scale_bench --sizes 100kx10,100kx1000
    python -m benchmarks.scale_bench --sizes 2000x10 --out /tmp/scale.md   # smoke test
    python -m benchmarks.scale_bench --sizes 100kx10,1mx10 --stages index,index_s3
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = "100kx10,1mx10,5mx10,100kx1000,1mx1000"
PREDS_PER_IMAGE = 5
NOISE = 0.1
CHUNK_CELLS = 1 << 24  # rows x classes of probabilities generated at a time
# The memory budgets: 1.5 GB for 10 classes, 4 GB for 1,000 classes.
BUDGET_GB = {10: 1.5, 1000: 4.0}
RELABEL_MAX = 100_000  # the relabel stage runs for cases of at most this many images
RELABEL_CLASSES = 10
RELABEL_BUCKET = "scale-bench"
RELABEL_TARGET = 500  # moves/s, issue 15, for 100k objects


@dataclass(frozen=True)
class Case:
    """One synthetic run: images, classes and the merge's memory budget."""

    n: int
    classes: int
    memory_gb: float

    @property
    def name(self) -> str:
        return f"{_count(self.n)} x {self.classes:,}"


@dataclass(frozen=True)
class Stage:
    """A step measured in its own process: `run(input, case)` returns extra facts. Its
    input is the case's run folder, or what the `prepare` stage (run first, in its own
    process, not measured) returned as "input"; `applies` says which cases it runs for."""

    name: str
    run: Callable[[str, Case], dict]
    prepare: str = "build"
    applies: Callable[[Case], bool] = lambda case: True


def _count(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{unit}"
    return f"{n:,}"


def parse_sizes(text: str, memory_gb: float | None = None) -> list[Case]:
    """`100kx10,1mx1000,300x5` as cases (budget: `memory_gb` or the issue's per class count)."""
    cases = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)([km]?)x(\d+)\s*", item.lower())
        if not match:
            raise SystemExit(f"--sizes: {item!r} is not like 100kx10 (images x classes)")
        n = int(match[1]) * {"": 1, "k": 1_000, "m": 1_000_000}[match[2]]
        classes = int(match[3])
        budget = memory_gb or BUDGET_GB.get(classes, 4.0 if classes > 256 else 1.5)
        cases.append(Case(n, classes, budget))
    return cases


# --- building a run folder -----------------------------------------------------------------

def build_run(work: Path, case: Case, seed: int = 0) -> str:
    """A run folder for `case`, written through the project's own writers."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from tasks import runs
    from tasks.config import AuditConfig
    from tasks.index import DatasetIndex, write_index
    from tasks.plan import plan_repeats, split_for_repeat
    from tasks.shards import fingerprint_base, repeat_fingerprint, shard_table, write_shard

    rng = np.random.default_rng(seed)
    classes = [f"n{i:08d}" for i in range(case.classes)]
    labels = np.sort(rng.integers(0, case.classes, case.n)).astype(np.int32)
    names = pa.array(classes).take(pa.array(labels))
    ids = pc.utf8_lpad(pc.cast(pa.array(np.arange(case.n)), pa.string()), 8, "0")
    keys = pc.binary_join_element_wise(names, "/", ids, ".png", "")  # sorted, as the index
    etags = pc.utf8_lpad(pc.cast(pa.array(np.arange(case.n)), pa.string()), 32, "0")
    manifest = pd.DataFrame({"id": np.arange(case.n), "key": keys.to_pandas(),
                             "label": names.to_pandas(), "label_idx": labels, "size": 100,
                             "etag": etags.to_pandas()})
    run = runs.run_uri(str(work), f"scale-{case.n}x{case.classes}")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_index(DatasetIndex(manifest, classes, pd.DataFrame(columns=["filename", "reason"])),
                run)
    cfg = AuditConfig(data_path=str(data), work_uri=str(work), n_repeats=25, test_split=0.2,
                      val_split=0.1, merge_memory_gb=case.memory_gb)
    runs.write_config(run, cfg)
    given = labels.astype(np.int64)
    true = np.where(rng.random(case.n) < NOISE, rng.integers(0, case.classes, case.n), given)
    step = max(1, CHUNK_CELLS // case.classes)
    base = fingerprint_base(cfg, manifest)
    for spec in plan_repeats(cfg):
        test = split_for_repeat(cfg, spec, given).test
        fingerprint = repeat_fingerprint(base, spec)
        parts = []
        for a in range(0, len(test), step):
            rows = test[a:a + step]
            logits = rng.standard_normal((len(rows), case.classes), dtype=np.float32)
            logits[np.arange(len(rows)), true[rows]] += 4.0
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            parts.append(shard_table(rows, given[rows], probs, spec, fingerprint, {}))
        write_shard(runs.shard_uri(run, spec.repeat), pa.concat_tables(parts))
    return run


# --- stages (run in the child process) ------------------------------------------------------

def _set_budget(run: str, memory_gb: float) -> None:
    from tasks import runs

    runs.write_config(run, runs.read_config(run).model_copy(update={"merge_memory_gb":
                                                                     memory_gb}))


class _Buckets(logging.Handler):
    """Reads the bucket count off the merge's log line."""

    buckets = 0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"in (\d+) bucket", record.getMessage())
        if found:
            self.buckets = int(found[1])


def _merge(run: str, memory_gb: float) -> dict:
    from tasks import merge


    _set_budget(run, memory_gb)
    seen = _Buckets()
    logging.getLogger("tasks.merge").addHandler(seen)
    out = Path(merge.merge_run(run))
    with out.open("rb") as f:
        rows = sum(1 for _ in f) - 1
    return {"rows": rows, "buckets": seen.buckets, "memory_gb": memory_gb,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def bucketed_budget(case: Case) -> float:
    """A `merge_memory_gb` that makes the merge of `case` use about twice the buckets of the
    merge within the case's budget, and at least 4."""
    from tasks import merge

    n_keys = case.n * 30  # bytes of file names and labels, about
    buckets = -(-case.n // merge.bucket_size(case.n, case.classes, case.memory_gb, n_keys))
    per_image = case.classes * merge.BUCKET_CELL_BYTES + merge.BUCKET_IMAGE_BYTES
    if case.classes > merge.FULL_PROBS_MAX_CLASSES:
        per_image += merge.TOPK_IMAGE_BYTES
    need = (merge.BASE_BYTES + case.n * merge.IMAGE_BYTES + n_keys
            + case.n / max(4, 2 * buckets) * per_image)
    return need / (1 << 30)


def stage_merge(run: str, case: Case) -> dict:
    return _merge(run, case.memory_gb)


def stage_merge_bucketed(run: str, case: Case) -> dict:
    return _merge(run, bucketed_budget(case))


def stage_build(run: str, case: Case) -> dict:
    """Not measured: writes the run folder of `case` under `run` (a work folder)."""
    return {"run": build_run(Path(run), case)}


def stage_report(run: str, case: Case) -> dict:
    from tasks.report import write_report

    out = Path(write_report(run))
    return {"bytes": out.stat().st_size}


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bucket_md5s(client, prefix: str, workers: int = 8) -> dict[str, str]:
    """key (relative to `prefix`) -> MD5 of the content of every object under it, read back
    with a plain client."""
    from concurrent.futures import ThreadPoolExecutor

    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=RELABEL_BUCKET,
                                                                 Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def md5(key: str) -> str:
        body = client.get_object(Bucket=RELABEL_BUCKET, Key=key)["Body"].read()
        return hashlib.md5(body, usedforsecurity=False).hexdigest()

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip([k[len(prefix):] for k in keys], pool.map(md5, keys), strict=True))


def _bare_moves(client, pairs: list[tuple[str, str]], workers: int) -> None:
    """Move (src, dst) keys of the relabel bucket as plainly as the server allows: one
    unconditional CopyObject per object from `workers` threads, the sources deleted
    DELETE_BATCH per DeleteObjects request, without the relabel's planning, conditions,
    verification and journal: the rate the relabel is compared with."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.relabel import DELETE_BATCH

    def copy(pair: tuple[str, str]) -> str:
        client.copy_object(Bucket=RELABEL_BUCKET, Key=pair[1],
                           CopySource={"Bucket": RELABEL_BUCKET, "Key": pair[0]})
        return pair[0]

    def delete(keys: list[str]) -> None:
        resp = client.delete_objects(Bucket=RELABEL_BUCKET, Delete={
            "Objects": [{"Key": k} for k in keys], "Quiet": True})
        if resp.get("Errors"):
            raise SystemExit(f"relabel stage: a bare delete failed: {resp['Errors'][0]}")

    with ThreadPoolExecutor(workers) as pool:
        sent = []
        for a in range(0, len(pairs), DELETE_BATCH):  # a batch of copies, then its deletes
            batch = list(pool.map(copy, pairs[a:a + DELETE_BATCH]))
            sent.append(pool.submit(delete, batch))
        for future in sent:
            future.result()


class _Finished(logging.Handler):
    """When the relabel's planning finished (its last `planned ...` line)."""

    planned_at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("planned ") and " in " in record.getMessage():
            self.planned_at = record.created


def stage_relabel(run: str, case: Case) -> dict:
    """Relabel and undo `case.n` objects on a SeaweedFS test server (see the module
    docstring); the server and its data live beside the run folder and go afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from tasks import relabel, runs, storage
    from tasks.config import AuditConfig
    from tests.s3server import SeaweedS3

    work = Path(run).parent / "relabel"
    server = SeaweedS3(work / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.env())
        client = server.client()
        client.create_bucket(Bucket=RELABEL_BUCKET)
        classes = [f"n{i:08d}" for i in range(min(case.classes, RELABEL_CLASSES))]
        names = [f"{classes[i % len(classes)]}/{i:08d}.png" for i in range(case.n)]

        bodies = {n: hashlib.sha256(n.encode()).digest() * 3 for n in names}  # ~100 bytes

        def put(name: str) -> None:
            client.put_object(Bucket=RELABEL_BUCKET, Key=f"staged/{name}", Body=bodies[name])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, names))
        workers = storage.parallelism(f"s3://{RELABEL_BUCKET}/ds")
        server_cpu, t0 = _proc_cpu_s(server.proc.pid), time.time()
        _bare_moves(server.client(connections=workers + 4),
                    [(f"staged/{n}", f"ds/{n}") for n in names], workers)
        bare_s, bare_server = time.time() - t0, _proc_cpu_s(server.proc.pid) - server_cpu
        before = _bucket_md5s(client, "ds/")
        if before != {n: hashlib.md5(b, usedforsecurity=False).hexdigest()
                      for n, b in bodies.items()}:
            raise SystemExit("relabel stage: the bare moves did not leave every object in ds/")
        labels = [n.split("/")[0] for n in names]
        results = pd.DataFrame({
            "filename": names, "label": labels,
            "corrected_label": [classes[(classes.index(c) + 1) % len(classes)] for c in labels],
            "num_preds": 5, "%": 100.0, "label_quality": 0.05, "suggested_quality": 0.95,
            "is_label_issue": True, "p_label_wrong": 0.95, "p_suggestion": 0.9})
        rel_run = str(work / "run")
        runs.write_config(rel_run, AuditConfig(data_path=f"s3://{RELABEL_BUCKET}/ds",
                                               work_uri=str(work), sensitivity=50, min_preds=2))
        storage.write_text(storage.join(rel_run, "classes.json"), json.dumps(classes))
        storage.write_text(runs.results_uri(rel_run), results.to_csv(index=False))
        seen = _Finished()
        logging.getLogger("tasks.relabel").addHandler(seen)

        server_cpu, t0 = _proc_cpu_s(server.proc.pid), time.time()
        journal = relabel.relabel_results(runs.results_uri(rel_run))
        relabel_s, relabel_server = time.time() - t0, _proc_cpu_s(server.proc.pid) - server_cpu
        plan_s = seen.planned_at - t0
        if journal is None:
            raise SystemExit("relabel stage: nothing was moved")
        moves = relabel.Journal(journal).read()[1]
        after = _bucket_md5s(client, "ds/")
        expected = dict(before)
        for m in moves:
            expected[m.dst] = expected.pop(m.src)
        if after != expected:
            lost = len(set(before.values()) - set(after.values()))
            raise SystemExit(f"relabel stage: the bucket after the relabel is not the plan's "
                             f"({lost} contents lost)")

        server_cpu, t0 = _proc_cpu_s(server.proc.pid), time.time()
        relabel.undo(journal)
        undo_s, undo_server = time.time() - t0, _proc_cpu_s(server.proc.pid) - server_cpu
        if _bucket_md5s(client, "ds/") != before:
            raise SystemExit("relabel stage: the bucket after the undo is not as before")
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {"moves": len(moves), "relabel_s": relabel_s, "plan_s": plan_s,
            "moves_per_s": len(moves) / relabel_s,
            "moving_per_s": len(moves) / max(relabel_s - plan_s, 1e-9),
            "undo_s": undo_s, "undo_moves_per_s": len(moves) / undo_s,
            "bare_moves_per_s": len(names) / bare_s, "bare_server_cpu_s": bare_server,
            "server_cpu_s": relabel_server + undo_server, "checksums": "equal"}



# --- the index over a tree of files ----------------------------------------------------------

INDEX_MAX = {"index": 1_000_000, "index_s3": 100_000}  # images, at 10 classes


def tiny_png() -> bytes:
    """One 8x8 RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def tree_keys(case: Case) -> list[str]:
    """`<class>/<image>.png` keys of `case`, images spread evenly over the classes."""
    return [f"c{i % case.classes:04d}/{i:08d}.png" for i in range(case.n)]


def stage_tree(work: str, case: Case) -> dict:
    """Not measured: writes the tree of `case` under `work`/tree."""
    root = Path(work) / "tree"
    data = tiny_png()
    for c in range(case.classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    for key in tree_keys(case):
        with open(root / key, "wb") as f:
            f.write(data)
    return {"input": str(root)}


def stage_tree_s3(work: str, case: Case) -> dict:
    """Not measured: starts a SeaweedFS test server (left running: the parent kills it by
    PID) and uploads the tree of `case` into it."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.s3server import SeaweedS3

    server = SeaweedS3(Path(work) / "seaweedfs")
    server.start()
    client = server.client()
    client.create_bucket(Bucket="acl-bench")
    data = tiny_png()
    with ThreadPoolExecutor(32) as pool:
        for _ in pool.map(lambda k: client.put_object(Bucket="acl-bench", Key=f"tree/{k}",
                                                      Body=data), tree_keys(case)):
            pass
    env = {**server.env(), "ACL_CACHE_DIR": str(Path(work) / "cache")}
    return {"input": "s3://acl-bench/tree", "env": env, "pid": server.proc.pid}


def stage_index(root: str, case: Case) -> dict:
    from tasks.config import AuditConfig
    from tasks.index import index_dataset, index_workers, list_dataset, write_index

    work = Path(tempfile.mkdtemp(prefix="scale-index-"))
    try:
        cfg = AuditConfig(data_path=root, work_uri=str(work))
        t0 = time.perf_counter()
        listing = list_dataset(root)
        listed = time.perf_counter() - t0
        index = index_dataset(cfg, listing)
        write_index(index, str(work / "run"))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = index.table.num_rows
    if rows != case.n or len(index.skipped):
        raise SystemExit(f"index of {root}: {rows} images, {len(index.skipped)} skipped; "
                         f"expected {case.n} and none")
    return {"rows": rows, "list_s": listed, "files_per_s": rows / wall,
            "workers": index_workers()}


def _index_case(name: str) -> Callable[[Case], bool]:
    return lambda case: case.classes == 10 and case.n <= INDEX_MAX[name]


STAGES = [Stage("merge", stage_merge), Stage("merge_bucketed", stage_merge_bucketed),
          Stage("report", stage_report),
          Stage("index", stage_index, "tree", _index_case("index")),
          Stage("index_s3", stage_index, "tree_s3", _index_case("index_s3")),
          Stage("relabel", stage_relabel,
                applies=lambda case: case.n <= RELABEL_MAX and case.classes <= RELABEL_CLASSES)]
BUILD = Stage("build", stage_build)
PREPARE = {"build": BUILD, "tree": Stage("tree", stage_tree),
           "tree_s3": Stage("tree_s3", stage_tree_s3)}


# --- measuring ------------------------------------------------------------------------------

@dataclass
class Measure:
    case: Case
    stage: str
    wall_s: float
    cpu_s: float
    peak_rss_gb: float
    facts: dict


def measure(stage: Stage, run: str, case: Case, env: dict | None = None) -> Measure:
    """Run one stage in a child process; its wall time, CPU time and peak RSS. (Linux counts
    the memory a child had before exec in its peak RSS: this process stays small, building
    the run folders in children too, and imports nothing heavy.)"""
    cmd = [sys.executable, "-m", "benchmarks.scale_bench", "--child", stage.name, "--run", run,
           "--sizes", f"{case.n}x{case.classes}", "--memory-gb", str(case.memory_gb)]
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage.name} of {case.name} failed ({proc.returncode}):\n"
                         f"{text[-3000:]}")
    facts = json.loads(text.strip().splitlines()[-1])
    return Measure(case, stage.name, wall, usage.ru_utime + usage.ru_stime,
                   usage.ru_maxrss / (1 << 20), facts)


def child(stage_name: str, run: str, case: Case) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    stage = next(s for s in [*STAGES, *PREPARE.values()] if s.name == stage_name)
    print(json.dumps(stage.run(run, case)))


# --- the results file -----------------------------------------------------------------------

TARGETS = [
    # (case, stage, CPU s at most, peak RSS GB at most)
    ((1_000_000, 10), "merge", 15.0, 1.5),
    ((1_000_000, 1000), "merge", 180.0, 4.0),
]
INDEX_TARGET = ((1_000_000, 10), "index", 10_000)  # files/s at least


def write_results(path: Path, rows: list[Measure], argv: list[str], built_s: dict) -> str:
    """The markdown results file; returns its text."""
    from importlib.metadata import version

    lines = [
        "# Scale benchmark: merge, report and relabel at millions of images",
        "",
        "Written by `benchmarks/scale_bench.py` (see its docstring for what each stage does); "
        "synthetic run folders, 5 predictions per image, no training.",
        "",
        f"Command: `{shlex.join(['python', '-m', 'benchmarks.scale_bench', *argv])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {version('numpy')}, pyarrow {version('pyarrow')}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| images x classes | stage | memory budget | buckets | wall s | CPU s | peak RSS GB |"
        " notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(m.case, m.stage): m for m in rows}
    for m in rows:
        notes = ""
        if m.stage == "merge_bucketed":
            same = m.facts["sha256"] == by[(m.case, "merge")].facts["sha256"]
            notes = "results.csv identical to merge's" if same else "RESULTS DIFFER"
        elif m.stage == "merge":
            notes = f"{m.facts['rows']:,} rows; run folder built in {built_s[m.case]:.0f} s"
        elif m.stage == "relabel":
            f = m.facts
            notes = (f"{f['moves']:,} moves on SeaweedFS: relabel {f['relabel_s']:.1f} s, "
                     f"{f['moves_per_s']:.0f} moves/s ({f['plan_s']:.1f} s planning, then "
                     f"{f['moving_per_s']:.0f} moves/s); undo {f['undo_s']:.1f} s, "
                     f"{f['undo_moves_per_s']:.0f} moves/s; server CPU "
                     f"{f['server_cpu_s']:.0f} s; checksums {f['checksums']} after relabel "
                     f"and undo; bare copy + delete {f['bare_moves_per_s']:.0f} moves/s "
                     f"(server CPU {f['bare_server_cpu_s']:.0f} s), relabel at "
                     f"{f['moves_per_s'] / f['bare_moves_per_s']:.0%} of it; columns "
                     "include setup and checks")
        elif m.stage.startswith("index"):
            notes = (f"{m.facts['files_per_s']:,.0f} files/s, {m.facts['workers']} workers; "
                     f"listing {m.facts['list_s']:.1f} s; files written in "
                     f"{built_s[(m.case, m.stage)]:.0f} s")
        budget = f"{m.facts['memory_gb']:.3g} GB" if "memory_gb" in m.facts else ""
        buckets = str(m.facts.get("buckets", ""))
        lines.append(f"| {m.case.name} | {m.stage} | {budget} | {buckets} | {m.wall_s:.1f} | "
                     f"{m.cpu_s:.1f} | {m.peak_rss_gb:.2f} | {notes} |")
    growth = []
    for stage in ("merge", "report", "index"):
        for classes in sorted({m.case.classes for m in rows}):
            sized = sorted((m for m in rows if m.stage == stage and m.case.classes == classes),
                           key=lambda m: m.case.n)
            for small, big in itertools.pairwise(sized):
                growth.append(
                    f"| {stage} | {small.case.name} → {big.case.name} | "
                    f"{big.case.n / small.case.n:g}x | {big.cpu_s / small.cpu_s:.2f}x | "
                    f"{big.peak_rss_gb / small.peak_rss_gb:.2f}x |")
    if growth:
        lines += ["", "Growth between sizes:", "",
                  "| stage | sizes | images | CPU time | peak RSS |", "|---|---|---|---|---|",
                  *growth]
    checks = []
    for (n, classes), stage, cpu, rss in TARGETS:
        m = next((m for m in rows if (m.case.n, m.case.classes, m.stage) == (n, classes,
                                                                              stage)), None)
        if m is not None:
            ok = m.cpu_s <= cpu and m.peak_rss_gb <= rss
            checks.append(f"- {m.case.name} {stage}: <= {cpu:g} CPU s and <= {rss:g} GB: "
                          f"{m.cpu_s:.1f} s, {m.peak_rss_gb:.2f} GB — {'met' if ok else 'MISSED'}")
    one, five = (next((m for m in rows if (m.case.n, m.case.classes, m.stage) == (n, 10,
                                                                                 "merge")),
                      None) for n in (1_000_000, 5_000_000))
    if one and five:
        ratio = five.cpu_s / one.cpu_s
        ok = ratio <= 5.5 and five.peak_rss_gb <= 1.5
        checks.append(f"- 5M x 10 merge within 5.5x the 1M time and 1.5 GB: {ratio:.2f}x, "
                      f"{five.peak_rss_gb:.2f} GB — {'met' if ok else 'MISSED'}")
    relabelled = next((m for m in rows if (m.case.n, m.stage) == (100_000, "relabel")), None)
    if relabelled:
        rate = relabelled.facts["moves_per_s"]
        checks.append(f"- 100k relabel on SeaweedFS: >= {RELABEL_TARGET} moves/s, nothing lost: "
                      f"{rate:.0f} moves/s ({rate / relabelled.facts['bare_moves_per_s']:.0%} "
                      "of the bare copy + delete rate of the same server in the same run), "
                      f"checksums {relabelled.facts['checksums']} — "
                      f"{'met' if rate >= RELABEL_TARGET else 'MISSED'}")
    (n, classes), stage, rate = INDEX_TARGET
    m = next((m for m in rows if (m.case.n, m.case.classes, m.stage) == (n, classes, stage)),
             None)
    if m is not None:
        ok = m.facts["files_per_s"] >= rate
        checks.append(f"- {m.case.name} {stage}: >= {rate:,} files/s: "
                      f"{m.facts['files_per_s']:,.0f} — {'met' if ok else 'MISSED'}")
    if checks:
        lines += ["", "Targets (issue 15, 2-core machine):", "", *checks]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _measure_prepared(stage: Stage, folder: Path, case: Case, built: dict) -> Measure:
    """Prepare the input of `stage` in its own process, then measure the stage on it; a
    server the preparation left running is killed after."""
    prepared = measure(PREPARE[stage.prepare], str(folder), case)
    built[(case, stage.name)] = prepared.wall_s
    try:
        return measure(stage, prepared.facts["input"], case, prepared.facts.get("env"))
    finally:
        if "pid" in prepared.facts:
            import signal

            os.kill(prepared.facts["pid"], signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES,
                    help=f"images x classes, comma-separated (default {DEFAULT_SIZES})")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="merge_memory_gb for every case (default: 1.5 for 10 classes, 4 for "
                         "1,000, the issue's budgets)")
    ap.add_argument("--stages", default=",".join(s.name for s in STAGES))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "SCALE_RESULTS.md"))
    ap.add_argument("--work", default=None, help="folder for the run folders (default: a "
                    "temporary folder, removed afterwards)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = parse_sizes(args.sizes, args.memory_gb)
    if args.child:
        child(args.child, args.run, cases[0])
        return 0
    names = args.stages.split(",")
    stages = [s for s in STAGES if s.name in names]
    if not stages or len(stages) != len(names):
        raise SystemExit(f"--stages: choose from {', '.join(s.name for s in STAGES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-bench-"))
    rows: list[Measure] = []
    built: dict = {}  # seconds to prepare: per case (run folder), per (case, stage) (trees)
    try:
        for case in cases:
            folder = work / f"{case.n}x{case.classes}"
            todo = [s for s in stages if s.applies(case)]
            if any(s.prepare == "build" for s in todo):
                built_in = measure(BUILD, str(folder), case)
                run, built[case] = built_in.facts["run"], built_in.wall_s
                print(f"{case.name}: run folder built in {built[case]:.0f} s", flush=True)
            for stage in todo:
                if stage.prepare == "build":
                    m = measure(stage, run, case)
                else:
                    m = _measure_prepared(stage, folder / stage.name, case, built)
                rows.append(m)
                print(f"{case.name} {stage.name}: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} CPU s, "
                      f"{m.peak_rss_gb:.2f} GB peak RSS {m.facts}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            write_results(Path(args.out), rows, argv, built)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    differ = [m for m in rows if m.stage == "merge_bucketed"
              and m.facts["sha256"] != next(r for r in rows if r.case == m.case
                                            and r.stage == "merge").facts["sha256"]]
    if differ:
        print(f"bucketed merge results differ for {[m.case.name for m in differ]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
