"""tasks/train.py and tasks/models.py: the trainer entrypoint writes its shard (schema,
exactly its test fold) and is a no-op the second time; model_weights loads a state dict or
fails with a clear error naming it, never touching the network; every architecture runs;
augmentation, input decoding and early stopping do what the config says."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks import runs
from tasks.audit import prepare_run
from tasks.config import ConfigError
from tasks.images import decode_image
from tasks.index import read_manifest
from tasks.models import SmallCNN, build_model
from tasks.plan import Split, plan_repeats, split_for_repeat
from tasks.shards import shard_fingerprint
from tasks.train import Augment, Batches, fit_model, make_optimiser, run_repeat, train_epoch
from tests.datasets import image_bytes, tiny_config, write_classes

SHARD_SCHEMA = pa.schema([("id", pa.int64()), ("repeat", pa.int32()), ("given", pa.int32()),
                          ("pred", pa.int32()), ("p_given", pa.float32()),
                          ("probs", pa.list_(pa.float32()))])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A prepared run over 75 images in 3 classes: 2 repeats of one epoch at 16 px."""
    root = tmp_path_factory.mktemp("train")
    write_classes(root / "data", {"ant": 25, "bee": 25, "cow": 25})
    return prepare_run(tiny_config(root / "data", root / "work", image_size=16), "tiny")


