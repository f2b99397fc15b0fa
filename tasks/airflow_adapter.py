"""The thin layer between Airflow and `tasks/`: the only module of the package that imports
Airflow.

It holds what the DAG files wire together and what tests call directly: the deployment
settings (ACL_* environment variables), the AWS connection handed to the storage layer, the
trigger form built from the config schema, conf validation, the task bodies (index, plan,
local trainer, merge, report, relabel), the one KubernetesPodOperator factory with the house
defaults, and the loader for scheduled audit files. Everything else stays Airflow-free
(tests/test_boundary.py checks it).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import runs, storage
from tasks.config import DEFAULT_CONFIG_PATH, AuditConfig, ConfigError, load_config, parse_config
from tasks.errors import UserError
from tasks.plan import plan_repeats

log = logging.getLogger(__name__)

RUNNERS = ("local", "kubernetes")
DEFAULT_AUDITS_DIR = DEFAULT_CONFIG_PATH.parent / "audits"
REPO_ROOT = DEFAULT_CONFIG_PATH.parent.parent  # the checkout: the folder holding configs/
TRAINER_LOGGER = "acl.trainer"
CONN_ID_ENV = "ACL_AWS_CONN_ID"
# The prefix of a trainer's log line (train.py / ffcv_data.py main: "%(asctime)s %(levelname)s
# %(message)s"); the task log adds its own time and level, so only the message is passed on.
TRAINER_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")

# Shown as each mapped trainer's name in the grid, e.g. "repeat 3 (round 0, fold 3)".
LOCAL_MAP_INDEX_TEMPLATE = "{{ task.op_kwargs['label'] }}"
POD_MAP_INDEX_TEMPLATE = (
    "repeat {{ task.labels['acl-repeat'] }} (round {{ task.labels['acl-round'] }}, "
    "fold {{ task.labels['acl-fold'] }})"
)
BETON_MAP_INDEX_TEMPLATE = "dataset.beton"
WEIGHTS_MAP_INDEX_TEMPLATE = "initial weights"
EMBED_POD_MAP_INDEX_TEMPLATE = "chunk {{ task.labels['acl-chunk'] }}"
PROBE_MAP_INDEX_TEMPLATE = "probes and neighbours"

# Readable labels for the form's drop-downs: one for every value of every choice key
# (tests/test_airflow_adapter.py checks them all).
VALUE_LABELS: dict[str, dict[str, str]] = {
    "model_name": {
        "small_cnn": "Small CNN (fast on CPU, small images)",
        "resnet18": "ResNet-18",
        "resnet50": "ResNet-50",
        "convnext_tiny": "ConvNeXt-Tiny (needs image_size >= 32)",
        "vit_b_16": "ViT-B/16 (image_size 224)",
        "efficientnet_v2_s": "EfficientNet V2-S",
        "alexnet": "AlexNet (needs image_size >= 63)",
    },
    "recipe": {
        "auto": "Auto (finetune when starting from weights)",
        "scratch": "From scratch (one-cycle SGD)",
        "finetune": "Fine-tune (lower backbone LR, warm-up, cosine)",
    },
    "device": {"auto": "Auto (CUDA when available)", "cpu": "CPU", "cuda": "CUDA GPU"},
    "method": {
        "train": "Train a model per repeat",
        "embeddings": "Frozen embeddings + a probe per repeat (fast)",
    },
    "probe": {"logistic": "Logistic regression", "mlp": "Small MLP (one hidden layer)"},
    "split_strategy": {
        "rounds": "Rounds of K folds (each image predicted once per round)",
        "random": "Fresh random split per repeat (original tool)",
    },
    "augment": {
        "crop": "Random crop only (safe for text, digits)",
        "flip": "Horizontal flip (+ mirrored predictions)",
        "flip_crop": "Random crop + horizontal flip",
        "none": "No augmentation",
    },
    "relabel_mode": {
        "move": "Move images into the corrected class folder (undoable)",
        "manifest": "Write corrected-labels.csv, move nothing",
    },
}
_SCHEMA_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
                "maxLength", "enum")


# --- deployment settings -----------------------------------------------------------------

def _env_json(env: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name} must be JSON ({kind.__name__}), got {raw!r}: {err}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{name} must be a JSON {kind.__name__}, got {raw!r}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int, least: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class Deployment:
    """What the cluster or laptop decides, read from ACL_* environment variables."""

    runner: str = "local"
    config_path: str = str(DEFAULT_CONFIG_PATH)
    audits_dir: str = str(DEFAULT_AUDITS_DIR)
    base_dir: str = str(REPO_ROOT)  # relative local paths of audit files resolve against it
    namespace: str = "auto-correct-labels"
    trainer_image: str = "ghcr.io/auto-correct-labels/trainer:0.1.0"
    service_account: str = "acl-trainer"
    gpu_count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] | None = None  # None: the GPU taint when gpu_count > 0
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    s3_secret: str = "acl-s3-credentials"
    s3_endpoint: str | None = None
    gpu_pool: str = "gpu_pods"
    startup_timeout: int = 1800

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Deployment:
        """Read the deployment contract; a bad value raises ConfigError naming the variable."""
        env = os.environ if env is None else env
        runner = env.get("ACL_RUNNER", "local").strip() or "local"
        if runner not in RUNNERS:
            raise ConfigError(f"ACL_RUNNER must be one of {', '.join(RUNNERS)}, got {runner!r}")
        d = cls()
        base_dir = env.get("ACL_BASE_DIR") or d.base_dir
        if not Path(base_dir).is_absolute():
            raise ConfigError(f"ACL_BASE_DIR must be an absolute path, got {base_dir!r}")
        return cls(
            runner=runner,
            config_path=env.get("ACL_CONFIG") or d.config_path,
            audits_dir=env.get("ACL_AUDITS_DIR") or d.audits_dir,
            base_dir=base_dir,
            namespace=env.get("ACL_K8S_NAMESPACE") or d.namespace,
            trainer_image=env.get("ACL_TRAINER_IMAGE") or d.trainer_image,
            service_account=env.get("ACL_TRAINER_SERVICE_ACCOUNT") or d.service_account,
            gpu_count=_env_int(env, "ACL_GPU_COUNT", d.gpu_count, 0),
            node_selector=_env_json(env, "ACL_NODE_SELECTOR", dict, {}),
            tolerations=_env_json(env, "ACL_TOLERATIONS", list, None),
            cpu_request=env.get("ACL_TRAINER_CPU") or d.cpu_request,
            memory_request=env.get("ACL_TRAINER_MEMORY") or d.memory_request,
            s3_secret=env.get("ACL_S3_SECRET") or d.s3_secret,
            s3_endpoint=env.get("ACL_S3_ENDPOINT") or None,
            gpu_pool=env.get("ACL_GPU_POOL") or d.gpu_pool,
            startup_timeout=_env_int(env, "ACL_STARTUP_TIMEOUT", d.startup_timeout, 1),
        )

    def default_config(self) -> AuditConfig:
        """The config the trigger form starts from (ACL_CONFIG, else configs/config.yaml)."""
        return load_config(self.config_path)


# --- the AWS connection -------------------------------------------------------------------

def aws_connection_settings() -> dict[str, str]:
    """boto3 client settings from the Airflow AWS connection (`ACL_AWS_CONN_ID`, default
    `aws_default`), for what the environment leaves unset; empty when the connection does
    not exist."""
    conn_id = os.environ.get(CONN_ID_ENV, "aws_default")
    try:
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
    except Exception as err:  # no connection or no Airflow context: the boto3 defaults
        log.debug("no Airflow connection %r (%s); using the boto3 defaults", conn_id,
                  type(err).__name__)
        return {}
    extra = conn.extra_dejson or {}
    s3_extra = (extra.get("service_config") or {}).get("s3") or {}
    out: dict[str, str] = {}
    endpoint = s3_extra.get("endpoint_url") or extra.get("endpoint_url")
    if endpoint and not (os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL")):
        out["endpoint_url"] = str(endpoint)
    region = extra.get("region_name")
    if region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        out["region_name"] = str(region)
    if conn.login and conn.password and not os.environ.get("AWS_ACCESS_KEY_ID"):
        out["aws_access_key_id"] = conn.login
        out["aws_secret_access_key"] = conn.password
        if extra.get("aws_session_token"):
            out["aws_session_token"] = str(extra["aws_session_token"])
    return out


def use_aws_connection() -> dict[str, str]:
    """Hand the AWS connection's settings to the storage layer (and so to local trainer
    subprocesses); every task body calls this first. Returns the settings."""
    settings = aws_connection_settings()
    storage.configure_s3(**settings)
    return settings


# --- the trigger form --------------------------------------------------------------------

def _param_schema(name: str, prop: dict[str, Any]) -> dict[str, Any]:
    """JSON-schema keywords of one config key, as Airflow's Param takes them."""
    if "anyOf" in prop:  # Optional[...]: "null" first so the form may leave it empty
        types = [t["type"] for t in prop["anyOf"] if "type" in t]
        schema: dict[str, Any] = {"type": sorted(types, key=lambda t: t != "null")}
        for branch in prop["anyOf"]:  # bounds of the non-null branch (image_size)
            schema.update({k: branch[k] for k in _SCHEMA_KEYS if k in branch})
    else:
        schema = {"type": prop["type"]}
    schema.update({k: prop[k] for k in _SCHEMA_KEYS if k in prop})
    if "enum" in prop:
        labels = VALUE_LABELS.get(name, {})
        schema["values_display"] = {v: labels.get(v, str(v)) for v in prop["enum"]}
    schema["section"] = prop.get("section", "Other")
    schema["title"] = name
    return schema


