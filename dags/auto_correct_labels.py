"""
### Auto-correct labels: find (and optionally fix) mislabelled images

Audits an image dataset laid out as `<root>/<class>/<image>` (a local folder or
`s3://bucket/prefix/`). Many models are trained on different splits; each predicts the
images it did not train on, and the pooled out-of-sample predictions score every label.
An image whose predictions consistently disagree with its folder is probably mislabelled.

**Flow**: `index` (list and verify the images, validate the config first) → `plan` (the
repeats: round, fold, seed) → `train_repeat` (one mapped task per repeat, named
`repeat r (round i, fold k)`) → `merge` (pool the shards into `results.csv` and
`summary.json`; fails naming the missing repeats when coverage is below `min_coverage`) →
`report` (`report.html`) → `autocorrect` → `relabel` (only when the `autocorrect` param is
on). With `method: embeddings` no model is trained (`train_repeat` is skipped):
`embed_chunk` (one mapped task per chunk of `embed_chunk_size` images, a frozen backbone) →
`probe` (a probe per repeat on the embeddings, writing the same shards, plus kNN agreement,
near-duplicates and outliers) → `merge`; with `method: train` those two are skipped.

**Where things are**: every artefact lives in `<work_uri>/runs/<run id>/`: `manifest.parquet`,
`shards/repeat-NNNN.parquet`, `results.csv` (one row per image, most suspicious first: the
`issue` tier, then `review`, then `ok`), `summary.json`, `report.html`,
`relabel-journal.jsonl`. The `merge` task's XCom (on the task's *XCom* tab or under
*Browse → XComs*) holds the CSV's URI (`return_value`) and the run summary (`summary`:
images, pooled accuracy, estimated wrong labels overall and per class, flagged, review tier,
would-relabel, the model-quality verdict); its log ends with the summary's lines.
`report`'s XCom holds the report's URI.

**Can the audit be trusted?** `merge` checks the models (their agreement with the given
labels against chance, the estimated noise rate, each class): when they are too weak, its
log warns with the cause and the remedy (more epochs, more images per class, a stronger or
pretrained model), the report shows a banner, and `relabel` fails with that one line. To
relabel such a run anyway, run
`python -m tasks relabel --results <work_uri>/runs/<run id>/results.csv --force`
where the dataset is reachable (or trigger the audit with the `force_relabel` param on); or
review it in the report and apply the decisions with the `apply_review` DAG (a reviewer's
decisions are never refused).

**A repeat failed?** `merge` still runs and names the missing repeats. Clear the failed
`train_repeat` map indexes with *Downstream* checked; finished repeats are never retrained.

**Runner** (`ACL_RUNNER`): `local` runs the trainer as a subprocess of the task and streams
its log (per-epoch progress) into the task log; `kubernetes` runs each repeat as a GPU pod
from the trainer image. Both run `python -m tasks.train --run <run uri> --repeat <r>`
(`python -m tasks.embed --run <run uri> --chunk <c>` and `python -m tasks.probe --run <run
uri>` in embedding mode; the embedders are GPU pods, the probe pod runs without a GPU).
With `ffcv` on, the run's `dataset.beton` is built once before the trainers: by `index` with
the local runner, by the `build_beton` pod (trainer image, `python -m tasks.ffcv_data`) with
the Kubernetes runner (skipped when `ffcv` is off). Initial weights are staged in the run
folder once, by `index`; with the Kubernetes runner (no torchvision in the Airflow image) a
torchvision weights name is staged by the `stage_weights` pod (trainer image, `python -m
tasks.weights`) before the trainers and embedders, the one pod that needs egress to the
download host or a filled torch hub cache (skipped for a state dict, `none` or weights
already staged); GPU pods only read the run's copy.

Scheduled audits: every file in `configs/audits/` (`ACL_AUDITS_DIR`) becomes a DAG
`audit_<name>` whose results CSV is an Asset.

#### Params (defaults from `configs/config.yaml`, or `ACL_CONFIG`)
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, TriggerRule, task

from tasks import airflow_adapter as acl

DEPLOYMENT = acl.Deployment.from_env()
DEFAULTS = DEPLOYMENT.default_config()
START = pendulum.datetime(2026, 1, 1, tz="UTC")
TAGS = ["auto-correct-labels", f"runner:{DEPLOYMENT.runner}"]


@task
def index(params: dict[str, Any] | None = None, dag_run=None) -> str:
    """Check the config, index the dataset into this run's folder; returns the run URI."""
    return acl.prepare(params or {}, dag_run.conf, dag_run.run_id, DEPLOYMENT.runner)


@task
def plan(run: str) -> list[dict[str, Any]]:
    """The repeats, as the mapped trainer's arguments."""
    return acl.plan_train_kwargs(run, DEPLOYMENT.runner)


@task
def plan_beton(run: str) -> list[dict[str, Any]]:
    """Kubernetes runner: the build_beton pod when the run's `ffcv` is on, none otherwise."""
    return acl.plan_beton_kwargs(run)


@task
def plan_weights(run: str) -> list[dict[str, Any]]:
    """Kubernetes runner: the stage_weights pod when `index` left the run's torchvision
    weights to it (no torchvision in the Airflow image), none otherwise."""
    return acl.plan_weights_kwargs(run)