def trainer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.train", *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_trainer_writes_its_test_fold_and_a_rerun_is_a_no_op(tiny_run):
    first = trainer("--run", tiny_run, "--repeat", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = first.stdout
    assert re.search(r"repeat 1 \(round 0, fold 1\) epoch 1/1 loss \d+\.\d+ train acc \d\.\d+ "
                     r"[\d,]+ img/s val acc \d\.\d+", log), log
    shard = Path(runs.shard_uri(tiny_run, 1))
    table = pq.read_table(shard)
    assert table.schema.remove_metadata() == SHARD_SCHEMA

    cfg = runs.read_config(tiny_run)
    manifest, classes = read_manifest(tiny_run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    spec = plan_repeats(cfg)[1]
    test = split_for_repeat(cfg, spec, labels).test
    df = table.to_pandas()
    assert sorted(df["id"]) == sorted(manifest["id"].to_numpy()[test])
    assert len(df) == len(test) and df["id"].is_unique
    given = labels[df["id"].to_numpy()]
    assert (df["given"].to_numpy() == given).all() and (df["repeat"] == 1).all()
    probs = np.stack(df["probs"].to_numpy())
    assert probs.shape == (len(test), len(classes))
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (df["pred"].to_numpy() == probs.argmax(1)).all()
    assert np.allclose(df["p_given"], probs[np.arange(len(df)), given])
    meta = table.schema.metadata
    assert meta[b"fingerprint"].decode() == shard_fingerprint(cfg, manifest, spec)
    assert meta[b"num_classes"] == b"3"
    assert b"test_agreement" in meta[b"stats"]

    before = (shard.read_bytes(), shard.stat().st_mtime_ns)
    again = trainer("--run", tiny_run, "--repeat", "1")
    assert again.returncode == 0
    assert f"already done: {shard}" in again.stdout
    assert "epoch" not in again.stdout
    assert (shard.read_bytes(), shard.stat().st_mtime_ns) == before


def test_a_forced_retry_yields_the_same_predictions(tiny_run):
    out = Path(run_repeat(tiny_run, 0))
    first = pq.read_table(out).to_pandas()
    run_repeat(tiny_run, 0, force=True)
    second = pq.read_table(out).to_pandas()
    assert first["id"].tolist() == second["id"].tolist()
    assert np.allclose(np.stack(first["probs"]), np.stack(second["probs"]), atol=1e-5)


def test_trainer_user_errors_are_one_line_and_exit_2(tiny_run):
    bad = trainer("--run", tiny_run, "--repeat", "7")
    assert bad.returncode == 2
    assert bad.stdout.strip().splitlines()[-1].endswith(
        "ERROR repeat 7 failed: RepeatError: repeat 7 is out of range: the run has 0..1")
    assert "Traceback" not in bad.stdout + bad.stderr


def test_an_unexpected_trainer_error_logs_its_traceback_at_error_and_exits_1(tmp_path):
    (tmp_path / "config.json").write_text("{not json")  # a damaged run, not a user mistake
    bad = trainer("--run", str(tmp_path), "--repeat", "0")
    assert bad.returncode == 1, bad.stdout
    lines = bad.stdout.strip().splitlines()
    assert "ERROR repeat 0 failed with an unexpected error" in bad.stdout
    assert "Traceback (most recent call last):" in lines
    assert " ERROR repeat 0 failed: " in lines[-1]


@pytest.mark.slow
def test_a_trainer_without_staged_weights_fails_in_one_line_without_network(tmp_path):
    """The real entrypoint, for a run whose weights the index step did not stage: a clear
    error naming model_weights and how to stage them; no download, no random init."""
    data = tmp_path / "data"
    write_classes(data, {"ant": 4, "bee": 4})
    cfg = tiny_config(data, tmp_path / "work", model_name="resnet18", image_size=16,
                      model_weights="none")
    run = prepare_run(cfg, "named")
    runs.write_config(run, cfg.model_copy(update={"model_weights": "IMAGENET1K_V1"}))
    # Any connection attempt in the child fails loudly instead of hanging.
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _no(*a, **k):\n    raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = _no\nsocket.create_connection = _no\n")
    env = {"TORCH_HOME": str(tmp_path / "torch-home"),
           "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}
    proc = trainer("--run", run, "--repeat", "0", env=env)
    assert proc.returncode == 2
    last = proc.stdout.strip().splitlines()[-1]
    assert "repeat 0 failed: ConfigError: model_weights 'IMAGENET1K_V1': run " in last
    assert "has no staged weights for resnet18" in last
    assert f"python -m tasks.weights --run {run}" in last
    assert "network access attempted" not in proc.stdout + proc.stderr
    assert not Path(runs.shard_uri(run, 0)).exists()


# --- model_weights ----------------------------------------------------------------------

def test_a_saved_state_dict_loads_and_a_head_of_another_shape_stays_at_init(tmp_path, caplog):
    torch.manual_seed(1)
    donor = SmallCNN(5)
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)
    torch.manual_seed(2)
    fresh = build_model("small_cnn", 3)
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="tasks.models"):
        model = build_model("small_cnn", 3, str(path))
    own, saved, init = model.state_dict(), donor.state_dict(), fresh.state_dict()
    head = {"10.weight", "10.bias"}
    assert head <= set(own)
    for name, tensor in own.items():
        if name in head:
            assert torch.equal(tensor, init[name]), name
        else:
            assert torch.equal(tensor, saved[name]), name
    assert "left at init (10.bias, 10.weight)" in caplog.text
    # A checkpoint that wraps the state dict loads the same.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": donor.state_dict(), "epoch": 3}, wrapped)
    other = build_model("small_cnn", 3, str(wrapped))
    assert torch.equal(other.state_dict()["0.0.weight"], saved["0.0.weight"])


@pytest.mark.parametrize(("model_name", "weights", "message"), [
    ("small_cnn", "{tmp}/missing.pt", r"model_weights '.*missing.pt': no such file"),
    ("resnet18", "weights.ckpt", r"model_weights 'weights.ckpt': no such file"),
    ("small_cnn", "{tmp}/garbage.pt", r"model_weights '.*garbage.pt': not a readable state "
                                      r"dict"),
    ("small_cnn", "{tmp}/alien.pt", r"model_weights '.*alien.pt': no tensor matches small_cnn"),
    ("resnet18", "{tmp}/cnn.pt", r"model_weights '.*cnn.pt': no tensor matches resnet18"),
    ("small_cnn", "{tmp}/tensor.pt", r"model_weights '.*tensor.pt': holds a Tensor, not a "
                                     r"state dict"),
    ("small_cnn", "{tmp}/partial.pt", r"model_weights '.*partial.pt': 1 of \d+ tensors of "
                                      r"small_cnn are missing or of another shape \(first: "
                                      r"0.0.weight\); is it a state dict of another"),
])
def test_state_dict_errors_name_the_key_and_never_download(tmp_path, monkeypatch, model_name,
                                                           weights, message):
    """build_model loads a local state-dict file (named weights are tasks.weights' business,
    tests/test_weights.py)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "alien.pt")
    torch.save(SmallCNN(3).state_dict(), tmp_path / "cnn.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    partial = SmallCNN(3).state_dict()
    del partial["0.0.weight"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=message) as err:
        build_model(model_name, 3, weights.format(tmp=tmp_path))
    assert "\n" not in str(err.value)


# --- models and inputs ------------------------------------------------------------------

@pytest.mark.parametrize(("model_name", "size"), [
    ("small_cnn", 32), ("resnet18", 32), ("resnet50", 32), ("convnext_tiny", 32),
    ("efficientnet_v2_s", 32), ("alexnet", 64), ("vit_b_16", 224)])
def test_every_model_runs_at_a_small_image_size(model_name, size):
    torch.manual_seed(0)
    model = build_model(model_name, 4, image_size=size)
    augment = Augment(size, "flip")
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    model.eval()
    augment.eval()
    with torch.no_grad():
        out = model(augment(x))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def tiny_batches(tmp_path: Path, n: int, **cfg) -> Batches:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        path.write_bytes(image_bytes(i))
        paths.append(str(path))
    labels = np.arange(n) % 2
    return Batches(paths, labels, tiny_config(tmp_path / "data", tmp_path / "work", **cfg))


def test_streamed_batches_match_the_decoded_ones(tmp_path):
    memory = tiny_batches(tmp_path, 10, batch_size=4, image_size=8)
    streamed = Batches(memory.paths, memory.labels, memory.cfg, in_memory=False)
    assert memory.in_memory and not streamed.in_memory
    rows = np.array([7, 2, 9, 0, 5, 1])
    gen = torch.Generator()
    got = list(streamed.iterate(rows, shuffle=False, generator=gen))
    want = list(memory.iterate(rows, shuffle=False, generator=gen))
    assert [len(y) for _, y, _ in got] == [4, 2]
    for (x, y, idx), (x0, y0, idx0) in zip(got, want, strict=True):
        assert x.shape == (len(idx), 3, 8, 8) and x.dtype == torch.uint8
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert idx.tolist() == idx0.tolist()


def test_a_last_batch_of_one_image_does_not_break_batchnorm(tmp_path):
    # 5 training images in batches of 4: the last batch holds one image, and resnet18's
    # last BatchNorm sees 1x1 maps at 32 px.
    batches = tiny_batches(tmp_path, 5, batch_size=4, image_size=32, model_name="resnet18")
    model = build_model("resnet18", 2)
    augment = Augment(32, "flip")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler(enabled=False)
    seen, loss, _ = train_epoch(model, augment, batches, np.arange(5), opt, sched, scaler,
                                torch.device("cpu"), torch.Generator().manual_seed(0))
    assert seen == 4 and np.isfinite(loss)


def test_early_stopping_keeps_the_best_epoch(tmp_path, caplog):
    batches = tiny_batches(tmp_path, 24, batch_size=8, image_size=8, num_epochs=40, patience=2,
                           learning_rate=0.5)
    cfg = batches.cfg
    spec = plan_repeats(cfg)[0]
    split = split_for_repeat(cfg, spec, batches.labels)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        _, stats = fit_model(cfg, spec, split, batches, 2)
    epochs = [m for m in caplog.messages if re.search(r" epoch \d+/40 ", m)]
    assert "stopping early: no val improvement for 2 epochs" in caplog.text
    assert len(epochs) < 40 and stats["epoch"] == len(epochs)
    val = [float(m.rsplit("val acc ", 1)[1]) for m in epochs]
    assert stats["val_acc"] == pytest.approx(max(val), abs=1e-3)
    assert stats["best_epoch"] == val.index(max(val)) + 1


@pytest.mark.parametrize(("mode", "flips", "shifts"), [("flip", True, False),
                                                       ("crop", False, True),
                                                       ("flip_crop", True, True),
                                                       ("none", False, False)])
def test_augment_does_what_the_mode_says(mode, flips, shifts):
    size, n = 32, 64
    ramp = torch.arange(size, dtype=torch.uint8) * 4  # brighter to the right
    x = ramp.repeat(n, 3, size, 1)
    augment = Augment(size, mode)
    augment.eval()
    plain = augment(x)
    assert torch.allclose(plain[0, 0, 0, :2] * 0.229 + 0.485, ramp[:2].float() / 255, atol=1e-5)
    augment.train()
    out = augment(x, generator=torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum().item()
    assert (10 < flipped < n - 10) if flips else flipped == 0
    moved = (~torch.isclose(out, plain).all(3).all(2).all(1)).sum().item()
    if shifts or flips:
        assert moved > 10
    else:
        assert moved == 0
    assert torch.equal(augment.eval()(x, flip_all=True), plain.flip(3))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_image_mode_decodes_to_rgb_at_the_configured_size(tmp_path, mode):
    img = Image.new(mode, (20, 10))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = decode_image(str(path), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize(("num_epochs", "batches_per_epoch"),
                         [(1, 1), (1, 2), (1, 3), (4, 1), (2, 2), (1, 4), (1, 5), (5, 1)])
def test_any_step_count_trains(tmp_path, num_epochs, batches_per_epoch):
    """OneCycleLR divides by zero at 4 steps and trains at lr 0 below: 1 to 5 steps in all
    must train, every step at a positive learning rate."""
    n = 4 * batches_per_epoch
    batches = tiny_batches(tmp_path, n, batch_size=4, image_size=8, num_epochs=num_epochs,
                           track_eval=False)
    cfg = batches.cfg
    split = Split(train=np.arange(n), val=np.arange(0), test=np.arange(0))
    spec = plan_repeats(cfg)[0]
    torch.manual_seed(spec.seed)  # as fit_model does: the same initial weights
    before = [p.detach().clone() for p in build_model(cfg.model_name, 2).parameters()]
    model, stats = fit_model(cfg, spec, split, batches, 2)
    assert stats["epoch"] == num_epochs and np.isfinite(stats["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    opt, sched, _ = make_optimiser(build_model(cfg.model_name, 2), cfg, batches_per_epoch,
                                   torch.device("cpu"))
    lrs = []
    for _ in range(num_epochs * batches_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert min(lrs) > 0 and max(lrs) <= cfg.learning_rate + 1e-12
