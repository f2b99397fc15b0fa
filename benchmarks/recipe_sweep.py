"""Training-recipe sweep: how training keys change detection quality, faster than
`noise_bench` because everything runs in one process on images decoded once.

For one dataset x noise model (the same sample `noise_bench` writes for that seed), each
variant (config overrides) trains the planned repeats with the product's own trainer
(`tasks.train.fit_model` / `predict`), pools the out-of-sample probabilities with
`tasks.merge.aggregate` / `score`, and prints: accuracy of the pooled prediction against the
true labels, precision/recall/F1 of `is_label_issue`, AUROC of `label_quality`, and the
relabel precision of the relabel rule (`noise_bench`'s own rows: the product's rule, and
by votes only). `--original` also runs each variant the original
way (random splits, hard votes). No files are written except `--json`.

    python -m benchmarks.recipe_sweep --pair fmnist20k:sym20 \\
        --variant none:augment=none --variant crop:augment=crop --variant e20:num_epochs=20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks.scoring import (
    DATASETS,
    DEFAULT_SENSITIVITY,
    NOISES,
    ORIGINAL_SENSITIVITY,
    Predictions,
    default_rows,
    original_rows,
    votes_only_row,
)
from tasks import sample
from tasks.config import AuditConfig
from tasks.merge import aggregate, score
from tasks.plan import plan_repeats, split_for_repeat
from tasks.train import Augment, Batches, fit_model, pick_device, predict


def noisy_sample(dataset: str, noise: str, seed: int, size: int
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """(images uint8 N x 3 x size x size, true labels, given labels, classes), drawn exactly
    as `tasks.sample.write_sample` draws them, decoded as `tasks.images.decode_image` does."""
    source, n = DATASETS[dataset]
    frac, kind = NOISES[noise]
    data = sample.load_clean(source)
    pick, true, given = sample.draw_noisy(data, n, frac, seed, kind)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i, src in enumerate(pick):
        img = Image.fromarray(data.images[src]).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return out, true, given, data.classes


def run_variant(cfg: AuditConfig, images: torch.Tensor, true: np.ndarray, given: np.ndarray,
                num_classes: int, sensitivity: float) -> dict[str, float]:
    """Train the plan of `cfg`, pool, score; metrics against the truth."""
    t0 = time.perf_counter()
    batches = Batches([], given, cfg, in_memory=False)
    batches.images = images
    device = pick_device(cfg)
    frames, epochs = [], []
    for spec in plan_repeats(cfg):
        split = split_for_repeat(cfg, spec, given)
        model, stats = fit_model(cfg, spec, split, batches, num_classes)
        epochs.append(stats.get("best_epoch", stats["epoch"]))
        probs = predict(model, Augment.for_config(cfg).to(device), batches,
                        split.test, device, tta_flip="flip" in cfg.augment)
        frames.append(pd.DataFrame({"id": split.test, "pred": probs.argmax(1),
                                    "probs": list(probs)}))
    agg = aggregate(len(given), given, frames, num_classes)
    s = score(given, agg["votes"], agg["mean_probs"], agg["num_preds"], cfg.max_label_quality)
    predicted = agg["num_preds"] > 0
    mean_probs = np.nan_to_num(agg["mean_probs"], nan=0.0)
    out: dict[str, float] = {
        "seconds": time.perf_counter() - t0,
        "mean_best_epoch": float(np.mean(epochs)),
        "pooled_acc_true": float((mean_probs.argmax(1) == true)[predicted].mean()),
    }
    p = Predictions(filename=np.arange(len(given)).astype(str), given=given, true=true,
                    corrected=s["corrected"], pct=s["pct"], num_preds=agg["num_preds"],
                    quality=s["quality"], suggested_quality=s["suggested_quality"],
                    is_label_issue=s["flagged"], mean_probs=agg["mean_probs"],
                    classes=[str(k) for k in range(num_classes)],
                    p_suggestion=s["p_suggestion"])
    if cfg.split_strategy == "random":
        out.update(next(iter(original_rows(p, ORIGINAL_SENSITIVITY).values())))
    else:
        votes_only = votes_only_row(p, sensitivity, cfg.min_preds)
        out["relabelled_votes_only"] = votes_only["relabelled"]
        out["relabel_precision_votes_only"] = votes_only["relabel_precision"]
        out.update(next(iter(default_rows(p, sensitivity, cfg.min_preds).values())))
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,key=value` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    pairs = [p.split("=", 1) for p in rest.split(",") if p]
    return name, {k: v for k, v in pairs}


def main(argv: list[str] | None = None) -> int:
    """Command line; prints one line per variant and run, and optionally writes JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="fmnist20k:sym20", help="dataset:noise")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sensitivity", type=float, default=DEFAULT_SENSITIVITY)
    p.add_argument("--original", action="store_true", help="also run each variant the "
                   "original way (random splits, hard votes)")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    dataset, noise = args.pair.split(":")
    base = AuditConfig(data_path="/nonexistent")
    images, true, given, classes = noisy_sample(dataset, noise, args.seed, base.input_size)
    print(f"{args.pair}: {len(true)} images, {(true != given).sum()} wrong labels, "
          f"device {pick_device(base)}", flush=True)
    results = []
    for text in args.variant or ["base:"]:
        name, overrides = parse_variant(text)
        methods = [("default", {})]
        if args.original:
            methods.append(("original", {"split_strategy": "random", "min_coverage": 0}))
        for method, extra in methods:
            cfg = AuditConfig.model_validate({**base.model_dump(), "seed": args.seed,
                                              **overrides, **extra})
            m = run_variant(cfg, images, true, given, len(classes), args.sensitivity)
            results.append({"pair": args.pair, "variant": name, "method": method,
                            "overrides": overrides, **m})
            print(f"{name:>14} {method:>8}: " + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in m.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
