"""report.html: one self-contained page where a reviewer sees the suspicious images of a run.

The page is a single file: thumbnails are embedded as small data: URIs (read through
`tasks.storage`, so a dataset on s3:// works), CSS and JS are inline, and a
Content-Security-Policy forbids every external load, so it opens the same from a run folder
on disk or from an object-store download and never contacts anything. Only the top
`report_top_n` rows of the results are rendered, and only those rows and the summary's columns
are read (`load_results`), so the page stays small and fast for any dataset;
cards after the first `THUMB_FULL_N` get smaller thumbnails, and cards after the first
`PAGE_CARDS` wait in an inert <template> until the reviewer scrolls to them, so a report of
thousands of cards stays a few MB and opens fast.

The presentation lives in tasks/report_assets: the page template `report.html.j2` (Jinja2,
autoescaped) with its pieces in `parts.html.j2`, `report.css` and `report.js`; this module
computes the data they show. The page's script reads everything from data-* attributes.

Sections: a warning banner when the run summary's model-quality guard says the audit cannot
be trusted (`tasks.decide.guard`), a summary (from `<run>/summary.json` where the run has
one: the review tier, cleanlab's estimate of the wrong labels, the models' pooled accuracy),
per class cleanlab's estimated noise rate beside the flagged share, a given x suggested
matrix of the flagged images, the review grid (the `issue` tier, then the `review` tier;
filter by tier, by class and by whether the image would be relabelled at a sensitivity
chosen with a slider; sort by rank, vote share, label quality or name), where the reviewer
decides each card (accept the suggestion, keep the label, pick another class, skip; by
keyboard), decisions kept in the browser's localStorage and exported as the decisions file
of `tasks.decisions`, and the skipped files with their reasons. A run merged before
summaries existed renders without the banner and the summary's estimates.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import jinja2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from markupsafe import Markup
from PIL import Image

from tasks import images, runs, storage
from tasks.decide import REVIEW_FACTOR, TIERS
from tasks.decisions import COLUMNS, OPTIONAL_COLUMNS
from tasks.embeddings import NEIGHBOUR_COLUMNS, neighbour_sections
from tasks.merge import RESULT_COLUMNS, read_results, read_summary, too_few_predictions
from tasks.relabel import relabel_ceiling, select_rows

log = logging.getLogger(__name__)

THUMB_PX = 96  # longest side of an embedded thumbnail; the page shows it in a 128 px box
THUMB_FULL_N = 500  # cards with THUMB_PX thumbnails; the later ones get SMALL_THUMB_PX WebP
SMALL_THUMB_PX = 64
PAGE_CARDS = 200  # cards in the grid when the page opens; the script adds more as it scrolls
THUMB_WORKERS = 16  # parallel image reads (latency-bound on S3)
SKIPPED_MAX = 1000  # skipped files listed on the page; the rest stay in skipped.csv
MATRIX_MAX_CLASSES = 25  # above this many classes the matrix becomes a list of top pairs
PAIRS_MAX = 60


@dataclass(frozen=True)
class Thumb:
    """An embedded thumbnail: data URI, size in pixels, and whether it is shown magnified."""

    uri: str
    width: int
    height: int
    pixelated: bool


LOSSY = {  # format -> (MIME type, Pillow save options)
    "JPEG": ("image/jpeg", {"quality": 80, "optimize": True}),
    "WEBP": ("image/webp", {"quality": 60, "method": 6}),
}


def thumbnail(data: bytes, px: int = THUMB_PX, lossy: str = "JPEG") -> Thumb:
    """A small data: URI of an image: longest side at most `px`. Small images stay lossless
    PNG (and are drawn with sharp pixels); larger ones are scaled down and saved as `lossy`
    (JPEG or WEBP). Raises ValueError when the bytes do not decode."""
    try:
        img = images.open_rgb(data)  # the pixels the trainer sees
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"does not decode ({type(err).__name__})") from err
    small = max(img.size) <= px
    buf = io.BytesIO()
    if small:
        img.save(buf, "PNG", optimize=True)
        mime = "image/png"
    else:
        img.thumbnail((px, px), Image.Resampling.LANCZOS)
        mime, options = LOSSY[lossy]
        img.save(buf, lossy, **options)
    uri = f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
    return Thumb(uri=uri, width=img.width, height=img.height, pixelated=small)


def fetch_thumbnails(root: str, keys: list[str], workers: int = THUMB_WORKERS,
                     full: int = THUMB_FULL_N) -> list[Thumb | str]:
    """A Thumb per key under the dataset root, or the reason it is unavailable: the first
    `full` THUMB_PX JPEG, the rest SMALL_THUMB_PX WebP (a third of the bytes)."""

    def one(at: int, key: str) -> Thumb | str:
        uri = storage.join(root, key)
        try:
            data = storage.read_bytes(uri)
            return thumbnail(data) if at < full else thumbnail(data, SMALL_THUMB_PX, "WEBP")
        except (storage.StorageError, FileNotFoundError):
            return "image not found (moved or deleted since the audit?)"
        except ValueError as err:
            return f"image {err}"
        except Exception as err:  # a report with a placeholder beats no report
            log.warning("cannot read %s for its thumbnail: %s", uri, err)
            return f"image unreadable ({type(err).__name__})"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys)))) as pool:
        thumbs = list(pool.map(one, range(len(keys)), keys))
    failed = [(k, t) for k, t in zip(keys, thumbs, strict=True) if not isinstance(t, Thumb)]
    if failed:
        log.warning("%d of %d thumbnails unavailable, e.g. %s: %s", len(failed), len(keys),
                    *failed[0])
    return thumbs


def read_skipped(run: str) -> pd.DataFrame:
    """skipped.csv of a run (empty when absent)."""
    uri = storage.join(run, "skipped.csv")
    if not storage.exists(uri):
        return pd.DataFrame(columns=["filename", "reason"])
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)


def tier_of(results: pd.DataFrame) -> pd.Series:
    """Each row's tier (`tasks.decide.TIERS`); without one (results from before tiers, an
    empty cell of a hand-made CSV): issue when flagged, else ok."""
    flagged = results["is_label_issue"].map({True: "issue", False: "ok"})
    if "tier" not in results.columns:
        return flagged
    tier = results["tier"].fillna("").astype(str)
    return tier.where(tier != "", flagged)


def class_stats(results: pd.DataFrame, classes: list[str], relabel: pd.Series,
                summary: dict | None = None) -> pd.DataFrame:
    """Per given class: images, flagged (the issue tier), flagged share, the review tier, how
    many would be relabelled (`relabel`: a boolean per results row) and cleanlab's estimated
    noise rate from the run summary (NaN without one)."""
    by = results["label"]
    out = pd.DataFrame({
        "images": by.value_counts(),
        "flagged": results.loc[results["is_label_issue"], "label"].value_counts(),
        "review": results.loc[tier_of(results) == "review", "label"].value_counts(),
        "relabel": results.loc[relabel, "label"].value_counts(),
    }).reindex(classes).fillna(0).astype(int)
    out["flagged_share"] = out["flagged"] / out["images"].clip(lower=1)
    estimate = {r["class"]: r.get("estimated_noise_rate")
                for r in (summary or {}).get("per_class", [])}
    out["noise_rate"] = pd.Series([estimate.get(c) for c in out.index], index=out.index,
                                  dtype=np.float64)
    return out


def flag_matrix(results: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Counts of flagged images: rows the given label, columns the suggested label."""
    flagged = results[results["is_label_issue"]]
    counts = pd.crosstab(flagged["label"], flagged["corrected_label"])
    return counts.reindex(index=classes, columns=classes, fill_value=0)


