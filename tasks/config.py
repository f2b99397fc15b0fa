"""The one config schema, shared by the CLI, the YAML files and the DAG Params.

Keys of the original tool keep their names and meaning; invalid values fail with a
message that names the key and the value.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from tasks.errors import UserError

ModelName = Literal["small_cnn", "resnet18", "resnet50", "convnext_tiny", "vit_b_16",
                    "efficientnet_v2_s", "alexnet"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
# image_size when it is null: the crop size of each torchvision model's DEFAULT weights
# (tests/test_backbones.py checks it against torchvision; this module stays torch-free).
DEFAULT_IMAGE_SIZE = {"small_cnn": 32, "resnet18": 224, "resnet50": 224, "convnext_tiny": 224,
                      "vit_b_16": 224, "efficientnet_v2_s": 384, "alexnet": 224}
# Smallest input each architecture accepts (AlexNet's pooling collapses below 63 px, ConvNeXt's
# four downsampling stages need 32).
MIN_IMAGE_SIZE = {"small_cnn": 8, "resnet18": 16, "resnet50": 16, "convnext_tiny": 32,
                  "vit_b_16": 224, "efficientnet_v2_s": 16, "alexnet": 63}
# Inputs an architecture takes at exactly these sizes only (its position embeddings fix them;
# 384 is for the SWAG_E2E weights).
EXACT_IMAGE_SIZES = {"vit_b_16": (224, 384)}
# model_weights values that mean random initialisation (null means the model's default).
NO_WEIGHTS = "none"

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "config.yaml"

FFCV_MISSING = (
    "ffcv is true but the FFCV package is not installed; install it with "
    "`bash scripts/setup.sh ffcv` (needs apt packages pkg-config libturbojpeg0-dev "
    "libopencv-dev, then `pip install -e '.[ffcv]'`), or set ffcv: false"
)


def ffcv_installed() -> bool:
    """True when the `ffcv` package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec("ffcv") is not None
    except (ImportError, ValueError):
        return False

# Keys that change what a trainer computes; a shard records their hash.
TRAINING_KEYS = (
    "model_name", "model_weights", "n_repeats", "batch_size", "learning_rate", "num_epochs",
    "track_eval", "patience", "test_split", "val_split", "split_strategy", "seed",
    "image_size", "augment", "weight_decay", "ffcv",
)
RECIPES = ("auto", "scratch", "finetune")
# Keys that change what embedding mode's probes compute; in the fingerprint only when
# `method` is not `train`, so the default mode's fingerprints (and run ids) stay as they were.
EMBEDDING_KEYS = ("method", "probe")


