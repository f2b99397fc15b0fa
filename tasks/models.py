"""The model zoo: a small CNN for CPUs and small images, and torchvision architectures, each
with the preprocessing its weights expect (`model_transform`).

Models are built here from a local state-dict file or randomly; where pretrained weights
come from (the network, the torch hub cache, a file) is `tasks.weights`' business, once per
run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.config import (
    DEFAULT_IMAGE_SIZE,
    EXACT_IMAGE_SIZES,
    AuditConfig,
    ConfigError,
    unknown_weights_name,
    weights_path_like,
)
from tasks.images import Preprocess

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


def weights_entry(model_name: str, name: str) -> Any:
    """The torchvision weights enum member `name` (DEFAULT or e.g. IMAGENET1K_V1) of
    `model_name`; ConfigError listing the valid names otherwise."""
    if model_name == "small_cnn":
        raise ConfigError(
            f"model_weights {name!r}: small_cnn has no named weights; give a state-dict path, "
            "or none for random init"
        )
    import torchvision

    enum = torchvision.models.get_model_weights(model_name)
    try:
        return enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError:
        raise unknown_weights_name(model_name, name, [w.name for w in enum]) from None


def default_image_size(model_name: str, weights_name: str | None = None) -> int:
    """The input size of `model_name`'s weights' transforms (DEFAULT unless named); small_cnn
    32."""
    if model_name == "small_cnn":
        return DEFAULT_IMAGE_SIZE["small_cnn"]
    return int(weights_entry(model_name, weights_name or "DEFAULT").transforms().crop_size[0])


def model_transform(model_name: str, image_size: int | None = None,
                    weights_name: str | None = None) -> Preprocess:
    """How `model_name` sees an image at `image_size` (None: its default): small_cnn resizes
    the whole image; a torchvision model resizes and centre-crops with the mean, std and
    interpolation of its weights' transforms (DEFAULT's when `weights_name` is None, so a
    random-init model preprocesses like its pretrained one), the resize scaled with the crop
    (resnet50 at 224: 232 then 224; at 112: 116 then 112)."""
    if model_name == "small_cnn":
        return Preprocess(image_size or DEFAULT_IMAGE_SIZE["small_cnn"],
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    t = weights_entry(model_name, weights_name or "DEFAULT").transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    size = image_size or crop
    return Preprocess(size, resize=max(size, round(size * resize / crop)),
                      mean=tuple(t.mean), std=tuple(t.std),
                      interpolation=str(t.interpolation.value))


def config_transform(cfg: AuditConfig) -> Preprocess:
    """`model_transform` for a config: its model, image size and (named) weights."""
    request = cfg.weights_request
    named = request if request and not weights_path_like(request) else None
    return model_transform(cfg.model_name, cfg.input_size,
                           named if cfg.model_name != "small_cnn" else None)


def check_image_size(model_name: str, image_size: int, weights_name: str | None) -> None:
    """ConfigError when named pretrained weights cannot take `image_size` (vit_b_16's
    position embeddings fix its input to the size its weights were trained at)."""
    if model_name in EXACT_IMAGE_SIZES and weights_name:
        need = int(weights_entry(model_name, weights_name).meta["min_size"][0])
        if image_size != need:
            raise ConfigError(
                f"image_size {image_size} does not fit model_weights {weights_name!r} of "
                f"{model_name}, which take exactly {need} px; set image_size: {need}"
            )


def head_names(model: nn.Module) -> list[str]:
    """State-dict names of the final linear layer, the head whose shape follows the classes."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{name}.weight", f"{name}.bias"]


def load_weights(model: nn.Module, model_name: str, path: str,
                 weights: str | None = None) -> None:
    """Load the state dict in the local file `path` (`weights`: what model_weights said, for
    messages); the head (final linear layer) keeps its fresh initialisation when its shape
    differs (another class count, e.g. a 1000-class ImageNet head), and that is logged; any
    other tensor missing or of another shape is a ConfigError (another architecture)."""
    weights = weights or path
    if not Path(path).is_file():
        raise ConfigError(f"model_weights {weights!r}: no such file")
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
    head = head_names(model)
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


def build_model(model_name: str, num_classes: int, weights: str | None = None,
                image_size: int | None = None, label: str | None = None) -> nn.Module:
    """The named architecture with a `num_classes` head, randomly initialised, then loaded
    from `weights` (a local state-dict file: `tasks.weights.staged_weights` gives a run's)
    if given. `image_size` matters only to vit_b_16 (its position embeddings); `label` is
    what model_weights said, for messages."""
    if model_name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes)
    else:
        import torchvision

        extra = {"image_size": image_size} if model_name in EXACT_IMAGE_SIZES and image_size \
            else {}
        model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes,
                                             **extra)
    if weights:
        load_weights(model, model_name, weights, label)
    return model
