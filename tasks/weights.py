"""Initial weights, resolved once per run: `resolve_weights` (the index step) stages them in
the run folder, `staged_weights` (every trainer, pod or subprocess) loads them from there.

What `model_weights` asks for (`AuditConfig.weights_request`):
- a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...; null means DEFAULT for a
  torchvision model): taken from the torch hub cache (`$TORCH_HOME/hub/checkpoints/`), and
  downloaded there first through torchvision's own `weights.get_state_dict` when missing;
- a local path or s3:// URI of a state dict;
- none (or null for small_cnn): random initialisation, nothing staged.

The staged file is `<run>/weights/<model>-<name>.pt` (a byte copy of the checkpoint) and
its record `<run>/weights/weights.json` holds what was asked for, where it came from, its
sha256 and size: the one place a trainer looks. A resumed run whose record matches and
whose file has the recorded sha256 fetches nothing. Without network access a download fails
within about CONNECT_TIMEOUT_S (DOWNLOAD_TIMEOUT_S when a connection stalls) with one line
naming model_weights, the weights and how to stage a file by hand.

Where torch and torchvision are not installed (the Airflow image of the Kubernetes runner)
the index step stages a state dict only; a torchvision weights name is checked against
`WEIGHTS_NAMES` and left to the DAG's stage_weights pod (`pending_stage`), which runs the
command below in the trainer image.

    python -m tasks.weights --run <run uri>    # stage a run's weights (what the index step does)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.config import AuditConfig, ConfigError, unknown_weights_name, weights_path_like

log = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
RECORD_NAME = "weights.json"
CONNECT_TIMEOUT_S = 10.0  # reaching the download host (or proxy), DNS included
DOWNLOAD_TIMEOUT_S = 30.0  # any one socket operation of the download itself
# Each torchvision model's weights names (DEFAULT aside), so that a process without
# torchvision can refuse an unknown name at indexing (tests/test_weights.py checks it against
# torchvision; this module stays torch-free).
WEIGHTS_NAMES = {
    "resnet18": ("IMAGENET1K_V1",),
    "resnet50": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "convnext_tiny": ("IMAGENET1K_V1",),
    "vit_b_16": ("IMAGENET1K_V1", "IMAGENET1K_SWAG_E2E_V1", "IMAGENET1K_SWAG_LINEAR_V1"),
    "efficientnet_v2_s": ("IMAGENET1K_V1",),
    "alexnet": ("IMAGENET1K_V1",),
}


def record_uri(run: str) -> str:
    """`<run>/weights/weights.json`: what was staged for the run."""
    return storage.join(run, WEIGHTS_DIR, RECORD_NAME)


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_record(run: str) -> dict[str, Any] | None:
    uri = record_uri(run)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_text(uri))
    except ValueError:
        return None  # a damaged record is restaged
    return record if isinstance(record, dict) else None


def _matches(record: dict[str, Any] | None, cfg: AuditConfig) -> bool:
    return bool(record) and record.get("model_name") == cfg.model_name and \
        record.get("model_weights") == cfg.weights_request


def _intact(run: str, record: dict[str, Any]) -> str | None:
    """The local path of the staged file when it has the recorded sha256, else None."""
    uri = storage.join(run, WEIGHTS_DIR, str(record.get("file", "")))
    if not record.get("file") or not storage.exists(uri):
        return None
    path = storage.local_path(uri)
    return path if file_sha256(path) == record.get("sha256") else None


def _torch_here() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))


def _check_loads(cfg: AuditConfig, path: str) -> None:
    """The file is a state dict that fits `model_name` (the head may differ), checked where
    torch is installed, so a wrong file fails at indexing, not in every trainer."""
    if importlib.util.find_spec("torch") is None:
        return
    from tasks.models import build_model

    build_model(cfg.model_name, 2, path, cfg.input_size, label=cfg.weights_request)


def _stage(run: str, cfg: AuditConfig, path: str, name: str, source: str,
           weights: str | None) -> str:
    """Copy the local file `path` to `<run>/weights/<name>` and write its record."""
    digest = file_sha256(path)
    uri = storage.join(run, WEIGHTS_DIR, name)
    if storage.is_s3(uri):
        storage.write_bytes(uri, Path(path).read_bytes())
    else:  # a local copy, then an atomic rename: a reader never sees half a file
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(uri).parent, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, uri)
        finally:
            Path(tmp).unlink(missing_ok=True)
    record = {"model_name": cfg.model_name, "model_weights": cfg.weights_request,
              "weights": weights, "source": source, "file": name, "sha256": digest,
              "bytes": os.path.getsize(path)}
    storage.write_text(record_uri(run), json.dumps(record, indent=2))
    log.info("staged %s weights %s from %s into %s (sha256 %s, %.1f MiB)", cfg.model_name,
             weights or name, source, uri, digest[:12], record["bytes"] / 2**20)
    return uri


def resolve_weights(cfg: AuditConfig, run: str, defer_torchvision: bool = False) -> str | None:
    """Stage the weights `cfg` asks for in the run folder, once; returns the URI of the staged
    file, or None for random initialisation. ConfigError (one line) when they cannot be had.
    `defer_torchvision` (the Kubernetes runner's index step): where torch or torchvision is
    missing, a torchvision weights name is only checked by name and left to the stage_weights
    pod (None is returned; `pending_stage` then says so)."""
    request = cfg.weights_request
    if request is None:
        return None
    record = _read_record(run)
    path = None
    if weights_path_like(request):
        if not storage.exists(request):
            raise ConfigError(f"model_weights {request!r}: no such file")
        path = storage.local_path(request)
        if record is not None and record.get("sha256") != file_sha256(path):
            record = None  # the file changed since it was staged
    if _matches(record, cfg) and record is not None and _intact(run, record):
        uri = storage.join(run, WEIGHTS_DIR, record["file"])
        log.info("weights already staged: %s (sha256 %s)", uri, record["sha256"][:12])
        return uri
    if path is not None:
        _check_loads(cfg, path)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(storage.basename(request)).stem) or "file"
        return _stage(run, cfg, path, f"{cfg.model_name}-{stem}.pt", request, None)
    if cfg.model_name == "small_cnn" or _torch_here():
        return _stage_torchvision(cfg, run, request)
    if defer_torchvision:
        if request != "DEFAULT" and request not in WEIGHTS_NAMES[cfg.model_name]:
            raise unknown_weights_name(cfg.model_name, request,
                                       list(WEIGHTS_NAMES[cfg.model_name]))
        storage.delete(record_uri(run))  # a stale or damaged copy: the pod restages it
        log.info("model_weights %r: torch and torchvision are not installed here; the "
                 "stage_weights pod stages the %s weights into %s", request, cfg.model_name,
                 storage.join(run, WEIGHTS_DIR))
        return None
    raise ConfigError(
        f"model_weights {request!r}: staging torchvision weights needs torch and torchvision, "
        "which this process lacks (e.g. the Airflow image of the Kubernetes runner); run "
        f"`python -m tasks.weights --run {run}` in the trainer image, or set model_weights "
        "to an s3:// URI of a state dict")


def pending_stage(cfg: AuditConfig, run: str) -> bool:
    """Whether `cfg` asks for torchvision weights that the run folder does not hold (the index
    step left them to the stage_weights pod). Cheap: the record and the file's presence; the
    pod and the trainers check its sha256."""
    request = cfg.weights_request
    if request is None or weights_path_like(request) or cfg.model_name == "small_cnn":
        return False  # nothing to stage, or staged (or refused) by the index step itself
    record = _read_record(run)
    return not (_matches(record, cfg) and record is not None and record.get("file") and
                storage.exists(storage.join(run, WEIGHTS_DIR, str(record["file"]))))


def hub_checkpoint(entry: Any) -> Path:
    """Where torch hub keeps (or would download) a torchvision weights entry's file."""
    import torch

    name = Path(urllib.parse.urlparse(entry.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _stage_torchvision(cfg: AuditConfig, run: str, request: str) -> str:
    from tasks.models import check_image_size, weights_entry

    entry = weights_entry(cfg.model_name, request)
    check_image_size(cfg.model_name, cfg.input_size, entry.name)
    cached = hub_checkpoint(entry)
    if cached.is_file():
        log.info("%s weights %s found in the torch hub cache: %s", cfg.model_name, entry.name,
                 cached)
    else:
        download(entry, cfg.model_name, request, cached)
    try:
        _check_loads(cfg, str(cached))
    except ConfigError as err:
        raise ConfigError(f"{err} (the torch hub cache file {cached}; delete it to download "
                          "it again)") from None
    return _stage(run, cfg, str(cached), f"{cfg.model_name}-{entry.name}.pt", entry.url,
                  entry.name)


def _probe_target(url: str) -> tuple[str, int]:
    """The host and port a download of `url` connects to first: the proxy when one is set."""
    parts = urllib.parse.urlparse(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _probe(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the download host (or proxy) opens within `timeout`
    seconds, name lookup included; else why not. Runs in a thread so a hanging DNS lookup
    cannot outlast the bound."""
    host, port = _probe_target(url)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{type(err).__name__}: {err}")

    worker = threading.Thread(target=connect, name="weights-probe", daemon=True)
    worker.start()
    worker.join(timeout + 1)
    if not outcome:
        return f"no connection to {host}:{port} within {timeout:.0f}s"
    return outcome[0]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens its connection without a timeout: bound every socket operation."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def download(entry: Any, model_name: str, request: str, cached: Path) -> None:
    """Download a torchvision weights entry into the torch hub cache through torchvision
    (`get_state_dict`, which also checks the file's hash), bounded in time; ConfigError with
    one line saying how to stage the file by hand when it fails."""
    why = _probe(entry.url, CONNECT_TIMEOUT_S)
    if why is None:
        log.info("downloading %s weights %s from %s into %s", model_name, entry.name,
                 entry.url, cached.parent)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                entry.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, a timeout, a hash mismatch: all end the same way
            why = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        else:
            if cached.is_file():
                return
            why = f"torch hub did not leave {cached.name} in {cached.parent}"
    raise ConfigError(
        f"model_weights {request!r}: cannot download {model_name} weights {entry.name} from "
        f"{entry.url} ({why}); without network access, stage them by hand: put "
        f"{cached.name} at {cached} (the torch hub cache, under TORCH_HOME), or set "
        "model_weights to the path or s3:// URI of that file or of any state dict")


def staged_weights(cfg: AuditConfig, run: str) -> str | None:
    """Trainer side: the local path of the run's staged weights (fetched from the run folder
    into the local cache for s3://, its sha256 checked), or None for random initialisation.
    Never touches the network or the torch hub cache."""
    if cfg.weights_request is None:
        return None
    record = _read_record(run)
    if not _matches(record, cfg) or record is None:
        raise ConfigError(
            f"model_weights {cfg.weights_request!r}: run {run} has no staged weights for "
            f"{cfg.model_name} ({record_uri(run)} is missing or names others); the index step "
            "(with the Kubernetes runner, the stage_weights pod) stages them: run the audit "
            f"again, or `python -m tasks.weights --run {run}`")
    path = _intact(run, record)
    if path is None:
        raise ConfigError(
            f"model_weights {cfg.weights_request!r}: the staged file "
            f"{storage.join(run, WEIGHTS_DIR, str(record.get('file')))} is missing or its "
            f"sha256 is not {str(record.get('sha256'))[:12]}...; run `python -m tasks.weights "
            f"--run {run}` (or the audit) again to restage it")
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tasks.weights --run URI (stage the run's weights)."""
    import argparse
    import sys

    from tasks import runs
    from tasks.errors import USER_ERROR_EXIT, UserError

    parser = argparse.ArgumentParser(prog="python -m tasks.weights",
                                     description="Stage a run's initial weights.")
    parser.add_argument("--run", required=True, help="run folder URI (local or s3://)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        uri = resolve_weights(runs.read_config(args.run), args.run)
    except UserError as err:
        log.error("staging weights failed: %s: %s", type(err).__name__, err)
        return USER_ERROR_EXIT
    log.info("weights: %s", uri or "none (random initialisation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
