"""The DAG files with a real Airflow: a migrated SQLite metadata DB in a temporary
AIRFLOW_HOME (tests/conftest.py), DagBag parsing, and `dag.test()` runs of the local runner
on a tiny generated dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jinja2
import kubernetes_validate
import pendulum
import pytest
import yaml
from kubernetes.client import ApiClient

from tasks import airflow_adapter as acl
from tasks import runs
from tasks.config import AuditConfig, parse_config
from tasks.decide import summary_lines
from tasks.merge import read_results, read_summary
from tests.test_airflow_adapter import raw_html, render_markdown

ROOT = Path(__file__).resolve().parent.parent
EMBED_TASK_IDS = {"plan_embed", "embed_chunk", "plan_probe", "probe"}  # method embeddings
TASK_IDS = {"index", "plan", "train_repeat", "shards_done", "merge", "report", "autocorrect",
            "relabel", *EMBED_TASK_IDS}
N_IMAGES = 120

pytestmark = pytest.mark.usefixtures("airflow_db")


def load_dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    return load_dagbag()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tasks.sample import write_sample

    out = tmp_path_factory.mktemp("data") / "sample"
    write_sample(out, N_IMAGES, noise=0.1, seed=0)
    return out


def tiny_conf(dataset: Path, work: Path, **extra) -> dict:
    return {"data_path": str(dataset), "work_uri": str(work), "n_repeats": 2,
            "num_epochs": 1, "test_split": 0.5, "num_workers": 0, **extra}


class LogLines(logging.Handler):
    """Records of one logger, kept in memory (attached to the logger itself, so Airflow's
    logging setup during dag.test cannot detach it)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.levels: list[int] = []
        logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.levels.append(record.levelno)


def states(dr) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}