# --- rendering: the page is tasks/report_assets/report.html.j2; here is only its data --------

ASSETS = "report_assets"


def _asset(name: str) -> str | None:
    """The text of a file in tasks/report_assets (None when there is none)."""
    path = resources.files("tasks") / ASSETS / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _inline(name: str, tag: str) -> Markup:
    """report.css or report.js, to be inlined in a <style> or <script> element."""
    text = _asset(name)
    if text is None:
        raise FileNotFoundError(f"tasks/{ASSETS}/{name} is missing; reinstall the package")
    if f"</{tag}" in text.lower():
        raise ValueError(f"tasks/{ASSETS}/{name} contains '</{tag}', which would end the "
                         f"page's <{tag}> element early; remove it")
    return Markup(text)  # our own file, inlined as it is


def _escaped(value: object) -> object:
    """Every value the template prints is HTML-escaped (unless it is already markup), with
    html.escape's entities (&quot;, &#x27;), the ones the report has always used."""
    return value if hasattr(value, "__html__") else Markup(html.escape(str(value), quote=True))


def _share(value: float | None) -> str:
    """A rate as a percent with one decimal; – when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1%}"


def _int(n: int) -> str:
    return f"{int(n):,}"


def _pct(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f}%" if float(value).is_integer() else f"{value:.1f}%"


def _quality(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"


def _attr_number(value: float) -> str:
    """A number for a data-* attribute that JavaScript's Number() reads back exactly; -1 for
    a missing one (below every slider position)."""
    value = float(value)
    if math.isnan(value):
        return "-1"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_asset), autoescape=True,
                             finalize=_escaped, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(thousands=_int, pct=_pct, quality=_quality, attr_number=_attr_number,
                       share=_share)
    return env


def _parts() -> jinja2.environment.TemplateModule:
    """The macros of parts.html.j2 (one per piece of the page)."""
    return _env().get_template("parts.html.j2").module


def duration(seconds: float) -> str:
    """17 s, 4 min 05 s, 2 h 03 min."""
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0):.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def csp(style: str, script: str) -> str:
    """The page's Content-Security-Policy: nothing external; only this page's own style and
    script (by hash) and data: images run or load."""
    return ("default-src 'none'; img-src data:; "
            f"style-src 'sha256-{_sha256(style)}'; script-src 'sha256-{_sha256(script)}'; "
            "base-uri 'none'; form-action 'none'")


def _stat(value: str, label: str, hint: str = "", id_: str = "", tone: str = "") -> dict:
    return {"value": value, "label": label, "hint": hint, "id": id_, "tone": tone}


def _class_rows(stats: pd.DataFrame) -> list[dict]:
    """class_stats rows, highest estimated noise rate first (flagged share without one)."""
    ordered = stats.sort_values(["noise_rate", "flagged_share", "flagged"], ascending=False,
                                na_position="last")
    rows = []
    for cls, r in ordered.iterrows():
        rate = r.noise_rate if not math.isnan(r.noise_rate) else r.flagged_share
        rows.append({"cls": cls, "images": r.images, "flagged": r.flagged,
                     "flagged_share": r.flagged_share, "review": r.review,
                     "relabel": r.relabel, "noise_rate": r.noise_rate,
                     "bar": max(0.0, min(1.0, rate)) * 100})
    return rows


def _level(n: int, peak: int) -> int:
    """Heat level 1-5 of a matrix count."""
    return min(5, 1 + 5 * n // (peak + 1))


def _matrix_view(matrix: pd.DataFrame) -> dict:
    """The given x suggested matrix over classes involved in a flag, or the top pairs."""
    involved = [c for c in matrix.index
                if matrix.loc[c].sum() > 0 or matrix[c].sum() > 0]
    if not involved:
        return {"kind": "none"}
    peak = max(1, int(matrix.to_numpy().max()))
    if len(involved) > MATRIX_MAX_CLASSES:
        pairs = matrix.stack()
        pairs = pairs[pairs > 0].sort_values(ascending=False, kind="stable")
        return {"kind": "pairs", "more": max(0, len(pairs) - PAIRS_MAX),
                "pairs": [{"given": g, "suggested": s, "n": int(n), "level": _level(int(n), peak)}
                          for (g, s), n in pairs.head(PAIRS_MAX).items()]}
    rows = []
    for g in involved:
        cells = []
        for s in involved:
            n = int(matrix.loc[g, s])
            kind = "diag" if g == s else "zero" if n == 0 else "count"
            cells.append({"kind": kind, "suggested": s, "n": n, "level": _level(n, peak)})
        rows.append({"given": g, "cells": cells, "total": int(matrix.loc[g, involved].sum())})
    return {"kind": "grid", "columns": involved, "rows": rows}


def _matrix(matrix: pd.DataFrame) -> str:
    """The matrix panel's HTML."""
    return str(_parts().matrix(_matrix_view(matrix)))


