"""report.html: one self-contained page where a reviewer sees the suspicious images of a run.

The page is a single file: thumbnails are embedded as small data: URIs (read through
`tasks.storage`, so a dataset on s3:// works), CSS and JS are inline, and a
Content-Security-Policy forbids every external load, so it opens the same from a run folder
on disk or from an object-store download and never contacts anything. Only the top
`report_top_n` rows of the results are rendered, so the page stays small for any dataset,
and only those rows and the summary's columns are read (`load_results`).

Sections: a summary, per-class flagged share (the estimated noise rate), a given x suggested
matrix of the flagged images, the review grid (filter by class and by whether the image
would be relabelled at a sensitivity chosen with a slider; sort by rank, vote share, label
quality or name) and the skipped files with their reasons.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from tasks import runs, storage
from tasks.merge import RESULT_COLUMNS, read_results
from tasks.relabel import select_rows

log = logging.getLogger(__name__)

THUMB_PX = 96  # longest side of an embedded thumbnail; the page shows it in a 128 px box
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


def thumbnail(data: bytes, px: int = THUMB_PX) -> Thumb:
    """A small data: URI of an image: longest side at most `px`. Small images stay lossless
    PNG (and are drawn with sharp pixels); larger ones are scaled down and saved as JPEG.
    Raises ValueError when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            img.load()
            small = max(img.size) <= px
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency"
                                                     in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode.startswith(("I", "F")):  # 16-bit or float grey: stretch to 8 bits
                arr = np.asarray(img, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) * (255 / (hi - lo)) if hi > lo else arr * 0
                img = Image.fromarray(np.rint(arr).clip(0, 255).astype(np.uint8), "L")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("L" if img.mode == "1" else "RGB")
            else:
                img = img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"does not decode ({type(err).__name__})") from err
    buf = io.BytesIO()
    if small:
        img.save(buf, "PNG", optimize=True)
        mime = "image/png"
    else:
        img.thumbnail((px, px), Image.Resampling.LANCZOS)
        img.save(buf, "JPEG", quality=80, optimize=True)
        mime = "image/jpeg"
    uri = f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
    return Thumb(uri=uri, width=img.width, height=img.height, pixelated=small)


def fetch_thumbnails(root: str, keys: list[str],
                     workers: int = THUMB_WORKERS) -> list[Thumb | str]:
    """A Thumb per key under the dataset root, or the reason it is unavailable."""

    def one(key: str) -> Thumb | str:
        uri = storage.join(root, key)
        try:
            return thumbnail(storage.read_bytes(uri))
        except (storage.StorageError, FileNotFoundError):
            return "image not found (moved or deleted since the audit?)"
        except ValueError as err:
            return f"image {err}"
        except Exception as err:  # a report with a placeholder beats no report
            log.warning("cannot read %s for its thumbnail: %s", uri, err)
            return f"image unreadable ({type(err).__name__})"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys)))) as pool:
        thumbs = list(pool.map(one, keys))
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


def class_stats(results: pd.DataFrame, classes: list[str], relabel: pd.Series) -> pd.DataFrame:
    """Per given class: images, flagged, flagged share (the estimated noise rate), and how
    many would be relabelled; `relabel` is a boolean per results row."""
    by = results["label"]
    out = pd.DataFrame({
        "images": by.value_counts(),
        "flagged": results.loc[results["is_label_issue"], "label"].value_counts(),
        "relabel": results.loc[relabel, "label"].value_counts(),
    }).reindex(classes).fillna(0).astype(int)
    out["noise_rate"] = out["flagged"] / out["images"].clip(lower=1)
    return out


