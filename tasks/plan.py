"""Plan the training repeats and their splits: a pure function of the config and labels.

`rounds` (default): repeats are grouped in rounds of K = round(1/test_split) folds. Each
round is a seeded, label-stratified permutation cut into K test folds, so after every
complete round each image has been predicted exactly once. The validation part is drawn
from the rest. `random`: a fresh random split per repeat (the original tool).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.config import AuditConfig


@dataclass(frozen=True)
class RepeatSpec:
    """One training repeat: which round and fold it is, and its seed."""

    repeat: int
    round: int
    fold: int
    seed: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Readable name for logs and the Airflow map index."""
        return f"repeat {self.repeat} (round {self.round}, fold {self.fold})"


@dataclass(frozen=True)
class Split:
    """Row positions (into the manifest) of one repeat's train, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def plan_repeats(cfg: AuditConfig) -> list[RepeatSpec]:
    """The repeats of an audit, in order."""
    k = cfg.folds if cfg.split_strategy == "rounds" else 1
    return [
        RepeatSpec(repeat=r, round=r // k, fold=r % k, seed=cfg.seed * 100_003 + r)
        for r in range(cfg.n_repeats)
    ]


def _stratified_folds(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number (0..k-1) per row: each class is shuffled and dealt round-robin, starting
    at a random fold, so folds have near-equal size and class mix."""
    fold_of = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rng.permutation(rows)
        fold_of[rows] = (np.arange(len(rows)) + offset) % k
        offset = (offset + len(rows)) % k
    return fold_of


def _round_folds(cfg: AuditConfig, round_: int, labels: np.ndarray) -> np.ndarray:
    """Fold number per row in round `round_` of the `rounds` strategy."""
    return _stratified_folds(labels, cfg.folds, np.random.default_rng([cfg.seed, round_]))


def planned_test(cfg: AuditConfig, labels: np.ndarray) -> np.ndarray:
    """True for each row that some repeat of the plan predicts: the union of the test parts
    of `split_for_repeat` over `plan_repeats`, computed once per round."""
    planned = np.zeros(len(labels), dtype=bool)
    specs = plan_repeats(cfg)
    if cfg.split_strategy == "rounds":
        for round_ in sorted({s.round for s in specs}):
            folds = [s.fold for s in specs if s.round == round_]
            planned |= np.isin(_round_folds(cfg, round_, labels), folds)
    else:
        for spec in specs:
            planned[split_for_repeat(cfg, spec, labels).test] = True
    return planned


def split_for_repeat(cfg: AuditConfig, spec: RepeatSpec, labels: np.ndarray) -> Split:
    """Train/val/test row positions for one repeat, deterministic from the seed."""
    n = len(labels)
    n_val = round(cfg.val_split * n)
    if cfg.split_strategy == "rounds":
        fold_of = _round_folds(cfg, spec.round, labels)
        test = np.flatnonzero(fold_of == spec.fold)
        rest = np.flatnonzero(fold_of != spec.fold)
        rest = np.random.default_rng([cfg.seed, spec.round, spec.fold, 1]).permutation(rest)
    else:
        perm = np.random.default_rng([cfg.seed, spec.repeat, 2]).permutation(n)
        n_test = round(cfg.test_split * n)
        test, rest = perm[:n_test], perm[n_test:]
    val, train = rest[:n_val], rest[n_val:]
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))