def _card(rank: int, row: dict, thumb: Thumb | str, relabel: bool, ceiling: float,
          tier: str) -> dict:
    """One review card: the results row, its thumbnail (or why there is none), its tier,
    whether it would be relabelled at the run's sensitivity and its relabel_ceiling."""
    label, sugg = str(row["label"]), str(row["corrected_label"])
    return {
        "rank": rank, "name": str(row["filename"]), "label": label, "suggested": sugg,
        "changed": sugg != label, "flagged": bool(row["is_label_issue"]), "relabel": relabel,
        "tier": tier,
        "pct": float(row["%"]), "prob": float(row.get("p_suggestion", math.nan)),
        "quality": float(row["label_quality"]), "preds": int(row["num_preds"]),
        "ceiling": ceiling,
        "votes": str(row.get("votes", "") or "").replace(";", ", ").replace(":", " "),
        "thumb": thumb if isinstance(thumb, Thumb) else None,
        "missing": "" if isinstance(thumb, Thumb) else thumb,
    }


def _guard(summary: dict | None) -> dict | None:
    """What the untrusted-audit banner shows (None when the audit can be trusted, or the run
    has no summary)."""
    guard = (summary or {}).get("guard") or {}
    if guard.get("trusted", True):
        return None
    return {"reasons": guard.get("reasons") or ["no reason recorded"],
            "remedy": guard.get("remedy") or ""}


