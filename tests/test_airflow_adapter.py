"""tasks/airflow_adapter.py without a metadata DB: the trigger form, conf validation, the
deployment settings, the trainer pod factory, the local trainer's log lines and
scheduled-audit files."""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from airflow.sdk import DAG
from airflow.sdk.exceptions import ParamValidationError
from kubernetes.client import ApiClient
from markdown_it import MarkdownIt

from tasks import airflow_adapter as acl
from tasks import runs
from tasks.audit import TrainerError
from tasks.config import (
    DEFAULT_CONFIG_PATH,
    AuditConfig,
    ConfigError,
    load_config,
    parse_config,
)

K8S_VERSION = "1.33"


def raw_html(markdown: str) -> list[str]:
    """The raw HTML in a Markdown text (CommonMark + tables, as Airflow's UI parses doc_md
    and description_md). Airflow renders with react-markdown's skipHtml: all of it would
    vanish, e.g. `<root>` in "laid out as <root>/<class>/<image>"."""
    found = []
    for token in MarkdownIt("commonmark", {"html": True}).enable("table").parse(markdown):
        if token.type == "html_block":
            found.append(token.content)
        found += [c.content for c in token.children or [] if c.type == "html_inline"]
    return found


def render_markdown(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


@pytest.fixture(scope="module")
def params() -> dict:
    return acl.build_params(load_config(DEFAULT_CONFIG_PATH))


def test_form_has_every_key_with_schema_and_yaml_defaults(params: dict) -> None:
    assert list(params) == list(AuditConfig.model_fields)
    # The form shows the config it was built from (config.yaml vs the schema: test_config.py).
    for key, value in load_config(DEFAULT_CONFIG_PATH).model_dump().items():
        assert params[key].value == value, key
    for key, param in params.items():
        field = AuditConfig.model_fields[key]
        # Markdown in the form: description_md, shown only when `description` is unset
        assert param.description is None, key
        assert param.schema["description_md"] == acl.markdown_text(field.description), key
        assert param.schema["section"] == field.json_schema_extra["section"], key
        assert param.schema["title"] == key
    assert params["n_repeats"].schema.items() >= {
        "type": "integer", "minimum": 1, "maximum": 1000}.items()
    assert params["test_split"].schema.items() >= {
        "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}.items()
    assert params["autocorrect"].schema["type"] == "boolean"
    assert params["results_path"].schema["type"] == ["null", "string"]
    model = params["model_name"].schema
    assert model["enum"] == ["small_cnn", "resnet18", "resnet50", "convnext_tiny", "vit_b_16",
                             "efficientnet_v2_s", "alexnet"]
    # image_size may be left empty (the model's default) and keeps its bounds
    assert params["image_size"].schema.items() >= {
        "type": ["null", "integer"], "minimum": 8, "maximum": 1024}.items()
    assert set(model["values_display"]) == set(model["enum"])
    assert model["values_display"]["resnet18"] == "ResNet-18"


def test_every_choice_in_the_form_has_a_label(params: dict) -> None:
    choices = {k for k, f in AuditConfig.model_fields.items()
               if typing.get_origin(f.annotation) is typing.Literal}
    assert {k for k, p in params.items() if "enum" in p.schema} == choices
    for key in choices:
        schema = params[key].schema
        assert schema["enum"] == list(typing.get_args(AuditConfig.model_fields[key].annotation))
        assert list(schema["values_display"]) == schema["enum"], key
        for value, label in schema["values_display"].items():
            # a label that is just the value is a missing label: shown raw among readable ones
            assert label.strip() and label != str(value), (key, value)
    assert params["augment"].schema["values_display"]["flip"].startswith("Horizontal flip")


def test_form_descriptions_render_as_markdown_without_raw_html(params: dict) -> None:
    for key, param in params.items():
        assert raw_html(param.schema["description_md"]) == [], key
    data_path = render_markdown(params["data_path"].schema["description_md"])
    assert "laid out as <code>&lt;root&gt;/&lt;class&gt;/&lt;image&gt;</code>." in data_path
    assert "after <code>patience</code> epochs" in render_markdown(
        params["track_eval"].schema["description_md"])
    # code spans stay as they are: escaping inside them would show "&lt;" literally
    assert acl.markdown_text("a <b> `<c>` & d") == "a &lt;b&gt; `<c>` &amp; d"


def test_form_rejects_out_of_range_and_unknown_choices(params: dict) -> None:
    with pytest.raises(ParamValidationError, match="minimum"):
        params["n_repeats"].resolve(0)
    with pytest.raises(ParamValidationError, match="vgg"):
        params["model_name"].resolve("vgg")
    assert params["results_path"].resolve(None) is None


def test_form_defaults_follow_acl_config(tmp_path: Path) -> None:
    cfg = tmp_path / "team.yaml"
    cfg.write_text("n_repeats: 3\nmodel_name: resnet18\n")
    dep = acl.Deployment.from_env({"ACL_CONFIG": str(cfg)})
    params = acl.build_params(dep.default_config())
    assert params["n_repeats"].value == 3
    assert params["model_name"].value == "resnet18"
    assert params["num_epochs"].value == AuditConfig.model_fields["num_epochs"].default


def test_doc_lists_every_key() -> None:
    doc = acl.params_doc(load_config(DEFAULT_CONFIG_PATH))
    for key in AuditConfig.model_fields:
        assert f"| `{key}` |" in doc
    assert raw_html(doc) == []
    page = render_markdown(doc)
    assert page.count("<tr>") == len(AuditConfig.model_fields) + 1  # no row broken by a "|"
    assert "&lt;root&gt;/&lt;class&gt;/&lt;image&gt;" in page


@pytest.mark.parametrize(("conf", "named"), [
    ({"n_repeat": 2}, "'n_repeat'"),
    ({"model_name": "vgg"}, "model_name"),
    ({"n_repeats": 0}, "n_repeats"),
    ({"test_split": 0.6, "val_split": 0.5}, "test_split + val_split"),
    ({"model_name": "alexnet", "image_size": 32}, "image_size"),
])
def test_bad_conf_names_the_key(params: dict, conf: dict, named: str) -> None:
    form = {k: p.value for k, p in params.items()}
    with pytest.raises(ConfigError) as err:
        acl.validate_conf(conf, form | {k: v for k, v in conf.items() if k in form})
    assert named in str(err.value)


def test_conf_overrides_the_form(params: dict) -> None:
    form = {k: p.value for k, p in params.items()}
    cfg = acl.validate_conf({"n_repeats": 3}, form | {"n_repeats": 3, "num_epochs": 2})
    assert (cfg.n_repeats, cfg.num_epochs, cfg.model_name) == (3, 2, form["model_name"])


def test_deployment_defaults_and_errors() -> None:
    dep = acl.Deployment.from_env({})
    assert (dep.runner, dep.namespace, dep.gpu_count, dep.gpu_pool) == (
        "local", "auto-correct-labels", 1, "gpu_pods")
    assert dep.startup_timeout >= 600
    for env, name in [({"ACL_RUNNER": "docker"}, "ACL_RUNNER"),
                      ({"ACL_GPU_COUNT": "two"}, "ACL_GPU_COUNT"),
                      ({"ACL_NODE_SELECTOR": "[1]"}, "ACL_NODE_SELECTOR"),
                      ({"ACL_TOLERATIONS": "{not json"}, "ACL_TOLERATIONS"),
                      ({"ACL_STARTUP_TIMEOUT": "0"}, "ACL_STARTUP_TIMEOUT"),
                      ({"ACL_BASE_DIR": "relative/dir"}, "ACL_BASE_DIR")]:
        with pytest.raises(ConfigError, match=name):
            acl.Deployment.from_env(env)


def _render_pods(dep: acl.Deployment, repeats: int = 2) -> list[dict]:
    """Every trainer pod of a run, rendered without a cluster and validated strictly."""
    run = "s3://acl-work/runs/manual__2026-01-01T00_00_00_00_00"
    with DAG("pods", schedule=None):
        mapped = acl.trainer_pod_operator(dep=dep).expand_kwargs(
            [acl.pod_kwargs(run, r, 0, r) for r in range(repeats)])
    pods = []
    for r in range(repeats):
        op = mapped.unmap(acl.pod_kwargs(run, r, 0, r))
        pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        assert pod["spec"]["containers"][0]["args"] == [
            "-m", "tasks.train", "--run", run, "--repeat", str(r)]
        pods.append(pod)
    return pods


def test_cpu_pods_with_custom_placement() -> None:
    dep = acl.Deployment.from_env({
        "ACL_GPU_COUNT": "0", "ACL_NODE_SELECTOR": '{"pool": "batch"}',
        "ACL_TOLERATIONS": '[{"key": "spot", "operator": "Exists", "effect": "NoExecute", '
                           '"tolerationSeconds": 300}]',
        "ACL_TRAINER_CPU": "2", "ACL_TRAINER_MEMORY": "6Gi",
        "ACL_S3_ENDPOINT": "http://seaweedfs.storage:8333", "ACL_K8S_NAMESPACE": "audits",
        "ACL_TRAINER_IMAGE": "registry.local/trainer:dev"})
    for pod in _render_pods(dep):
        spec, container = pod["spec"], pod["spec"]["containers"][0]
        assert pod["metadata"]["namespace"] == "audits"
        assert container["image"] == "registry.local/trainer:dev"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["resources"]["requests"] == {"cpu": "2", "memory": "6Gi"}
        assert spec["nodeSelector"] == {"pool": "batch"}
        assert spec["tolerations"] == [{"key": "spot", "operator": "Exists",
                                        "effect": "NoExecute", "tolerationSeconds": 300}]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://seaweedfs.storage:8333"


def test_gpu_pods_tolerate_the_gpu_taint() -> None:
    dep = acl.Deployment.from_env({"ACL_GPU_COUNT": "2"})
    for pod in _render_pods(dep):
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            pod["spec"]["tolerations"]
        assert "AWS_ENDPOINT_URL_S3" not in json.dumps(pod)


def test_beton_pod_is_a_cpu_trainer_pod_placed_like_the_trainers(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    runs.write_config(run, AuditConfig(data_path="s3://acl/data/"))
    assert acl.plan_beton_kwargs(run) == []  # ffcv off: no pod, build_beton is skipped
    runs.write_config(run, parse_config({"data_path": "s3://acl/data/", "ffcv": True},
                                        check_installed=False))
    (kwargs,) = acl.plan_beton_kwargs(run)
    dep = acl.Deployment.from_env({"ACL_GPU_COUNT": "2", "ACL_NODE_SELECTOR": '{"pool": "gpu"}'})
    with DAG("beton", schedule=None):
        mapped = acl.beton_pod_operator(dep=dep).expand_kwargs([kwargs])
    op = mapped.unmap(kwargs)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (trainer,) = _render_pods(dep, repeats=1)
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["-m", "tasks.ffcv_data", "--run", run]
    assert container["image"] == trainer["spec"]["containers"][0]["image"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # FFCV writes on the CPU
    for key in ("nodeSelector", "tolerations", "serviceAccountName"):  # schedules where they do
        assert pod["spec"][key] == trainer["spec"][key], key
    assert container["env"] == trainer["spec"]["containers"][0]["env"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "build-beton"
    assert op.pool == "default_pool" and op.retries >= 1 and op.get_logs



def test_stage_weights_pod_is_a_cpu_trainer_pod_placed_like_the_trainers(
        tmp_path: Path) -> None:
    """The pod that stages torchvision weights the Airflow image could not (decisions of the
    plan: tests/test_weights.py)."""
    run = str(tmp_path / "run")
    runs.write_config(run, AuditConfig(data_path="s3://acl/data/"))  # small_cnn: random init
    assert acl.plan_weights_kwargs(run) == []
    runs.write_config(run, AuditConfig(data_path="s3://acl/data/", model_name="resnet18",
                                       model_weights="none"))
    assert acl.plan_weights_kwargs(run) == []
    runs.write_config(run, AuditConfig(data_path="s3://acl/data/", model_name="resnet18"))
    (kwargs,) = acl.plan_weights_kwargs(run)  # DEFAULT weights, not staged yet
    dep = acl.Deployment.from_env({"ACL_GPU_COUNT": "2", "ACL_NODE_SELECTOR": '{"pool": "gpu"}'})
    with DAG("weights", schedule=None):
        mapped = acl.weights_pod_operator(dep=dep).expand_kwargs([kwargs])
    op = mapped.unmap(kwargs)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (trainer,) = _render_pods(dep, repeats=1)
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python"]
    assert container["args"] == ["-m", "tasks.weights", "--run", run]
    assert container["image"] == trainer["spec"]["containers"][0]["image"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # a copy, no GPU
    for key in ("nodeSelector", "tolerations", "serviceAccountName"):  # schedules where they do
        assert pod["spec"][key] == trainer["spec"][key], key
    assert container["env"] == trainer["spec"]["containers"][0]["env"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "stage-weights"
    assert op.task_id == "stage_weights" and op.map_index_template == "initial weights"
    assert op.pool == "default_pool" and op.retries >= 1 and op.get_logs

# --- the local trainer's log lines ---------------------------------------------------------

def test_trainer_lines_reach_the_task_log_without_their_own_time_and_level(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=acl.TRAINER_LOGGER)
    missing = str(tmp_path / "no-run")
    with pytest.raises(TrainerError):  # a real trainer subprocess, failing at once
        acl.run_repeat_local(missing, 0)
    records = [r for r in caplog.records if r.name == acl.TRAINER_LOGGER]
    (failed,) = [r for r in records if "repeat 0 failed" in r.getMessage()]
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith("repeat 0 failed: MissingFileError: ")
    assert not any(acl.TRAINER_LINE.match(r.getMessage()) for r in records)
    # lines without the trainer's prefix (a traceback, a print) pass unchanged, as INFO
    for line in ("Traceback (most recent call last):", "  File \"x.py\", line 1", ""):
        assert acl.trainer_record(line) == (logging.INFO, line)
    assert acl.trainer_record("2026-05-04 10:00:00,123 WARNING low disk: 2 GB") == (
        logging.WARNING, "low disk: 2 GB")


# --- scheduled audit files -----------------------------------------------------------------

def _audit(tmp_path: Path, name: str, body: dict | str) -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def test_audit_file_becomes_an_audit(tmp_path: Path) -> None:
    base = load_config(DEFAULT_CONFIG_PATH)
    path = _audit(tmp_path, "pets-daily.yaml", {
        "schedule": "@daily", "dataset": "s3://pets/images/",
        "overrides": {"n_repeats": 4, "work_uri": str(tmp_path / "work")}})
    audit = acl.load_audit(path, base)
    assert (audit.name, audit.dag_id, audit.schedule) == ("pets_daily", "audit_pets_daily",
                                                         "@daily")
    assert audit.config.data_path == "s3://pets/images/"
    assert audit.config.n_repeats == 4
    assert audit.results_uri == str(tmp_path / "work" / "audits" / "pets_daily" / "results.csv")
    assert acl.asset_uri(audit.results_uri).startswith("file:///")
    assert acl.asset_uri("s3://b/x/results.csv") == "s3://b/x/results.csv"


@pytest.mark.parametrize(("body", "named"), [
    ({"schedul": "@daily", "dataset": "d"}, "'schedul'"),
    ({"schedule": "61 * * * *", "dataset": "d"}, "schedule"),
    ({"schedule": "@daily"}, "dataset"),
    ({"schedule": "@daily", "dataset": "d", "overrides": {"n_repeats": 0}}, "n_repeats"),
    ({"schedule": "@daily", "dataset": "d", "overrides": {"epochs": 3}}, "'epochs'"),
    ({"name": "has space", "schedule": "@daily", "dataset": "d"}, "name"),
    ("schedule: [unclosed", "YAML"),
])
def test_bad_audit_file_names_file_and_key(tmp_path: Path, body: dict | str,
                                           named: str) -> None:
    path = _audit(tmp_path, "bad.yaml", body)
    with pytest.raises(ConfigError) as err:
        acl.load_audit(path, load_config(DEFAULT_CONFIG_PATH))
    assert str(path) in str(err.value)
    assert named in str(err.value)


def test_load_audits_keeps_the_good_ones(tmp_path: Path) -> None:
    _audit(tmp_path, "a.yaml", {"schedule": "@daily", "dataset": "d1"})
    _audit(tmp_path, "b.yaml", {"schedule": "@daily", "dataset": "d2",
                                "overrides": {"test_split": 2}})
    _audit(tmp_path, "c.yml", {"name": "a", "schedule": "@hourly", "dataset": "d3"})
    dep = acl.Deployment.from_env({"ACL_AUDITS_DIR": str(tmp_path)})
    audits, errors = acl.load_audits(dep)
    assert [a.name for a in audits] == ["a"]
    assert len(errors) == 2
    assert "b.yaml" in errors[0] and "test_split" in errors[0]
    assert "c.yml" in errors[1] and "already used" in errors[1]
    with pytest.raises(acl.AuditFileError, match="2 invalid audit file"):
        acl.check_audit_files(dep)
    assert acl.load_audits(acl.Deployment.from_env({"ACL_AUDITS_DIR": str(tmp_path / "no")})) \
        == ([], [])


def test_relative_audit_paths_resolve_against_the_base_dir(tmp_path: Path,
                                                          monkeypatch) -> None:
    path = _audit(tmp_path, "pets.yaml", {
        "schedule": "@daily", "dataset": "data/pets",
        "overrides": {"results_path": "out/latest.csv", "model_weights": "w/init.pt"}})
    base = load_config(DEFAULT_CONFIG_PATH)  # work_uri "work": relative, inherited
    seen = []
    for cwd in (tmp_path, tmp_path / "elsewhere"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        seen.append(acl.load_audit(path, base).config)
        root = tmp_path / "deploy"
        dep = acl.Deployment.from_env({"ACL_AUDITS_DIR": str(tmp_path),
                                       "ACL_BASE_DIR": str(root)})
        ((audit,), errors) = acl.load_audits(dep)
        assert errors == []
        assert audit.config.data_path == str(root / "data" / "pets")
        assert audit.config.work_uri == str(root / "work")
        assert audit.results_uri == str(root / "out" / "latest.csv")
    first, second = seen
    assert first == second
    # default base: the checkout's root (the folder holding configs/), wherever Airflow runs
    assert first.data_path == str(acl.REPO_ROOT / "data" / "pets")
    assert first.work_uri == str(acl.REPO_ROOT / "work")
    assert first.results_path == str(acl.REPO_ROOT / "out" / "latest.csv")
    assert first.model_weights == "w/init.pt"  # left to the trainer, as in every config


def test_local_paths_become_absolute_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = acl.absolute_paths(AuditConfig(data_path="data/pets", work_uri="s3://b/work",
                                         results_path="out/latest.csv"))
    assert cfg.data_path == str(tmp_path / "data" / "pets")
    assert cfg.work_uri == "s3://b/work"
    assert cfg.results_path == str(tmp_path / "out" / "latest.csv")


def test_kubernetes_runner_needs_object_storage(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    form = {"data_path": str(tmp_path / "data"), "work_uri": "s3://b/work"}
    with pytest.raises(AirflowFailException, match="data_path must be an s3:// URI"):
        acl.prepare(form, {}, "manual__1", runner="kubernetes")


def test_task_bodies_hand_the_aws_connection_to_storage(tmp_path: Path, monkeypatch) -> None:
    """A task body hands what the environment leaves unset from the AWS connection
    (`ACL_AWS_CONN_ID`) to the storage layer, and so to local trainer subprocesses."""
    from tasks import runs, storage

    run = runs.run_uri(str(tmp_path), "r1")
    runs.write_config(run, AuditConfig(data_path=str(tmp_path / "data"), work_uri=str(tmp_path)))
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    conn = {"conn_type": "aws", "login": "AKIAEXAMPLEKEYID1234", "password": "example-secret",
            "extra": {"service_config": {"s3": {"endpoint_url": "http://store.example:8333"}},
                      "region_name": "eu-west-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_ACL_STORE", json.dumps(conn))
    monkeypatch.setenv("ACL_AWS_CONN_ID", "acl_store")
    try:
        acl.autocorrect_requested(run)
        assert storage.subprocess_env() == {
            "AWS_ENDPOINT_URL_S3": "http://store.example:8333", "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID1234", "AWS_SECRET_ACCESS_KEY": "example-secret"}
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env.example:9000")  # the env wins
        acl.autocorrect_requested(run)
        assert sorted(storage.subprocess_env()) == ["AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION",
                                                    "AWS_SECRET_ACCESS_KEY"]
        monkeypatch.setenv("ACL_AWS_CONN_ID", "no_such_connection")
        acl.autocorrect_requested(run)
        assert storage.subprocess_env() == {}
    finally:
        storage.configure_s3()
