"""Review report at scale: file size, time to first render and responsiveness in Chromium.

Builds a run folder whose results CSV has `--cards` suspects (synthetic scores over a real
image dataset), writes its report.html with `report_top_n = --cards` through
`tasks.report.write_report`, and opens it in headless Chromium (tests/browser.py), three
times each. Two datasets: photos (random crops of scikit-learn's two sample photos, 224 px
JPEG: thumbnails near the largest they get) and Fashion-MNIST (28 px PNG, as
`python -m tasks sample`).

    python -m benchmarks.report_bench --cards 5000

(run from the repository root, under the heavy-job lock on a shared machine). Writes
benchmarks/REPORT_RESULTS.md. Measured per page: its size; first contentful paint, largest
contentful paint and DOMContentLoaded (the script has run: the page is interactive), from
navigation start; then, on the loaded page, the time until the next frame after a class
filter, after a review key (`a`), after "show more" (200 cards), after jumping to the last
card (`End`: every page of cards rendered), after the "not reviewed yet" filter from there
and after a review key under that filter (the card leaves the list, the next moves up).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks import runs
from tasks.config import AuditConfig
from tasks.index import DatasetIndex, write_index
from tasks.report import write_report
from tasks.sample import write_sample

OUT = Path(__file__).resolve().parent / "REPORT_RESULTS.md"
PHOTO_CLASSES = ["building", "flower", "garden", "roof", "sky", "temple", "tree", "water"]

# One measurement on a loaded page: run `act`, then resolve after the next frame is drawn.
_FRAME_AFTER = """
const done = arguments[arguments.length - 1];
const t0 = performance.now();
(%s)();
requestAnimationFrame(() => setTimeout(() => done(performance.now() - t0), 0));
"""
_LOAD_TIMES = """
const done = arguments[arguments.length - 1];
const nav = performance.getEntriesByType('navigation')[0];
const paint = Object.fromEntries(performance.getEntriesByType('paint')
  .map((e) => [e.name, e.startTime]));
