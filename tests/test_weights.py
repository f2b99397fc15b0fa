"""tasks/weights.py: initial weights are staged once per run in `<run>/weights/` (from the
torch hub cache, a downloaded checkpoint or a state-dict file, with a sha256 record) and
trainers load them from there only. Offline, a download fails fast with one line saying how
to stage a file. Nothing here downloads: the hub cache is a folder the test fills itself."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from tasks import weights as tw
from tasks.audit import prepare_run
from tasks.config import ConfigError
from tasks.models import SmallCNN, build_model
from tests.datasets import tiny_config, write_classes

RESNET18_FILE = "resnet18-f37072fd.pth"  # the checkpoint name torchvision expects for V1


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache of the test's own (TORCH_HOME)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert Path(torch.hub.get_dir()) == home / "hub"
    return checkpoints


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_classes(data, {"ant": 4, "bee": 4})
    return data


def cfg_for(tmp_path: Path, **extra):
    return tiny_config(tmp_path / "data", tmp_path / "work", image_size=32, **extra)


# --- what model_weights asks for ------------------------------------------------------------

@pytest.mark.parametrize(("model_name", "value", "request_"), [
    ("small_cnn", None, None), ("small_cnn", "", None), ("small_cnn", "none", None),
    ("resnet18", None, "DEFAULT"), ("resnet18", "NONE", None),
    ("resnet50", "IMAGENET1K_V1", "IMAGENET1K_V1"), ("resnet18", "/w/x.pt", "/w/x.pt"),
])
def test_model_weights_null_means_the_default_weights_of_a_torchvision_model(
        tmp_path, model_name, value, request_):
    cfg = cfg_for(tmp_path, model_name=model_name, model_weights=value)
    assert cfg.weights_request == request_


def test_random_init_stages_nothing(tmp_path, no_network):
    dataset(tmp_path)
    run = prepare_run(cfg_for(tmp_path, model_name="resnet18", model_weights="none"), "r")
    assert not Path(tw.record_uri(run)).exists()
    assert tw.staged_weights(cfg_for(tmp_path, model_name="resnet18", model_weights="none"),
                             run) is None


# --- the torch hub cache path ---------------------------------------------------------------

def test_cached_weights_are_staged_once_and_trainers_load_the_run_copy(tmp_path, hub,
                                                                       no_network, caplog):
    dataset(tmp_path)
    torch.manual_seed(3)
    donor = torchvision.models.resnet18(num_classes=1000)  # an ImageNet-shaped head
    torch.save(donor.state_dict(), hub / RESNET18_FILE)
    cfg = cfg_for(tmp_path, model_name="resnet18")  # model_weights null: DEFAULT
    with caplog.at_level("INFO", logger="tasks.weights"):
        run = prepare_run(cfg, "cached")
    staged = Path(run) / "weights" / "resnet18-IMAGENET1K_V1.pt"
    record = json.loads(Path(tw.record_uri(run)).read_text())
    assert staged.read_bytes() == (hub / RESNET18_FILE).read_bytes()
    assert record["sha256"] == tw.file_sha256(str(staged))
    assert record | {"sha256": "", "bytes": 0} == {
        "model_name": "resnet18", "model_weights": "DEFAULT", "weights": "IMAGENET1K_V1",
        "source": "https://download.pytorch.org/models/" + RESNET18_FILE,
        "file": "resnet18-IMAGENET1K_V1.pt", "sha256": "", "bytes": 0}
    assert "found in the torch hub cache" in caplog.text

    # The trainer side reads the run folder only: the hub cache may be gone.
    (hub / RESNET18_FILE).unlink()
    path = tw.staged_weights(cfg, run)
    assert path == str(staged)
    model = build_model("resnet18", 2, path, label="DEFAULT")
    assert torch.equal(model.state_dict()["conv1.weight"], donor.state_dict()["conv1.weight"])
    assert model.fc.out_features == 2  # the 1000-class head was re-initialised

    # Resume: the staged file has the recorded sha256, so nothing is fetched (the hub cache
    # is empty now and the network refuses).
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.weights"):
        assert prepare_run(cfg, "cached") == run
    assert "weights already staged" in caplog.text

    # A damaged staged file is refused by the trainer, by name.
    staged.write_bytes(b"damaged")
    with pytest.raises(ConfigError, match=r"model_weights 'DEFAULT': the staged file .*"
                                          r"resnet18-IMAGENET1K_V1.pt is missing or its sha256"):
        tw.staged_weights(cfg, run)


def test_a_corrupt_hub_cache_file_is_one_line_naming_it(tmp_path, hub, no_network):
    dataset(tmp_path)
    (hub / RESNET18_FILE).write_bytes(b"half a download")
    with pytest.raises(ConfigError) as err:
        prepare_run(cfg_for(tmp_path, model_name="resnet18"), "corrupt")
    message = str(err.value)
    assert "model_weights 'DEFAULT': not a readable state dict" in message
    assert f"the torch hub cache file {hub / RESNET18_FILE}; delete it" in message
    assert "\n" not in message


# --- offline ----------------------------------------------------------------------------------

def test_offline_download_fails_fast_with_one_line_saying_how_to_stage(tmp_path, hub):
    """A real download attempt through torchvision: this machine has no network, so it must
    fail within the bound with the way out."""
    dataset(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        prepare_run(cfg_for(tmp_path, model_name="resnet50"), "offline")
    seconds = time.perf_counter() - t0
    message = str(err.value)
    assert seconds < 60, seconds
    assert message.startswith("model_weights 'DEFAULT': cannot download resnet50 weights "
                              "IMAGENET1K_V2 from https://download.pytorch.org/models/"
                              "resnet50-11ad3fa6.pth (")
    assert f"put resnet50-11ad3fa6.pth at {hub / 'resnet50-11ad3fa6.pth'}" in message
    assert "or set model_weights to the path or s3:// URI" in message
    assert "\n" not in message
    assert not (hub / "resnet50-11ad3fa6.pth").exists()
    assert not list((tmp_path / "work").rglob("*.pt"))  # no run copy, no random init


def test_a_download_that_stalls_is_cut_by_the_socket_timeout(tmp_path, hub, monkeypatch):
    """A proxy that accepts and never answers: the download ends at DOWNLOAD_TIMEOUT_S."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    for name in ("https_proxy", "HTTPS_PROXY"):  # whichever spelling the environment uses
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):  # nothing bypasses it
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tw, "DOWNLOAD_TIMEOUT_S", 2.0)
    # urllib's global opener reads the proxy settings once, when first used (maybe by an
    # earlier test): drop it so that this test's proxy applies.
    monkeypatch.setattr(urllib.request, "_opener", None)
    dataset(tmp_path)
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"cannot download resnet18 weights IMAGENET1K_V1 "
                                              r"from .* \(.*timed out"):
            prepare_run(cfg_for(tmp_path, model_name="resnet18"), "stall")
    finally:
        stop.set()
        for conn in held:
            conn.close()
        server.close()
    assert time.perf_counter() - t0 < 30
    assert held, "the download never reached the proxy"
    assert socket.getdefaulttimeout() is None  # the bound is put back


