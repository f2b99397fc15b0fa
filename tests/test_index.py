"""tasks/index.py: a dataset with every kind of bad input indexes fine and lists what it
skipped; datasets that cannot be audited fail with one clear line; the manifest schema and
the class order are stable."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from tasks import index, runs
from tasks.audit import prepare_run
from tasks.index import (
    MANIFEST_COLUMNS,
    DatasetError,
    index_dataset,
    list_dataset,
    read_manifest,
)
from tests.datasets import image_bytes, tiny_config, write_classes

UNICODE_NAME = "bird/ünïcødé 猫 01.png"


def bad_input_dataset(root: Path) -> None:
    """Three classes of good images, plus one of each kind of bad input."""
    write_classes(root, {"bird": 6, "cat": 6, "dog": 6})
    png = image_bytes(1000)
    (root / "cat" / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated PNG
    (root / "cat" / "garbage.png").write_bytes(b"not an image at all")
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("a text file in a class folder")
    (root / "dog" / "noextension").write_bytes(png)
    (root / "fish").mkdir()  # an empty class folder
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / ".thumbs").mkdir()
    (root / "cat" / ".thumbs" / "hidden.png").write_bytes(image_bytes(1001))
    (root / ".trash" / "cat").mkdir(parents=True)
    (root / ".trash" / "cat" / "old.png").write_bytes(image_bytes(1002))
    (root / "README.md").write_text("not inside a class folder")
    (root / "dog" / "UPPER.JPG").write_bytes(image_bytes(1003, "JPEG"))
    (root / "dog" / "photo.Jpeg").write_bytes(image_bytes(1004, "JPEG"))
    (root / "cat" / "with space.png").write_bytes(image_bytes(1005))
    (root / UNICODE_NAME).write_bytes(image_bytes(1006))
    (root / "bird" / "b.bmp").write_bytes(image_bytes(1007, "BMP"))
    (root / "bird" / "w.webp").write_bytes(image_bytes(1008, "WEBP"))


def test_bad_input_dataset_indexes_and_lists_what_it_skipped(tmp_path, caplog):
    data = tmp_path / "data"
    bad_input_dataset(data)
    cfg = tiny_config(data, tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="tasks.index"):
        run = prepare_run(cfg, "bad-input")
    manifest, classes = read_manifest(run)
    assert classes == ["bird", "cat", "dog"]  # the empty folder is no class
    keys = set(manifest["key"])
    for key in ("dog/UPPER.JPG", "dog/photo.Jpeg", "cat/with space.png", UNICODE_NAME,
                "bird/b.bmp", "bird/w.webp"):
        assert key in keys
    assert len(manifest) == 18 + 6

    skipped = pd.read_csv(Path(run) / "skipped.csv", keep_default_na=False)
    assert list(skipped.columns) == ["filename", "reason"]
    reasons = dict(zip(skipped["filename"], skipped["reason"], strict=True))
    assert set(reasons) == {"cat/corrupt.png", "cat/garbage.png", "dog/zero.png",
                            "dog/notes.txt", "dog/noextension", "README.md"}
    assert reasons["cat/corrupt.png"].startswith("does not decode as an image")
    assert reasons["cat/garbage.png"].startswith("does not decode as an image")
    assert not any(" at 0x" in r for r in reasons.values())  # no object addresses
    assert reasons["dog/zero.png"] == "empty file (0 bytes)"
    assert reasons["dog/notes.txt"] == "not an image file (extension '.txt')"
    assert reasons["dog/noextension"] == "not an image file (extension 'none')"
    assert reasons["README.md"] == "not inside a class folder"
    # Hidden files and folders are neither indexed nor reported.
    everything = keys | set(reasons)
    assert not [k for k in everything if "/." in f"/{k}"]
    # The log lists every skipped file and the totals.
    for name in reasons:
        assert any(name in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), name
    assert any("indexed 24 images in 3 classes" in r.getMessage() and "skipped 6, ignored 4 "
               "hidden" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_bad_input_dataset_audits_fine(tmp_path):
    """Every usable image (JPG, BMP, WEBP, odd names) is decoded by the trainer and gets a
    prediction."""
    from tasks.merge import merge_run, read_results
    from tasks.train import run_repeat

    data = tmp_path / "data"
    bad_input_dataset(data)
    cfg = tiny_config(data, tmp_path / "work")
    run = prepare_run(cfg, "bad-input")
    for repeat in range(cfg.n_repeats):
        run_repeat(run, repeat)
    results = read_results(merge_run(run))
    manifest, _ = read_manifest(run)
    assert sorted(results["filename"]) == sorted(manifest["key"])
    assert UNICODE_NAME in set(results["filename"]) and len(results) == 24
    assert (results["num_preds"] == 1).all()


def test_files_that_cannot_be_read_are_skipped(tmp_path):
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    cfg = tiny_config(data, tmp_path / "work")
    listing = list_dataset(cfg.data_path)
    (data / "cat" / "img-001.png").unlink()  # removed between the listing and the check
    result = index_dataset(cfg, listing)
    assert "cat/img-001.png" not in set(result.manifest["key"])
    assert result.skipped.to_dict("records") == [
        {"filename": "cat/img-001.png",
         "reason": "cannot be read (FileNotFoundError: No such file or directory)"}]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_files_without_read_permission_are_skipped(tmp_path):
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    (data / "dog" / "img-002.png").chmod(0)
    try:
        result = index_dataset(tiny_config(data, tmp_path / "work"))
    finally:
        (data / "dog" / "img-002.png").chmod(0o644)
    assert result.skipped.to_dict("records") == [
        {"filename": "dog/img-002.png",
         "reason": "cannot be read (PermissionError: Permission denied)"}]


def test_single_class_dataset_is_one_clear_error(tmp_path):
    data = tmp_path / "data"
    write_classes(data, {"cat": 10})
    (data / "dog").mkdir()
    (data / "dog" / "broken.png").write_bytes(b"broken")  # the second class has no usable image
    with pytest.raises(DatasetError) as err:
        index_dataset(tiny_config(data, tmp_path / "work"))
    message = str(err.value)
    assert "need at least 2 class folders with usable images, found 1 ('cat')" in message
    assert "\n" not in message


def test_images_directly_in_the_root_are_no_classes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.png").write_bytes(image_bytes(i))
    with pytest.raises(DatasetError, match=r"found 0; expected <root>/<class>/<image>"):
        index_dataset(tiny_config(data, tmp_path / "work"))


def test_missing_dataset_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"data_path '.*nowhere' is not a folder"):
        index_dataset(tiny_config(tmp_path / "nowhere", tmp_path / "work"))


@pytest.mark.parametrize(("counts", "extra"), [
    ({"cat": 1, "dog": 1}, {}),  # no image left for training
    ({"cat": 2, "dog": 1}, {"test_split": 0.2}),  # K=5 folds of 3 images: an empty test fold
    ({"cat": 3, "dog": 3}, {"val_split": 0.05, "test_split": 0.5}),  # no validation image
])
def test_too_few_images_for_the_splits_is_one_clear_error(tmp_path, counts, extra):
    data = tmp_path / "data"
    write_classes(data, counts)
    cfg = tiny_config(data, tmp_path / "work", **extra)
    with pytest.raises(DatasetError) as err:
        index_dataset(cfg)
    message = str(err.value)
    assert f"usable images are too few for test_split {cfg.test_split} and val_split " \
           f"{cfg.val_split}" in message
    assert "\n" not in message


def test_class_folders_differing_only_in_case_fail(tmp_path):
    data = tmp_path / "data"
    write_classes(data, {"Cat": 4, "cat": 4, "dog": 4})
    with pytest.raises(DatasetError, match=r"class folders 'Cat' and 'cat' differ only in case"):
        index_dataset(tiny_config(data, tmp_path / "work"))


def test_manifest_schema_and_stable_class_order(tmp_path):
    data = tmp_path / "data"
    # Folders created out of order; names that sort differently by case and by number.
    write_classes(data, {"zebra": 4, "Ant": 4, "bee": 4, "10": 3, "9": 3})
    cfg = tiny_config(data, tmp_path / "work")
    first = index_dataset(cfg)
    assert first.classes == sorted(first.classes) == ["10", "9", "Ant", "bee", "zebra"]
    m = first.manifest
    assert list(m.columns) == MANIFEST_COLUMNS
    assert m["id"].tolist() == list(range(len(m)))
    assert m["key"].tolist() == sorted(m["key"])
    assert str(m["label_idx"].dtype) == "int32"
    assert [first.classes[i] for i in m["label_idx"]] == m["label"].tolist()
    assert (m["label"] == m["key"].str.split("/").str[0]).all()
    for row in m.itertuples():
        raw = (data / row.key).read_bytes()
        assert row.size == len(raw)
        assert row.etag == hashlib.md5(raw).hexdigest()

    run = runs.run_uri(str(tmp_path / "work"), "r1")
    index.write_index(first, run)
    manifest, classes = read_manifest(run)
    assert classes == first.classes
    assert json.loads((Path(run) / "classes.json").read_text()) == first.classes
    pd.testing.assert_frame_equal(manifest, m)
    # Indexing again gives the same manifest, row for row.
    pd.testing.assert_frame_equal(index_dataset(cfg).manifest, m)


def test_read_manifest_of_a_folder_that_was_never_indexed(tmp_path):
    with pytest.raises(DatasetError, match=r"no manifest at .*; run the index step first"):
        read_manifest(str(tmp_path / "empty-run"))


def skipped_reasons(run: str) -> dict[str, str]:
    skipped = pd.read_csv(Path(run) / "skipped.csv", keep_default_na=False)
    return dict(zip(skipped["filename"], skipped["reason"], strict=True))


def test_names_that_are_not_utf8_are_skipped_and_listed(tmp_path, caplog):
    """b'caf\\xe9.png' (Latin-1) is a legal Linux name that Python sees with a surrogate
    escape; it used to fail the whole audit while fingerprinting the listing."""
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    raw = os.fsencode(data)
    with open(raw + b"/cat/caf\xe9.png", "wb") as f:
        f.write(image_bytes(50))
    os.mkdir(raw + b"/ni\xf1o")  # a class folder with such a name
    with open(raw + b"/ni\xf1o/a.png", "wb") as f:
        f.write(image_bytes(51))
    cfg = tiny_config(data, tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="tasks.index"):
        run = prepare_run(cfg)  # the default run id fingerprints the listing
    manifest, classes = read_manifest(run)
    assert classes == ["cat", "dog"] and len(manifest) == 10
    reasons = skipped_reasons(run)
    assert reasons == {"cat/caf\\xe9.png": "file name is not valid UTF-8; rename it",
                       "ni\\xf1o": "folder name is not valid UTF-8; rename it"}
    for name in reasons:
        assert any(repr(name) in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), name
    # Same listing, same run id: the second audit resumes.
    assert prepare_run(cfg) == run


def test_symlinks_inside_the_root_are_followed_others_listed(tmp_path, caplog):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    write_classes(data, {"cat": 5})
    write_classes(data / ".store", {"dogs": 5}, start=10)  # hidden: reached only by the link
    write_classes(outside, {"bird": 5}, start=20)
    (data / "dog").symlink_to(data / ".store" / "dogs")  # a class folder inside the root
    (data / "cat" / "alias.png").symlink_to(data / "cat" / "img-000.png")
    (data / "bird").symlink_to(outside / "bird")  # leaves the root
    (data / "cat" / "far.png").symlink_to(outside / "bird" / "img-000.png")
    (data / "cat" / "gone.png").symlink_to(tmp_path / "nothing.png")  # dangling
    (data / "dog2").symlink_to(tmp_path / "no-folder")  # dangling folder link
    (data / "cat" / "loop").symlink_to(data / "cat")  # a loop
    os.mkfifo(data / "cat" / "pipe.png")
    cfg = tiny_config(data, tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="tasks.index"):
        run = prepare_run(cfg, "links")
    manifest, classes = read_manifest(run)
    assert classes == ["cat", "dog"]
    assert sorted(manifest["key"]) == sorted(
        [f"cat/img-{i:03d}.png" for i in range(5)] + ["cat/alias.png"]
        + [f"dog/img-{i:03d}.png" for i in range(5)])
    row = manifest.set_index("key").loc["dog/img-000.png"]
    assert row["etag"] == hashlib.md5((data / ".store/dogs/img-000.png").read_bytes()).hexdigest()
    reasons = skipped_reasons(run)
    assert reasons == {
        "bird": f"symbolic link to outside the dataset root ({outside / 'bird'})",
        "cat/far.png": "symbolic link to outside the dataset root "
                       f"({outside / 'bird' / 'img-000.png'})",
        "cat/gone.png": "dangling symbolic link",
        "dog2": "dangling symbolic link",
        "cat/loop": "symbolic link loop",
        "cat/pipe.png": "not a regular file (a device, pipe or socket)",
    }
    for name in reasons:
        assert any(repr(name) in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), name
    # A dataset root that is itself a link: links into it still count as inside.
    (tmp_path / "root-link").symlink_to(data)
    again = index_dataset(tiny_config(tmp_path / "root-link", tmp_path / "work"))
    pd.testing.assert_frame_equal(again.manifest, manifest)


UNREADABLE_CHILD = """
import json, sys
from tasks.index import index_dataset
from tests.datasets import tiny_config
result = index_dataset(tiny_config(sys.argv[1], sys.argv[2]))
print(json.dumps([result.classes, result.skipped.to_dict("records")]))
"""


def test_unreadable_class_folder_is_listed():
    """Root reads any folder, so as root the index runs as user nobody (setpriv)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root reads folders without read permission, and setpriv is missing")
    base = Path(tempfile.mkdtemp(prefix="acl-unreadable-"))  # outside pytest's 0700 folders
    try:
        base.chmod(0o755)
        data = base / "data"
        write_classes(data, {"cat": 5, "dog": 5, "fish": 3})
        for path in (data, *data.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (data / "fish").chmod(0)
        cmd = [sys.executable, "-c", UNREADABLE_CHILD, str(data), str(base / "work")]
        proc = subprocess.run((as_nobody if os.geteuid() == 0 else []) + cmd, text=True,
                              capture_output=True, cwd=Path(__file__).resolve().parent.parent,
                              timeout=120)
    finally:
        (base / "data" / "fish").chmod(0o755)
        shutil.rmtree(base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    classes, skipped = json.loads(proc.stdout.strip().splitlines()[-1])
    assert classes == ["cat", "dog"]
    assert skipped == [{"filename": "fish",
                        "reason": "folder cannot be read (PermissionError: Permission denied)"}]


def test_resuming_a_run_over_a_dataset_that_lost_an_image_is_refused(tmp_path):
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    cfg = tiny_config(data, tmp_path / "work")
    run = prepare_run(cfg, "mine")
    assert prepare_run(cfg, "mine") == run  # unchanged: resumes
    (data / "cat" / "img-002.png").unlink()
    (data / "dog" / "img-003.png").write_bytes(image_bytes(99, size=13))  # another size
    with pytest.raises(DatasetError) as err:
        prepare_run(cfg, "mine")
    message = str(err.value)
    assert message.startswith("run 'mine' cannot resume: 2 of its 10 images are gone from "
                              f"{data} or ")
    assert ("changed size since it was indexed (e.g. 'cat/img-002.png'); its manifest and "
            "predictions are stale: start a new run (pass a new --run-id, or drop --run-id to "
            "use the one derived from the dataset as it is now)") in message
    assert "\n" not in message
    # The derived run id follows the dataset, so the default starts a new run.
    fresh = prepare_run(cfg)
    assert fresh != run and len(read_manifest(fresh)[0]) == 9


def test_resuming_over_an_image_edited_in_place_is_refused(tmp_path):
    """Same size, same modification time, other pixels: the listing (and so the derived run
    id) cannot see it; the manifest's checksums can."""
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    photo = data / "cat" / "photo.bmp"
    photo.write_bytes(image_bytes(40, "BMP"))
    cfg = tiny_config(data, tmp_path / "work")
    run = prepare_run(cfg)
    st = photo.stat()
    edited = image_bytes(41, "BMP")
    assert len(edited) == st.st_size and edited != photo.read_bytes()
    photo.write_bytes(edited)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DatasetError) as err:
        prepare_run(cfg)
    assert str(err.value) == (
        f"run {Path(run).name!r} cannot resume: 1 of its 11 images changed content since it "
        "was indexed (e.g. 'cat/photo.bmp'); its manifest and predictions are stale: start a "
        "new run (pass a new --run-id, or drop --run-id to use the one derived from the "
        "dataset as it is now)")
    fresh = prepare_run(cfg, "edited")
    row = read_manifest(fresh)[0].set_index("key").loc["cat/photo.bmp"]
    assert row["etag"] == hashlib.md5(edited).hexdigest()


def test_resuming_with_new_images_warns_and_keeps_the_run(tmp_path, caplog):
    data = tmp_path / "data"
    write_classes(data, {"cat": 5, "dog": 5})
    (data / "dog" / "notes.txt").write_text("skipped at indexing, not new")
    cfg = tiny_config(data, tmp_path / "work")
    run = prepare_run(cfg, "mine")
    (data / "cat" / "new.png").write_bytes(image_bytes(98))
    (data / "cat" / ".hidden.png").write_bytes(image_bytes(97))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.index"):
        assert prepare_run(cfg, "mine") == run
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"1 images were added to {data} since run mine was indexed and are "
                        "not part of it (e.g. 'cat/new.png'); start a new run to audit them"]
    assert len(read_manifest(run)[0]) == 10