new PerformanceObserver((list) => {
  const lcp = list.getEntries().at(-1);
  done({fcp: paint['first-contentful-paint'], lcp: lcp ? lcp.startTime : null,
        dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd});
}).observe({type: 'largest-contentful-paint', buffered: true});
"""


def photo_dataset(root: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` 224 px JPEG crops of scikit-learn's sample photos in class folders; returns
    (key, class) per image."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cls = PHOTO_CLASSES[i % len(PHOTO_CLASSES)]
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(96, 420))
        x, y = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
        key = f"{cls}/photo-{i:05d}.jpg"
        (root / cls).mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + side, y + side)).resize((224, 224)).save(root / key, quality=90)
        out.append((key, cls))
    return out


def sample_dataset(root: Path, n: int) -> list[tuple[str, str]]:
    """`n` Fashion-MNIST images (28 px PNG) as `python -m tasks sample` writes them."""
    truth = pd.read_csv(write_sample(root, n, 0.2, seed=3))
    return list(zip(truth["filename"], truth["given_label"], strict=True))


def fake_run(work: Path, data: Path, images: list[tuple[str, str]], cards: int,
             seed: int = 0) -> str:
    """A run folder with a results CSV over `images` (most suspicious first: most of them
    flagged with another suggestion) and a report of the top `cards`."""
    rng = np.random.default_rng(seed)
    keys = [k for k, _ in images]
    label = np.array([c for _, c in images])
    classes = sorted(set(label))
    n = len(keys)
    other = rng.choice(classes, n)
    corrected = np.where((rng.random(n) < 0.85) & (other != label), other, label)
    quality = np.sort(rng.random(n))
    flagged = corrected != label
    results = pd.DataFrame({
        "filename": keys, "label": label, "corrected_label": corrected,
        "num_preds": rng.integers(2, 6, n), "%": np.round(100 - quality * 60, 2),
        "label_quality": np.round(quality, 5), "is_label_issue": flagged,
        "suggested_quality": np.round(1 - quality, 5), "votes": "", "id": np.arange(n),
        "tier": np.where(flagged, "issue", "ok"),
        "p_label_wrong": np.round(np.where(flagged, 1 - quality / 2, quality / 2), 5),
        "p_suggestion": np.where(flagged, np.round(1 - quality * 0.6, 5), 0.0)})
    run = str(work / "runs" / f"bench-{data.name}")
    manifest = pd.DataFrame({"id": np.arange(n), "key": keys, "label": label,
                             "label_idx": [classes.index(c) for c in label], "size": 1,
                             "etag": ""})
    write_index(DatasetIndex(manifest, classes, pd.DataFrame(columns=["filename", "reason"])),
                run)
    runs.write_config(run, AuditConfig(data_path=str(data), report_top_n=cards))
    Path(runs.results_uri(run)).write_text(results.to_csv(index=False))
    return run


def measure(url: str, rounds: int) -> dict[str, float]:
    """Medians over `rounds` fresh loads of the page (one browser, storage cleared)."""
    from tests.browser import chrome

    driver = chrome()
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            driver.get(url)
            driver.execute_script("localStorage.clear()")
            driver.get(url)
            assert driver.execute_script("return document.body.dataset.ready") == "1"
            got = driver.execute_async_script(_LOAD_TIMES)
            got["cards"] = driver.execute_script(
                "const t = document.getElementById('more-cards');"
                "return document.querySelectorAll('#grid .card').length"
                " + (t ? t.content.querySelectorAll('.card').length : 0)")
            got["filter"] = driver.execute_async_script(_FRAME_AFTER % """() => {
                const s = document.getElementById('f-given');
                s.value = s.options[1].value; s.dispatchEvent(new Event('change')); }""")
            driver.execute_script("const s = document.getElementById('f-given'); s.value = '';"
                                  "s.dispatchEvent(new Event('change'));"
                                  "document.dispatchEvent(new KeyboardEvent('keydown', "
                                  "{key: 'j'}))")  # the cursor on the first card
            got["key"] = driver.execute_async_script(_FRAME_AFTER % """() =>
                document.dispatchEvent(new KeyboardEvent('keydown', {key: 'a'}))""")
            got["more"] = driver.execute_async_script(_FRAME_AFTER % """() =>
                document.getElementById('more-button').click()""")
            got["end"] = driver.execute_async_script(_FRAME_AFTER % """() =>
                document.dispatchEvent(new KeyboardEvent('keydown', {key: 'End'}))""")
            got["todo"] = driver.execute_async_script(_FRAME_AFTER % """() => {
                const s = document.getElementById('f-review');
                s.value = 'todo'; s.dispatchEvent(new Event('change')); }""")
            driver.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', "
                                  "{key: 'j'}))")
            got["todo_key"] = driver.execute_async_script(_FRAME_AFTER % """() =>
                document.dispatchEvent(new KeyboardEvent('keydown', {key: 'n'}))""")
            for k, v in got.items():
                if v is not None:
                    samples.setdefault(k, []).append(float(v))
    finally:
        driver.quit()
    return {k: statistics.median(v) for k, v in samples.items()}


def chromium_version() -> str:
    out = subprocess.run(["chromium", "--version"], capture_output=True, text=True, check=False)
    return " ".join(out.stdout.split()[:2]) or "chromium"


COLUMNS = [("fcp", "first contentful paint"), ("lcp", "largest contentful paint"),
           ("dcl", "interactive (DOMContentLoaded)"), ("filter", "class filter"),
           ("key", "review key"), ("more", "200 more cards"),
           ("end", "End (all cards rendered)"), ("todo", "not reviewed yet"),
           ("todo_key", "review key, not reviewed yet")]


def table(rows: list[dict]) -> str:
    lines = ["| dataset | cards | report.html | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['cards']:,} | {r['bytes'] / 1e6:.1f} MB | "
                     + " | ".join(f"{r[k]:,.0f} ms" for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cards", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        root = Path(tmp)
        for name, make in (("photos", photo_dataset), ("fashion-mnist", sample_dataset)):
            data = root / name
            t0 = time.perf_counter()
            run = fake_run(root / "work", data, make(data, args.cards), args.cards)
            t1 = time.perf_counter()
            page = Path(write_report(run))
            written = time.perf_counter() - t1
            print(f"{name}: dataset in {t1 - t0:.0f} s, report in {written:.1f} s, "
                  f"{page.stat().st_size / 1e6:.1f} MB", flush=True)
            got = measure(page.resolve().as_uri(), args.rounds)
            print(f"{name}: {got}", flush=True)
            rows.append({"dataset": name, "cards": int(got.pop("cards")),
                         "bytes": page.stat().st_size, "write": written, **got})
    text = (f"# Review report at scale\n\nWritten by `python -m benchmarks.report_bench "
            f"--cards {args.cards}` ({chromium_version()} headless, {platform.machine()}, "
            f"{platform.python_version()}); medians of {args.rounds} fresh loads, times from "
            "navigation start, interaction times until the next frame.\n\n"
            f"{table(rows)}\n\nWriting the report (thumbnails included) took "
            + ", ".join(f"{r['write']:.0f} s ({r['dataset']})" for r in rows) + ".\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