def markdown_text(text: str) -> str:
    """A config description (plain text with `code` spans) as Markdown: angle brackets and
    ampersands outside code spans escaped, because Airflow's renderer drops raw HTML
    (`<root>` would vanish)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else html.escape(p, quote=False) for p in parts)


def build_params(defaults: AuditConfig) -> dict[str, Any]:
    """One Airflow Param per config key: type, bounds, enums with readable labels,
    Markdown description and form section from the schema; defaults from `defaults`."""
    from airflow.sdk import Param

    props = AuditConfig.model_json_schema()["properties"]
    values = defaults.model_dump()
    # description_md (the form renders Markdown only when `description` is unset)
    return {
        name: Param(values[name],
                    description_md=markdown_text(props[name].get("description", "")),
                    **_param_schema(name, props[name]))
        for name in AuditConfig.model_fields
    }


def params_doc(defaults: AuditConfig) -> str:
    """A Markdown table of every config key for the DAG's doc_md."""
    props = AuditConfig.model_json_schema()["properties"]
    rows = ["| key | section | default | meaning |", "|---|---|---|---|"]
    for name, value in defaults.model_dump().items():
        prop = props[name]
        desc = markdown_text(str(prop.get("description", ""))).replace("|", "\\|")
        rows.append(f"| `{name}` | {prop.get('section', '')} | `{json.dumps(value)}` | {desc} |")
    return "\n".join(rows)


