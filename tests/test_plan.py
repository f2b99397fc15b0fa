"""tasks/plan.py: rounds of K = round(1/test_split) stratified folds (each image predicted
exactly once per complete round), validation apart from train and test, determinism from
the seed, and the original tool's random strategy."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import AuditConfig
from tasks.plan import RepeatSpec, plan_repeats, split_for_repeat

# Three unbalanced classes, interleaved as a folder listing would not be.
LABELS = np.random.default_rng(5).permutation(np.repeat([0, 1, 2], [17, 23, 9]))


def splits(cfg: AuditConfig, labels: np.ndarray = LABELS):
    return [(spec, split_for_repeat(cfg, spec, labels)) for spec in plan_repeats(cfg)]


@pytest.mark.parametrize(("test_split", "k"), [(0.2, 5), (0.25, 4), (0.3, 3), (0.5, 2), (0.1, 10)])
def test_repeats_form_rounds_of_k_folds(test_split, k):
    cfg = AuditConfig(test_split=test_split, val_split=0.05, n_repeats=2 * k + 1)
    assert cfg.folds == k
    specs = plan_repeats(cfg)
    assert [s.repeat for s in specs] == list(range(2 * k + 1))
    assert [(s.round, s.fold) for s in specs] == [(r // k, r % k) for r in range(2 * k + 1)]
    assert len({s.seed for s in specs}) == len(specs)


@pytest.mark.parametrize("test_split", [0.2, 0.3, 0.5])
def test_every_complete_round_predicts_each_image_exactly_once(test_split):
    cfg = AuditConfig(test_split=test_split, val_split=0.1, n_repeats=3 * round(1 / test_split))
    per_round: dict[int, np.ndarray] = {}
    for spec, split in splits(cfg):
        counts = per_round.setdefault(spec.round, np.zeros(len(LABELS), dtype=int))
        counts[split.test] += 1
    assert sorted(per_round) == [0, 1, 2]
    for counts in per_round.values():
        assert (counts == 1).all()
    # Rounds are different permutations, not the same folds again.
    tests = {spec.round: tuple(split.test) for spec, split in splits(cfg) if spec.fold == 0}
    assert len(set(tests.values())) == 3


def test_folds_are_balanced_by_size_and_class():
    cfg = AuditConfig(test_split=0.2, n_repeats=5)
    sizes, per_class = [], []
    for _, split in splits(cfg):
        sizes.append(len(split.test))
        per_class.append(np.bincount(LABELS[split.test], minlength=3))
    assert max(sizes) - min(sizes) <= 1
    per_class = np.array(per_class)  # folds x classes
    assert (per_class.max(0) - per_class.min(0) <= 1).all()
    assert per_class.sum(0).tolist() == [17, 23, 9]


@pytest.mark.parametrize("strategy", ["rounds", "random"])
def test_validation_is_apart_from_train_and_test(strategy):
    cfg = AuditConfig(test_split=0.2, val_split=0.15, n_repeats=6, split_strategy=strategy)
    n = len(LABELS)
    for _, split in splits(cfg):
        train, val, test = set(split.train), set(split.val), set(split.test)
        assert not train & val and not train & test and not val & test
        assert train | val | test == set(range(n))
        assert len(val) == round(0.15 * n)
        for part in (split.train, split.val, split.test):
            assert (np.diff(part) > 0).all()  # sorted row positions, no duplicates


def test_plan_is_deterministic_from_the_seed():
    def fingerprint(seed: int, strategy: str) -> list[tuple]:
        cfg = AuditConfig(seed=seed, n_repeats=6, split_strategy=strategy)
        return [(tuple(s.train), tuple(s.val), tuple(s.test)) for _, s in splits(cfg)]

    for strategy in ("rounds", "random"):
        assert fingerprint(1, strategy) == fingerprint(1, strategy)
        assert fingerprint(1, strategy) != fingerprint(2, strategy)
        other = fingerprint(2, strategy)
        assert all(a != b for a, b in zip(fingerprint(1, strategy), other, strict=True))


def test_random_strategy_draws_a_fresh_split_per_repeat():
    cfg = AuditConfig(test_split=0.2, val_split=0.1, n_repeats=8, split_strategy="random")
    specs = plan_repeats(cfg)
    assert [(s.round, s.fold) for s in specs] == [(r, 0) for r in range(8)]
    tests = []
    for _, split in splits(cfg):
        assert len(split.test) == round(0.2 * len(LABELS))
        tests.append(frozenset(split.test))
    assert len(set(tests)) == 8
    # Unlike rounds, some image is predicted twice before another once.
    counts = np.zeros(len(LABELS), dtype=int)
    for t in tests[:5]:
        counts[list(t)] += 1
    assert counts.max() >= 2 and counts.min() == 0


def test_partial_round_and_spec_labels():
    cfg = AuditConfig(test_split=0.2, n_repeats=7)
    specs = plan_repeats(cfg)
    assert specs[-1] == RepeatSpec(repeat=6, round=1, fold=1, seed=specs[-1].seed)
    assert specs[6].label == "repeat 6 (round 1, fold 1)"
    assert specs[6].to_dict() == {"repeat": 6, "round": 1, "fold": 1, "seed": specs[6].seed}
    covered = np.zeros(len(LABELS), dtype=int)
    for spec, split in splits(cfg):
        if spec.round == 1:
            covered[split.test] += 1
    assert 0 < covered.sum() < len(LABELS) and covered.max() == 1
