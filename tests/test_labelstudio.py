"""tasks/labelstudio.py: the import file and labeling config it writes, the decisions it reads
from a Label Studio JSON export, and the whole round trip through a real Label Studio server
on loopback (tests/lsserver.py): create a project with the generated config, import the
tasks, check every image reference resolves to the image's bytes, annotate (accept, keep,
other, cancelled, and one left alone), export, and read the export back as decisions that
tasks.decisions accepts."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks import labelstudio as ls
from tasks.decisions import (
    COLUMNS,
    DecisionsError,
    read_decisions,
    validate_decisions,
    write_decisions,
)
from tasks.merge import RESULT_COLUMNS, read_results
from tests import lsserver

CLASSES = ["cat", "dog", "owl"]
# filename, label, corrected_label, %, is_label_issue, suggested_quality
RESULTS = [
    ("cat/0.png", "cat", "dog", 100.0, True, 0.91),
    ("cat/tabby 1.png", "cat", "owl", 75.0, True, 0.62),  # a space: URL-quoted for Label Studio
    ("dog/0.png", "dog", "cat", 80.0, True, 0.7),
    ("owl/0.png", "owl", "dog", 66.67, True, 0.55),
    ("owl/1.png", "owl", "cat", 60.0, True, 0.5),
    ("dog/1.png", "dog", "dog", 100.0, False, 0.95),  # not flagged: not exported
]
FLAGGED = [r[0] for r in RESULTS if r[4]]


def write_results(path: Path) -> pd.DataFrame:
    """A results CSV with merge's columns, read back the way the pipeline reads it."""
    rows = [{"filename": f, "label": g, "corrected_label": c, "num_preds": 3, "%": p,
             "label_quality": 0.1 if flag else 0.9, "is_label_issue": flag,
             "suggested_quality": q, "votes": f"{c}:3", "id": i,
             "tier": "issue" if flag else "ok", "p_label_wrong": 0.9 if flag else 0.05,
             "p_suggestion": round(0.9 * q, 5) if c != g else 0.0}
            for i, (f, g, c, p, flag, q) in enumerate(RESULTS)]
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
    return read_results(str(path))


def write_images(root: Path) -> None:
    """A tiny distinct PNG per results row."""
    for i, (name, *_) in enumerate(RESULTS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 5), (40 * i, 255 - 40 * i, 90)).save(path)


@pytest.fixture
def results_uri(tmp_path: Path) -> str:
    write_results(tmp_path / "results.csv")
    return str(tmp_path / "results.csv")


# --- the files, without a server -----------------------------------------------------------

def test_labeling_config_has_one_choice_per_class() -> None:
    classes = ["cat", "dog & \"friends\"", "owl<3"]
    root = ET.fromstring(ls.labeling_config(classes))
    image = root.find("Image")
    assert image is not None and image.attrib == {"name": "image", "value": "$image"}
    choices = root.find("Choices")
    assert choices is not None
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == (
        "label", "image", "single")
    assert [c.get("value") for c in choices.findall("Choice")] == classes


