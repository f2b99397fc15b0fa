"""Review a run's suspects in Label Studio, and read the reviewers' choices back as decisions.

Out: `export_tasks` writes a Label Studio import file (the documented "Label Studio JSON"
task list): one image classification task per suspect, with the image, its given label and
the run's suggestion as a pre-annotation (`predictions`), and beside it the labeling config
to paste into the project (Settings -> Labeling Interface), generated from the run's classes.

How Label Studio finds the images (`image_root`):

- a folder path, e.g. `datasets/pets` or `/srv/pets`: tasks point at Label Studio's local
  file serving, `/data/local-files/?d=<image_root>/<filename>`. Start Label Studio with
  `LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true` and
  `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<a folder above the dataset>`, give `image_root`
  relative to that document root (an absolute path works with the default root, `/`), and
  add a Local Files source storage to the project whose absolute path contains the dataset
  (it need not be synced: it grants access).
- an `s3://bucket/prefix` URI: tasks hold `s3://bucket/prefix/<filename>`; add an Amazon S3
  source storage for that bucket to the project (it need not be synced) and Label Studio
  resolves these URIs with presigned URLs.
- an `http(s)://` URL prefix: tasks hold `<prefix>/<filename>` as they are.

In: `import_export` reads a project's export in the "JSON" format (a list of tasks, each with
`annotations[].result[].value.choices`, `completed_by`, `was_cancelled`, `updated_at`) and
turns each exported task into one decision: the suggestion chosen -> accept, the given label
chosen -> keep, another class -> other, cancelled ("skipped") or unannotated -> skip.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd

from tasks import storage
from tasks.decisions import COLUMNS, DecisionsError, validate_decisions

log = logging.getLogger(__name__)

IMAGE = "image"  # the Image object's name, and the task data key of the image reference
CHOICES = "label"  # the Choices control's name (`from_name` of results)
MODEL_VERSION = "auto-correct-labels"
LOCAL_FILES = "/data/local-files/?d="


def labeling_config(classes: list[str]) -> str:
    """The labeling config XML: the image, a line with the given label and the suggestion,
    and one single choice per class."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{IMAGE}" value="${IMAGE}"/>\n'
            '  <Header value="$caption" size="5"/>\n'
            f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="single" '
            f'showInline="true">\n{choices}\n  </Choices>\n</View>\n')


def image_reference(image_root: str, filename: str) -> str:
    """What a task's `image` holds for one dataset key (see the module doc)."""
    if storage.is_s3(image_root):
        return storage.join(image_root, filename)
    if image_root.startswith(("http://", "https://")):
        return storage.join(image_root, quote(filename))
    return LOCAL_FILES + quote(storage.join(image_root, filename), safe="/")


def select_suspects(results: pd.DataFrame, top_n: int | None = None,
                    flagged_only: bool = True) -> pd.DataFrame:
    """The rows to review: flagged ones (or all with a prediction), most suspicious first
    (the results' order), at most `top_n`."""
    rows = results[results["num_preds"] > 0]
    if flagged_only:
        rows = rows[rows["is_label_issue"].astype(bool)]
    return rows.head(top_n) if top_n is not None else rows


def _task(row: dict, image_root: str, model_version: str) -> dict:
    # the probability that the suggestion is the true label; a hand-made CSV without it:
    # the pooled probability, else the vote share
    score = next((row[c] for c in ("p_suggestion", "suggested_quality")
                  if pd.notna(row.get(c))), float(row["%"]) / 100)
    caption = (f"given label: {row['label']} · suggested: {row['corrected_label']} "
               f"({row['%']:g}% of {int(row['num_preds'])} predictions)")
    return {
        "data": {IMAGE: image_reference(image_root, row["filename"]),
                 "filename": row["filename"], "label": row["label"],
                 "suggestion": row["corrected_label"], "caption": caption},
        "predictions": [{
            "model_version": model_version, "score": round(float(score), 5),
            "result": [{"from_name": CHOICES, "to_name": IMAGE, "type": "choices",
                        "value": {"choices": [row["corrected_label"]]}}],
        }],
    }


def build_tasks(results: pd.DataFrame, image_root: str, top_n: int | None = None,
                flagged_only: bool = True, model_version: str = MODEL_VERSION) -> list[dict]:
    """Label Studio tasks for a run's suspects (see `select_suspects`)."""
    rows = select_suspects(results, top_n, flagged_only)
    return [_task(row, image_root, model_version) for row in rows.to_dict("records")]


def results_classes(results: pd.DataFrame) -> list[str]:
    """The run's classes: every class folder has images, so they are the given labels."""
    return sorted(set(results["label"]))