def validate_conf(conf: Mapping[str, Any] | None,
                  params: Mapping[str, Any] | None = None,
                  check_installed: bool = True) -> AuditConfig:
    """The run's config: the form's values (`params`, which Airflow has already merged with
    the conf) with the conf on top, checked against the schema. Unknown conf keys, bad
    values and bad combinations raise ConfigError naming the key. `check_installed=False`
    where the trainers run elsewhere (pods), so FFCV need not be installed here."""
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(AuditConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} in the run conf; valid keys: "
                          f"{', '.join(AuditConfig.model_fields)}")
    merged = {k: v for k, v in (params or {}).items() if k in AuditConfig.model_fields}
    merged.update(conf)
    return parse_config(merged, check_installed=check_installed)


def _fail(err: Exception) -> Exception:
    """An error that fails the task at once: retrying cannot fix a bad config or a missing
    shard."""
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(str(err))


# --- task bodies ---------------------------------------------------------------------------

def prepare(params: Mapping[str, Any], conf: Mapping[str, Any] | None, run_id: str,
            runner: str = "local") -> str:
    """Validate the conf (before any work), index the dataset into the run folder of this
    DAG run and record the config; returns the run URI."""
    from tasks.audit import prepare_run

    use_aws_connection()
    try:
        cfg = validate_conf(conf, params, check_installed=runner != "kubernetes")
        if runner == "kubernetes":
            for key in ("data_path", "work_uri"):
                if not storage.is_s3(value := getattr(cfg, key)):
                    raise ConfigError(f"{key} must be an s3:// URI with ACL_RUNNER=kubernetes "
                                      f"(trainer pods cannot see the local folder {value!r})")
    except ConfigError as err:
        raise _fail(err) from None
    cfg = absolute_paths(cfg)
    run = prepare_run(cfg, run_id, defer_weights=runner == "kubernetes")
    log.info("run folder %s: %d repeats of %s on %s", run, cfg.n_repeats, cfg.model_name,
             cfg.data_path)
    return run