def flag_matrix(results: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Counts of flagged images: rows the given label, columns the suggested label."""
    flagged = results[results["is_label_issue"]]
    counts = pd.crosstab(flagged["label"], flagged["corrected_label"])
    return counts.reindex(index=classes, columns=classes, fill_value=0)


# --- rendering ------------------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


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


def _stat(value: str, label: str, hint: str = "", id_: str = "") -> str:
    ident = f' id="{id_}"' if id_ else ""
    hint_html = f"<small>{_e(hint)}</small>" if hint else ""
    return f'<div class="stat"{ident}><b>{_e(value)}</b><span>{_e(label)}</span>{hint_html}</div>'


def _bar(share: float) -> str:
    width = max(0.0, min(1.0, share)) * 100
    return ('<svg class="bar" viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true">'
            '<rect width="100" height="8" class="bg"/>'
            f'<rect width="{width:.1f}" height="8"/></svg>')


def _class_table(stats: pd.DataFrame) -> str:
    rows = []
    for cls, r in stats.sort_values(["noise_rate", "flagged"], ascending=False).iterrows():
        rows.append(
            f'<tr data-class="{_e(cls)}"><td class="cls">{_e(cls)}</td><td>{_int(r.images)}</td>'
            f"<td>{_int(r.flagged)}</td><td class=\"rate\">{r.noise_rate:.1%} {_bar(r.noise_rate)}"
            f"</td><td>{_int(r.relabel)}</td></tr>")
    return ('<table id="classes"><thead><tr><th>given class</th><th>images</th><th>flagged</th>'
            '<th title="share of the class flagged as a label issue">est. noise rate</th>'
            "<th>would relabel</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _matrix(matrix: pd.DataFrame) -> str:
    """The given x suggested matrix over classes involved in a flag, or the top pairs."""
    involved = [c for c in matrix.index
                if matrix.loc[c].sum() > 0 or matrix[c].sum() > 0]
    if not involved:
        return '<p class="muted" id="matrix">No image is flagged.</p>'
    peak = max(1, int(matrix.to_numpy().max()))
    if len(involved) > MATRIX_MAX_CLASSES:
        pairs = matrix.stack()
        pairs = pairs[pairs > 0].sort_values(ascending=False, kind="stable")
        rows = "".join(
            f'<tr><td class="cls"><span class="chip given">{_e(g)}</span></td>'
            f'<td class="cls"><span class="chip sugg">{_e(s)}</span></td>'
            f'<td><button class="cell h{min(5, 1 + 5 * int(n) // (peak + 1))}" data-given="{_e(g)}"'
            f' data-suggested="{_e(s)}">{_int(n)}</button></td></tr>'
            for (g, s), n in pairs.head(PAIRS_MAX).items())
        more = (f'<p class="muted">{_int(len(pairs) - PAIRS_MAX)} more pairs in results.csv.</p>'
                if len(pairs) > PAIRS_MAX else "")
        return ('<table id="matrix" class="pairs"><thead><tr><th>given</th><th>suggested</th>'
                f"<th>flagged</th></tr></thead><tbody>{rows}</tbody></table>{more}")
    head = "".join(f'<th class="col"><span>{_e(c)}</span></th>' for c in involved)
    body = []
    for g in involved:
        cells = []
        for s in involved:
            n = int(matrix.loc[g, s])
            if g == s:
                cells.append('<td class="diag">·</td>')
            elif n == 0:
                cells.append('<td class="zero"></td>')
            else:
                level = min(5, 1 + 5 * n // (peak + 1))
                cells.append(f'<td><button class="cell h{level}" data-given="{_e(g)}" '
                             f'data-suggested="{_e(s)}" title="given {_e(g)}, suggested {_e(s)}">'
                             f"{_int(n)}</button></td>")
        total = int(matrix.loc[g, involved].sum())
        body.append(f'<tr><th class="row">{_e(g)}</th>{"".join(cells)}'
                    f'<td class="total">{_int(total) if total else ""}</td></tr>')
    return ('<table id="matrix"><thead><tr><th class="corner">given ↓ · suggested →</th>'
            f'{head}<th class="total">total</th></tr></thead><tbody>{"".join(body)}'
            "</tbody></table>")


def _card(rank: int, row: dict, thumb: Thumb | str, relabel: bool) -> str:
    label, sugg = str(row["label"]), str(row["corrected_label"])
    changed = sugg != label
    flagged = bool(row["is_label_issue"])
    pct = row["%"]
    pct_attr = -1 if pd.isna(pct) else pct
    prob = row.get("suggested_quality", float("nan"))
    prob_attr = -1 if pd.isna(prob) else prob
    quality = row["label_quality"]
    name = str(row["filename"])
    if isinstance(thumb, Thumb):
        cls = ' class="px"' if thumb.pixelated else ""
        img = (f'<img{cls} src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" '
               f'alt="{_e(name)}">')
    else:
        img = f'<span class="noimg">{_e(thumb)}</span>'
    labels = (f'<span class="chip given" title="given label">{_e(label)}</span>'
              f'<span class="arrow">→</span><span class="chip sugg" title="suggested label">'
              f"{_e(sugg)}</span>" if changed else
              f'<span class="chip same" title="given label, also the majority vote">{_e(label)}'
              "</span><span class=\"keeps\">keeps label</span>")
    votes = str(row.get("votes", "") or "").replace(";", ", ").replace(":", " ")
    state = " ".join(c for c, on in (("flagged", flagged), ("relabel", relabel)) if on)
    verdict = ("would relabel" if relabel else "flagged, below threshold" if flagged
               else "not flagged")
    return (
        f'<article class="card {state}" data-rank="{rank}" data-name="{_e(name)}" '
        f'data-label="{_e(label)}" data-suggested="{_e(sugg)}" data-pct="{pct_attr}" '
        f'data-prob="{prob_attr}" '
        f'data-preds="{int(row["num_preds"])}" '
        f'data-quality="{-1 if pd.isna(quality) else quality}" data-changed="{int(changed)}" '
        f'data-flagged="{int(flagged)}" data-relabel="{int(relabel)}">'
        f'<div class="thumb">{img}<span class="rank">#{rank}</span></div>'
        f'<div class="lbl">{labels}</div>'
        f'<div class="num" title="votes: {_e(votes)}"><b class="pct">{_pct(pct)}</b> of '
        f'<b class="preds">{int(row["num_preds"])}</b> predictions, p '
        f'<b class="prob" title="pooled probability of the suggested label">'
        f'{_quality(prob)}</b></div>'
        '<div class="num" title="mean out-of-sample probability of the given label">'
        f'label quality <b class="quality">{_quality(quality)}</b></div>'
        f'<div class="fname" title="{_e(name)}">{_e(name)}</div>'
        f'<div class="verdict">{verdict}</div></article>')


def _options(values: pd.Series) -> str:
    counts = values.value_counts()
    return "".join(f'<option value="{_e(c)}">{_e(c)} ({_int(n)})</option>'
                   for c, n in sorted(counts.items()))


def _skipped(skipped: pd.DataFrame) -> str:
    if skipped.empty:
        return '<p class="muted">No file was skipped.</p>'
    rows = "".join(f'<tr><td class="cls">{_e(r.filename)}</td><td class="reason">{_e(r.reason)}'
                   "</td></tr>" for r in skipped.head(SKIPPED_MAX).itertuples(index=False))
    more = (f'<p class="muted">{_int(len(skipped) - SKIPPED_MAX)} more in skipped.csv.</p>'
            if len(skipped) > SKIPPED_MAX else "")
    return (f'<table id="skipped-list"><thead><tr><th>file</th><th>reason</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>{more}")


CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1b2230;--muted:#5d6678;--line:#e1e4ea;
--given:#b42318;--given-bg:#fde8e6;--sugg:#05693f;--sugg-bg:#dcf5e6;--accent:#1f56d6;
--accent-bg:#e6edfc;--warn:#c26a06;--warn-bg:#fdf0dc}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,
sans-serif;color:var(--ink);background:var(--bg)}
main{max-width:1440px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:0}
h2{font-size:16px;margin:0 0 10px}
.hint{margin:-6px 0 6px;font-size:12px}
section{margin-top:18px}
.sub{color:var(--muted);margin:4px 0 0;overflow-wrap:anywhere}
.muted{color:var(--muted)}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(128px,1fr));gap:10px;
margin-top:14px}
.stat{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 12px}
.stat b{display:block;font-size:21px;line-height:1.3;font-variant-numeric:tabular-nums}
.stat span{color:var(--muted);font-size:12px}
.stat small{display:block;color:var(--muted);font-size:11px}
.stat.warn b{color:var(--warn)}.stat.accent b{color:var(--accent)}
.panels{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1.25fr);gap:16px}
@media (max-width:1050px){.panels{grid-template-columns:minmax(0,1fr)}}
.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;
overflow:auto;max-height:420px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:2px 8px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-size:12px;color:var(--muted);font-weight:600}
td.cls,th.row{text-align:left;font-weight:600;color:var(--ink)}
td.rate{min-width:130px}
svg.bar{width:60px;height:8px;vertical-align:middle;margin-left:6px}
svg.bar rect{fill:var(--warn)}svg.bar rect.bg{fill:var(--warn-bg)}
#matrix th.col{vertical-align:bottom;height:76px;padding:0 2px}
#matrix th.col span{writing-mode:vertical-rl;transform:rotate(180deg);color:var(--sugg)}
#matrix th.row{color:var(--given)}
#matrix th.corner{text-align:left;vertical-align:bottom}
#matrix td{padding:1px;text-align:center;border:1px solid var(--line);min-width:30px}
#matrix td.diag{background:#f0f1f4;color:#b6bcc8}
#matrix td.total{font-weight:600;border:none;padding-left:8px}
#matrix.pairs td{text-align:left;padding:2px 6px}
button.cell{all:unset;cursor:pointer;display:block;min-width:28px;padding:2px 4px;
text-align:center;border-radius:3px;font-weight:600}
button.cell:hover,button.cell:focus-visible{outline:2px solid var(--accent)}
.cell.h1{background:#fdf0dc}.cell.h2{background:#fbd9a6}.cell.h3{background:#f6b35e}
.cell.h4{background:#e88a2d;color:#fff}.cell.h5{background:#c25d06;color:#fff}
.controls{position:sticky;top:0;z-index:2;background:var(--bg);padding:10px 0;display:flex;
flex-wrap:wrap;gap:8px 14px;align-items:center;border-bottom:1px solid var(--line);
margin-bottom:12px}
.controls label{font-size:12px;color:var(--muted);display:flex;align-items:center;gap:5px}
.controls select,.controls input[type=search]{font:inherit;font-size:13px;padding:3px 6px;
border:1px solid #c9ced8;border-radius:5px;background:#fff;color:var(--ink)}
.controls input[type=range]{width:120px}
#sens-value{font-weight:700;color:var(--ink);min-width:34px}
#shown{margin-left:auto;font-size:13px}
.controls button{font:inherit;font-size:13px;padding:3px 10px;border:1px solid #c9ced8;
border-radius:5px;background:#fff;color:var(--ink);cursor:pointer}
.controls button:hover{border-color:var(--accent)}
.legend{display:flex;gap:4px 18px;align-items:center;font-size:12px;color:var(--muted);
flex-wrap:wrap;margin-bottom:10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(172px,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-top:4px solid #c9ced8;
border-radius:8px;padding:8px;display:flex;flex-direction:column;gap:4px;min-width:0}
.card.flagged{border-top-color:var(--warn)}
.card.relabel{border-top-color:var(--accent)}
.card[hidden]{display:none}
.thumb{position:relative;height:128px;background:#23272e;border-radius:5px;display:flex;
align-items:center;justify-content:center;overflow:hidden}
.thumb img{width:128px;height:128px;object-fit:contain}
.thumb img.px{image-rendering:pixelated}
.noimg{color:#d0d4dc;font-size:12px;padding:8px;text-align:center}
.rank{position:absolute;top:4px;left:4px;background:rgba(0,0,0,.62);color:#fff;font-size:11px;
padding:0 5px;border-radius:4px}
.lbl{display:flex;flex-wrap:wrap;gap:3px 4px;align-items:center;margin-top:2px}
.chip{padding:1px 6px;border-radius:4px;font-weight:700;font-size:13px;overflow-wrap:anywhere}
.chip.given{color:var(--given);background:var(--given-bg)}
.chip.sugg{color:var(--sugg);background:var(--sugg-bg)}
.chip.same{color:var(--muted);background:#eceef2}
.arrow,.keeps{color:var(--muted);font-size:12px}
.num{color:var(--muted);font-size:12px;line-height:1.35;font-variant-numeric:tabular-nums}
.num b{color:var(--ink)}
.fname{font-size:11px;color:var(--muted);overflow:hidden;text-overflow:ellipsis;
white-space:nowrap}
.verdict{font-size:10.5px;font-weight:700;text-transform:uppercase;letter-spacing:.04em;
color:#8a92a2}
.card.flagged .verdict,.legend-flagged{color:var(--warn)}
.card.relabel .verdict,.legend-relabel{color:var(--accent)}
#skipped-list td.reason{text-align:left;color:var(--muted);white-space:normal}
footer{margin-top:28px;color:var(--muted);font-size:12px;max-width:900px}
"""

SCRIPT = """
(() => {
  const $ = (id) => document.getElementById(id);
  const grid = $('grid');
  const cards = Array.from(grid.querySelectorAll('.card'));
  const minPreds = Number(grid.dataset.minPreds);
  const fGiven = $('f-given'), fSugg = $('f-suggested'), fState = $('f-state');
  const fSort = $('f-sort'), fText = $('f-text'), sens = $('f-sens');
  const sorters = {
    rank: (a, b) => a.dataset.rank - b.dataset.rank,
    pct: (a, b) => b.dataset.pct - a.dataset.pct || a.dataset.rank - b.dataset.rank,
    quality: (a, b) => a.dataset.quality - b.dataset.quality || a.dataset.rank - b.dataset.rank,
    name: (a, b) => a.dataset.name.localeCompare(b.dataset.name),
  };
  function update() {
    const s = Number(sens.value);
    $('sens-value').textContent = s + '%';
    const g = fGiven.value, sg = fSugg.value, st = fState.value;
    const text = fText.value.trim().toLowerCase();
    let shown = 0, relabel = 0;
    for (const c of cards) {
      const d = c.dataset;
      const r = d.flagged === '1' && d.changed === '1' && Number(d.pct) > s
        && Number(d.prob) > s / 100 && Number(d.preds) >= minPreds;
      d.relabel = r ? '1' : '0';
      c.classList.toggle('relabel', r);
      c.querySelector('.verdict').textContent = r ? 'would relabel'
        : d.flagged === '1' ? 'flagged, below threshold' : 'not flagged';
      if (r) relabel++;
      const ok = (!g || d.label === g) && (!sg || d.suggested === sg)
        && (!st || (st === 'relabel') === r) && (!text || d.name.toLowerCase().includes(text));
      c.hidden = !ok;
      if (ok) shown++;
    }
    $('shown').textContent = 'showing ' + shown + ' of ' + cards.length + ' · '
      + relabel + ' would be relabelled at > ' + s + '%';
  }
  function sort() {
    const sorted = cards.slice().sort(sorters[fSort.value] || sorters.rank);
    grid.append(...sorted);
  }
  for (const el of [fGiven, fSugg, fState, fText, sens]) {
    el.addEventListener('input', update);
    el.addEventListener('change', update);
  }
  fSort.addEventListener('change', sort);
  for (const b of document.querySelectorAll('button.cell')) {
    b.addEventListener('click', () => {
      fGiven.value = b.dataset.given; fSugg.value = b.dataset.suggested; fState.value = '';
      update();
      $('review').scrollIntoView({behavior: 'smooth'});
    });
  }
  $('f-reset').addEventListener('click', () => {
    fGiven.value = ''; fSugg.value = ''; fState.value = ''; fText.value = '';
    sens.value = sens.defaultValue; fSort.value = 'rank'; sort(); update();
  });
  update();
  document.body.dataset.ready = '1';
})();
"""


def render_page(*, cfg, run: str, results: pd.DataFrame, classes: list[str], top: pd.DataFrame,
                thumbs: list[Thumb | str], top_relabel: pd.Series, relabel: pd.Series,
                skipped: pd.DataFrame, seconds: float | None) -> str:
    """The whole HTML page."""
    n = len(results)
    flagged = int(results["is_label_issue"].sum())
    n_relabel = int(relabel.sum())
    preds = results["num_preds"]
    pred_range = (f"{int(preds.min())}" if preds.min() == preds.max()
                  else f"{int(preds.min())}–{int(preds.max())}") if n else "0"
    stats = class_stats(results, classes, relabel)
    stat_cards = [
        _stat(_int(n), "images audited", id_="s-images"),
        _stat(_int(len(classes)), "classes", id_="s-classes"),
        _stat(_int(cfg.n_repeats), "training repeats", f"{pred_range} predictions per image",
              id_="s-repeats"),
        _stat(_int(flagged), "flagged as label issues", f"{flagged / max(n, 1):.1%} of images",
              id_="s-flagged"),
        _stat(_int(n_relabel), "would be relabelled",
              f"> {cfg.sensitivity:g}% of votes and probability, ≥ {cfg.min_preds} "
              "predictions", id_="s-relabel"),
        _stat(_int(len(skipped)), "files skipped", id_="s-skipped"),
    ]
    if seconds is not None:
        stat_cards.append(_stat(duration(seconds), "time taken", id_="s-time"))
    stat_cards[3] = stat_cards[3].replace('class="stat"', 'class="stat warn"', 1)
    stat_cards[4] = stat_cards[4].replace('class="stat"', 'class="stat accent"', 1)
    cards = "".join(
        _card(i + 1, row, thumb, bool(rel))
        for i, (row, thumb, rel) in enumerate(
            zip(top.to_dict("records"), thumbs, top_relabel.to_list(), strict=True)))
    n_missing = sum(not isinstance(t, Thumb) for t in thumbs)
    missing_note = (f' <span class="muted">({_int(n_missing)} images could not be read)</span>'
                    if n_missing else "")
    sens = cfg.sensitivity
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    title = f"Label review · {storage.basename(cfg.data_path) or cfg.data_path}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp(CSS, SCRIPT))}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body><main>
<header><h1>{_e(title)}</h1>
<p class="sub">dataset <b>{_e(cfg.data_path)}</b> · run <b>{_e(storage.basename(run))}</b> ·
generated {generated}</p></header>
<section class="stats" id="summary">{"".join(stat_cards)}</section>
<section class="panels">
<div class="panel"><h2>Estimated noise rate per class</h2>{_class_table(stats)}</div>
<div class="panel"><h2>Flagged images: given label vs suggested label</h2>
<p class="muted hint">Click a count to review those images.</p>
{_matrix(flag_matrix(results, classes))}</div>
</section>
<section id="review"><h2>Most suspicious {_int(len(top))} of {_int(n)} images{missing_note}</h2>
<div class="controls">
<label>given <select id="f-given"><option value="">all classes</option>
{_options(top["label"])}</select></label>
<label>suggested <select id="f-suggested"><option value="">all classes</option>
{_options(top["corrected_label"])}</select></label>
<label>show <select id="f-state"><option value="">all</option>
<option value="relabel">would relabel</option><option value="keep">would not relabel</option>
</select></label>
<label>sensitivity <input id="f-sens" type="range" min="0" max="100" step="1"
value="{sens:g}"><span id="sens-value">{sens:g}%</span></label>
<label>sort <select id="f-sort"><option value="rank">most suspicious</option>
<option value="pct">vote share, high first</option>
<option value="quality">label quality, low first</option><option value="name">file name</option>
</select></label>
<label><input id="f-text" type="search" placeholder="file name contains…"></label>
<button id="f-reset" type="button">reset</button>
<span id="shown" class="muted">showing {_int(len(top))} of {_int(len(top))}</span>
</div>
<div class="legend"><span><span class="chip given">given</span> <span class="arrow">→</span>
<span class="chip sugg">suggested</span></span>
<span><b>%</b>: share of predictions voting for the suggestion</span>
<span><b>label quality</b>: mean probability of the given label</span>
<span>top border: <b class="legend-relabel">blue</b> would relabel,
<b class="legend-flagged">orange</b> flagged</span></div>
<div class="grid" id="grid" data-min-preds="{cfg.min_preds}" data-sensitivity="{sens:g}">
{cards}</div>
</section>
<section id="skipped"><h2>Skipped files ({_int(len(skipped))})</h2>
<div class="panel">{_skipped(skipped)}</div></section>
<footer>An image is <b>flagged</b> when the pooled out-of-sample predictions disagree with its
folder (cleanlab's confident-learning estimate of each class's wrong labels, lowest label
quality first, and a majority vote for another class). It <b>would be relabelled</b> when it
is flagged, the suggested label differs, more than the sensitivity's share of its
predictions chose it, its pooled probability is above the sensitivity too, and it has at
least {cfg.min_preds} predictions (config: sensitivity {sens:g}%). The est. noise rate is the
share of a class flagged. Every image, with its votes, is in results.csv in the run folder.</footer>
</main><script>{SCRIPT}</script></body></html>
"""


# What the page's summary reads of every image; the review grid reads the top rows whole.
SUMMARY_COLUMNS = ["label", "corrected_label", "num_preds", "%", "label_quality",
                   "suggested_quality", "is_label_issue"]


def load_results(run: str, top_n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every image with the `SUMMARY_COLUMNS`, the `top_n` most suspicious images with every
    results column). Read from predictions.parquet, which the merge writes beside
    results.csv with the same rows in the same order: only those columns, and only the first
    row groups for the top rows, so it stays seconds at millions of images. A run without
    predictions.parquet is read from results.csv."""
    uri = storage.join(run, "predictions.parquet")
    if not storage.exists(uri):
        results = read_results(runs.results_uri(run))
        return results, results.head(top_n)
    pf = pq.ParquetFile(storage.local_path(uri))
    results = pf.read(columns=SUMMARY_COLUMNS).to_pandas()
    groups, rows = [], 0
    while rows < top_n and len(groups) < pf.num_row_groups:
        rows += pf.metadata.row_group(len(groups)).num_rows
        groups.append(len(groups))
    columns = [c for c in RESULT_COLUMNS if c in pf.schema_arrow.names]
    top = pf.read_row_groups(groups, columns=columns).slice(0, top_n).to_pandas()
    return results, top


def write_report(run: str, seconds: float | None = None) -> str:
    """Write `<run>/report.html` from the run's results; returns its URI."""
    t0 = time.perf_counter()
    cfg = runs.read_config(run)
    results, top = load_results(run, cfg.report_top_n)
    classes = json.loads(storage.read_text(storage.join(run, "classes.json")))  # not the manifest
    extra = sorted(set(results["label"].unique()) - set(classes))
    classes = list(classes) + extra
    skipped = read_skipped(run)
    relabel = results.index.isin(select_rows(results, cfg.sensitivity, cfg.min_preds).index)
    relabel = pd.Series(relabel, index=results.index)
    thumbs = fetch_thumbnails(cfg.data_path, top["filename"].astype(str).tolist())
    page = render_page(cfg=cfg, run=run, results=results, classes=classes, top=top,
                       thumbs=thumbs, top_relabel=relabel.loc[top.index], relabel=relabel,
                       skipped=skipped, seconds=seconds)
    out = storage.join(run, "report.html")
    data = page.encode("utf-8")
    storage.write_bytes(out, data)
    log.info("report: %s of %s images shown, %d thumbnails unavailable, %s, in %.1fs; wrote %s",
             _int(len(top)), _int(len(results)), sum(not isinstance(t, Thumb) for t in thumbs),
             _size(len(data)), time.perf_counter() - t0, out)
    return out

