"""tasks/config.py: the YAML defaults match the schema, invalid values give one line that
names the key and the value, and `--set key=value` overrides parse as a user expects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import (
    DEFAULT_CONFIG_PATH,
    MODEL_NAMES,
    TRAINING_KEYS,
    AuditConfig,
    ConfigError,
    load_config,
    parse_config,
    parse_override,
)


def test_default_yaml_holds_every_key_with_the_schema_default():
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    fields = set(AuditConfig.model_fields)
    assert not set(data) - fields, f"config.yaml keys not in AuditConfig: {set(data) - fields}"
    assert not fields - set(data), f"fields missing in config.yaml: {fields - set(data)}"
    defaults = AuditConfig()
    for key, value in data.items():
        default = getattr(defaults, key)
        assert default == value, f"{key}: config.yaml has {value!r}, AuditConfig {default!r}"
    assert load_config() == defaults
    assert set(TRAINING_KEYS) <= set(AuditConfig.model_fields)


def test_every_field_is_documented_with_a_section():
    for name, field in AuditConfig.model_fields.items():
        assert field.description, f"{name} has no description"
        assert (field.json_schema_extra or {}).get("section"), f"{name} has no section"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["test_split=0.6", "val_split=0.5"], "test_split + val_split must be < 1, got 0.6 + 0.5"),
    (["n_repeats=0"], "n_repeats: Input should be greater than or equal to 1, got 0"),
    (["batch_size=abc"], "batch_size: Input should be a valid integer"),
    (["learning_rate=-0.1"], "learning_rate: Input should be greater than 0, got -0.1"),
    (["sensitivity=101"], "sensitivity: Input should be less than or equal to 100, got 101"),
    (["test_split=1"], "test_split: Input should be less than 1, got 1"),
    (["n_repeats=2.5"], "n_repeats: Input should be a valid integer"),
    (["val_split=0"], "track_eval needs val_split > 0, got val_split 0"),
    (["split_strategy=kfold"], "split_strategy: got 'kfold'; choose one of 'rounds' or 'random'"),
    (["image_size=4"], "image_size: Input should be greater than or equal to 8, got 4"),
])
def test_invalid_value_is_one_line_naming_key_and_value(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("invalid config: ")


def test_several_problems_still_give_one_line():
    with pytest.raises(ConfigError) as err:
        parse_config({"n_repeats": 0, "batch_size": "abc", "colour": "red"})
    message = str(err.value)
    assert "\n" not in message
    for part in ("n_repeats", "got 0", "batch_size", "'abc'", "'colour'"):
        assert part in message


def test_unknown_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'n_repeat'; valid keys: .*n_repeats"):
        load_config(overrides=["n_repeat=3"])
    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("data_path: /data\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'"):
        load_config(cfg_file)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model_name=vgg16"])
    message = str(err.value)
    assert "model_name: got 'vgg16'" in message
    for name in MODEL_NAMES:
        assert repr(name) in message


def test_alexnet_needs_a_larger_image_size():
    with pytest.raises(ConfigError, match=r"image_size must be >= 63 for model_name 'alexnet', "
                                          r"got 32"):
        load_config(overrides=["model_name=alexnet", "image_size=32"])
    assert load_config(overrides=["model_name=alexnet", "image_size=64"]).image_size == 64
    assert load_config(overrides=["model_name=resnet18", "image_size=16"]).image_size == 16


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_repeats: [1,\n")
    with pytest.raises(ConfigError, match=r"'.*bad.yaml' is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == AuditConfig()


def test_a_partial_file_keeps_defaults_and_overrides_win(tmp_path):
    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("data_path: /data/cats\nn_repeats: 4\n")
    cfg = load_config(cfg_file, ["n_repeats=6", "seed=3"])
    assert (cfg.data_path, cfg.n_repeats, cfg.seed) == ("/data/cats", 6, 3)
    assert cfg.model_name == AuditConfig().model_name


# (item, key, what parse_override returns, the config's value)
@pytest.mark.parametrize(("item", "key", "parsed", "value"), [
    ("n_repeats=4", "n_repeats", 4, 4),
    ("learning_rate=0.01", "learning_rate", 0.01, 0.01),
    # YAML 1.1 reads 1e-3 (no dot) as a string; pydantic makes it a float.
    ("learning_rate=1e-3", "learning_rate", "1e-3", 0.001),
    ("track_eval=false", "track_eval", False, False),
    ("autocorrect=true", "autocorrect", True, True),
    ("results_path=null", "results_path", None, None),
    ("model_weights=", "model_weights", None, None),
    ("data_path=2024", "data_path", "2024", "2024"),
    ("work_uri=1.50", "work_uri", "1.50", "1.50"),
    ("results_path=007", "results_path", "007", "007"),
    ("model_weights=true", "model_weights", "true", "true"),
    ("data_path=s3://bucket/a=b", "data_path", "s3://bucket/a=b", "s3://bucket/a=b"),
    (" seed = 5", "seed", 5, 5),
])
def test_override_values_parse_like_yaml_but_paths_stay_strings(item, key, parsed, value):
    assert parse_override(item) == (key, parsed)
    assert type(parse_override(item)[1]) is type(parsed)
    cfg = load_config(overrides=[item])
    got = getattr(cfg, key)
    assert got == value and type(got) is type(value)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'n_repeats' must look like key=value"):
        parse_override("n_repeats")


def test_folds_and_fingerprint():
    assert [AuditConfig(test_split=t).folds for t in (0.2, 0.25, 0.3, 0.5)] == [5, 4, 3, 2]
    base = AuditConfig()
    assert base.training_fingerprint() == AuditConfig().training_fingerprint()
    assert base.training_fingerprint() != AuditConfig(seed=1).training_fingerprint()
    assert base.training_fingerprint() != AuditConfig(num_epochs=3).training_fingerprint()
    # Relabelling and storage settings do not change what a trainer computes.
    assert base.training_fingerprint() == AuditConfig(
        sensitivity=80, min_preds=3, work_uri="elsewhere").training_fingerprint()


def test_json_round_trip_is_lossless(tmp_path: Path):
    cfg = load_config(overrides=["model_weights=/w/x.pt", "results_path=/tmp/r.csv"])
    assert parse_config(cfg.model_dump()) == cfg
    assert AuditConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(("test_split", "k", "held_out"), [
    (0.7, 1, "all"), (0.99, 1, "all"), (0.4, 2, "1/2"), (0.6, 2, "1/2"), (0.39, 3, "1/3")])
def test_test_split_that_rounds_cannot_honour_is_refused(test_split, k, held_out):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"test_split={test_split}", "val_split=0.005"])
    message = str(err.value)
    assert (f"test_split {test_split} cannot be honoured with split_strategy rounds: rounds of "
            f"K = round(1/test_split) = {k} folds would hold out {held_out} of the images; use "
            "a value within 0.05 of 1/K for a whole K >= 2 (0.5, 0.33, 0.25, 0.2, 0.1, ...), "
            "or split_strategy: random") in message
    assert "\n" not in message
    # The original tool's random split takes any share.
    cfg = load_config(overrides=[f"test_split={test_split}", "val_split=0.005",
                                 "split_strategy=random"])
    assert cfg.test_split == test_split


@pytest.mark.parametrize(("test_split", "k"), [
    (0.5, 2), (0.45, 2), (0.33, 3), (0.3, 3), (0.25, 4), (0.2, 5), (0.15, 7), (0.1, 10),
    (0.01, 100)])
def test_test_split_near_one_over_k_is_accepted(test_split, k):
    cfg = AuditConfig(test_split=test_split, val_split=0.05)
    assert cfg.folds == k and abs(1 / k - test_split) <= 0.05


@pytest.mark.parametrize(("data_path", "work_uri"), [
    ("{tmp}/data", "{tmp}/data/work"),
    ("{tmp}/data", "{tmp}/data"),
    ("{tmp}/data/", "{tmp}/other/../data/runs-here"),  # compared after resolving
    ("{tmp}/link", "{tmp}/data/work"),  # a link to the dataset
    ("s3://bucket/images", "s3://bucket/images/work"),
    ("s3://bucket/images/", "s3://bucket/images"),
    ("s3://bucket", "s3://bucket/work"),
])
def test_work_uri_inside_data_path_is_refused(tmp_path, data_path, work_uri):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    data, work = data_path.format(tmp=tmp_path), work_uri.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"data_path={data}", f"work_uri={work}"])
    assert (f"work_uri {work!r} is inside data_path {data!r}: the next audit would index this "
            "run's files as part of the dataset and never resume; put work_uri outside the "
            "dataset") in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("data_path", "work_uri"), [
    ("{tmp}/data", "{tmp}/data-work"),  # a sibling with the same prefix
    ("{tmp}/data", "{tmp}/work"),
    ("s3://bucket/images", "s3://bucket/images-work"),
    ("s3://bucket/images", "s3://other/images/work"),
    ("s3://bucket/images", "{tmp}/data/work"),  # another store
])
def test_work_uri_beside_data_path_is_fine(tmp_path, data_path, work_uri):
    data, work = data_path.format(tmp=tmp_path), work_uri.format(tmp=tmp_path)
    cfg = load_config(overrides=[f"data_path={data}", f"work_uri={work}"])
    assert (cfg.data_path, cfg.work_uri) == (data, work)


@pytest.mark.parametrize(("item", "message"), [
    ("n_repeats=[", r"override 'n_repeats=\[': the value of 'n_repeats' is not valid YAML"),
    ("seed={a", r"override 'seed=\{a': the value of 'seed' is not valid YAML"),
    ("=5", r"override '=5' has an empty key"),
    (" =5", r"override ' =5' has an empty key"),
])
def test_a_malformed_override_is_one_line_naming_it(item, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=[item])
    assert "\n" not in str(info.value)


def test_a_config_that_is_a_folder_or_not_utf8_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file '{tmp_path}' is a folder"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("data_path: /données\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file '{latin}' is not UTF-8 text"):
        load_config(latin)


def test_the_default_config_keeps_its_training_fingerprint():
    """image_size null and the recipe keys left the default audit's fingerprint (and so its
    run ids and shards) as it was before they existed; null is the model's default size."""
    assert AuditConfig().training_fingerprint() == "7e7e499f38704f4a"
    assert AuditConfig(image_size=32).training_fingerprint() == "7e7e499f38704f4a"
    assert AuditConfig(recipe="scratch", backbone_lr_mult=0.5).training_fingerprint() == \
        "7e7e499f38704f4a"
    pretrained = AuditConfig(model_name="resnet50")
    assert pretrained.input_size == 224 and pretrained.fine_tunes
    assert pretrained.training_fingerprint() != AuditConfig(
        model_name="resnet50", backbone_lr_mult=0.2).training_fingerprint()
    assert pretrained.training_fingerprint() != AuditConfig(
        model_name="resnet50", model_weights="none").training_fingerprint()