def absolute_paths(cfg: AuditConfig, base: str | Path | None = None) -> AuditConfig:
    """Local relative paths resolved once against `base` (default: this process's folder,
    at index time), so later tasks (maybe on another worker or folder) and the XCom URIs
    agree."""
    update = {key: str((Path(base or ".") / value).resolve())
              for key in ("data_path", "work_uri", "results_path")
              if (value := getattr(cfg, key)) and not storage.is_s3(value)}
    return cfg.model_copy(update=update)


def step_pod_kwargs(module: str, run: str, component: str) -> dict[str, Any]:
    """The expand_kwargs entry of a one-off pod of a run: `python -m <module> --run <run>`."""
    return {"arguments": ["-m", module, "--run", run],
            "labels": {"app.kubernetes.io/name": "auto-correct-labels",
                       "app.kubernetes.io/component": component}}


def plan_beton_kwargs(run: str) -> list[dict[str, Any]]:
    """Kubernetes runner: the expand_kwargs input of the build_beton pod, one pod when the
    run's `ffcv` is on, none otherwise (the task is then skipped)."""
    use_aws_connection()
    if not runs.read_config(run).ffcv:
        return []
    return [step_pod_kwargs("tasks.ffcv_data", run, "build-beton")]


def plan_weights_kwargs(run: str) -> list[dict[str, Any]]:
    """Kubernetes runner: the expand_kwargs input of the stage_weights pod, one pod when the
    run asks for torchvision weights its folder does not hold yet (the index step leaves them
    to the pod where torchvision is missing), none otherwise (the task is then skipped)."""
    from tasks.weights import pending_stage

    use_aws_connection()
    if not pending_stage(runs.read_config(run), run):
        return []
    return [step_pod_kwargs("tasks.weights", run, "stage-weights")]


def plan_train_kwargs(run: str, runner: str = "local") -> list[dict[str, Any]]:
    """One small dict per repeat, the expand_kwargs input of the mapped trainer task."""
    use_aws_connection()
    cfg = runs.read_config(run)
    if cfg.method != "train":  # method embeddings: the probe step writes the shards
        return []
    specs = plan_repeats(cfg)
    if runner == "kubernetes":
        return [pod_kwargs(run, s.repeat, s.round, s.fold) for s in specs]
    return [{"run": run, "repeat": s.repeat, "label": s.label} for s in specs]


def pod_kwargs(run: str, repeat: int, round_: int, fold: int) -> dict[str, Any]:
    """The per-repeat part of a trainer pod: its arguments and labels."""
    return {
        "arguments": ["-m", "tasks.train", "--run", run, "--repeat", str(repeat)],
        "labels": {"app.kubernetes.io/name": "auto-correct-labels",
                   "app.kubernetes.io/component": "trainer",
                   "acl-repeat": str(repeat), "acl-round": str(round_), "acl-fold": str(fold)},
    }


def plan_embed_kwargs(run: str, runner: str = "local") -> list[dict[str, Any]]:
    """method embeddings: one small dict per embedding chunk, the expand_kwargs input of the
    mapped embed_chunk task; none for method train (the task is then skipped)."""
    from tasks.embeddings import n_chunks
    from tasks.index import read_manifest

    use_aws_connection()
    cfg = runs.read_config(run)
    if cfg.method != "embeddings":
        return []
    manifest, _ = read_manifest(run)
    chunks = range(n_chunks(len(manifest), cfg.embed_chunk_size))
    if runner == "kubernetes":
        return [{"arguments": ["-m", "tasks.embed", "--run", run, "--chunk", str(c)],
                 "labels": {"app.kubernetes.io/name": "auto-correct-labels",
                            "app.kubernetes.io/component": "embedder", "acl-chunk": str(c)}}
                for c in chunks]
    return [{"run": run, "chunk": c, "label": f"chunk {c}"} for c in chunks]


