"""FFCV fast path: config-time install check, one .beton per run, the FFCV batch source, and
an audit with ffcv: true against one with ffcv: false.

CI installs FFCV (scripts/test.sh runs `setup.sh ... ffcv`), so there the FFCV tests must
run; elsewhere they skip when FFCV is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tasks import ffcv_data, runs
from tasks.audit import prepare_run, run_audit
from tasks.config import FFCV_MISSING, ConfigError, load_config, parse_config
from tasks.index import read_manifest
from tasks.plan import plan_repeats
from tasks.sample import write_sample
from tasks.train import Batches, make_batches

HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(
    not HAVE_FFCV and not os.environ.get("CI"),
    reason="FFCV is not installed (bash scripts/setup.sh ffcv)",
)


def _hide_ffcv(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Make FFCV look uninstalled, by find_spec or by a sys.modules entry of None."""
    if how == "find_spec":
        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            return None if name == "ffcv" else real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    else:
        monkeypatch.setitem(sys.modules, "ffcv", None)


@pytest.fixture(scope="module")
def sample150(tmp_path_factory: pytest.TempPathFactory) -> str:
    """150 clean Fashion-MNIST images in 10 class folders."""
    out = tmp_path_factory.mktemp("data") / "fashion"
    write_sample(out, 150, noise=0.0, seed=3)
    return str(out)


@pytest.fixture(scope="module")
def sample40(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data") / "small"
    write_sample(out, 40, noise=0.0, seed=1)
    return str(out)


# --- config -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["find_spec", "sys.modules"])
def test_ffcv_true_without_ffcv_fails_at_config_time(monkeypatch, how):
    _hide_ffcv(monkeypatch, how)
    with pytest.raises(ConfigError) as err:
        parse_config({"ffcv": True})
    msg = str(err.value)
    assert "\n" not in msg
    assert "FFCV package is not installed" in msg and "bash scripts/setup.sh ffcv" in msg
    with pytest.raises(ConfigError, match="FFCV package is not installed"):
        load_config(overrides=["ffcv=true"])
    assert parse_config({"ffcv": False}).ffcv is False
    # A process that never touches FFCV (reading a finished run) may skip the check.
    assert parse_config({"ffcv": True}, check_installed=False).ffcv is True


def test_trainer_without_ffcv_says_how_to_install(monkeypatch, tmp_path, sample40):
    cfg = parse_config({"data_path": sample40, "work_uri": str(tmp_path), "ffcv": False,
                        "n_repeats": 2, "test_split": 0.5})
    run = prepare_run(cfg, "r")
    runs.write_config(run, cfg.model_copy(update={"ffcv": True}))  # validated elsewhere
    _hide_ffcv(monkeypatch, "find_spec")
    cfg = runs.read_config(run)  # reading a run's config does not need FFCV
    manifest, _ = read_manifest(run)
    with pytest.raises(RuntimeError) as err:
        make_batches(cfg, run, manifest, manifest["label_idx"].to_numpy(np.int64))
    assert str(err.value) == FFCV_MISSING


# --- the .beton -------------------------------------------------------------------------

@needs_ffcv
def test_beton_built_once_and_reused(monkeypatch, tmp_path, sample40):
    cfg = parse_config({"data_path": sample40, "work_uri": str(tmp_path), "ffcv": True,
                        "n_repeats": 2, "test_split": 0.5})
    run = prepare_run(cfg, "r")
    beton = Path(ffcv_data.beton_uri(run))
    meta = json.loads(Path(f"{beton}.json").read_text())
    assert beton.stat().st_size > 0 and meta["images"] == 40 and meta["image_size"] == 32
    stamp = beton.stat().st_mtime_ns
    assert not list(beton.parent.glob(".dataset.beton.*"))  # no temp file left behind

    calls: list[int] = []
    real_write = ffcv_data.write_beton

    def counting_write(paths, labels, prep, out, workers=2):
        calls.append(prep.crop)  # the model's preprocessing, at the config's size
        real_write(paths, labels, prep, out, workers)

    monkeypatch.setattr(ffcv_data, "write_beton", counting_write)
    assert prepare_run(cfg, "r") == run  # resume: reuses the file
    assert ffcv_data.main(["--run", run]) == 0  # the DAG/pod entrypoint too
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    batches = make_batches(cfg, run, manifest, labels)  # a trainer: reuses it
    assert isinstance(batches, ffcv_data.FfcvBatches)
    assert calls == [] and beton.stat().st_mtime_ns == stamp

    # Another image size does not match the recorded build: rebuilt once, then reused.
    cfg16 = cfg.model_copy(update={"image_size": 16})
    ffcv_data.build_beton(run, cfg16, manifest)
    ffcv_data.build_beton(run, cfg16, manifest)
    assert calls == [16]
    assert json.loads(Path(f"{beton}.json").read_text())["image_size"] == 16


@needs_ffcv
def test_ffcv_batches_match_plain_batches(tmp_path, sample40):
    cfg = parse_config({"data_path": sample40, "work_uri": str(tmp_path), "ffcv": True,
                        "n_repeats": 2, "test_split": 0.5, "batch_size": 16})
    run = prepare_run(cfg, "r")
    manifest, _ = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    plain = Batches([str(Path(sample40) / k) for k in manifest["key"]], labels, cfg,
                    in_memory=True)
    fast = ffcv_data.FfcvBatches(ffcv_data.beton_uri(run), labels, cfg)
    rows = np.array([33, 2, 17, 5, 8, 21, 39, 0, 11, 26, 14, 30, 7, 19, 3, 24, 36, 10, 28, 1])
    threads = torch.get_num_threads()

    # Evaluation order: the rows as given, every batch (the last one partial) kept.
    got_rows, sizes = [], []
    for x, y, idx in fast.iterate(rows, shuffle=False, generator=torch.Generator()):
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 32, 32)
        assert y.dtype == torch.int64 and y.tolist() == labels[idx].tolist()
        # Same pixels as the plain loader up to JPEG loss (quality 90).
        diff = (x.float() - plain.images[idx].float()).abs()
        assert diff.mean() < 4, float(diff.mean())
        got_rows.extend(idx.tolist())
        sizes.append(len(idx))
    assert got_rows == rows.tolist() and sizes == [16, 4]
    assert torch.get_num_threads() == threads  # FFCV must not change the trainer's threads

    # Training order: every row once per epoch, a new order each epoch, seeded.
    gen = torch.Generator().manual_seed(5)
    epochs = [np.concatenate([i for _, _, i in fast.iterate(rows, True, gen)]) for _ in "ab"]
    assert all(sorted(e.tolist()) == sorted(rows.tolist()) for e in epochs)
    assert epochs[0].tolist() != epochs[1].tolist()
    again = ffcv_data.FfcvBatches(ffcv_data.beton_uri(run), labels, cfg)
    replay = np.concatenate([i for _, _, i in again.iterate(rows, True,
                                                            torch.Generator().manual_seed(5))])
    assert replay.tolist() == epochs[0].tolist()


