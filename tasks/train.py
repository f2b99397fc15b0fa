"""Train one repeat and write its out-of-sample predictions as a shard.

The one trainer entrypoint, the same in a Kubernetes pod and in a local subprocess:

    python -m tasks.train --run <run uri> --repeat <r>

It reads config.json and the manifest from the run folder, trains on the repeat's train
part (early stopping on its validation part), predicts its held-out part and writes
`shards/repeat-<r>.parquet` atomically. A shard that exists with the same fingerprint
makes the call a no-op, so retries are safe.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from tasks import images, runs, shards, storage
from tasks.config import AuditConfig, ConfigError, weights_path_like
from tasks.errors import UserError, run_step
from tasks.ffcv_data import FfcvBatches, build_beton, require_ffcv
from tasks.index import read_manifest
from tasks.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    check_image_size,
    config_transform,
    head_names,
    weights_entry,
)
from tasks.plan import RepeatSpec, Split, plan_repeats, split_for_repeat
from tasks.weights import staged_weights

log = logging.getLogger("tasks.train")

IN_MEMORY_BUDGET = 4 << 30  # decoded uint8 images up to this size are kept in RAM
ONE_CYCLE_WARMUP = 0.25  # share of all steps spent raising the learning rate
FINETUNE_WARMUP = 0.05  # finetune recipe: share of all steps of linear warm-up


# --- images -----------------------------------------------------------------------------

def load_images(paths: list[str], prep: images.Preprocess | int, workers: int) -> torch.Tensor:
    """Decode files into one uint8 tensor N x 3 x size x size (`prep`: a model's
    preprocessing, or a size for a whole-image resize)."""
    prep = prep if isinstance(prep, images.Preprocess) else images.Preprocess(prep)
    size = prep.crop
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(lambda p: images.decode_for(p, prep), paths, chunksize=64)
        for i, arr in enumerate(decoded):
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return out


class Batches:
    """uint8 image batches with labels and row positions, from memory or streamed from files.
    Augmentation and normalisation happen afterwards, on the batch, on the training device."""

    def __init__(self, paths: list[str], labels: np.ndarray, cfg: AuditConfig,
                 in_memory: bool | None = None) -> None:
        self.paths, self.labels, self.cfg = paths, labels, cfg
        self.prep = config_transform(cfg)
        size = self.prep.crop
        decoded = len(paths) * 3 * size**2
        self.in_memory = decoded <= IN_MEMORY_BUDGET if in_memory is None else in_memory
        self.images: torch.Tensor | None = None
        if self.in_memory:
            t0 = time.perf_counter()
            self.images = load_images(paths, self.prep, max(cfg.num_workers, 2))
            log.info("decoded %d images to %dx%d in %.1fs (%.0f MiB in memory)", len(paths),
                     size, size, time.perf_counter() - t0, decoded / 2**20)

    def iterate(self, rows: np.ndarray, shuffle: bool, generator: torch.Generator,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield (images uint8 Bx3xHxW, labels, row positions) over `rows`."""
        bs = self.cfg.batch_size
        order = rows[torch.randperm(len(rows), generator=generator).numpy()] if shuffle else rows
        if self.images is not None:
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                yield self.images[idx], torch.from_numpy(self.labels[idx]).long(), idx
            return
        # Streamed from files, for datasets too large to keep decoded in memory.
        ds = images.FileImages([self.paths[i] for i in order], self.labels[order], self.prep)
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False,
                                             num_workers=self.cfg.num_workers,
                                             persistent_workers=False)
        for x, y, local in loader:  # x is B x H x W x 3
            yield x.permute(0, 3, 1, 2), y.long(), order[local.numpy()]