def plan_probe_kwargs(run: str, runner: str = "local") -> list[dict[str, Any]]:
    """method embeddings: the probe step (one task: every repeat's probe, the neighbours) as
    expand_kwargs input; none for method train (the task is then skipped)."""
    use_aws_connection()
    if runs.read_config(run).method != "embeddings":
        return []
    if runner == "kubernetes":
        return [step_pod_kwargs("tasks.probe", run, "probe")]
    return [{"run": run}]


def trainer_record(line: str) -> tuple[int, str]:
    """(level, message) of one trainer output line: its own time and level taken off;
    other lines (a traceback, a library's print) are INFO, as they are."""
    if m := TRAINER_LINE.fullmatch(line):
        return logging.getLevelNamesMapping()[m[1]], m[2]
    return logging.INFO, line


def run_repeat_local(run: str, repeat: int, label: str | None = None) -> str:
    """Local runner: the trainer entrypoint as a subprocess, each of its log lines passed to
    the task log (message and level) as it comes; returns the shard URI."""
    from tasks.audit import run_trainer_subprocess

    use_aws_connection()
    trainer_log = logging.getLogger(TRAINER_LOGGER)
    log.info("training %s of run %s", label or f"repeat {repeat}", run)
    run_trainer_subprocess(run, repeat, emit=lambda line: trainer_log.log(*trainer_record(line)))
    shard = runs.shard_uri(run, repeat)
    if not storage.exists(shard):
        raise RuntimeError(f"trainer for repeat {repeat} exited cleanly but {shard} is missing")
    return shard


def _run_local(command: list[str], what: str, resumes_at: str) -> None:
    """Local runner: an entrypoint as a subprocess, its log lines passed to the task log."""
    from tasks.audit import run_step_subprocess

    use_aws_connection()
    trainer_log = logging.getLogger(TRAINER_LOGGER)
    run_step_subprocess(command, what, resumes_at,
                        emit=lambda line: trainer_log.log(*trainer_record(line)))


def embed_chunk_local(run: str, chunk: int) -> str:
    """Local runner: one embedding chunk as a subprocess of `tasks.embed`; returns its URI."""
    from tasks.audit import embed_command

    log.info("embedding chunk %d of run %s", chunk, run)
    _run_local(embed_command(run, chunk), f"embedding chunk {chunk}", "this chunk")
    out = runs.embedding_chunk_uri(run, chunk)
    if not storage.exists(out):
        raise RuntimeError(f"embedding chunk {chunk} exited cleanly but {out} is missing")
    return out


def probe_local(run: str) -> str:
    """Local runner: the probes and neighbours as a subprocess of `tasks.probe`; returns
    the neighbours file's URI."""
    from tasks.audit import probe_command

    log.info("fitting the probes of run %s", run)
    _run_local(probe_command(run), "the probe step", "the probes")
    return runs.neighbours_uri(run)


def merge_shards(run: str) -> str:
    """Merge whatever shards exist; fail (no retry) naming the missing repeats when coverage
    is below min_coverage. Returns the results CSV URI. The merge logs the run summary's
    lines (`tasks.decide.summary_lines`) into the task log, the guard's as a warning."""
    from tasks.merge import MissingShardsError, merge_run

    use_aws_connection()
    try:
        return merge_run(run)
    except MissingShardsError as err:
        if runs.read_config(run).method == "embeddings":
            raise _fail(RuntimeError(
                f"{err}. In Airflow: clear the failed embed_chunk map indexes or the probe "
                "task with 'Downstream' checked (finished chunks are not embedded again)")
                ) from None
        raise _fail(RuntimeError(
            f"{err}. In Airflow: clear the failed train_repeat map indexes {err.missing} "
            "with 'Downstream' checked (or clear the whole run; finished repeats are not "
            "retrained)")) from None