def test_every_dag_imports_cleanly(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert dagbag.captured_warnings == {}
    assert {"auto_correct_labels", "audit_sample_weekly", "apply_review"} <= set(dagbag.dag_ids)
    for dag in dagbag.dags.values():
        assert dag.tags and dag.doc_md and dag.catchup is False
        assert dag.start_date.tzinfo is not None
        assert raw_html(dag.doc_md) == [], dag.dag_id  # the renderer would drop it
    audits = [d for d in dagbag.dags.values() if d.dag_id != "apply_review"]
    for dag in audits:
        assert {t.task_id for t in dag.tasks} == TASK_IDS
        assert set(dag.params) == set(AuditConfig.model_fields)
    dag = dagbag.dags["auto_correct_labels"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert all(f"`{key}`" in dag.doc_md for key in AuditConfig.model_fields)
    for dag in audits:  # Airflow's renderer would drop raw HTML such as <class>
        assert "&lt;root&gt;/&lt;class&gt;/&lt;image&gt;" in render_markdown(dag.doc_md)
    train = dag.get_task("train_repeat")
    assert train.map_index_template == acl.LOCAL_MAP_INDEX_TEMPLATE
    assert dag.get_task("merge").trigger_rule.startswith("all_done")
    assert dag.get_task("relabel").upstream_task_ids == {"autocorrect", "merge"}


def test_example_audit_file_is_a_scheduled_dag(dagbag) -> None:
    spec = yaml.safe_load((ROOT / "configs" / "audits" / "sample_weekly.yaml").read_text())
    dag = dagbag.dags[f"audit_{spec['name']}"]
    assert dag.timetable.expression == spec["schedule"]
    for key, value in spec["overrides"].items():
        assert dag.params[key] == value
    (asset,) = dag.get_task("merge").outlets
    # Relative paths (its dataset, the default work_uri "work") resolve against the checkout's
    # root, not the folder Airflow was started in.
    assert dag.params["data_path"] == str(ROOT / spec["dataset"])
    results = ROOT / "work" / "audits" / spec["name"] / "results.csv"
    assert asset.uri == results.as_uri()
    assert dag.params["results_path"] == str(results)


def test_invalid_audit_file_is_an_import_error_naming_file_and_key(tmp_path, monkeypatch) -> None:
    (tmp_path / "pets.yaml").write_text(yaml.safe_dump({
        "schedule": "30 2 * * *", "dataset": "s3://pets/images/",
        "overrides": {"results_path": "s3://pets/audits/latest.csv"}}))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({
        "schedule": "@daily", "dataset": "s3://x/", "overrides": {"n_repeats": 0}}))
    monkeypatch.setenv("ACL_AUDITS_DIR", str(tmp_path))
    bag = load_dagbag()
    (path, message), = bag.import_errors.items()
    assert path.endswith("audit_file_errors.py")
    assert str(tmp_path / "broken.yaml") in message and "n_repeats" in message
    assert {"auto_correct_labels", "audit_pets"} <= set(bag.dag_ids)
    pets = bag.dags["audit_pets"]
    assert pets.timetable.expression == "30 2 * * *"
    assert [a.uri for a in pets.get_task("merge").outlets] == ["s3://pets/audits/latest.csv"]


def test_bad_conf_is_refused_before_any_work(dagbag, dataset, tmp_path) -> None:
    from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

    dag = dagbag.dags["auto_correct_labels"]
    work = tmp_path / "work"
    # Out of the form's bounds: Airflow refuses to create the run.
    with pytest.raises(ParamValidationError, match="n_repeats"):
        dag.test(run_conf=tiny_conf(dataset, work, n_repeats=0))
    # Unknown key: the first task fails before indexing anything; nothing else runs.
    conf = tiny_conf(dataset, work, n_repeat=3)
    dr = dag.test(run_conf=conf)
    assert dr.state == "failed"
    got = states(dr)
    assert got[("index", -1)] == "failed"
    assert {s for (t, _), s in got.items() if t != "index"} == {"upstream_failed"}
    assert not work.exists()
    # ...with this message in its log.
    with pytest.raises(AirflowFailException, match="unknown config key 'n_repeat'"):
        acl.prepare(dag.params.dump(), conf, dr.run_id)


def xcom(dr, task_id: str, key: str):
    """One XCom value of a finished DAG run, as a downstream task would read it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dr.run_id, key=key, task_ids=task_id,
                                                 dag_ids=dr.dag_id)).one()
        return XComModel.deserialize_value(row)


def test_local_runner_audits_a_tiny_dataset(dagbag, dataset, tmp_path) -> None:
    """Two 1-epoch trainings on 120 images in 10 classes: the audit runs end to end; its
    models are far too weak to trust (near chance, noise above half, classes never learnt),
    so the summary, the merge's log and the report say so, the relabel the run forces warns,
    and the same relabel unforced fails the task with the guard's one line."""
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["auto_correct_labels"]
    trainer_lines = LogLines(acl.TRAINER_LOGGER)
    merge_lines = LogLines("tasks.merge")
    relabel_lines = LogLines("tasks.relabel")
    root_lines = LogLines("")  # where the task log's handlers are
    # One epoch on a tiny dataset: the guard would stop the relabel, so it is forced.
    conf = tiny_conf(dataset, tmp_path / "work", autocorrect=True, relabel_mode="manifest",
                     force_relabel=True)
    dr = dag.test(run_conf=conf)
    logging.getLogger("").removeHandler(root_lines)
    assert dr.state == "success", states(dr)
    got = states(dr)
    assert {s for (t, _), s in got.items() if t not in EMBED_TASK_IDS} == {"success"}, got
    # method train: the embedding pass and the probes are skipped
    assert {s for (t, _), s in got.items() if t in {"embed_chunk", "probe"}} == {"skipped"}
    assert {k for k in got if k[0] == "train_repeat"} == {("train_repeat", 0), ("train_repeat", 1)}
    names = {ti.rendered_map_index for ti in dr.get_task_instances()
             if ti.task_id == "train_repeat"}
    assert names == {"repeat 0 (round 0, fold 0)", "repeat 1 (round 0, fold 1)"}
    run = runs.run_uri(str(tmp_path / "work"), dr.run_id)
    results = read_results(runs.results_uri(run))
    images = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png"))
    assert len(results) == N_IMAGES
    assert sorted(results["filename"]) == images
    assert (results["num_preds"] == 1).all()  # K=2 folds, one round: one prediction each
    assert Path(run, "report.html").is_file()
    corrected = Path(run, "corrected-labels.csv")
    assert corrected.is_file()  # autocorrect on, manifest mode
    # The merge task pushes the run summary as XCom "summary" and logs its lines.
    summary = xcom(dr, "merge", "summary")
    assert summary == read_summary(run) and summary["images"] == N_IMAGES
    assert xcom(dr, "merge", "return_value") == runs.results_uri(run)
    # The guard's line is logged at WARNING without its "WARNING: " (the level says it).
    logged = [line.removeprefix("WARNING: ") for line in summary_lines(summary)]
    assert logged[-1] != summary_lines(summary)[-1]
    for line in logged:
        assert line in merge_lines.lines
        assert line in root_lines.lines  # propagated to the task log's handlers
    # A few training images per class for one epoch: the vote agrees with about a tenth of the
    # labels (chance: 14%), far below the guard's bar, on every machine.
    guard = summary["guard"]
    assert guard["trusted"] is False
    assert any(r.startswith("the models are near chance") for r in guard["reasons"])
    assert merge_lines.levels[merge_lines.lines.index(logged[-1])] == \
        logging.WARNING  # the guard's line
    page = Path(run, "report.html").read_text()
    assert 'id="guard"' in page and guard["reasons"][0] in page
    assert "refused without --force: the audit cannot be trusted" in page
    # The forced relabel warns with the reasons.
    assert any(line.startswith("relabelling although the audit cannot be trusted (--force): "
                               + guard["reasons"][0]) for line in relabel_lines.lines)
    # The relabel task of the same run unforced fails at once with the guard's one line
    # (AirflowFailException: no retry), before it writes anything.
    corrected.unlink()
    runs.write_config(run, runs.read_config(run).model_copy(update={"force_relabel": False}))
    with pytest.raises(AirflowFailException,
                       match=r"^relabel refused: the audit cannot be trusted \(") as refused:
        acl.relabel_run(runs.results_uri(run))
    assert guard["reasons"][0] in str(refused.value) and "--force" in str(refused.value)
    assert not corrected.exists()
    # The trainer's own log lines (per-epoch progress) stream into the task log: the message
    # at its level, without the trainer's time and level (the task log adds its own).
    (epoch,) = [i for i, line in enumerate(trainer_lines.lines)
                if line.startswith("repeat 1 (round 0, fold 1) epoch 1/1")]
    assert trainer_lines.levels[epoch] == logging.INFO
    assert not any(acl.TRAINER_LINE.match(line) for line in trainer_lines.lines)
    # One prediction per image and min_preds 2: merge and the report say nothing can be
    # relabelled, and why.
    why = ("no image can be relabelled: every image has at most 1 prediction, fewer than "
           "min_preds 2; raise n_repeats to at least 4 (2 rounds of 2 folds) or lower min_preds")
    assert why in merge_lines.lines
    assert "1 prediction per image" in page and why in page


def test_local_runner_embedding_mode_embeds_chunks_then_probes(dataset, tmp_path) -> None:
    import torch

    from tasks.models import SmallCNN

    torch.manual_seed(0)
    weights = tmp_path / "small_cnn.pt"
    torch.save(SmallCNN(3).state_dict(), weights)
    # its own DagBag: dag.test keeps a run's conf in dag.params, and later tests use the default
    dag = load_dagbag().dags["auto_correct_labels"]
    trainer_lines = LogLines(acl.TRAINER_LOGGER)
    conf = tiny_conf(dataset, tmp_path / "work", method="embeddings", n_repeats=4,
                     embed_chunk_size=50, model_weights=str(weights))
    dr = dag.test(run_conf=conf)
    assert dr.state == "success", states(dr)
    got = states(dr)
    assert got[("train_repeat", -1)] == "skipped"  # no model is trained
    assert {k: v for k, v in got.items() if k[0] == "embed_chunk"} == {
        ("embed_chunk", c): "success" for c in range(3)}  # 120 images in chunks of 50
    assert got[("probe", 0)] == "success" and got[("merge", -1)] == "success"
    names = {ti.task_id: ti.rendered_map_index for ti in dr.get_task_instances()
             if ti.task_id in ("embed_chunk", "probe") and ti.map_index == 0}
    assert names == {"embed_chunk": "chunk 0", "probe": "probes and neighbours"}
    run = runs.run_uri(str(tmp_path / "work"), dr.run_id)
    assert sorted(p.name for p in Path(run, "shards").iterdir()) == [
        f"repeat-{r:04d}.parquet" for r in range(4)]
    results = read_results(runs.results_uri(run))
    assert len(results) == N_IMAGES and (results["num_preds"] == 2).all()
    assert {"knn_agreement", "outlier_score", "duplicate_group",
            "duplicate_conflict"} <= set(results.columns)
    assert '<section id="outliers">' in Path(run, "report.html").read_text()
    # The embedder's and the probes' own log lines stream into the task log.
    assert any(line.startswith("chunk 3/3 done: 20 images") for line in trainer_lines.lines)
    assert any("repeat 3 (round 1, fold 1): logistic probe" in line
               for line in trainer_lines.lines)


def test_failed_repeat_fails_merge_then_rerun_completes(dagbag, dataset, tmp_path) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.utils.types import DagRunType

    dag = dagbag.dags["auto_correct_labels"]
    work = tmp_path / "work"
    when = pendulum.datetime(2026, 2, 1, tz="UTC")
    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=when, run_after=when)
    run = Path(runs.run_uri(str(work), run_id))
    # Repeat 1 cannot write its shard (a folder is in the way): its task fails.
    blocker = Path(runs.shard_uri(str(run), 1))
    blocker.mkdir(parents=True)
    # autocorrect off explicitly: dag.test keeps an earlier run_conf in the DAG's params
    conf = tiny_conf(dataset, work, autocorrect=False)
    trainer_lines = LogLines(acl.TRAINER_LOGGER)
    dr = dag.test(run_conf=conf, logical_date=when, run_after=when)
    got = states(dr)
    assert dr.state == "failed"
    assert got[("train_repeat", 0)] == "success"
    assert got[("train_repeat", 1)] == "failed"
    assert got[("merge", -1)] == "failed"  # it ran although a repeat failed
    assert got[("report", -1)] == "upstream_failed"
    with pytest.raises(AirflowFailException, match=r"missing repeats: \[1\]"):
        acl.merge_shards(str(run))  # what merge said in its log
    shard0 = Path(runs.shard_uri(str(run), 0))
    first_write = shard0.stat().st_mtime_ns

    # The cause is fixed; running the same run again (what "Clear" does in the UI) trains
    # only the missing repeat and completes the audit.
    blocker.rmdir()
    dr = dag.test(run_conf=conf, logical_date=when, run_after=when)
    assert dr.state == "success", states(dr)
    assert dr.run_id == run_id
    assert shard0.stat().st_mtime_ns == first_write
    assert any("repeat 0 (round 0, fold 0) already done" in line
               for line in trainer_lines.lines)
    assert len(read_results(runs.results_uri(str(run)))) == N_IMAGES