def weights_path_like(value: str) -> bool:
    """Whether a model_weights value names a state-dict file (a path or s3:// URI) rather
    than a torchvision weights name (names never hold '/' or '.')."""
    return value.startswith("s3://") or "/" in value or "." in value or os.path.exists(value)


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key and the value."""


def unknown_weights_name(model_name: str, name: str, names: list[str]) -> ConfigError:
    """The one-line error for a weights name `model_name` does not have (`names`: its own)."""
    return ConfigError(
        f"model_weights {name!r} is not a weights name of {model_name}; choose one of "
        f"{', '.join(['DEFAULT', *names])}, none (random init), or give a state-dict path")


def _section(name: str) -> dict[str, Any]:
    return {"section": name}


class AuditConfig(BaseModel):
    """Every setting of an audit. Field descriptions feed the CLI help and the DAG form."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- data -------------------------------------------------------------------
    data_path: str = Field(
        "data/sample",
        min_length=1,
        description="Dataset root: a local folder or s3://bucket/prefix/ laid out as "
        "`<root>/<class>/<image>`.",
        json_schema_extra=_section("Data"),
    )
    work_uri: str = Field(
        "work",
        min_length=1,
        description="Where run artefacts go (manifest, shards, results, report, journal): "
        "a local folder or s3://bucket/prefix/. Each run lives in "
        "`<work_uri>/runs/<run_id>/`.",
        json_schema_extra=_section("Data"),
    )
    results_path: str | None = Field(
        None,
        description="Extra copy of the results CSV (local path or s3:// URI). "
        "The CSV is always written to the run folder as results.csv.",
        json_schema_extra=_section("Data"),
    )
    image_size: int | None = Field(
        None, ge=8, le=1024,
        description="Side of the square input in pixels. null: the model's default (small_cnn "
        "32; resnet18, resnet50, convnext_tiny, vit_b_16, alexnet 224; efficientnet_v2_s 384). "
        "small_cnn resizes the whole image to it; the torchvision models resize the shorter "
        "side and centre-crop as their weights' transforms do (resnet50: 232 then 224). "
        "vit_b_16 takes exactly 224 (384 for its SWAG_E2E weights).",
        json_schema_extra=_section("Data"),
    )
    ffcv: bool = Field(
        False,
        description="Build one FFCV .beton per run and train from it (needs the ffcv extra).",
        json_schema_extra=_section("Data"),
    )
    num_workers: int = Field(
        2, ge=0, le=64,
        description="Data-loading worker processes per trainer.",
        json_schema_extra=_section("Data"),
    )
    # --- model ------------------------------------------------------------------
    model_name: ModelName = Field(
        "small_cnn",
        description="Architecture: small_cnn (fast on CPU, small images, no pretrained "
        "weights), or torchvision's resnet18, resnet50, convnext_tiny, vit_b_16, "
        "efficientnet_v2_s, alexnet (alexnet needs image_size >= 63, convnext_tiny >= 32).",
        json_schema_extra=_section("Model"),
    )
    model_weights: str | None = Field(
        None,
        description="Initial weights. null: the torchvision model's DEFAULT pretrained "
        "weights (small_cnn: random init); a torchvision weights name (DEFAULT, "
        "IMAGENET1K_V1, ...); none for random init; or a path or s3:// URI of a state dict. "
        "Resolved once per run at indexing (downloaded into the torch hub cache when not "
        "there yet) and copied to `<run>/weights/`, where every trainer loads them from.",
        json_schema_extra=_section("Model"),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where trainers run: auto picks CUDA when available.",
        json_schema_extra=_section("Model"),
    )
    method: Literal["train", "embeddings"] = Field(
        "train",
        description="train: train a model per repeat (the default). embeddings: embed every "
        "image once with the frozen model_name backbone (its classifier removed), then fit a "
        "probe per repeat on the embeddings (seconds each, so many repeats are cheap), and "
        "add kNN label agreement, near-duplicates and an outlier score to the results. "
        "Give it pretrained model_weights: a random backbone's features are weak.",
        json_schema_extra=_section("Model"),
    )
    # --- training ---------------------------------------------------------------
    n_repeats: int = Field(
        10, ge=1, le=1000,
        description="Models to train. Each predicts the images it did not see.",
        json_schema_extra=_section("Training"),
    )
    split_strategy: Literal["rounds", "random"] = Field(
        "rounds",
        description="rounds: repeats form rounds of K = round(1/test_split) folds, so every "
        "image is predicted once per complete round. random: a fresh random split per "
        "repeat (the original tool's behaviour).",
        json_schema_extra=_section("Training"),
    )
    test_split: float = Field(
        0.2, gt=0, lt=1,
        description="Share of images each repeat holds out and predicts. With split_strategy "
        "rounds it must be within 0.05 of 1/K for a whole K >= 2 (0.5, 0.33, 0.25, 0.2, 0.1, "
        "...); each repeat then holds out exactly 1/K, K = round(1/test_split).",
        json_schema_extra=_section("Training"),
    )
    val_split: float = Field(
        0.1, ge=0, lt=1,
        description="Share of images each repeat uses for validation (early stopping).",
        json_schema_extra=_section("Training"),
    )
    batch_size: int = Field(
        128, ge=1, le=65536, description="Training batch size.",
        json_schema_extra=_section("Training"),
    )
    learning_rate: float = Field(
        0.05, gt=0, le=10,
        description="Peak learning rate of the one-cycle SGD schedule (with the finetune "
        "recipe: of the new head).",
        json_schema_extra=_section("Training"),
    )
    recipe: Literal["auto", "scratch", "finetune"] = Field(
        "auto",
        description="scratch: SGD with a one-cycle schedule, one learning rate. finetune: the "
        "backbone at learning_rate x backbone_lr_mult, the new head at learning_rate, a linear "
        "warm-up over the first 5% of steps, then cosine decay. auto: finetune when the model "
        "starts from weights (pretrained or a state dict), scratch otherwise.",
        json_schema_extra=_section("Training"),
    )
    backbone_lr_mult: float = Field(
        0.1, gt=0, le=1,
        description="finetune recipe: the backbone's learning rate as a share of the head's.",
        json_schema_extra=_section("Training"),
    )
    weight_decay: float = Field(
        5e-4, ge=0, le=1, description="SGD weight decay.",
        json_schema_extra=_section("Training"),
    )
    num_epochs: int = Field(
        12, ge=1, le=1000, description="Epochs per repeat.",
        json_schema_extra=_section("Training"),
    )
    track_eval: bool = Field(
        True,
        description="Evaluate on the validation part each epoch, keep the best epoch and stop "
        "early after `patience` epochs without improvement.",
        json_schema_extra=_section("Training"),
    )
    patience: int = Field(
        4, ge=1, le=1000, description="Epochs without validation improvement before stopping.",
        json_schema_extra=_section("Training"),
    )
    augment: Literal["flip", "flip_crop", "crop", "none"] = Field(
        "crop",
        description="Training augmentation: a random shift of up to image_size/16 px (crop, "
        "the default: safe for any image and measured best), horizontal flip (flip), both "
        "(flip_crop), or none. flip also averages each prediction with its mirror image. Never "
        "flip text, digits or other images whose mirror image means something else.",
        json_schema_extra=_section("Training"),
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed for splits and training.",
        json_schema_extra=_section("Training"),
    )
    # --- embedding mode -----------------------------------------------------------
    embed_chunk_size: int = Field(
        50000, ge=1, le=10_000_000,
        description="method embeddings: images per embedding chunk, `<run>/embeddings/"
        "chunk-NNNNN.parquet`; one pod (Kubernetes) or subprocess (local) embeds each chunk.",
        json_schema_extra=_section("Embeddings"),
    )
    probe: Literal["logistic", "mlp"] = Field(
        "logistic",
        description="method embeddings: the probe fitted per repeat on the embeddings of its "
        "training rows: logistic (multinomial logistic regression, scikit-learn) or mlp (one "
        "hidden layer, torch).",
        json_schema_extra=_section("Embeddings"),
    )
    knn_k: int = Field(
        10, ge=1, le=1000,
        description="method embeddings: neighbours per image for knn_agreement (share of its "
        "k nearest neighbours with its given label), outlier_score (cosine distance to the "
        "k-th) and the near-duplicate search.",
        json_schema_extra=_section("Embeddings"),
    )
    duplicate_threshold: float = Field(
        0.98, gt=0, le=1,
        description="method embeddings: images whose cosine similarity (of mean-centred "
        "embeddings) is at least this are near-duplicates, grouped transitively; a group "
        "filed under more than one class is a label conflict. 1 keeps exact copies only.",
        json_schema_extra=_section("Embeddings"),
    )
    # --- scoring and relabelling ------------------------------------------------
    max_label_quality: float = Field(
        1.0, gt=0, le=1,
        description="Flag an image only when its label_quality (mean out-of-sample "
        "probability of its given label) is below this, besides p_label_wrong and the vote. "
        "1 (default) is off; 0.1 helped at low symmetric noise but cut recall to a third "
        "on asymmetric noise (benchmarks/RESULTS.md).",
        json_schema_extra=_section("Scoring"),
    )
    min_coverage: float = Field(
        1.0, ge=0, le=1,
        description="Merge fails (naming the missing repeats) when fewer than this share of "
        "the images the plan predicts has at least one out-of-sample prediction.",
        json_schema_extra=_section("Scoring"),
    )
    merge_memory_gb: float = Field(
        2.0, gt=0, le=4096,
        description="Memory the merge may use, in GB. Beyond it the merge pools the images in "
        "buckets, spilling each shard's rows to local temporary files per bucket; the results "
        "are the same either way.",
        json_schema_extra=_section("Scoring"),
    )
    sensitivity: float = Field(
        90.0, ge=0, le=100,
        description="Relabel a flagged image when the probability that its suggested label is "
        "the true one (p_suggestion) is above this %.",
        json_schema_extra=_section("Relabelling"),
    )
    min_preds: int = Field(
        2, ge=1, le=1000,
        description="Relabel only images with at least this many predictions.",
        json_schema_extra=_section("Relabelling"),
    )
    autocorrect: bool = Field(
        False,
        description="Relabel after the audit (in the DAG and `audit --relabel`).",
        json_schema_extra=_section("Relabelling"),
    )
    force_relabel: bool = Field(
        False,
        description="Relabel even when the model-quality guard says the audit cannot be "
        "trusted (models near chance, estimated noise above half, a class never learnt, or "
        "embeddings from a random backbone; see the run's summary.json). Off: relabel refuses "
        "such a run with one line.",
        json_schema_extra=_section("Relabelling"),
    )
    relabel_mode: Literal["move", "manifest"] = Field(
        "move",
        description="move: move images into their corrected class folder (journaled, undoable). "
        "manifest: leave images in place and write corrected-labels.csv.",
        json_schema_extra=_section("Relabelling"),
    )
    report_top_n: int = Field(
        500, ge=1, le=100000, description="Most suspicious images shown in report.html.",
        json_schema_extra=_section("Report"),
    )

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> AuditConfig:
        if self.test_split + self.val_split >= 1:
            raise ValueError(
                f"test_split + val_split must be < 1, got {self.test_split} + {self.val_split}"
            )
        if self.split_strategy == "rounds":
            _check_folds(self.test_split)
        _check_work_outside_data(self.work_uri, self.data_path)
        if self.track_eval and self.val_split == 0:
            raise ValueError("track_eval needs val_split > 0, got val_split 0")
        exact = EXACT_IMAGE_SIZES.get(self.model_name)
        if exact and self.input_size not in exact:
            raise ValueError(
                f"image_size must be {' or '.join(map(str, exact))} for model_name "
                f"{self.model_name!r} (its position embeddings fix the input), "
                f"got {self.input_size}; set image_size: null for {exact[0]}"
            )
        least = MIN_IMAGE_SIZE[self.model_name]
        if self.input_size < least:
            raise ValueError(
                f"image_size must be >= {least} for model_name {self.model_name!r}, "
                f"got {self.input_size}"
            )
        if self.method == "embeddings" and self.ffcv:
            raise ValueError("ffcv is not used by method embeddings (the embedding pass reads "
                             "each image once); set ffcv: false")
        # Where the FFCV steps run, their package must be there: fail now, not in a trainer.
        # Callers whose process never touches FFCV (an Airflow image that starts trainer pods,
        # reading back a finished run) validate with context {"check_installed": False}.
        check = (info.context or {}).get("check_installed", True)
        if self.ffcv and check and not ffcv_installed():
            raise ValueError(FFCV_MISSING)
        return self

    @property
    def input_size(self) -> int:
        """The image size trainers use: `image_size`, or the model's default when null."""
        return self.image_size or DEFAULT_IMAGE_SIZE[self.model_name]

    @property
    def weights_request(self) -> str | None:
        """What `model_weights` asks for: a torchvision weights name (DEFAULT when null for a
        torchvision model), a state-dict path or URI, or None for random initialisation."""
        value = (self.model_weights or "").strip()
        if not value:
            return None if self.model_name == "small_cnn" else "DEFAULT"
        return None if value.lower() == NO_WEIGHTS else value

    @property
    def fine_tunes(self) -> bool:
        """Whether trainers use the finetune recipe (see `recipe`)."""
        if self.recipe == "auto":
            return self.weights_request is not None
        return self.recipe == "finetune"

    @property
    def folds(self) -> int:
        """K, the folds per round: round(1 / test_split), at least 2 (with split_strategy
        rounds, test_split is within FOLD_TOLERANCE of 1/K)."""
        return max(2, round(1 / self.test_split))

    def training_fingerprint(self) -> str:
        """Hash of the keys that change what a trainer computes."""
        data = {k: getattr(self, k) for k in TRAINING_KEYS}
        # What is computed, not how it was asked for: null and the default size hash alike,
        # and the recipe keys count only where the finetune recipe runs (so configs from
        # before these keys keep their run ids).
        data.update(image_size=self.input_size, model_weights=self.weights_request)
        if self.fine_tunes and self.method == "train":
            data["finetune"] = {"backbone_lr_mult": self.backbone_lr_mult}
        if self.method != "train":
            data.update({k: getattr(self, k) for k in EMBEDDING_KEYS})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