def run_summary(run: str) -> dict[str, Any] | None:
    """The run's summary.json (`tasks.decide.summary`), the merge task's XCom "summary";
    None for a run merged before summaries existed."""
    from tasks.merge import read_summary

    use_aws_connection()
    return read_summary(run)


def write_run_report(run: str, started: datetime | None = None) -> str:
    """report.html of the run; `started` is when the DAG run began."""
    from tasks.report import write_report

    use_aws_connection()
    seconds = None
    if started is not None:
        seconds = (datetime.now(UTC) - started).total_seconds()
    return write_report(run, seconds=seconds)


def autocorrect_requested(run: str) -> bool:
    """Whether this run's config asks to relabel after the audit."""
    use_aws_connection()
    cfg = runs.read_config(run)
    log.info("autocorrect is %s", "on" if cfg.autocorrect else "off: relabel is skipped")
    return cfg.autocorrect


def relabel_run(results: str) -> str | None:
    """Relabel the dataset from a run's results CSV (mode and thresholds from the run's
    config); returns the journal or corrected-labels CSV URI. An audit the model-quality guard
    does not trust, or any other error the user can fix, fails the task at once with its one
    line (relabel with `python -m tasks relabel --results <results> --force` to override)."""
    from tasks.relabel import relabel_results

    use_aws_connection()
    try:
        return relabel_results(results)
    except UserError as err:
        raise _fail(err) from None


def review_params() -> dict[str, Any]:
    """The apply_review DAG's Params: the audited run and the reviewer's decisions file."""
    from airflow.sdk import Param

    return {
        "results": Param("", type="string", minLength=1, title="Run or results CSV",
                         description_md="The audited run's `results.csv` (or its run folder, "
                         "`<work_uri>/runs/<run id>`): a local path or an `s3://` URI."),
        "decisions": Param("", type="string", minLength=1, title="Decisions file",
                           description_md="The reviewer's `decisions.csv` (exported from "
                           "`report.html`, or by `python -m tasks labelstudio import`): a "
                           "local path or an `s3://` URI."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description_md="Log the plan (what would move where) and change "
                         "nothing."),
    }


def apply_review(results: str, decisions: str, dry_run: bool = False) -> str | None:
    """Relabel a run exactly as its decisions file says (`relabel_results` with
    `decisions_uri`, the run's relabel_mode); `results` is the results CSV or the run
    folder. A bad decisions file fails the task at once, naming the row; nothing moves.
    Returns the journal or corrected-labels CSV URI (None for a dry run)."""
    from tasks.relabel import relabel_results

    use_aws_connection()
    results = results.strip()
    if not results.endswith(".csv"):
        results = runs.results_uri(results.rstrip("/"))
    try:
        return relabel_results(results, dry_run=dry_run, decisions_uri=decisions.strip())
    except UserError as err:
        raise _fail(err) from None


# --- Kubernetes runner ---------------------------------------------------------------------

def pod_tolerations(dep: Deployment) -> list[dict[str, Any]]:
    """ACL_TOLERATIONS, else the GPU taint when pods request GPUs."""
    if dep.tolerations is not None:
        return dep.tolerations
    # GPU nodes are usually tainted nvidia.com/gpu:NoSchedule
    return ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            if dep.gpu_count > 0 else [])