def test_index_in_worker_processes_gives_the_single_process_result(tmp_path, caplog,
                                                                  monkeypatch):
    """Chunks of a few entries checked by two worker processes, with a progress line per
    chunk: the same manifest, classes and skipped list as one process checking one chunk."""
    data = tmp_path / "data"
    bad_input_dataset(data)
    raw = os.fsencode(data)
    with open(raw + b"/cat/caf\xe9.png", "wb") as f:
        f.write(image_bytes(50))
    (data / "dog" / "gone.png").symlink_to(tmp_path / "nothing.png")
    cfg = tiny_config(data, tmp_path / "work")
    single = index_dataset(cfg, workers=1, chunk_rows=10_000)
    monkeypatch.setattr(index, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="tasks.index"):
        parallel = index_dataset(cfg, workers=2, chunk_rows=3)
    pd.testing.assert_frame_equal(parallel.manifest, single.manifest)
    # PIL names the BytesIO object it could not read, at its address: not compared.
    pd.testing.assert_frame_equal(*(s.replace(r" at 0x[0-9a-f]+>", ">", regex=True)
                                    for s in (parallel.skipped, single.skipped)))
    assert parallel.classes == single.classes == ["bird", "cat", "dog"]
    assert len(single.manifest) == 24 and len(single.skipped) == 8
    n = len(list_dataset(cfg.data_path))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checked ")]
    assert len(progress) == -(-n // 3)  # a line per chunk here; one every few seconds at scale
    assert re.fullmatch(r"checked 3/\d+ files \([\d,]+ files/s, ETA \d+m\d\ds\)", progress[0])
    assert progress[-1].startswith(f"checked {n}/{n} files")