@task(map_index_template=acl.LOCAL_MAP_INDEX_TEMPLATE)
def train_repeat(run: str, repeat: int, label: str) -> str:
    """Local runner: one repeat as a trainer subprocess; returns its shard URI."""
    return acl.run_repeat_local(run, repeat, label)


@task
def plan_embed(run: str) -> list[dict[str, Any]]:
    """method embeddings: the embedding chunks, as the mapped embedder's arguments."""
    return acl.plan_embed_kwargs(run, DEPLOYMENT.runner)


@task
def plan_probe(run: str) -> list[dict[str, Any]]:
    """method embeddings: the probe step, as one mapped argument; none for method train."""
    return acl.plan_probe_kwargs(run, DEPLOYMENT.runner)


@task(map_index_template=acl.LOCAL_MAP_INDEX_TEMPLATE)
def embed_chunk(run: str, chunk: int, label: str) -> str:
    """Local runner: one embedding chunk as a subprocess; returns its file's URI."""
    return acl.embed_chunk_local(run, chunk)


@task(map_index_template=acl.PROBE_MAP_INDEX_TEMPLATE)
def probe(run: str) -> str:
    """Local runner: every repeat's probe and the neighbours, as a subprocess."""
    return acl.probe_local(run)


@task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
def merge(run: str, ti=None) -> str:
    """Runs when every repeat is done, failed or not; returns the results CSV URI and pushes
    the run summary as XCom "summary"."""
    results = acl.merge_shards(run)
    ti.xcom_push(key="summary", value=acl.run_summary(run))
    return results


@task
def report(run: str, results: str, dag_run=None) -> str:
    """report.html with the most suspicious images; returns its URI."""
    return acl.write_run_report(run, dag_run.start_date)


@task.short_circuit
def autocorrect(run: str) -> bool:
    """Go on to relabel only when the run's `autocorrect` param is on."""
    return acl.autocorrect_requested(run)


@task
def relabel(results: str) -> str | None:
    """Move images to their corrected class (or write corrected-labels.csv)."""
    return acl.relabel_run(results)


def audit_flow(results_asset: Asset | None = None) -> None:
    """The task graph of one audit, inside the current DAG."""
    run = index()
    repeats = plan(run)
    # method embeddings: embed chunks, then the probes write the shards (skipped for train)
    chunks, probes = plan_embed(run), plan_probe(run)
    if DEPLOYMENT.runner == "kubernetes":
        # One-off pods of the trainer image before the GPU pods, skipped when not needed:
        # the initial weights (torchvision weights the Airflow image could not stage) and,
        # with ffcv, the .beton. none_failed: the GPU pods also start when they are skipped.
        staged = acl.weights_pod_operator(dep=DEPLOYMENT).expand_kwargs(plan_weights(run))
        beton = acl.beton_pod_operator(dep=DEPLOYMENT).expand_kwargs(plan_beton(run))
        trained = acl.trainer_pod_operator(
            dep=DEPLOYMENT, trigger_rule=TriggerRule.NONE_FAILED).expand_kwargs(repeats)
        embedded = acl.embed_pod_operator(
            dep=DEPLOYMENT, trigger_rule=TriggerRule.NONE_FAILED).expand_kwargs(chunks)
        [staged, beton] >> trained
        staged >> embedded
        probed = acl.probe_pod_operator(dep=DEPLOYMENT).expand_kwargs(probes)
    else:
        trained = train_repeat.expand_kwargs(repeats)
        embedded, probed = embed_chunk.expand_kwargs(chunks), probe.expand_kwargs(probes)
    embedded >> probed
    # The join of both modes: the mode not run is skipped, which would skip merge itself;
    # none_failed passes skips, and merge still runs after a failed repeat (it names it).
    shards_done = EmptyOperator(task_id="shards_done", trigger_rule=TriggerRule.NONE_FAILED)
    results = merge.override(outlets=[results_asset] if results_asset else [])(run)
    [trained, probed] >> shards_done >> results
    report(run, results) >> autocorrect(run) >> relabel(results)


with DAG(
    dag_id="auto_correct_labels",
    schedule=None,
    start_date=START,
    catchup=False,
    doc_md=f"{__doc__}\n{acl.params_doc(DEFAULTS)}",
    params=acl.build_params(DEFAULTS),
    tags=TAGS,
):
    audit_flow()

# Invalid audit files are reported by dags/audit_file_errors.py, not here.
for audit in acl.load_audits(DEPLOYMENT)[0]:
    with DAG(
        dag_id=audit.dag_id,
        description=audit.description or f"Scheduled audit of {audit.config.data_path}",
        schedule=audit.schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        doc_md=f"{__doc__}\nScheduled by `{audit.source}`; its config is the default of each "
        f"param below.\n\n{acl.params_doc(audit.config)}",
        params=acl.build_params(audit.config),
        tags=[*TAGS, "scheduled-audit"],
    ):
        audit_flow(Asset(uri=acl.asset_uri(audit.results_uri), name=f"{audit.dag_id}_results"))