def _summary_stats(summary: dict | None, n_review: int) -> list[dict]:
    """The summary's cards: the review tier, the estimated wrong labels, the pooled
    accuracy (none for a run without a summary)."""
    if not summary:
        return []
    stats = [_stat(_int(summary.get("review", n_review)), "to review",
                   "review tier: the next lowest label quality", id_="s-review", tone="review")]
    wrong, rate = summary.get("estimated_wrong_labels"), summary.get("estimated_noise_rate")
    if wrong is not None:
        stats.append(_stat(_int(wrong), "estimated wrong labels",
                           f"{_share(rate)} of predicted images (cleanlab's estimate)",
                           id_="s-noise"))
    accuracy = summary.get("pooled_accuracy")
    if accuracy is not None:
        stats.append(_stat(_share(accuracy), "pooled accuracy",
                           "the models' vote agrees with the given label", id_="s-accuracy"))
    return stats


def _options(values: pd.Series) -> list[tuple[str, int]]:
    """(class, count) for a filter's options, by class."""
    return sorted(values.value_counts().items())


def _skipped(skipped: pd.DataFrame) -> dict:
    return {"rows": skipped.head(SKIPPED_MAX).to_dict("records"),
            "more": max(0, len(skipped) - SKIPPED_MAX)}


def render_page(*, cfg, run: str, results: pd.DataFrame, classes: list[str], top: pd.DataFrame,
                thumbs: list[Thumb | str], top_relabel: pd.Series, top_ceiling: pd.Series,
                relabel: pd.Series, skipped: pd.DataFrame, seconds: float | None,
                summary: dict | None = None) -> str:
    """The whole HTML page; `summary` is the run's summary.json (None: a run without one)."""
    n = len(results)
    flagged = int(results["is_label_issue"].sum())
    tiers = tier_of(results)
    guard = _guard(summary)
    preds = results["num_preds"]
    pred_range = (f"{int(preds.min())}" if preds.min() == preds.max()
                  else f"{int(preds.min())}–{int(preds.max())}") if n else "0"
    stats = [
        _stat(_int(n), "images audited", id_="s-images"),
        _stat(_int(len(classes)), "classes", id_="s-classes"),
        _stat(_int(cfg.n_repeats), "training repeats",
              f"{pred_range} prediction{'' if pred_range == '1' else 's'} per image",
              id_="s-repeats"),
        _stat(_int(flagged), "flagged as label issues", f"{flagged / max(n, 1):.1%} of images",
              id_="s-flagged", tone="warn"),
        *_summary_stats(summary, int((tiers == "review").sum())),
        _stat(_int(relabel.sum()), "would be relabelled",
              (too_few_predictions(preds.to_numpy(), cfg) or f"issues with > "
               f"{cfg.sensitivity:g}% of votes and probability, ≥ {cfg.min_preds} predictions")
              + ("; refused without --force: the audit cannot be trusted" if guard else ""),
              id_="s-relabel", tone="accent"),
        _stat(_int(len(skipped)), "files skipped", id_="s-skipped"),
    ]
    if seconds is not None:
        stats.append(_stat(duration(seconds), "time taken", id_="s-time"))
    top_tiers = tier_of(top)
    cards = [_card(i + 1, row, thumb, bool(rel), float(ceil), tier)
             for i, (row, thumb, rel, ceil, tier) in enumerate(
                 zip(top.to_dict("records"), thumbs, top_relabel.to_list(),
                     top_ceiling.to_list(), top_tiers.to_list(), strict=True))]
    tier_counts = top_tiers.value_counts()
    css, script = _inline("report.css", "style"), _inline("report.js", "script")
    title = f"Label review · {storage.basename(cfg.data_path) or cfg.data_path}"
    return _env().get_template("report.html.j2").render(
        csp=csp(css, script), css=css, script=script, title=title, data_path=cfg.data_path,
        run_name=storage.basename(run),
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), stats=stats,
        guard=guard, has_estimate=summary is not None, results_uri=runs.results_uri(run),
        class_rows=_class_rows(class_stats(results, classes, relabel, summary)),
        matrix=_matrix_view(flag_matrix(results, classes)), n_top=len(top), n_images=n,
        n_missing=sum(not isinstance(t, Thumb) for t in thumbs),
        given_options=_options(top["label"]), suggested_options=_options(top["corrected_label"]),
        tier_options=[(t, int(tier_counts[t])) for t in TIERS if t in tier_counts],
        sensitivity=f"{cfg.sensitivity:g}", min_preds=cfg.min_preds, cards=cards,
        page_cards=PAGE_CARDS, run_id=storage.basename(run), classes=classes,
        review_factor=f"{REVIEW_FACTOR:g}",
        decision_columns=",".join(COLUMNS + OPTIONAL_COLUMNS), n_skipped=len(skipped),
        skipped=_skipped(skipped), neighbours=neighbour_sections(results))