def test_tasks_are_the_flagged_rows_with_the_suggestion_as_prediction(results_uri: str) -> None:
    tasks = ls.build_tasks(read_results(results_uri), "pets")
    assert [t["data"]["filename"] for t in tasks] == FLAGGED
    first = tasks[1]
    assert first["data"] == {
        "image": "/data/local-files/?d=pets/cat/tabby%201.png", "filename": "cat/tabby 1.png",
        "label": "cat", "suggestion": "owl",
        "caption": "given label: cat · suggested: owl (75% of 3 predictions)"}
    assert first["predictions"] == [{
        "model_version": "auto-correct-labels", "score": 0.558,  # p_suggestion
        "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                    "value": {"choices": ["owl"]}}]}]
    assert len(ls.build_tasks(read_results(results_uri), "pets", top_n=2)) == 2
    everything = ls.build_tasks(read_results(results_uri), "pets", flagged_only=False)
    assert [t["data"]["filename"] for t in everything] == [r[0] for r in RESULTS]


@pytest.mark.parametrize(("root", "expected"), [
    ("pets", "/data/local-files/?d=pets/cat/tabby%201.png"),
    ("/srv/data/pets/", "/data/local-files/?d=/srv/data/pets/cat/tabby%201.png"),
    ("s3://bucket/pets", "s3://bucket/pets/cat/tabby 1.png"),
    ("https://img.example.com/pets/", "https://img.example.com/pets/cat/tabby%201.png"),
])
def test_image_reference(root: str, expected: str) -> None:
    assert ls.image_reference(root, "cat/tabby 1.png") == expected


def test_export_tasks_writes_tasks_and_config(results_uri: str, tmp_path: Path) -> None:
    out = str(tmp_path / "review" / "tasks.json")
    written = ls.export_tasks(results_uri, out, "s3://bucket/pets", top_n=3)
    assert written == {"tasks": out, "config": str(tmp_path / "review" /
                                                   "tasks.labeling-config.xml"), "count": 3}
    tasks = json.loads(Path(out).read_text())
    assert [t["data"]["image"] for t in tasks] == [f"s3://bucket/pets/{f}" for f in FLAGGED[:3]]
    assert Path(written["config"]).read_text() == ls.labeling_config(CLASSES)


def annotation(choice: str | None, by: object = 7, cancelled: bool = False,
               at: str = "2026-05-01T10:00:00Z", truth: bool = False) -> dict:
    """An annotation as Label Studio's JSON export writes it."""
    result = [] if choice is None else [{"from_name": "label", "to_name": "image",
                                         "type": "choices", "value": {"choices": [choice]}}]
    return {"id": 1, "completed_by": by, "result": result, "was_cancelled": cancelled,
            "ground_truth": truth, "created_at": at, "updated_at": at}


def task(i: int, filename: str, label: str, suggestion: str, annotations: list[dict]) -> dict:
    return {"id": i, "annotations": annotations, "predictions": [],
            "data": {"image": "x", "filename": filename, "label": label,
                     "suggestion": suggestion}}


def test_read_export_maps_choices_to_decisions() -> None:
    export = [
        task(11, "cat/0.png", "cat", "dog", [annotation("dog", by={"id": 7, "email": "a@x.io"})]),
        task(12, "cat/tabby 1.png", "cat", "owl", [annotation("cat")]),
        task(13, "dog/0.png", "dog", "cat", [annotation("owl", at="2026-05-02T09:00:00Z")]),
        task(14, "owl/0.png", "owl", "dog", [annotation(None, cancelled=True)]),
        task(15, "owl/1.png", "owl", "cat", []),
        # a later cancellation does not undo a decision; the ground truth wins a disagreement
        task(16, "dog/1.png", "dog", "dog", [
            annotation("cat", by=8), annotation(None, cancelled=True, at="2026-06-01T00:00:00Z"),
            annotation("dog", by=9, truth=True)]),
    ]
    frame = ls.read_export(json.dumps(export))
    assert list(frame.columns) == COLUMNS and list(frame.index) == [str(i) for i in range(11, 17)]
    assert frame.to_dict("records") == [
        {"filename": "cat/0.png", "label": "cat", "decision": "accept", "new_label": "dog",
         "reviewer": "a@x.io", "decided_at": "2026-05-01T10:00:00Z"},
        {"filename": "cat/tabby 1.png", "label": "cat", "decision": "keep", "new_label": "",
         "reviewer": "7", "decided_at": "2026-05-01T10:00:00Z"},
        {"filename": "dog/0.png", "label": "dog", "decision": "other", "new_label": "owl",
         "reviewer": "7", "decided_at": "2026-05-02T09:00:00Z"},
        {"filename": "owl/0.png", "label": "owl", "decision": "skip", "new_label": "",
         "reviewer": "7", "decided_at": "2026-05-01T10:00:00Z"},
        {"filename": "owl/1.png", "label": "owl", "decision": "skip", "new_label": "",
         "reviewer": "", "decided_at": ""},
        {"filename": "dog/1.png", "label": "dog", "decision": "keep", "new_label": "",
         "reviewer": "9", "decided_at": "2026-05-01T10:00:00Z"},
    ]


@pytest.mark.parametrize(("export", "expected"), [
    ({"tasks": []}, "the Label Studio export is not a list of tasks"),
    ([{"id": 3, "data": {"image": "x"}}],
     "Label Studio task 3: data lacks filename, label, suggestion"),
    ([task(4, "cat/0.png", "cat", "dog", [annotation("dog", by=1), annotation("owl", by=2)])],
     r"Label Studio task 4 \(cat/0.png\): annotations disagree \(dog by 1, owl by 2\)"),
    ([task(5, "cat/0.png", "cat", "dog", [{**annotation("dog"), "result": [
        {"from_name": "label", "type": "choices", "value": {"choices": ["dog", "owl"]}}]}])],
     r"Label Studio task 5 \(cat/0.png\): an annotation chose 2 classes"),
])
def test_read_export_refuses(export: object, expected: str) -> None:
    with pytest.raises(DecisionsError, match=f"^{expected}") as err:
        ls.read_export(json.dumps(export))
    assert "\n" not in str(err.value)


def test_import_export_checks_against_the_results(results_uri: str, tmp_path: Path) -> None:
    export = tmp_path / "export.json"
    export.write_text(json.dumps([task(21, "cat/0.png", "dog", "cat", [annotation("cat")])]))
    with pytest.raises(DecisionsError, match=r"^.*export\.json task 21 \(cat/0\.png\): label "
                                             r"'dog' but the run's results say 'cat'"):
        ls.import_export(str(export), results_uri)


# --- the round trip through a real Label Studio ---------------------------------------------

@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    if lsserver.binary() is None:
        pytest.skip(f"no Label Studio virtualenv at {lsserver.VENV}: run "
                    "`bash scripts/setup.sh labelstudio` to run the round trip")
    work = tmp_path_factory.mktemp("label-studio")
    (work / "files").mkdir()
    server = lsserver.LabelStudio(work / "server", document_root=work / "files")
    (work / "server").mkdir()
    server.start()
    yield server
    server.kill()


def label_studio_export(server: lsserver.LabelStudio, project: int, expand_users: bool) -> bytes:
    """The project's export in the JSON format: the direct download (user ids), or an export
    snapshot with the annotators expanded (their emails)."""
    if not expand_users:
        status, _, raw = server.request(
            "GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true")
        assert status == 200, raw[:500]
        return raw
    snap = server.api("POST", f"/api/projects/{project}/exports/", {
        "title": "review", "annotation_filter_options": {"usual": True, "skipped": True},
        "serialization_options": {"annotations__completed_by": {"only_id": False}}})
    deadline = time.monotonic() + 60
    while snap["status"] != "completed":
        assert snap["status"] != "failed" and time.monotonic() < deadline, snap
        time.sleep(0.5)
        snap = server.api("GET", f"/api/projects/{project}/exports/{snap['id']}")
    status, _, raw = server.request(
        "GET", f"/api/projects/{project}/exports/{snap['id']}/download?exportType=JSON")
    assert status == 200, raw[:500]
    return raw


def test_round_trip_through_label_studio(label_studio: lsserver.LabelStudio,
                                         tmp_path: Path) -> None:
    server = label_studio
    dataset = server.document_root / "pets"
    write_images(dataset)
    results_uri = str(tmp_path / "results.csv")
    results = write_results(tmp_path / "results.csv")
    written = ls.export_tasks(results_uri, str(tmp_path / "tasks.json"), image_root="pets")
    assert written["count"] == len(FLAGGED)

    project = server.api("POST", "/api/projects", {
        "title": "auto-correct-labels review",
        "label_config": Path(written["config"]).read_text()})["id"]
    # A Local Files source storage on the dataset grants access to its files (not synced).
    server.api("POST", "/api/storages/localfiles", {
        "project": project, "title": "pets", "path": str(dataset), "use_blob_urls": False})
    imported = server.api("POST", f"/api/projects/{project}/import",
                          json.loads(Path(written["tasks"]).read_text()))
    assert (imported["task_count"], imported["prediction_count"]) == (5, 5)

    listed = server.api("GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    ids = {t["data"]["filename"]: t["id"] for t in listed}
    assert sorted(ids) == sorted(FLAGGED)
    for t in listed:  # every image reference resolves to that image's bytes
        status, _, body = server.request("GET", t["data"]["image"])
        assert status == 200 and body == (dataset / t["data"]["filename"]).read_bytes()
    for name, suggestion in [("cat/0.png", "dog"), ("dog/0.png", "cat")]:
        preds = server.api("GET", f"/api/predictions?task={ids[name]}")
        assert [(p["model_version"], p["result"][0]["value"]["choices"]) for p in preds] == [
            ("auto-correct-labels", [suggestion])]

    def annotate(name: str, choice: str | None, cancelled: bool = False) -> None:
        result = [] if choice is None else [{"from_name": "label", "to_name": "image",
                                             "type": "choices", "value": {"choices": [choice]}}]
        server.api("POST", f"/api/tasks/{ids[name]}/annotations/",
                   {"result": result, "was_cancelled": cancelled})

    annotate("cat/0.png", "dog")  # the suggestion: accept
    annotate("cat/tabby 1.png", "cat")  # the given label: keep
    annotate("dog/0.png", "owl")  # another class: other
    annotate("owl/0.png", None, cancelled=True)  # skipped in the labeling UI
    # owl/1.png: never annotated

    expected = {"cat/0.png": ("accept", "dog"), "cat/tabby 1.png": ("keep", ""),
                "dog/0.png": ("other", "owl"), "owl/0.png": ("skip", ""),
                "owl/1.png": ("skip", "")}
    for expand_users, reviewer in [(False, "1"), (True, lsserver.USER)]:
        export = tmp_path / f"export-{expand_users}.json"
        export.write_bytes(label_studio_export(server, project, expand_users))
        decisions = ls.import_export(str(export), results_uri)
        got = {r["filename"]: (r["decision"], r["new_label"])
               for r in decisions.to_dict("records")}
        assert {k: v for k, v in got.items() if k != "owl/1.png"} == {
            k: v for k, v in expected.items() if k != "owl/1.png"}
        assert got.get("owl/1.png", ("skip", "")) == ("skip", "")  # exported or not: no move
        decided = decisions[decisions["filename"] != "owl/1.png"]
        assert set(decided["reviewer"]) == {reviewer}
        assert all(pd.to_datetime(decided["decided_at"], utc=True) > pd.Timestamp("2020", tz="UTC"))

        # through the decisions file and back: the same two moves
        uri = str(tmp_path / f"decisions-{expand_users}.csv")
        write_decisions(decisions, uri)
        moves = validate_decisions(read_decisions(uri), results, CLASSES)
        assert moves.to_dict("records") == [
            {"filename": "cat/0.png", "label": "cat", "new_label": "dog", "decision": "accept"},
            {"filename": "dog/0.png", "label": "dog", "new_label": "owl", "decision": "other"}]