# --- state-dict files and bad input ----------------------------------------------------------

def test_a_state_dict_file_is_copied_into_the_run_and_restaged_when_it_changes(
        tmp_path, no_network):
    dataset(tmp_path)
    source = tmp_path / "init.pt"
    torch.save(SmallCNN(5).state_dict(), source)
    cfg = cfg_for(tmp_path, model_weights=str(source))
    run = prepare_run(cfg, "file")
    staged = Path(run) / "weights" / "small_cnn-init.pt"
    assert staged.read_bytes() == source.read_bytes()
    assert tw.staged_weights(cfg, run) == str(staged)
    torch.save(SmallCNN(7).state_dict(), source)  # a new file at the same path
    prepare_run(cfg, "file")
    assert staged.read_bytes() == source.read_bytes()
    assert json.loads(Path(tw.record_uri(run)).read_text())["sha256"] == \
        tw.file_sha256(str(source))


@pytest.mark.parametrize(("model_name", "value", "message"), [
    ("resnet18", "IMAGENET9K", r"model_weights 'IMAGENET9K' is not a weights name of resnet18; "
                               r"choose one of DEFAULT, IMAGENET1K_V1, none \(random init\), "
                               r"or give a state-dict path"),
    ("vit_b_16", "IMAGENET_V3", r"choose one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1, "
                                r"IMAGENET1K_SWAG_LINEAR_V1, none"),
    ("small_cnn", "IMAGENET1K_V1", r"model_weights 'IMAGENET1K_V1': small_cnn has no named "
                                   r"weights; give a state-dict path, or none"),
    ("resnet18", "{tmp}/missing.pt", r"model_weights '.*missing.pt': no such file"),
    ("resnet18", "{tmp}/garbage.pt", r"model_weights '.*garbage.pt': not a readable state dict"),
    ("resnet18", "{tmp}/cnn.pt", r"model_weights '.*cnn.pt': no tensor matches resnet18"),
    ("resnet50", "{tmp}/r18.pt", r"model_weights '.*r18.pt': \d+ of \d+ tensors of resnet50 are "
                                 r"missing or of another shape \(first: .*\); is it a state "
                                 r"dict of another architecture\?"),
])
def test_bad_weights_fail_at_indexing_in_one_line(tmp_path, hub, no_network, model_name, value,
                                                  message):
    dataset(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save(SmallCNN(3).state_dict(), tmp_path / "cnn.pt")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    size = 224 if model_name == "vit_b_16" else 32
    cfg = tiny_config(tmp_path / "data", tmp_path / "work", model_name=model_name,
                      image_size=size, model_weights=value.format(tmp=tmp_path))
    with pytest.raises(ConfigError, match=message) as err:
        prepare_run(cfg, "bad")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "work" / "runs" / "bad" / "manifest.parquet").exists()