# What the page's summary reads of every image (those the run has: older runs lack the
# decision columns); the review grid reads the top rows whole.
SUMMARY_COLUMNS = ["label", "corrected_label", "num_preds", "%", "label_quality",
                   "suggested_quality", "is_label_issue", "tier", "p_suggestion"]


def load_results(run: str, top_n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every image with the `SUMMARY_COLUMNS` (and, method embeddings, the file name and the
    neighbour columns), the `top_n` most suspicious images with every results column). Read
    from predictions.parquet, which the merge writes beside results.csv with the same rows in
    the same order: only those columns, and only the first row groups for the top rows, so it
    stays seconds at millions of images. A run without predictions.parquet is read from
    results.csv."""
    uri = storage.join(run, "predictions.parquet")
    if not storage.exists(uri):
        results = read_results(runs.results_uri(run))
        return results, results.head(top_n)
    pf = pq.ParquetFile(storage.local_path(uri))
    names = pf.schema_arrow.names
    # method embeddings: what the duplicates and outliers sections read
    extra = ["filename", *NEIGHBOUR_COLUMNS] if set(NEIGHBOUR_COLUMNS) <= set(names) else []
    results = pf.read(columns=[c for c in SUMMARY_COLUMNS if c in names] + extra).to_pandas()
    groups, rows = [], 0
    while rows < top_n and len(groups) < pf.num_row_groups:
        rows += pf.metadata.row_group(len(groups)).num_rows
        groups.append(len(groups))
    columns = [c for c in RESULT_COLUMNS + NEIGHBOUR_COLUMNS if c in names]
    top = pf.read_row_groups(groups, columns=columns).slice(0, top_n).to_pandas()
    return results, top


def write_report(run: str, seconds: float | None = None) -> str:
    """Write `<run>/report.html` from the run's results and summary.json; returns its URI."""
    t0 = time.perf_counter()
    cfg = runs.read_config(run)
    summary = read_summary(run)
    results, top = load_results(run, cfg.report_top_n)
    classes = json.loads(storage.read_text(storage.join(run, "classes.json")))  # not the manifest
    extra = sorted(set(results["label"].unique()) - set(classes))
    classes = list(classes) + extra
    skipped = read_skipped(run)
    relabel = results.index.isin(select_rows(results, cfg.sensitivity, cfg.min_preds).index)
    relabel = pd.Series(relabel, index=results.index)
    thumbs = fetch_thumbnails(cfg.data_path, top["filename"].astype(str).tolist())
    page = render_page(cfg=cfg, run=run, results=results, classes=classes, top=top,
                       thumbs=thumbs, top_relabel=relabel.loc[top.index],
                       top_ceiling=relabel_ceiling(top, cfg.min_preds), relabel=relabel,
                       skipped=skipped, seconds=seconds, summary=summary)
    out = storage.join(run, "report.html")
    data = page.encode("utf-8")
    storage.write_bytes(out, data)
    log.info("report: %s of %s images shown, %d thumbnails unavailable, %s, in %.1fs; wrote %s",
             _int(len(top)), _int(len(results)), sum(not isinstance(t, Thumb) for t in thumbs),
             _size(len(data)), time.perf_counter() - t0, out)
    return out