def test_kubernetes_runner_renders_every_pod(tmp_path, monkeypatch) -> None:
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID1234",
               "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/EXAMPLE/secretvalue"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)  # present in Airflow's env: must not leak into pods
    monkeypatch.setenv("ACL_RUNNER", "kubernetes")
    monkeypatch.setenv("ACL_S3_ENDPOINT", "http://seaweedfs.acl:8333")
    bag = load_dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["auto_correct_labels"]
    mapped = dag.get_task("train_repeat")
    assert mapped.operator_class.__name__ == "KubernetesPodOperator"
    # ffcv: the trainer image builds the .beton once, in a pod before every trainer pod
    # (skipped when ffcv is off: the trainers still start)
    beton = dag.get_task("build_beton")
    assert beton.operator_class.__name__ == "KubernetesPodOperator"
    # and stages torchvision weights once, in a pod before every trainer and embedder pod
    # (skipped when index staged them or there are none: the trainers still start)
    weights = dag.get_task("stage_weights")
    assert weights.operator_class.__name__ == "KubernetesPodOperator"
    assert {t.task_id for t in dag.tasks} == TASK_IDS | {
        "plan_beton", "build_beton", "plan_weights", "stage_weights"}
    assert mapped.upstream_task_ids == {"plan", "build_beton", "stage_weights"}
    assert beton.upstream_task_ids == {"plan_beton"}
    assert weights.upstream_task_ids == {"plan_weights"}
    assert dag.get_task("plan_weights").upstream_task_ids == {"index"}
    assert mapped.trigger_rule == "none_failed"
    assert dag.get_task("embed_chunk").upstream_task_ids == {"plan_embed", "stage_weights"}
    assert dag.get_task("embed_chunk").trigger_rule == "none_failed"
    assert weights.trigger_rule == beton.trigger_rule == "all_success"

    run = runs.run_uri(str(tmp_path / "work"), "manual__2026-03-01T00:00:00+00:00")
    runs.write_config(run, parse_config({"data_path": "s3://acl/data/", "n_repeats": 4,
                                         "test_split": 0.5}))
    assert acl.plan_beton_kwargs(run) == []
    ffcv_run = runs.run_uri(str(tmp_path / "work"), "manual__2026-03-02T00:00:00+00:00")
    runs.write_config(ffcv_run, parse_config({"data_path": "s3://acl/data/", "ffcv": True},
                                             check_installed=False))
    (kwargs,) = acl.plan_beton_kwargs(ffcv_run)
    op = beton.unmap(kwargs)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, "1.33", strict=True)
    assert not any(value in json.dumps(pod) for value in secrets.values())
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python"]
    assert container["args"] == ["-m", "tasks.ffcv_data", "--run", ffcv_run]
    assert container["image"] == "ghcr.io/auto-correct-labels/trainer:0.1.0"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert pod["metadata"]["namespace"] == "auto-correct-labels"
    assert jinja2.Template(op.map_index_template).render(task=op) == "dataset.beton"
    assert op.on_finish_action.value == "delete_pod" and op.get_logs

    assert acl.plan_weights_kwargs(run) == []  # small_cnn: random init
    weights_run = runs.run_uri(str(tmp_path / "work"), "manual__2026-03-05T00:00:00+00:00")
    runs.write_config(weights_run, parse_config({"data_path": "s3://acl/data/",
                                                 "model_name": "resnet18"}))
    (kwargs,) = acl.plan_weights_kwargs(weights_run)  # DEFAULT weights, not staged yet
    op = weights.unmap(kwargs)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, "1.33", strict=True)
    assert not any(value in json.dumps(pod) for value in secrets.values())
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python"]
    assert container["args"] == ["-m", "tasks.weights", "--run", weights_run]
    assert container["image"] == "ghcr.io/auto-correct-labels/trainer:0.1.0"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert all("value" not in env[name] for name in secrets)
    assert jinja2.Template(op.map_index_template).render(task=op) == "initial weights"
    assert op.pool == "default_pool"
    assert op.on_finish_action.value == "delete_pod" and op.get_logs

    plan = acl.plan_train_kwargs(run, "kubernetes")
    assert len(plan) == 4
    for repeat, kwargs in enumerate(plan):
        op = mapped.unmap(kwargs)
        pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
        kubernetes_validate.validate(pod, "1.33", strict=True)
        text = json.dumps(pod)
        assert not any(value in text for value in secrets.values())
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert container["command"] == ["python"]
        assert container["args"] == ["-m", "tasks.train", "--run", run, "--repeat", str(repeat)]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"] == "ghcr.io/auto-correct-labels/trainer:0.1.0"
        assert pod["metadata"]["namespace"] == "auto-correct-labels"
        assert spec["serviceAccountName"] == "acl-trainer"
        assert spec["restartPolicy"] == "Never"
        env = {e["name"]: e for e in container["env"]}
        for name in secrets:
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": "acl-s3-credentials", "key": name, "optional": True}
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://seaweedfs.acl:8333"
        label = jinja2.Template(op.map_index_template).render(task=op)
        assert label == f"repeat {repeat} (round {repeat // 2}, fold {repeat % 2})"
        assert op.pool == "gpu_pods" and op.retries >= 1
        assert op.startup_timeout_seconds >= 600
        assert op.on_finish_action.value == "delete_pod" and op.get_logs


