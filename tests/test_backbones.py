"""The backbones: each torchvision model's preprocessing comes from its weights' transforms,
image sizes a model cannot take are refused up front, and pretrained starts use the finetune
recipe (backbone and head learning rates, warm-up then cosine decay)."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tasks import runs
from tasks.audit import prepare_run
from tasks.config import DEFAULT_IMAGE_SIZE, MODEL_NAMES, ConfigError, load_config
from tasks.images import decode_image
from tasks.models import build_model, default_image_size, head_names, model_transform
from tasks.train import (
    FINETUNE_WARMUP,
    finetune_factor,
    make_optimiser,
    parameter_groups,
    run_repeat,
)
from tests.datasets import tiny_config, write_classes

TORCHVISION = [m for m in MODEL_NAMES if m != "small_cnn"]


@pytest.mark.parametrize("model_name", TORCHVISION)
def test_default_sizes_and_preprocessing_come_from_the_weights_transforms(model_name):
    t = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
    assert DEFAULT_IMAGE_SIZE[model_name] == default_image_size(model_name) == t.crop_size[0]
    prep = model_transform(model_name)
    assert (prep.crop, prep.resize) == (t.crop_size[0], t.resize_size[0])
    assert prep.mean == tuple(t.mean) and prep.std == tuple(t.std)
    assert prep.interpolation == t.interpolation.value
    assert load_config(overrides=[f"model_name={model_name}"]).input_size == t.crop_size[0]


def test_preprocessing_scales_with_the_image_size_and_follows_named_weights():
    assert model_transform("resnet50", 112).crop == 112
    assert model_transform("resnet50", 112).resize == 116  # 232/224 of it
    assert model_transform("resnet50", weights_name="IMAGENET1K_V1").resize == 256
    swag = model_transform("vit_b_16", 384, "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.crop, swag.resize, swag.interpolation) == (384, 384, "bicubic")
    small = model_transform("small_cnn")
    assert (small.crop, small.resize) == (32, None)  # small_cnn: the whole image, as before
    assert load_config().input_size == 32 and load_config().image_size is None


def test_decoding_matches_torchvision_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    prep = model_transform("resnet50", 64)
    ours = decode_image(buf.getvalue(), prep.crop, prep.resize, prep.interpolation)
    ref = torchvision.transforms.Compose([
        torchvision.transforms.Resize(prep.resize, antialias=True),
        torchvision.transforms.CenterCrop(prep.crop)])(img)
    assert ours.shape == (64, 64, 3)
    # PIL resizes both; rounding of the same filter may differ by a level or so
    assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["model_name=vit_b_16", "image_size=64"],
     r"image_size must be 224 or 384 for model_name 'vit_b_16' .*got 64"),
    (["model_name=convnext_tiny", "image_size=16"],
     r"image_size must be >= 32 for model_name 'convnext_tiny', got 16"),
    (["model_name=alexnet", "image_size=32"],
     r"image_size must be >= 63 for model_name 'alexnet', got 32"),
])
def test_an_image_size_the_model_cannot_take_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize(("model_name", "size"), [("convnext_tiny", 32), ("resnet50", 16),
                                                  ("vit_b_16", 224)])
def test_the_smallest_accepted_size_builds_and_runs(model_name, size):
    model = build_model(model_name, 3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 3)


# --- the finetune recipe ----------------------------------------------------------------------

def test_finetune_groups_give_the_backbone_a_lower_learning_rate(tmp_path):
    cfg = tiny_config(tmp_path / "d", tmp_path / "w", model_name="resnet50", image_size=32,
                      learning_rate=0.02, backbone_lr_mult=0.25)
    assert cfg.fine_tunes  # model_weights null: pretrained, so auto picks finetune
    model = build_model("resnet50", 4)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert groups["head"]["lr"] == 0.02 and groups["backbone"]["lr"] == 0.005
    head = {id(p) for p in groups["head"]["params"]}
    assert head == {id(model.fc.weight), id(model.fc.bias)}
    assert len(groups["backbone"]["params"]) + 2 == len(list(model.parameters()))
    assert head_names(model) == ["fc.weight", "fc.bias"]
    # random init and small_cnn: one group, the scratch recipe
    for extra in ({"model_weights": "none"}, {"model_name": "small_cnn"}):
        scratch = tiny_config(tmp_path / "d", tmp_path / "w", image_size=32,
                              **{"model_name": "resnet50", **extra})
        assert not scratch.fine_tunes
        assert [g["name"] for g in parameter_groups(model, scratch)] == ["all"]
    forced = tiny_config(tmp_path / "d", tmp_path / "w", model_name="small_cnn", recipe="finetune")
    assert forced.fine_tunes


def test_finetune_schedule_warms_up_then_decays(tmp_path):
    total = 200
    warm = round(FINETUNE_WARMUP * total)
    factors = [finetune_factor(s, total) for s in range(total)]
    assert factors[0] == pytest.approx(1 / warm) and factors[warm - 1] == pytest.approx(1)
    assert all(a < b for a, b in itertools.pairwise(factors[:warm]))
    assert all(a >= b for a, b in itertools.pairwise(factors[warm - 1:]))
    assert factors[-1] < 0.01 and min(factors) > 0
    assert finetune_factor(warm + (total - warm) // 2, total) == pytest.approx(0.5, abs=0.02)
    # one step in all still trains, at the peak
    assert finetune_factor(0, 1) == 1.0
    # through the optimiser: each group follows the same shape at its own peak
    cfg = tiny_config(tmp_path / "d", tmp_path / "w", model_name="resnet18", image_size=32,
                      num_epochs=4, learning_rate=0.1)
    opt, sched, _ = make_optimiser(build_model("resnet18", 2), cfg, 25, torch.device("cpu"))
    seen = []
    for _ in range(100):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[4]["head"] == pytest.approx(0.1) and seen[4]["backbone"] == pytest.approx(0.01)
    assert seen[0]["head"] == pytest.approx(0.1 / 5)
    assert seen[-1]["head"] < 0.1 * 0.01
    assert all(math.isclose(s["backbone"], s["head"] * 0.1) for s in seen)


@pytest.mark.slow
def test_resnet50_fine_tunes_one_repeat_from_staged_weights(tmp_path, monkeypatch, caplog):
    """resnet50 at 32 px, 1 epoch on 40 images, from a state dict the test saves: the run
    folder holds the staged copy and the trainer logs the finetune recipe."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    write_classes(tmp_path / "data", {"ant": 20, "bee": 20})
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), tmp_path / "r50.pt")
    cfg = tiny_config(tmp_path / "data", tmp_path / "work", model_name="resnet50",
                      image_size=32, model_weights=str(tmp_path / "r50.pt"), batch_size=16,
                      learning_rate=0.01)
    run = prepare_run(cfg, "r50")
    with caplog.at_level("INFO", logger="tasks.train"):
        shard = run_repeat(run, 0)
    assert shard == runs.shard_uri(run, 0) and Path(shard).is_file()
    assert (Path(run) / "weights" / "resnet50-r50.pt").is_file()
    assert "recipe finetune: head lr 0.01, backbone lr 0.001" in caplog.text
