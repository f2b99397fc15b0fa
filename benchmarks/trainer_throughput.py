"""Trainer throughput: the same training loop fed by three batch sources.

(a) plain: the PyTorch DataLoader decoding image files (the streaming path of
    `tasks.train.Batches`, forced with in_memory=False);
(b) ffcv: `tasks.ffcv_data.FfcvBatches` reading the run's .beton;
(c) memory: decoded uint8 tensors already in RAM (`Batches(in_memory=True)`), the upper
    bound for any loader.

Each source trains a fresh model with `tasks.train.train_epoch` (the trainer's own loop:
augmentation and normalisation on the device, SGD, one-cycle schedule). One untimed warm-up
epoch per source absorbs one-off costs (FFCV's JIT compile, worker start-up), then
`--epochs` epochs are timed per round; the sources take turns for `--rounds` rounds and
medians are reported, the ratios as the median of per-round ratios, which damps noise from
other work on a shared machine. Also printed: loader-only rates (batches drawn, no
training) and the time to build the .beton per 10k images.

    python -m benchmarks.trainer_throughput --n 4000 --rounds 3
    python -m benchmarks.trainer_throughput --device cuda --image-size 224 \\
        --model efficientnet_v2_s --n 20000 --batch-size 256 --num-workers 8

(run from the repository root, so `tasks` is this checkout's package).

Without --data it samples `--n` Fashion-MNIST images (as `python -m tasks sample`) into a
temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks import runs
from tasks.config import MODEL_NAMES, AuditConfig, ffcv_installed
from tasks.ffcv_data import FfcvBatches, build_beton
from tasks.index import index_dataset, write_index
from tasks.models import build_model
from tasks.train import Augment, Batches, make_optimiser, pick_device, train_epoch

SOURCES = {"plain": "(a) plain PyTorch loader from image files",
           "ffcv": "(b) FFCV loader from the .beton",
           "memory": "(c) tensors already in memory"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="images to sample (without --data)")
    p.add_argument("--data", help="an existing class-folder dataset instead of a sample")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes for (a), FFCV threads for (b)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per source and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="the sources take turns this often; medians are reported")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--sources", default="plain,ffcv,memory",
                   help=f"comma-separated subset of {','.join(SOURCES)}")
    p.add_argument("--batches-ahead", type=int, default=3, help="FFCV batches prepared ahead")
    p.add_argument("--no-os-cache", action="store_true",
                   help="FFCV: read the .beton into process memory instead of the OS page cache")
    p.add_argument("--work", help="folder for the sample and the run (default: a temp folder)")
    return p.parse_args(argv)


def loader_rate(batches, rows: np.ndarray, device: torch.device) -> float:
    """Images/s of drawing one shuffled epoch of batches onto the device, without training."""
    gen = torch.Generator().manual_seed(1)
    t0, seen = time.perf_counter(), 0
    for x, _, _ in batches.iterate(rows, shuffle=True, generator=gen):
        x = x.to(device, non_blocking=True)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


class Trainer:
    """A fresh model, optimiser and augmentation for one source; `epoch()` times one epoch."""

    def __init__(self, cfg: AuditConfig, batches, rows: np.ndarray, num_classes: int,
                 total_epochs: int) -> None:
        self.cfg, self.batches, self.rows = cfg, batches, rows
        self.device = pick_device(cfg)
        torch.manual_seed(0)
        self.gen = torch.Generator().manual_seed(0)
        model = build_model(cfg.model_name, num_classes, None)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.augment = Augment.for_config(cfg).to(self.device)
        steps = -(-len(rows) // cfg.batch_size)
        cfg_all = cfg.model_copy(update={"num_epochs": total_epochs})
        self.opt, self.sched, self.scaler = make_optimiser(self.model, cfg_all, steps,
                                                           self.device)

    def epoch(self) -> tuple[int, float]:
        """(images, seconds) of one training epoch."""
        t0 = time.perf_counter()
        seen, _, _ = train_epoch(self.model, self.augment, self.batches, self.rows, self.opt,
                                 self.sched, self.scaler, self.device, self.gen)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise SystemExit(f"--sources: unknown {unknown}; choose from {list(SOURCES)}")
    if "ffcv" in sources and not ffcv_installed():
        print("FFCV is not installed (bash scripts/setup.sh ffcv); skipping (b)")
        sources.remove("ffcv")

    tmp = tempfile.TemporaryDirectory(prefix="throughput-") if not args.work else None
    work = Path(args.work or tmp.name)
    data = args.data
    if not data:
        from tasks.sample import write_sample

        data = str(work / "sample")
        if not Path(data).is_dir():
            write_sample(data, args.n, noise=0.0, seed=0)
    cfg = AuditConfig(data_path=data, work_uri=str(work / "work"), image_size=args.image_size,
                      model_name=args.model, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=args.device,
                      ffcv="ffcv" in sources, track_eval=False, val_split=0.0)
    run = runs.run_uri(cfg.work_uri, "throughput")
    index = index_dataset(cfg)
    write_index(index, run)
    manifest, classes = index.manifest, index.classes
    n = len(manifest)
    labels = manifest["label_idx"].to_numpy(np.int64)
    paths = [str(Path(data) / k) for k in manifest["key"]]
    rows = np.arange(n)
    device = pick_device(cfg)
    print(f"{n} images ({len(classes)} classes) at {args.image_size} px, model {args.model}, "
          f"batch {args.batch_size}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"({platform.processor() or platform.machine()})")

    build_per_10k = None
    batches = {}
    if "ffcv" in sources:
        t0 = time.perf_counter()
        import ffcv.writer  # noqa: F401  (numba compiles at import: a one-off, not per image)

        print(f"ffcv import: {time.perf_counter() - t0:.1f}s (once per process, not counted)")
        t0 = time.perf_counter()
        uri = build_beton(run, cfg, manifest, force=True)
        build_s = time.perf_counter() - t0
        build_per_10k = build_s * 10_000 / n
        size = Path(uri).stat().st_size
        print(f".beton: built in {build_s:.1f}s ({build_per_10k:.1f}s per 10k images, "
              f"{args.num_workers} writer processes), {size / 2**20:.1f} MiB")
        batches["ffcv"] = FfcvBatches(uri, labels, cfg, device=device,
                                      batches_ahead=args.batches_ahead,
                                      os_cache=not args.no_os_cache)
    if "plain" in sources:
        batches["plain"] = Batches(paths, labels, cfg, in_memory=False)
    if "memory" in sources:
        t0 = time.perf_counter()
        batches["memory"] = Batches(paths, labels, cfg, in_memory=True)
        print(f"memory: decoded {n} images in {time.perf_counter() - t0:.1f}s (not timed)")

    total_epochs = 1 + args.epochs * args.rounds
    trainers = {s: Trainer(cfg, batches[s], rows, len(classes), total_epochs) for s in sources}
    for s in sources:  # warm-up: JIT compile, first worker start-up, allocator growth
        seen, secs = trainers[s].epoch()
        print(f"warm-up {s:6s}: {seen / secs:8,.0f} img/s (first epoch, not counted)")
    rates: dict[str, list[float]] = {s: [] for s in sources}
    for r in range(args.rounds):
        order = sources[r % len(sources):] + sources[:r % len(sources)]  # rotate: no position bias
        for s in order:
            seen = secs = 0.0
            for _ in range(args.epochs):
                k, t = trainers[s].epoch()
                seen, secs = seen + k, secs + t
            rates[s].append(seen / secs)
            print(f"round {r + 1} {s:6s}: {rates[s][-1]:8,.0f} img/s")
    loader_only = {s: loader_rate(batches[s], rows, device) for s in sources if s != "memory"}

    print(f"\nresults: training images/s, median of {args.rounds} round(s) (min-max)")
    for s in sources:
        extra = f"   loader alone {loader_only[s]:,.0f} img/s" if s in loader_only else ""
        print(f"  {SOURCES[s]:44s} {np.median(rates[s]):8,.0f} "
              f"({min(rates[s]):,.0f}-{max(rates[s]):,.0f}){extra}")
    if "memory" in rates:
        # Each round's ratio compares epochs run minutes apart at most, so load from other
        # work on the machine cancels out better than in a ratio of overall medians.
        for s, name in (("plain", "(a)/(c)"), ("ffcv", "(b)/(c)")):
            if s in rates:
                paired = [a / c for a, c in zip(rates[s], rates["memory"], strict=True)]
                print(f"  {name} = {np.median(paired):.2f}  (per round: "
                      f"{', '.join(f'{x:.2f}' for x in paired)})")
    if build_per_10k is not None:
        print(f"  .beton build time per 10k images: {build_per_10k:.1f}s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
