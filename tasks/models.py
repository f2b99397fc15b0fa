"""The model zoo: a small CNN for CPUs and small images, and torchvision architectures.

Weights never come from the network: `model_weights` is a state-dict file (local or
s3://), or a torchvision weights name that must already be in the torch hub cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tasks import storage
from tasks.config import ConfigError

log = logging.getLogger(__name__)

# Inputs are scaled to 0-1 and normalised with ImageNet statistics, which is what the
# torchvision weights expect; for randomly initialised models it is a plain standardisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Sequential):
    """Five conv blocks (32-64-64-128-128 channels) in three stages with pooling and a
    linear head: about 290k parameters, 1,500+ images/s training on two CPU cores at 32 px."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(
            _conv_block(3, 32), nn.MaxPool2d(2),
            _conv_block(32, 64), _conv_block(64, 64), nn.MaxPool2d(2),
            _conv_block(64, 128), _conv_block(128, 128), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
        )


def _looks_like_path(value: str) -> bool:
    # torchvision weights names (IMAGENET1K_V1, DEFAULT) never hold a '/' or a '.'.
    return storage.is_s3(value) or "/" in value or "." in value


def _resolve_weights_file(model_name: str, weights: str) -> str:
    """A local file holding the state dict named by `model_weights`."""
    if _looks_like_path(weights):
        if not storage.exists(weights):
            raise ConfigError(f"model_weights {weights!r}: no such file")
        return storage.local_path(weights)
    if model_name == "small_cnn":
        raise ConfigError(
            f"model_weights {weights!r}: small_cnn has no named weights; give a state-dict path"
        )
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model_name)
        entry = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        known = [w.name for w in torchvision.models.get_model_weights(model_name)]
        names = ", ".join(["DEFAULT", *known])
        raise ConfigError(
            f"model_weights {weights!r} is not a weights name of {model_name}; choose one of "
            f"{names}, or give a state-dict path"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if not cached.is_file():
        raise ConfigError(
            f"model_weights {weights!r}: {cached} is not in the torch hub cache and nothing is "
            f"downloaded; copy {Path(entry.url).name} there, or set model_weights to a "
            "state-dict path (local or s3://)"
        )
    return str(cached)


def load_weights(model: nn.Module, model_name: str, weights: str) -> None:
    """Load a state dict; tensors whose shape differs (e.g. a 1000-class head) keep their
    fresh initialisation, and that is logged."""
    path = _resolve_weights_file(model_name, weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's message runs over many lines: keep its first
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"model_weights {weights!r}: not a readable state dict ({first})"
                          ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model_weights {weights!r}: holds a {type(state).__name__}, not a "
                          "state dict (save model.state_dict())")
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"model_weights {weights!r}: no tensor matches {model_name}")
    head = list(own)[-2:]  # the final layer's weight and bias: its shape follows the classes
    unfit = [k for k in own if k not in usable and k not in head]
    if unfit:
        raise ConfigError(
            f"model_weights {weights!r}: {len(unfit)} of {len(own)} tensors of {model_name} "
            f"are missing or of another shape (first: {unfit[0]}); is it a state dict of "
            "another architecture?")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s; %d left at init (%s)", len(usable), weights,
             len(skipped), ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))


def build_model(model_name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """The named architecture with a `num_classes` head, weights loaded if given."""
    if model_name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes)
    else:
        import torchvision

        model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    if weights:
        load_weights(model, model_name, weights)
    return model