def test_a_state_dict_with_another_class_count_reinitialises_the_head(tmp_path, no_network,
                                                                      caplog):
    donor = torchvision.models.resnet18(num_classes=10)
    torch.save(donor.state_dict(), tmp_path / "ten.pt")
    with caplog.at_level("INFO", logger="tasks.models"):
        model = build_model("resnet18", 3, str(tmp_path / "ten.pt"))
    assert model.fc.out_features == 3
    assert torch.equal(model.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert "left at init (fc.bias, fc.weight)" in caplog.text


def test_weights_for_another_image_size_are_refused_up_front(tmp_path, hub, no_network):
    """vit_b_16's SWAG_E2E weights take exactly 384 px: 224 is a ConfigError before anything
    is read or downloaded."""
    dataset(tmp_path)
    cfg = tiny_config(tmp_path / "data", tmp_path / "work", model_name="vit_b_16",
                      image_size=224, model_weights="IMAGENET1K_SWAG_E2E_V1")
    with pytest.raises(ConfigError, match=r"image_size 224 does not fit model_weights "
                                          r"'IMAGENET1K_SWAG_E2E_V1' of vit_b_16, which take "
                                          r"exactly 384 px; set image_size: 384"):
        prepare_run(cfg, "vit")


def test_stage_command_line(tmp_path, hub, no_network):
    dataset(tmp_path)
    torch.save(torchvision.models.resnet18().state_dict(), hub / RESNET18_FILE)
    cfg = cfg_for(tmp_path, model_name="resnet18", model_weights="none")
    run = prepare_run(cfg, "cli")
    from tasks import runs

    runs.write_config(run, cfg.model_copy(update={"model_weights": "IMAGENET1K_V1"}))
    assert tw.main(["--run", run]) == 0
    assert (Path(run) / "weights" / "resnet18-IMAGENET1K_V1.pt").is_file()


def test_a_dns_lookup_that_hangs_is_cut_by_the_connect_bound(tmp_path, hub, monkeypatch):
    """Name lookup is not bounded by socket timeouts: the probe's thread is."""
    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(60)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(tw, "CONNECT_TIMEOUT_S", 1.0)
    dataset(tmp_path)
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"cannot download resnet18 weights IMAGENET1K_V1 "
                                              r".*\(no connection to download.pytorch.org:443 "
                                              r"within 1s\)"):
            prepare_run(cfg_for(tmp_path, model_name="resnet18"), "dns")
    finally:
        release.set()
    assert time.perf_counter() - t0 < 10


def test_weights_in_a_bucket_are_staged_in_the_bucket_run(s3, tmp_path):
    """A state dict at s3:// for a run in the bucket: the trainer side fetches the run's copy
    into the local cache and checks its sha256."""
    from tasks import storage

    local = dataset(tmp_path)
    for path in sorted(local.rglob("*.png")):
        storage.write_bytes(f"{s3.root}/ds/{path.relative_to(local).as_posix()}",
                            path.read_bytes())
    buf = io.BytesIO()
    torch.save(SmallCNN(4).state_dict(), buf)
    storage.write_bytes(f"{s3.root}/init/cnn.pt", buf.getvalue())
    cfg = tiny_config(f"{s3.root}/ds", f"{s3.root}/work", model_weights=f"{s3.root}/init/cnn.pt")
    run = prepare_run(cfg, "bucket")
    assert run.startswith("s3://")
    assert storage.read_bytes(f"{run}/weights/small_cnn-cnn.pt") == buf.getvalue()
    record = json.loads(storage.read_text(tw.record_uri(run)))
    assert record["source"] == f"{s3.root}/init/cnn.pt" and record["file"] == "small_cnn-cnn.pt"
    path = tw.staged_weights(cfg, run)
    assert Path(path).read_bytes() == buf.getvalue() and str(s3.cache) in path