def trainer_pod_defaults(dep: Deployment) -> dict[str, Any]:
    """The house defaults of every trainer pod, as KubernetesPodOperator arguments."""
    from kubernetes.client import models as k8s

    limits = {"memory": dep.memory_request}
    if dep.gpu_count > 0:
        limits["nvidia.com/gpu"] = str(dep.gpu_count)
    tolerations = pod_tolerations(dep)

    def secret(name: str) -> k8s.V1EnvVar:
        # optional: clusters with workload identity (IRSA etc.) need no Secret at all
        return k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=dep.s3_secret, key=name, optional=True)))

    env = [secret("AWS_ACCESS_KEY_ID"), secret("AWS_SECRET_ACCESS_KEY"),
           k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
    if dep.s3_endpoint:
        env.append(k8s.V1EnvVar(name="AWS_ENDPOINT_URL_S3", value=dep.s3_endpoint))
    return {
        "namespace": dep.namespace,
        "image": dep.trainer_image,
        "image_pull_policy": "IfNotPresent",
        "name": "acl-train",
        "cmds": ["python"],
        "service_account_name": dep.service_account,
        "automount_service_account_token": False,
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": dep.cpu_request, "memory": dep.memory_request}, limits=limits),
        "node_selector": dep.node_selector or None,
        "tolerations": [k8s.V1Toleration(**_snake(t)) for t in tolerations] or None,
        "env_vars": env,
        # GPU nodes may have to be created by the autoscaler first: wait long enough.
        "startup_timeout_seconds": dep.startup_timeout,
        "schedule_timeout_seconds": dep.startup_timeout,
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
        "pool": dep.gpu_pool,
        # Safe: a shard is written atomically and a retry of a finished repeat is a no-op.
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
    }


def _snake(obj: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes JSON keys (tolerationSeconds) as client model arguments."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in obj.items()}


def trainer_pod_operator(task_id: str = "train_repeat", dep: Deployment | None = None,
                         **overrides: Any):
    """KubernetesPodOperator.partial(...) with the house defaults; expand it with
    `.expand_kwargs(plan_train_kwargs(run, "kubernetes"))`."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    kwargs = {**trainer_pod_defaults(dep or Deployment.from_env()),
              "map_index_template": POD_MAP_INDEX_TEMPLATE, **overrides}
    return KubernetesPodOperator.partial(task_id=task_id, **kwargs)


def cpu_pod_operator(task_id: str, name: str, map_index_template: str,
                     dep: Deployment | None = None, **overrides: Any):
    """A one-off pod of a run (build_beton, stage_weights, probe): a trainer pod (image, env,
    service account, placement) without a GPU and outside the GPU pool."""
    dep = dep or Deployment.from_env()
    cpu_only = replace(dep, gpu_count=0, tolerations=pod_tolerations(dep))
    return trainer_pod_operator(task_id, cpu_only, **{
        "name": name, "pool": "default_pool", "map_index_template": map_index_template,
        **overrides})


def beton_pod_operator(task_id: str = "build_beton", dep: Deployment | None = None,
                       **overrides: Any):
    """The pod that builds the run's .beton once, before the trainer pods (the Airflow image
    has no FFCV). Expand it with `.expand_kwargs(plan_beton_kwargs(run))`."""
    return cpu_pod_operator(task_id, "acl-build-beton", BETON_MAP_INDEX_TEMPLATE, dep,
                            **overrides)


def weights_pod_operator(task_id: str = "stage_weights", dep: Deployment | None = None,
                         **overrides: Any):
    """The pod that stages the run's torchvision weights once, before the trainer and
    embedding pods (the Airflow image has no torchvision): the one pod that needs egress to
    the download host, or a filled torch hub cache. Expand it with
    `.expand_kwargs(plan_weights_kwargs(run))`."""
    return cpu_pod_operator(task_id, "acl-stage-weights", WEIGHTS_MAP_INDEX_TEMPLATE, dep,
                            **overrides)


def embed_pod_operator(task_id: str = "embed_chunk", dep: Deployment | None = None,
                       **overrides: Any):
    """method embeddings: the mapped pods of the embedding pass, trainer pods (image, GPU,
    pool) named per chunk. Expand it with `.expand_kwargs(plan_embed_kwargs(run,
    "kubernetes"))`."""
    return trainer_pod_operator(task_id, dep, **{
        "name": "acl-embed", "map_index_template": EMBED_POD_MAP_INDEX_TEMPLATE, **overrides})


def probe_pod_operator(task_id: str = "probe", dep: Deployment | None = None,
                       **overrides: Any):
    """method embeddings: the probe pod (trainer image: scikit-learn, faiss, torch), placed
    like the trainers but without a GPU and outside the GPU pool, as build_beton. Expand it
    with `.expand_kwargs(plan_probe_kwargs(run, "kubernetes"))`."""
    return cpu_pod_operator(task_id, "acl-probe", PROBE_MAP_INDEX_TEMPLATE, dep, **overrides)


# --- scheduled audits ----------------------------------------------------------------------

class AuditFile(BaseModel):
    """One file in the audits folder: a dataset audited on a schedule."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="DAG id suffix (audit_<name>); default: file stem.")
    description: str | None = None
    schedule: str = Field(..., min_length=1, description="Cron expression or preset (@daily).")
    dataset: str | None = Field(None, min_length=1, description="Dataset root (data_path).")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Config keys that differ from the defaults.")


@dataclass(frozen=True)
class Audit:
    """A valid scheduled audit, ready to become DAG `audit_<name>`."""

    name: str
    schedule: str
    config: AuditConfig
    source: str
    description: str | None = None

    @property
    def dag_id(self) -> str:
        return f"audit_{self.name}"

    @property
    def results_uri(self) -> str:
        assert self.config.results_path
        return self.config.results_path


class AuditFileError(UserError, ValueError):
    """One or more audit files are invalid; the message names each file and key."""


def asset_uri(uri: str) -> str:
    """An Asset URI for a local path or s3:// URI."""
    return uri if storage.is_s3(uri) else Path(uri).resolve().as_uri()


def _check_schedule(expr: str) -> None:
    from airflow.sdk import CronTriggerTimetable

    CronTriggerTimetable(expr, timezone="UTC").validate()


def load_audit(path: Path, base: AuditConfig, base_dir: str | Path | None = None) -> Audit:
    """Read and check one audit file; errors raise ConfigError naming the file and key.
    Relative local paths (its own and those it inherits from `base`) resolve against
    `base_dir` (default: the checkout's root), not the folder Airflow was started in."""
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must hold a mapping (schedule, dataset, overrides)")
    if "data_path" in raw and "dataset" not in raw:
        raw["dataset"] = raw.pop("data_path")
    try:
        spec = AuditFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"]) or "file"
        if e["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: "
                              f"{', '.join(AuditFile.model_fields)}") from None
        raise ConfigError(f"{where}: {key}: {e['msg']}, got {e.get('input')!r}") from None
    name = spec.name or path.stem.replace("-", "_")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}: name {name!r} may only hold letters, digits, _ . -")
    try:
        _check_schedule(spec.schedule)
    except Exception as err:
        raise ConfigError(f"{where}: schedule {spec.schedule!r} is not a valid cron "
                          f"expression or preset: {err}") from None
    data = {**base.model_dump(), **spec.overrides}
    if spec.dataset:
        data["data_path"] = spec.dataset
    if "data_path" not in spec.overrides and not spec.dataset:
        raise ConfigError(f"{where}: dataset is missing (the dataset root to audit)")
    if not data.get("results_path"):  # a stable copy of the latest results: the Asset
        data["results_path"] = storage.join(data["work_uri"], "audits", name, "results.csv")
    try:
        cfg = parse_config(data)
    except ConfigError as err:
        msg = str(err).removeprefix("invalid config: ")
        raise ConfigError(f"{where}: overrides: {msg}") from None
    cfg = absolute_paths(cfg, base_dir or Deployment().base_dir)
    return Audit(name=name, schedule=spec.schedule, config=cfg, source=where,
                 description=spec.description)


def load_audits(dep: Deployment | None = None) -> tuple[list[Audit], list[str]]:
    """Every audit file in the audits folder: (valid audits, one error line per bad file).
    Never raises, so one bad file cannot hide the other DAGs."""
    dep = dep or Deployment.from_env()
    folder = Path(dep.audits_dir)
    if not folder.is_dir():
        return [], []
    try:
        base = dep.default_config()
    except ConfigError as err:
        return [], [f"{dep.config_path}: {err}"]
    audits: list[Audit] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            audit = load_audit(path, base, dep.base_dir)
        except ConfigError as err:
            errors.append(str(err))
            continue
        if audit.name in seen:
            errors.append(f"{path}: name {audit.name!r} is already used by {seen[audit.name]}")
            continue
        seen[audit.name] = str(path)
        audits.append(audit)
    return audits, errors


def check_audit_files(dep: Deployment | None = None) -> None:
    """Raise AuditFileError listing every invalid audit file (file and key)."""
    _, errors = load_audits(dep)
    if errors:
        raise AuditFileError(f"{len(errors)} invalid audit file(s); their DAGs are not "
                             "loaded:\n" + "\n".join(errors))
