"""benchmarks/decision_variants.py's two variants, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.decision_variants import fit_temperature, with_temperature


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 5))
    true_t = 2.0  # labels drawn from softmax(logits / 2); the model reports softmax(logits)
    target = with_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), true_t)
    labels = np.array([rng.choice(5, p=row) for row in target])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.1)
    assert with_temperature(probs, 1.0) == pytest.approx(probs, abs=1e-6)