# --- no torchvision where the index step runs (the Airflow image of the Kubernetes runner) ----

@contextlib.contextmanager
def no_torch(monkeypatch) -> Iterator[None]:
    """torch and torchvision look uninstalled to find_spec, as in the Airflow image."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in ("torch", "torchvision") else \
            real(name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", find_spec)
        yield


def test_the_weights_names_table_is_torchvisions():
    from tasks.config import MODEL_NAMES

    assert set(tw.WEIGHTS_NAMES) == set(MODEL_NAMES) - {"small_cnn"}
    for model_name, names in tw.WEIGHTS_NAMES.items():
        enum = torchvision.models.get_model_weights(model_name)
        assert names == tuple(w.name for w in enum), model_name


def test_without_torchvision_the_stage_weights_pod_stages_a_weights_name(
        tmp_path, hub, no_network, monkeypatch, caplog):
    from tasks import airflow_adapter as acl

    dataset(tmp_path)
    cfg = cfg_for(tmp_path, model_name="resnet18")  # model_weights null: DEFAULT
    staged = Path(tmp_path / "work" / "runs" / "k8s" / "weights" / "resnet18-IMAGENET1K_V1.pt")
    with no_torch(monkeypatch):
        # The local runner's index step cannot stage them: one line saying how.
        with pytest.raises(ConfigError, match=r"model_weights 'DEFAULT': staging torchvision "
                                              r"weights needs torch and torchvision"):
            prepare_run(cfg, "k8s")
        # The Kubernetes runner's index step leaves them to the pod, and says so.
        with caplog.at_level("INFO", logger="tasks.weights"):
            run = prepare_run(cfg, "k8s", defer_weights=True)
        assert "model_weights 'DEFAULT': torch and torchvision are not installed here; the " \
               "stage_weights pod stages the resnet18 weights into" in caplog.text
        assert not Path(tw.record_uri(run)).exists()
        (pod,) = acl.plan_weights_kwargs(run)
        assert pod["arguments"] == ["-m", "tasks.weights", "--run", run]
        # A trainer started without them fails in one line, naming the way out.
        with pytest.raises(ConfigError, match=r"model_weights 'DEFAULT': run .* has no staged "
                                              r"weights for resnet18 .*the stage_weights pod\) "
                                              r"stages them") as err:
            tw.staged_weights(cfg, run)
        assert "\n" not in str(err.value)
        # An unknown name is refused at indexing all the same, in torchvision's own words.
        bad = cfg.model_copy(update={"model_weights": "IMAGENET9K"})
        with pytest.raises(ConfigError, match=r"^model_weights 'IMAGENET9K' is not a weights "
                                              r"name of resnet18; choose one of DEFAULT, "
                                              r"IMAGENET1K_V1, none \(random init\), or give a "
                                              r"state-dict path$"):
            prepare_run(bad, "k8s-bad", defer_weights=True)

    # The pod (the trainer image: torch is there) stages them; the plan has no pod left.
    torch.save(torchvision.models.resnet18().state_dict(), hub / RESNET18_FILE)
    assert tw.main(["--run", run]) == 0
    assert tw.staged_weights(cfg, run) == str(staged)
    assert acl.plan_weights_kwargs(run) == []
    with no_torch(monkeypatch):
        prepare_run(cfg, "k8s", defer_weights=True)  # a resumed run: still nothing to stage
        assert acl.plan_weights_kwargs(run) == []
        # A damaged copy: the index step drops its record, so the pod runs and restages it.
        staged.write_bytes(b"damaged")
        prepare_run(cfg, "k8s", defer_weights=True)
        assert len(acl.plan_weights_kwargs(run)) == 1


@pytest.mark.parametrize(("model_name", "value"), [
    ("small_cnn", None), ("resnet18", "none"), ("resnet18", "{tmp}/init.pt")])
def test_without_torchvision_no_pod_when_nothing_is_left_to_stage(
        tmp_path, no_network, monkeypatch, model_name, value):
    from tasks import airflow_adapter as acl

    dataset(tmp_path)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "init.pt")
    cfg = cfg_for(tmp_path, model_name=model_name,
                  model_weights=value and value.format(tmp=tmp_path))
    with no_torch(monkeypatch):
        run = prepare_run(cfg, "nothing", defer_weights=True)  # a state dict is staged here
        assert acl.plan_weights_kwargs(run) == []
    assert tw.staged_weights(cfg, run) == (
        None if cfg.weights_request is None else str(Path(run) / "weights" / "resnet18-init.pt"))