# --- end to end -------------------------------------------------------------------------

def _shards(run: str, n_repeats: int) -> list[dict[str, object]]:
    out = []
    for r in range(n_repeats):
        table = pq.read_table(runs.shard_uri(run, r))
        stats = table.schema.metadata[b"stats"].decode()
        ids = table.column("id").to_pylist()
        agree = float(np.mean(np.array(table.column("pred")) == np.array(table.column("given"))))
        out.append({"ids": ids, "agreement": agree, "stats": stats})
    return out


@needs_ffcv
@pytest.mark.slow
def test_audit_with_ffcv_matches_plain_audit(tmp_path, sample150):
    base = {"data_path": sample150, "n_repeats": 2, "test_split": 0.5, "num_epochs": 6,
            "batch_size": 16, "track_eval": False, "val_split": 0.0}
    results = {}
    for ffcv in (False, True):
        cfg = parse_config({**base, "ffcv": ffcv, "work_uri": str(tmp_path / f"ffcv-{ffcv}")})
        lines: list[str] = []
        csv = run_audit(cfg, run_id="r", emit=lines.append)
        run = str(Path(csv).parent)
        results[ffcv] = _shards(run, len(plan_repeats(cfg)))
        if ffcv:
            # Built once by the prepare step; both trainers reused it.
            assert sum("reusing" in ln and "dataset.beton" in ln for ln in lines) == 2, lines
            assert not any("built" in ln and "dataset.beton" in ln for ln in lines)
    for plain, fast in zip(results[False], results[True], strict=True):
        assert sorted(fast["ids"]) == sorted(plain["ids"])
        assert fast["ids"] == plain["ids"]
    plain_acc = np.mean([s["agreement"] for s in results[False]])
    fast_acc = np.mean([s["agreement"] for s in results[True]])
    # 10 classes, chance 0.1: both learn, and FFCV is as good as the plain loader.
    assert plain_acc > 0.25 and fast_acc > 0.25, (plain_acc, fast_acc)
    assert abs(fast_acc - plain_acc) < 0.2, (plain_acc, fast_acc)