def export_tasks(results_uri: str, out_uri: str, image_root: str, top_n: int | None = None,
                 flagged_only: bool = True, model_version: str = MODEL_VERSION,
                 config_uri: str | None = None) -> dict:
    """Write the Label Studio import file for a run's results CSV, and the labeling config
    beside it (`<out without .json>.labeling-config.xml` unless `config_uri`). Returns
    `{"tasks": out_uri, "config": config_uri, "count": n}`."""
    from tasks.merge import read_results

    results = read_results(results_uri)
    tasks = build_tasks(results, image_root, top_n, flagged_only, model_version)
    config_uri = config_uri or f"{out_uri.removesuffix('.json')}.labeling-config.xml"
    storage.write_text(out_uri, json.dumps(tasks, indent=1, ensure_ascii=False))
    storage.write_text(config_uri, labeling_config(results_classes(results)))
    log.info("wrote %d Label Studio tasks to %s and the labeling config to %s", len(tasks),
             out_uri, config_uri)
    return {"tasks": out_uri, "config": config_uri, "count": len(tasks)}


def _reviewer(completed_by: object) -> str:
    """`completed_by` of an export: a user id, or a user object (email preferred)."""
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id") or "")
    return "" if completed_by is None else str(completed_by)


def _choice(annotation: dict, where: str) -> str | None:
    """The class an annotation chose, or None when it chose none."""
    chosen = [c for r in annotation.get("result") or []
              if r.get("type") == "choices" and r.get("from_name") == CHOICES
              for c in r.get("value", {}).get("choices", [])]
    if len(chosen) > 1:
        raise DecisionsError(f"{where}: an annotation chose {len(chosen)} classes "
                             f"({', '.join(chosen)}); the config allows one")
    return chosen[0] if chosen else None


def _decision(task: dict, position: int) -> dict:
    data = task.get("data") or {}
    where = f"Label Studio task {task.get('id', f'#{position + 1}')}"
    missing = [k for k in ("filename", "label", "suggestion") if not data.get(k)]
    if missing:
        raise DecisionsError(f"{where}: data lacks {', '.join(missing)}; import tasks made by "
                             "export_tasks")
    where = f"{where} ({data['filename']})"
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    done = [(a, c) for a in done if (c := _choice(a, where)) is not None]
    truth = [(a, c) for a, c in done if a.get("ground_truth")]
    picked = truth or done
    if len({c for _, c in picked}) > 1:
        votes = ", ".join(f"{c} by {_reviewer(a.get('completed_by'))}" for a, c in picked)
        raise DecisionsError(f"{where}: annotations disagree ({votes}); mark one as ground "
                             "truth in Label Studio and export again")
    row = {"filename": data["filename"], "label": data["label"], "decision": "skip",
           "new_label": "", "reviewer": "", "decided_at": ""}
    everyone = task.get("annotations") or []
    if picked:
        annotation, chosen = max(picked, key=lambda ac: _when(ac[0]))
        if chosen == data["label"]:
            row["decision"] = "keep"
        else:
            row["decision"] = "accept" if chosen == data["suggestion"] else "other"
            row["new_label"] = chosen
    elif everyone:  # cancelled only (or submitted without a choice): who skipped it, when
        annotation = max(everyone, key=_when)
    else:
        return row
    row["reviewer"] = _reviewer(annotation.get("completed_by"))
    row["decided_at"] = _when(annotation)
    return row


def _when(annotation: dict) -> str:
    return str(annotation.get("updated_at") or annotation.get("created_at") or "")


def read_export(text: str) -> pd.DataFrame:
    """A Label Studio JSON export as a decisions frame: one row per task, in export order,
    indexed by task id (so validation errors name the task)."""
    tasks = json.loads(text)
    if not isinstance(tasks, list):
        raise DecisionsError("the Label Studio export is not a list of tasks: export the "
                             "project in the JSON format")
    rows = [_decision(task, i) for i, task in enumerate(tasks)]
    ids = [str(task.get("id", f"#{i + 1}")) for i, task in enumerate(tasks)]
    frame = pd.DataFrame(rows, columns=COLUMNS, index=pd.Index(ids, name="task"), dtype=str)
    frame.attrs["source"] = "Label Studio export"
    return frame


def import_export(export_uri: str, results_uri: str, run_id: str | None = None) -> pd.DataFrame:
    """Read a Label Studio JSON export, check it against the run's results CSV (as
    `validate_decisions` does) and return the decisions frame (every reviewed task,
    skips included) ready for `write_decisions`."""
    from tasks.merge import read_results

    if not storage.exists(export_uri):
        raise DecisionsError(f"Label Studio export {export_uri} does not exist")
    decisions = read_export(storage.read_text(export_uri))
    decisions.attrs["source"] = export_uri
    results = read_results(results_uri)
    validate_decisions(decisions, results, results_classes(results), run_id)
    return decisions