class Augment(nn.Module):
    """uint8 batch -> normalised float batch (with the model's `mean` and `std`); in training
    mode a random shift of up to size/16 pixels (crop of the reflect-padded image) and/or a
    horizontal flip, as `mode` says. Runs on the training device."""

    def __init__(self, size: int, mode: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.pad = max(1, size // 16) if "crop" in mode else 0
        self.flip = "flip" in mode
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    @classmethod
    def for_config(cls, cfg: AuditConfig) -> Augment:
        """The augmentation and normalisation of `cfg`'s model at its image size."""
        prep = config_transform(cfg)
        return cls(prep.crop, cfg.augment, prep.mean, prep.std)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                flip_all: bool = False) -> torch.Tensor:
        x = x.float()
        if self.training and self.pad:
            b, _, h, w = x.shape
            p = self.pad
            xp = F.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator).to(x.device)
            iy = (dy + torch.arange(h, device=x.device))[:, None, :, None]
            ix = (dx + torch.arange(w, device=x.device))[:, None, None, :]
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(3, device=x.device)[None, :, None, None]
            x = xp[bi, ci, iy, ix]
        if self.training and self.flip:  # with or without the shift
            mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        if flip_all:
            x = x.flip(3)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


# --- training ---------------------------------------------------------------------------

def pick_device(cfg: AuditConfig) -> torch.device:
    """CUDA when asked for or available under `auto`; a clear error when asked but absent."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA GPU is visible to this process; set "
                          "device: cpu or auto, or run where a GPU is visible")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict(model: nn.Module, augment: Augment, batches: Batches | FfcvBatches,
            rows: np.ndarray, device: torch.device, tta_flip: bool) -> np.ndarray:
    """Softmax probabilities for `rows`, in the order of `rows`; with `tta_flip` the mean over
    the image and its mirror."""
    model.eval()
    augment.eval()
    out = np.zeros((len(rows), 0), dtype=np.float32)
    parts, positions = [], []
    pos_of = {int(r): i for i, r in enumerate(rows)}
    for x, _, idx in batches.iterate(rows, shuffle=False, generator=torch.Generator()):
        x = x.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(augment(x)).float()
            probs = logits.softmax(1)
            if tta_flip:
                probs = (probs + model(augment(x, flip_all=True)).float().softmax(1)) / 2
        parts.append(probs.cpu().numpy())
        positions.extend(pos_of[int(i)] for i in idx)
    out = np.concatenate(parts)
    result = np.empty_like(out)
    result[np.asarray(positions)] = out
    return result


def parameter_groups(model: nn.Module, cfg: AuditConfig) -> list[dict]:
    """Optimiser parameter groups: one at `learning_rate` for the scratch recipe; for the
    finetune recipe the backbone at learning_rate x backbone_lr_mult and the head (the final
    linear layer, new for the run's classes) at learning_rate."""
    if not cfg.fine_tunes:
        return [{"params": list(model.parameters()), "lr": cfg.learning_rate, "name": "all"}]
    head = set(head_names(model))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in head], "name": "backbone",
         "lr": cfg.learning_rate * cfg.backbone_lr_mult},
        {"params": [p for n, p in named if n in head], "name": "head", "lr": cfg.learning_rate},
    ]


def finetune_factor(step: int, total: int) -> float:
    """The finetune schedule's multiplier at `step` of `total`: a linear warm-up over the
    first FINETUNE_WARMUP of the steps (at least one), then a cosine decay towards 0."""
    warm = max(1, round(FINETUNE_WARMUP * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def make_optimiser(model: nn.Module, cfg: AuditConfig, steps_per_epoch: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer,
                                                  torch.optim.lr_scheduler.LRScheduler,
                                                  torch.amp.GradScaler]:
    """SGD with Nesterov momentum over `parameter_groups`, and a grad scaler (active only for
    float16 autocast on CUDA). Scratch recipe: a one-cycle schedule over all epochs (a linear
    decay from `learning_rate` when there are too few steps for a warm-up). Finetune recipe:
    `finetune_factor` applied to each group's learning rate."""
    opt = torch.optim.SGD(parameter_groups(model, cfg), lr=cfg.learning_rate, momentum=0.9,
                          nesterov=True, weight_decay=cfg.weight_decay)
    total = max(1, cfg.num_epochs * steps_per_epoch)
    sched: torch.optim.lr_scheduler.LRScheduler
    if cfg.fine_tunes:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: finetune_factor(step, total))
    elif total * ONE_CYCLE_WARMUP >= 2:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate,
                                                    total_steps=total,
                                                    pct_start=ONE_CYCLE_WARMUP)
    else:  # OneCycleLR needs two warm-up steps: with fewer it divides by zero or trains at 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and
                                  not torch.cuda.is_bf16_supported())
    return opt, sched, scaler