def test_kubernetes_runner_renders_the_embedding_pods(tmp_path, monkeypatch) -> None:
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID1234",
               "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/EXAMPLE/secretvalue"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)  # present in Airflow's env: must not leak into pods
    monkeypatch.setenv("ACL_RUNNER", "kubernetes")
    bag = load_dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["auto_correct_labels"]
    embed, probe = dag.get_task("embed_chunk"), dag.get_task("probe")
    assert embed.operator_class.__name__ == "KubernetesPodOperator"
    assert probe.operator_class.__name__ == "KubernetesPodOperator"
    assert embed.upstream_task_ids == {"plan_embed", "stage_weights"}
    assert probe.upstream_task_ids == {"plan_probe", "embed_chunk"}
    assert dag.get_task("shards_done").upstream_task_ids == {"train_repeat", "probe"}
    assert dag.get_task("merge").upstream_task_ids == {"index", "shards_done"}

    import pandas as pd

    from tasks.index import DatasetIndex, write_index

    run = runs.run_uri(str(tmp_path / "work"), "manual__2026-03-03T00:00:00+00:00")
    runs.write_config(run, parse_config({"data_path": "s3://acl/data/", "n_repeats": 4,
                                         "test_split": 0.5, "method": "embeddings",
                                         "embed_chunk_size": 40}))
    manifest = pd.DataFrame({"id": range(100), "key": [f"a/{i}.png" for i in range(100)],
                             "label": "a", "label_idx": 0, "size": 1, "etag": "e"})
    write_index(DatasetIndex(manifest=manifest, classes=["a", "b"],
                            skipped=pd.DataFrame(columns=["filename", "reason"])), run)
    assert acl.plan_train_kwargs(run, "kubernetes") == []  # no trainer pods
    chunks = acl.plan_embed_kwargs(run, "kubernetes")
    assert len(chunks) == 3
    for chunk, kwargs in enumerate(chunks):
        op = embed.unmap(kwargs)
        pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
        kubernetes_validate.validate(pod, "1.33", strict=True)
        assert not any(value in json.dumps(pod) for value in secrets.values())
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["python"]
        assert container["args"] == ["-m", "tasks.embed", "--run", run, "--chunk", str(chunk)]
        assert container["image"] == "ghcr.io/auto-correct-labels/trainer:0.1.0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["metadata"]["labels"]["acl-chunk"] == str(chunk)
        assert jinja2.Template(op.map_index_template).render(task=op) == f"chunk {chunk}"
        assert op.pool == "gpu_pods" and op.retries >= 1
        assert op.on_finish_action.value == "delete_pod" and op.get_logs
    (kwargs,) = acl.plan_probe_kwargs(run, "kubernetes")
    op = probe.unmap(kwargs)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, "1.33", strict=True)
    assert not any(value in json.dumps(pod) for value in secrets.values())
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["-m", "tasks.probe", "--run", run]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert op.pool == "default_pool"
    env = {e["name"]: e for e in container["env"]}
    assert all("value" not in env[name] for name in secrets)
    # method train: neither the embedders nor the probe pod start
    train_run = runs.run_uri(str(tmp_path / "work"), "manual__2026-03-04T00:00:00+00:00")
    runs.write_config(train_run, parse_config({"data_path": "s3://acl/data/"}))
    assert acl.plan_embed_kwargs(train_run, "kubernetes") == []
    assert acl.plan_probe_kwargs(train_run, "kubernetes") == []