FOLD_TOLERANCE = 0.05  # how far test_split may be from the 1/K that rounds hold out


def _check_folds(test_split: float) -> None:
    """Refuse a test_split that rounds of K folds cannot honour (0.7 would give K = 1)."""
    k = round(1 / test_split)
    if k >= 2 and abs(1 / k - test_split) <= FOLD_TOLERANCE + 1e-9:
        return
    raise ValueError(
        f"test_split {test_split} cannot be honoured with split_strategy rounds: rounds of "
        f"K = round(1/test_split) = {k} folds would hold out {'all' if k < 2 else f'1/{k}'} "
        f"of the images; use a value within {FOLD_TOLERANCE} of 1/K for a whole K >= 2 "
        "(0.5, 0.33, 0.25, 0.2, 0.1, ...), or split_strategy: random"
    )


def _location(uri: str) -> tuple[str, str]:
    """(bucket or '', path) of a URI: s3 by bucket and prefix, local paths resolved."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        return bucket, "/" + prefix.strip("/")
    return "", Path(uri).expanduser().resolve().as_posix()


def _check_work_outside_data(work_uri: str, data_path: str) -> None:
    """Refuse run artefacts inside the dataset: the next audit would index them as files."""
    (wb, wp), (db, dp) = _location(work_uri), _location(data_path)
    if wb == db and (wp == dp or wp.startswith(dp.rstrip("/") + "/")):
        raise ValueError(
            f"work_uri {work_uri!r} is inside data_path {data_path!r}: the next audit would "
            "index this run's files as part of the dataset and never resume; put work_uri "
            "outside the dataset"
        )


def _describe(err: ValidationError) -> str:
    """One line per problem, each naming the key and the offending value."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(AuditConfig.model_fields)
            lines.append(f"unknown config key {key!r}; valid keys: {valid}")
        elif e["type"] == "literal_error":
            lines.append(f"{key}: got {e['input']!r}; choose one of {e['ctx']['expected']}")
        elif key == "config":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']}, got {e['input']!r}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any], check_installed: bool = True) -> AuditConfig:
    """Validate a dict of settings; raise ConfigError with a one-line message.
    `check_installed=False` skips checking that optional packages the config asks for
    (FFCV) are installed in this process."""
    try:
        return AuditConfig.model_validate(data, context={"check_installed": check_installed})
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_describe(err)}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """Parse a `key=value` override; the value is read as YAML (numbers, true, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key; write key=value, e.g. seed=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"override {item!r}: the value of {key!r} is not valid YAML "
                          f"({first}); check its brackets and quotes") from None
    if key in ("data_path", "work_uri", "results_path", "model_weights") and value is not None:
        value = raw  # paths stay strings even when they look like numbers
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None,
                check_installed: bool = True) -> AuditConfig:
    """Load a YAML config (default configs/config.yaml), apply `key=value` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); "
                          "save it as UTF-8") from None
    except PermissionError:
        raise ConfigError(f"config file {str(path)!r} cannot be read (permission denied)"
                          ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    data.update(extra or {})
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
    return parse_config(data, check_installed=check_installed)