def train_epoch(model: nn.Module, augment: Augment, batches: Batches | FfcvBatches,
                rows: np.ndarray, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                device: torch.device, gen: torch.Generator) -> tuple[int, float, int]:
    """One pass over `rows` in random order; returns (images seen, summed loss, correct).
    Loss and accuracy stay on the device until the end, so no step waits for the GPU."""
    model.train()
    augment.train()
    seen = 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y, _ in batches.iterate(rows, shuffle=True, generator=gen):
        if len(y) == 1 and batches.cfg.batch_size > 1:
            # A last batch of one image: BatchNorm cannot train on one value per channel
            # (the 1x1 maps of resnet18/efficientnet at small sizes). Rows are shuffled, so
            # a different image sits out each epoch.
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(augment(x, generator=gen))
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        seen += len(y)
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return seen, float(loss_sum), int(correct)


def fit_model(cfg: AuditConfig, spec: RepeatSpec, split: Split,
              batches: Batches | FfcvBatches, num_classes: int, weights: str | None = None,
              ) -> tuple[nn.Module, dict[str, float]]:
    """Fit one model on `split.train`, starting from the local state-dict file `weights`
    (`run_repeat` passes the run's staged weights, runs a whole repeat and writes its shard);
    returns the best model (by validation accuracy when tracked) and its stats."""
    device = pick_device(cfg)
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    model = build_model(cfg.model_name, num_classes, weights, cfg.input_size,
                        label=cfg.weights_request)
    model = model.to(device, memory_format=torch.channels_last)
    augment = Augment.for_config(cfg).to(device)
    steps = max(1, -(-len(split.train) // cfg.batch_size))
    opt, sched, scaler = make_optimiser(model, cfg, steps, device)
    if cfg.fine_tunes:
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        log.info("%s recipe finetune: head lr %g, backbone lr %g, %d warm-up steps of %d, "
                 "cosine decay", spec.label, lrs["head"], lrs["backbone"],
                 max(1, round(FINETUNE_WARMUP * cfg.num_epochs * steps)),
                 cfg.num_epochs * steps)
    best_acc, best_state, best_epoch, stale = -1.0, None, 0, 0
    stats: dict[str, float] = {}
    for epoch in range(1, cfg.num_epochs + 1):
        t0 = time.perf_counter()
        seen, loss_sum, correct = train_epoch(model, augment, batches, split.train, opt, sched,
                                              scaler, device, gen)
        rate = seen / (time.perf_counter() - t0)
        line = (f"{spec.label} epoch {epoch}/{cfg.num_epochs} loss {loss_sum / seen:.3f} "
                f"train acc {correct / seen:.3f} {rate:,.0f} img/s")
        stats = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if cfg.track_eval and len(split.val):
            probs = predict(model, augment, batches, split.val, device, tta_flip=False)
            val_acc = float((probs.argmax(1) == batches.labels[split.val]).mean())
            line += f" val acc {val_acc:.3f}"
            if val_acc > best_acc:
                best_acc, best_epoch, stale = val_acc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        log.info(line)
        if cfg.track_eval and stale >= cfg.patience:
            log.info("%s stopping early: no val improvement for %d epochs (best %.3f at epoch %d)",
                     spec.label, stale, best_acc, best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
        stats.update(best_epoch=best_epoch, val_acc=best_acc)
    return model, stats


# --- the entrypoint -----------------------------------------------------------------------

class RepeatError(UserError, ValueError):
    """A repeat number the run does not have."""


def check_training(cfg: AuditConfig) -> None:
    """What a trainer would fail on at once, checked before an audit indexes or trains: the
    device exists, a `model_weights` path exists and loads as a state dict of `model_name`,
    a weights name is one of the model's and fits `image_size`. Nothing is downloaded here
    (`tasks.weights.resolve_weights` does that, at indexing)."""
    pick_device(cfg)
    request = cfg.weights_request
    if request is None:
        return
    if weights_path_like(request):
        if not storage.exists(request):
            raise ConfigError(f"model_weights {request!r}: no such file")
        # the head's shape does not matter
        build_model(cfg.model_name, 2, storage.local_path(request), cfg.input_size,
                    label=request)
    else:
        check_image_size(cfg.model_name, cfg.input_size,
                         weights_entry(cfg.model_name, request).name)


def run_repeat(run: str, repeat: int, force: bool = False) -> str:
    """Train repeat `repeat` of the run at `run` and write its shard; returns the shard URI."""
    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    specs = plan_repeats(cfg)
    if not 0 <= repeat < len(specs):
        raise RepeatError(f"repeat {repeat} is out of range: the run has 0..{len(specs) - 1}")
    spec = specs[repeat]
    out = runs.shard_uri(run, repeat)
    fingerprint = shards.shard_fingerprint(cfg, manifest, spec)
    if not force and shards.existing_fingerprint(out) == fingerprint:
        log.info("%s already done: %s", spec.label, out)
        return out
    labels = manifest["label_idx"].to_numpy(np.int64)
    split = split_for_repeat(cfg, spec, labels)
    log.info("%s: %d train / %d val / %d test images, %d classes, model %s on %s",
             spec.label, len(split.train), len(split.val), len(split.test), len(classes),
             cfg.model_name, pick_device(cfg))
    t0 = time.perf_counter()
    weights = staged_weights(cfg, run)
    batches = make_batches(cfg, run, manifest, labels)
    model, stats = fit_model(cfg, spec, split, batches, len(classes), weights)
    augment = Augment.for_config(cfg).to(pick_device(cfg))
    probs = predict(model, augment, batches, split.test, pick_device(cfg),
                    tta_flip="flip" in cfg.augment)
    test_acc = float((probs.argmax(1) == labels[split.test]).mean())
    stats.update(test_agreement=test_acc, seconds=time.perf_counter() - t0)
    table = shards.shard_table(manifest["id"].to_numpy()[split.test], labels[split.test],
                               probs, spec, fingerprint, stats)
    shards.write_shard(out, table)
    log.info("%s done in %.0fs: held-out agreement with given labels %.3f; wrote %s",
             spec.label, stats["seconds"], test_acc, out)
    return out


def make_batches(cfg: AuditConfig, run: str, manifest: pd.DataFrame,
                 labels: np.ndarray) -> Batches | FfcvBatches:
    """The batch source for a run: with `ffcv` the run's .beton (built here if `prepare_run`
    did not; fetched into the local cache from object storage), else decoded images
    from the dataset files (fetched into the local cache when in object storage)."""
    if cfg.ffcv:
        require_ffcv()
        uri = build_beton(run, cfg, manifest)  # a no-op when prepare_run built it
        t0 = time.perf_counter()
        path = storage.local_path(uri)
        if storage.is_s3(uri):
            log.info("fetched %s into the local cache in %.1fs", uri, time.perf_counter() - t0)
        return FfcvBatches(path, labels, cfg, device=pick_device(cfg))
    uris = [storage.join(cfg.data_path, k) for k in manifest["key"]]
    t0 = time.perf_counter()
    # The manifest's ETags pin the version indexed: the cache is keyed by them, and an
    # object changed since is an error instead of training on a different image.
    etags = manifest["etag"].astype(str).tolist() if storage.is_s3(cfg.data_path) else None
    paths = storage.fetch_many(uris, etags)
    if storage.is_s3(cfg.data_path):
        log.info("fetched %d images into the local cache in %.1fs", len(paths),
                 time.perf_counter() - t0)
    return Batches(paths, labels, cfg)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tasks.train --run URI --repeat R [--force]."""
    parser = argparse.ArgumentParser(prog="python -m tasks.train",
                                     description="Train one repeat and write its shard.")
    parser.add_argument("--run", required=True, help="run folder URI (local or s3://)")
    parser.add_argument("--repeat", required=True, type=int, help="repeat number, from 0")
    parser.add_argument("--force", action="store_true", help="retrain even if the shard exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    return run_step(lambda: run_repeat(args.run, args.repeat, force=args.force),
                    f"repeat {args.repeat}", log, "its shard was not written")


if __name__ == "__main__":
    sys.exit(main())
