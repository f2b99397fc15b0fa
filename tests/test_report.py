"""report.html: content checks on a run folder, and a headless-Chromium check of the page.

The run folder is real: a sample dataset with planted label noise, the real index step, and
the real merge, fed with shards from an "oracle" model that knows the true labels (training
a model for seconds on 150 images would not find the planted errors reliably). So the
planted images are what the report must show first.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import report, runs
from tasks.config import AuditConfig
from tasks.index import DatasetIndex, read_manifest, write_index
from tasks.merge import merge_run, read_results, read_summary, summary_uri
from tasks.plan import plan_repeats, split_for_repeat
from tasks.relabel import select_rows
from tasks.report import _matrix, duration, fetch_thumbnails, flag_matrix, thumbnail, write_report
from tasks.sample import write_sample
from tests.browser import HAVE_CHROMIUM, NEEDS_CHROMIUM
from tests.browser import chrome as _chrome
from tests.browser import network as _network
from tests.browser import urls as _urls

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
HOSTILE = "coat/a<b>&\"c'.png"  # a legal file name that is also HTML


# --- a run folder -----------------------------------------------------------------------------

def write_oracle_shards(run: str, truth: dict[str, str]) -> None:
    """Shards as a model that knows the true labels would write them. Every third planted
    image gets its given label voted for in round 1, so its vote is split 50/50."""
    import pyarrow.parquet as pq

    from tasks.shards import shard_fingerprint, shard_table

    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    labels = manifest["label_idx"].to_numpy(np.int64)
    true = np.array([classes.index(truth.get(k, lbl))
                     for k, lbl in zip(manifest["key"], manifest["label"], strict=True)])
    rng = np.random.default_rng(7)
    for spec in plan_repeats(cfg):
        test = split_for_repeat(cfg, spec, labels).test
        logits = rng.normal(0, 0.6, (len(test), len(classes)))
        logits[np.arange(len(test)), true[test]] += 4.0
        split = (true[test] != labels[test]) & (test % 3 == 0) & (spec.round == 1)
        logits[np.flatnonzero(split), labels[test][split]] += 6.0
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        table = shard_table(manifest["id"].to_numpy()[test], labels[test], probs, spec,
                            shard_fingerprint(cfg, manifest, spec), {})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        Path(runs.shard_uri(run, spec.repeat)).parent.mkdir(parents=True, exist_ok=True)
        Path(runs.shard_uri(run, spec.repeat)).write_bytes(buf.getvalue())


def make_run(root: Path, n: int = 150, top_n: int = 200) -> tuple[str, pd.DataFrame]:
    """A merged run of a sample dataset with 20% planted noise, a broken file and a file
    whose name is HTML; returns (run URI, truth table)."""
    from tasks.audit import prepare_run

    ds = root / "ds"
    truth = pd.read_csv(write_sample(ds, n, 0.2, seed=1, kind="symmetric"))
    (ds / "coat" / "broken.png").write_bytes(b"this is not a png")
    first_coat = sorted((ds / "coat").glob("*-*.png"))[0]
    shutil.copy(first_coat, ds / HOSTILE)
    cfg = AuditConfig(data_path=str(ds), work_uri=str(root / "work"), n_repeats=4,
                      test_split=0.5, num_epochs=1, report_top_n=top_n, sensitivity=60,
                      min_preds=2)
    run = prepare_run(cfg, "oracle")
    write_oracle_shards(run, dict(zip(truth["filename"], truth["true_label"], strict=True)))
    merge_run(run)
    return run, truth


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pd.DataFrame]:
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(oracle: tuple[str, pd.DataFrame]) -> str:
    run, _ = oracle
    return Path(write_report(run, seconds=75.4)).read_text()


# --- a small HTML reader ------------------------------------------------------------------------

class Page(HTMLParser):
    """Every start tag with its attributes, the cards, and the text of ids."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.cards: list[dict[str, str]] = []
        self.text_of: dict[str, str] = {}
        self.raw: dict[str, str] = {}  # tag -> text content for <script>/<style>
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if "card" in a.get("class", "").split():
            self.cards.append(a)
        if tag in ("img", "meta", "link", "input", "br", "rect"):
            return
        self._open.append((tag, a.get("id")))
        if a.get("id"):
            self.text_of[a["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.text_of[ident] += " " + data
        if self._open and self._open[-1][0] in ("script", "style"):
            self.raw[self._open[-1][0]] = self.raw.get(self._open[-1][0], "") + data

    def text(self, ident: str) -> str:
        return " ".join(self.text_of[ident].split())


def flagged_of(run: str) -> pd.DataFrame:
    return read_results(runs.results_uri(run))


# --- content ----------------------------------------------------------------------------------

def test_summary_counts_images_classes_repeats_flags_and_time(oracle, page):
    run, truth = oracle
    results = flagged_of(run)
    p = Page(page)
    assert p.text("s-images").startswith(f"{len(results)} images")
    assert p.text("s-classes").startswith("10 classes")
    assert p.text("s-repeats") == "4 training repeats 2 predictions per image"
    n_flagged = int(results["is_label_issue"].sum())
    assert n_flagged > 10
    assert p.text("s-flagged").startswith(f"{n_flagged} flagged as label issues")
    relabel = select_rows(results, 60, 2)
    n_relabel = len(relabel)
    # Some issues would move, not all (p_suggestion at most 0.6 stays); each to its true class.
    assert 5 < n_relabel < n_flagged
    true = dict(zip(truth["filename"], truth["true_label"], strict=True))
    assert [true[f] for f in relabel["filename"]] == relabel["corrected_label"].tolist()
    assert (relabel["label"] != relabel["corrected_label"]).all()
    assert p.text("s-relabel").startswith(f"{n_relabel} would be relabelled")
    assert p.text("s-skipped").startswith("1 files skipped")
    assert p.text("s-time") == "1 min 15 s time taken"
    # From summary.json: the review tier, cleanlab's estimate, the pooled accuracy.
    summary = read_summary(run)
    n_review = int((results["tier"] == "review").sum())
    assert n_review > 0 and summary["review"] == n_review
    assert p.text("s-review").startswith(f"{n_review} to review")
    assert p.text("s-noise").startswith(f"{summary['estimated_wrong_labels']} estimated wrong "
                                        f"labels {summary['estimated_noise_rate']:.1%} of")
    assert p.text("s-accuracy").startswith(f"{summary['pooled_accuracy']:.1%} pooled accuracy")
    assert "id=\"guard\"" not in page  # a trusted audit: no banner


def test_time_is_left_out_when_not_given(oracle):
    run, _ = oracle
    assert 'id="s-time"' not in Path(write_report(run)).read_text()
    assert duration(17.2) == "17 s" and duration(3725) == "1 h 02 min"


CLASS_ROW = re.compile(
    r'<tr data-class="([^"]+)"><td class="cls">[^<]*</td><td>(\d+)</td>'
    r'(?:<td class="rate">([\d.]+)% <svg[^>]*>.*?</svg></td>)?'
    r'<td class="share">(\d+) <span class="muted">\(([\d.]+)%\)</span>.*?</td>'
    r"<td>(\d+)</td><td>(\d+)</td></tr>")


def test_class_table_shows_the_estimate_beside_the_flagged_share(oracle, page):
    """Per class: cleanlab's estimated noise rate (summary.json), highest first, and beside
    it the flagged count and share, the review tier and what would be relabelled."""
    run, _ = oracle
    results = flagged_of(run)
    estimate = {r["class"]: r["estimated_noise_rate"] for r in read_summary(run)["per_class"]}
    relabel = select_rows(results, 60, 2)
    rows = CLASS_ROW.findall(page)
    assert len(rows) == 10
    for cls, images, rate, flagged, share, review, moved in rows:
        mine = results[results["label"] == cls]
        assert int(images) == len(mine)
        assert float(rate) == pytest.approx(100 * estimate[cls], abs=0.051)
        assert int(flagged) == int(mine["is_label_issue"].sum())
        assert float(share) == pytest.approx(100 * int(flagged) / len(mine), abs=0.051)
        assert int(review) == int((mine["tier"] == "review").sum())
        assert int(moved) == int((relabel["label"] == cls).sum())
    rates = [float(r[2]) for r in rows]
    assert rates == sorted(rates, reverse=True)
    # The estimate is not the flagged share (the column used to be the flagged share).
    assert any(float(r[2]) != float(r[4]) for r in rows)
    assert "Estimated noise rate per class" in page


def untrusted_copy(run: str, root: Path, reasons: list[str]) -> str:
    """A copy of a run whose summary.json (written by hand) says the audit cannot be
    trusted."""
    copy = root / "runs" / "untrusted"
    shutil.copytree(run, copy)
    summary = read_summary(str(copy))
    summary["guard"] = {**summary["guard"], "trusted": False, "reasons": reasons}
    Path(summary_uri(str(copy))).write_text(json.dumps(summary))
    return str(copy)


def test_an_untrusted_audit_gets_a_banner_with_reasons_and_remedy(oracle, tmp_path):
    run, _ = oracle
    reasons = ["the models are near chance <b>9%</b>", "the models never learnt class(es) bag"]
    copy = untrusted_copy(run, tmp_path, reasons)
    text = Path(write_report(copy)).read_text()
    p = Page(text)
    banner = p.text("guard")
    assert banner.startswith("This audit cannot be trusted")
    for reason in reasons:
        assert reason in banner
    assert "<b>9%</b>" not in text  # a reason is text, escaped
    assert read_summary(copy)["guard"]["remedy"] in banner
    assert (f"relabel refuses this run unless forced: python -m tasks relabel --results "
            f"{runs.results_uri(copy)} --force") in banner
    assert p.text("s-relabel").endswith("refused without --force: the audit cannot be trusted")
    # It is the first thing on the page, before the summary.
    ids = [a.get("id") for _, a in p.tags if a.get("id") in ("guard", "summary")]
    assert ids == ["guard", "summary"]
    assert ".banner{" in p.raw["style"]  # styled by the page's own (hashed) style sheet


def test_a_run_without_summary_renders_as_before(oracle, tmp_path):
    """A run merged before summary.json: no banner, no estimate; the per-class table is the
    flagged share, and says so."""
    run, _ = oracle
    copy = untrusted_copy(run, tmp_path, ["ignored"])
    os.remove(summary_uri(copy))
    text = Path(write_report(copy)).read_text()
    p = Page(text)
    assert 'id="guard"' not in text and 'id="s-review"' not in text
    assert "Flagged share per class" in text and "est. noise rate" not in text
    rows = CLASS_ROW.findall(text)
    assert len(rows) == 10 and all(r[2] == "" for r in rows)
    assert p.text("s-flagged").startswith(f"{int(flagged_of(run)['is_label_issue'].sum())} ")


def test_matrix_counts_flagged_given_vs_suggested(oracle, page):
    run, _ = oracle
    flagged = flagged_of(run).query("is_label_issue")
    want = flagged.groupby(["label", "corrected_label"]).size().to_dict()
    cells = re.findall(r'<button class="cell h\d" data-given="([^"]+)" data-suggested="([^"]+)"'
                       r"[^>]*>(\d+)</button>", page)
    assert {(g, s): int(n) for g, s, n in cells} == want


def test_grid_lists_top_rows_in_order_with_their_numbers(oracle, page):
    run, truth = oracle
    results = flagged_of(run)
    cards = Page(page).cards
    assert [c["data-name"] for c in cards] == results["filename"].tolist()
    relabel = set(select_rows(results, 60, 2)["filename"])
    for card, row in zip(cards, results.to_dict("records"), strict=True):
        assert card["data-label"] == row["label"]
        assert card["data-suggested"] == row["corrected_label"]
        assert float(card["data-pct"]) == pytest.approx(row["%"])
        assert int(card["data-preds"]) == row["num_preds"]
        assert float(card["data-quality"]) == pytest.approx(row["label_quality"])
        assert card["data-relabel"] == str(int(row["filename"] in relabel))
        assert card["data-tier"] == row["tier"]
        assert float(card["data-prob"]) == row["p_suggestion"]
        assert ("review" in card["class"].split()) == (row["tier"] == "review")
    # The issue tier first, then the review tier.
    tiers = [c["data-tier"] for c in cards]
    n_issue, n_review = tiers.count("issue"), tiers.count("review")
    assert n_issue and n_review and tiers[:n_issue + n_review] == (["issue"] * n_issue
                                                                   + ["review"] * n_review)
    # The tier filter offers the tiers of the cards, with their counts.
    options = re.search(r'<select id="f-tier">(.*?)</select>', page, re.S).group(1)
    assert re.findall(r'<option value="(\w*)">([^<]*)</option>', options) == [
        ("", "all"), ("issue", f"issue ({n_issue})"), ("review", f"review ({n_review})"),
        ("ok", f"ok ({len(cards) - n_issue - n_review})")]
    planted = set(truth.loc[truth["true_label"] != truth["given_label"], "filename"])
    assert {c["data-name"] for c in cards[: len(planted)]} == planted
    # What a reviewer reads on the first card.
    first = results.iloc[0]
    card_html = page[page.index('<article class="card'): page.index("</article>")]
    for text in (first["filename"], first["label"], first["corrected_label"],
                 f"{first['%']:.0f}%", f"{first['label_quality']:.3f}"):
        assert text in card_html
    assert '<span class="tier">issue</span>' in card_html

    # Each card's tier badge, its vote share and the suggestion's pooled probability, and its
    # verdict, as the reviewer reads them.
    articles = re.findall(r'<article class="card.*?</article>', page, re.S)
    for html_card, row in zip(articles, results.to_dict("records"), strict=True):
        badge = re.findall(r'<span class="tier">([^<]*)</span>', html_card)
        assert badge == ([] if row["tier"] == "ok" else [row["tier"]])
        shown = re.search(r'<div class="num"[^>]*>(.*?)</div>', html_card).group(1)
        pct = f"{row['%']:.0f}%" if float(row["%"]).is_integer() else f"{row['%']:.1f}%"
        assert html.unescape(re.sub(r"<[^>]+>", "", shown)) == (
            f"{pct} of {row['num_preds']} predictions, p {row['p_suggestion']:.3f}")
        verdict = re.search(r'<div class="verdict">([^<]*)</div>', html_card).group(1)
        assert verdict == ("would relabel" if row["filename"] in relabel
                           else "issue, below threshold" if row["tier"] == "issue"
                           else "to review" if row["tier"] == "review" else "not flagged")


def test_cards_carry_the_relabel_ceiling_that_the_slider_compares(oracle, page):
    from tasks.relabel import relabel_ceiling

    run, _ = oracle
    results = flagged_of(run)
    cards = Page(page).cards
    ceilings = np.array([float(c["data-ceiling"]) for c in cards])
    # Exactly the float relabel_ceiling computed (JavaScript's Number() reads it back the
    # same); -1, below any sensitivity, for the images that never move.
    assert np.array_equal(ceilings, relabel_ceiling(results, 2).fillna(-1).to_numpy())
    assert (ceilings == -1).any() and (ceilings > 60).any()
    for s in range(101):  # every slider position
        slider = {c["data-name"] for c, ceiling in zip(cards, ceilings, strict=True)
                  if s < ceiling}
        assert slider == set(select_rows(results, s, 2)["filename"]), s


def test_many_classes_get_a_list_of_top_pairs_instead_of_a_matrix():
    classes = [f"c{i:02d}" for i in range(40)]
    rows = [(classes[i], classes[(i + 1) % 40]) for i in range(40) for _ in range(i % 3 + 1)]
    results = pd.DataFrame(rows, columns=["label", "corrected_label"]).assign(
        is_label_issue=True)
    out = _matrix(flag_matrix(results, classes))
    assert 'class="pairs"' in out and "<th class=\"col\">" not in out
    assert out.count("<tr>") == 41  # header + 40 pairs
    first = re.search(r'data-given="(\w+)" data-suggested="(\w+)">(\d+)<', out).groups()
    assert first == ("c02", "c03", "3")  # largest count first


def test_top_n_limits_the_grid_not_the_summary(tmp_path):
    run, _ = make_run(tmp_path, n=120, top_n=25)
    p = Page(Path(write_report(run)).read_text())
    assert len(p.cards) == 25
    assert p.text("s-images").startswith("121 images")  # 120 + the HTML-named copy
    assert "Most suspicious 25 of 121 images" in p.text("review")


def test_page_is_self_contained_and_its_policy_forbids_external_loads(page):
    p = Page(page)
    for tag, attrs in p.tags:
        for key in ("src", "href", "srcset", "action", "data", "poster", "background"):
            if key in attrs:
                assert attrs[key].startswith("data:"), (tag, key, attrs[key][:80])
    assert not re.search(r"url\(|@import|https?://", p.raw["style"])
    assert not re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket|import\(", p.raw["script"])
    policy = next(a["content"] for t, a in p.tags
                  if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["img-src"] == "data:"
    # The inline script and style are allowed by their hash, so they run (and nothing else).
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        digest = base64.b64encode(hashlib.sha256(p.raw[tag].encode()).digest()).decode()
        assert directives[directive] == f"'sha256-{digest}'"
    assert not any("style" in a for _, a in p.tags), "style attributes would be blocked"


def test_thumbnails_are_small_embedded_images(page):
    imgs = [a for t, a in Page(page).tags if t == "img"]
    assert len(imgs) == 151
    for a in imgs[:20]:
        mime, b64 = re.fullmatch(r"data:(image/\w+);base64,(.+)", a["src"]).groups()
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert mime == "image/png" and img.size == (28, 28)  # tiny: kept as is, lossless
        assert a["class"] == "px"  # magnified with sharp pixels


def test_large_images_are_scaled_down_to_jpeg():
    buf = io.BytesIO()
    rgba = Image.new("RGBA", (640, 400), (200, 30, 30, 128))
    rgba.save(buf, "PNG")
    t = thumbnail(buf.getvalue())
    assert t.uri.startswith("data:image/jpeg;base64,")
    assert (t.width, t.height) == (96, 60) and not t.pixelated
    assert len(t.uri) < 6000
    buf = io.BytesIO()
    Image.fromarray(np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)).save(buf, "PNG")
    grey = Image.open(io.BytesIO(base64.b64decode(thumbnail(buf.getvalue()).uri.split(",")[1])))
    # 16-bit scaled to 8 bits as the trainer scales it (0..4032 -> 0..16), not clipped at 255
    assert grey.convert("L").getextrema() == (0, 16)
    with pytest.raises(ValueError, match="does not decode"):
        thumbnail(b"GIF89a broken")


def test_later_cards_get_smaller_webp_thumbnails(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 200)).save(buf, "PNG")
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(buf.getvalue())
    first, *later = fetch_thumbnails(str(tmp_path), ["a.png", "b.png", "c.png"], full=1)
    assert first.uri.startswith("data:image/jpeg;base64,")
    assert (first.width, first.height) == (96, 64)
    for t in later:
        img = Image.open(io.BytesIO(base64.b64decode(t.uri.split(",", 1)[1])))
        assert t.uri.startswith("data:image/webp;base64,") and img.format == "WEBP"
        assert img.size == (t.width, t.height) == (64, 43)
        assert len(t.uri) < len(first.uri)


def test_cards_after_the_first_page_wait_in_a_template(tmp_path, monkeypatch):
    """The grid holds the first page; the later cards, in rank order, sit in an inert
    <template> that the script shows as the reviewer scrolls."""
    run, _ = make_run(tmp_path, n=60, top_n=60)
    monkeypatch.setattr(report, "PAGE_CARDS", 25)
    text = Path(write_report(run)).read_text()
    grid, rest = text.split('<template id="more-cards">')
    later, _ = rest.split("</template>", 1)
    assert grid.count('<article class="card') == 25
    assert later.count('<article class="card') == 60 - 25  # report_top_n 60
    assert [c["data-name"] for c in Page(text).cards] == flagged_of(run)["filename"][:60].tolist()
    p = Page(text)
    grid_attrs = next(a for t, a in p.tags if a.get("id") == "grid")
    assert grid_attrs["data-page"] == "25" and grid_attrs["data-run-id"] == "oracle"
    assert grid_attrs["data-columns"] == ("filename,label,decision,new_label,reviewer,"
                                          "decided_at,run_id")
    picker = [a["data-class"] for t, a in p.tags if t == "button" and "data-class" in a]
    assert picker == read_manifest(run)[1]


def test_names_and_reasons_are_escaped(page):
    assert HOSTILE not in page and "a<b>" not in page
    assert "a&lt;b&gt;&amp;&quot;c&#x27;.png" in page
    p = Page(page)
    assert HOSTILE in {c["data-name"] for c in p.cards}


def test_skipped_files_are_listed_with_reasons(page):
    text = Page(page).text("skipped")
    assert "Skipped files (1)" in text
    assert "coat/broken.png" in text and "does not decode as an image" in text


def test_unreadable_images_get_a_placeholder_not_a_failure(tmp_path):
    run, _ = make_run(tmp_path, n=60, top_n=60)
    cfg = runs.read_config(run)
    gone = flagged_of(run)["filename"].iloc[0]
    os.remove(Path(cfg.data_path) / gone)
    p = Page(Path(write_report(run)).read_text())
    assert len(p.cards) == 60
    assert "image not found" in p.text("grid")
    assert "(1 images could not be read)" in p.text("review")


def test_large_run_renders_only_top_n_and_stays_small(tmp_path):
    """200,000 results rows, top 500 rendered: the page stays well under a few MB."""
    ds = tmp_path / "ds"
    truth = pd.read_csv(write_sample(ds, 500, 0.2, seed=3))
    classes = sorted(truth["given_label"].unique())
    n = 200_000
    rng = np.random.default_rng(0)
    label = rng.choice(classes, n)
    keys = truth["filename"].tolist() + [f"{c}/img-{i:07d}.png" for i, c in
                                         enumerate(label[500:])]
    label[:500] = truth["given_label"]
    corrected = np.where(rng.random(n) < 0.1, rng.choice(classes, n), label)
    results = pd.DataFrame({
        "filename": keys, "label": label, "corrected_label": corrected,
        "num_preds": rng.integers(1, 6, n), "%": np.round(rng.random(n) * 100, 2),
        "label_quality": np.round(rng.random(n), 5), "is_label_issue": corrected != label,
        "suggested_quality": 0.5, "votes": "", "id": np.arange(n),
        "tier": np.where(corrected != label, "issue", "ok"),
        "p_label_wrong": np.round(rng.random(n), 5),
        "p_suggestion": np.where(corrected != label, np.round(rng.random(n), 5), 0.0)})
    run = str(tmp_path / "work" / "runs" / "big")
    manifest = pd.DataFrame({"id": np.arange(n), "key": keys, "label": label,
                             "label_idx": [classes.index(c) for c in label], "size": 1,
                             "etag": ""})
    write_index(DatasetIndex(manifest, classes, pd.DataFrame(columns=["filename", "reason"])),
                run)
    runs.write_config(run, AuditConfig(data_path=str(ds), report_top_n=500))
    Path(runs.results_uri(run)).write_text(results.to_csv(index=False))
    out = Path(write_report(run))
    p = Page(out.read_text())
    assert len(p.cards) == 500
    assert p.text("s-images").startswith("200,000 images")
    assert out.stat().st_size < 3_000_000


# --- in a browser ----------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NEEDS_CHROMIUM)
def test_report_in_headless_chromium(oracle, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run, truth = oracle
    url = Path(run, "report.html").resolve().as_uri()
    planted = set(truth.loc[truth["true_label"] != truth["given_label"], "filename"])
    results = flagged_of(run)
    ARTIFACTS.mkdir(exist_ok=True)
    driver = _chrome()
    try:
        driver.get(url)
        assert driver.execute_script("return document.body.dataset.ready") == "1"

        def visible() -> list:
            return [c for c in driver.find_elements(By.CSS_SELECTOR, "#grid .card")
                    if c.is_displayed()]

        # The planted mislabelled images come first.
        cards = visible()
        assert len(cards) == len(results)
        assert {c.get_attribute("data-name") for c in cards[: len(planted)]} == planted
        first = cards[0]
        assert first.find_element(By.CSS_SELECTOR, ".chip.given").text == results["label"][0]
        assert (first.find_element(By.CSS_SELECTOR, ".chip.sugg").text
                == results["corrected_label"][0])
        assert driver.execute_script(
            "const i = document.querySelector('#grid img'); return i.complete && i.naturalWidth"
        ) == 28
        driver.save_screenshot(str(ARTIFACTS / "report.png"))

        # The script's relabel rule agrees with tasks.relabel.select_rows.
        Select(driver.find_element(By.ID, "f-state")).select_by_value("relabel")
        shown = {c.get_attribute("data-name") for c in visible()}
        assert shown == set(select_rows(results, 60, 2)["filename"])

        # Filter by class: only that class, in rank order, planted ones first.
        Select(driver.find_element(By.ID, "f-state")).select_by_value("")
        cls = results["label"][0]
        Select(driver.find_element(By.ID, "f-given")).select_by_value(cls)
        names = [c.get_attribute("data-name") for c in visible()]
        mine = results[results["label"] == cls]["filename"].tolist()
        assert names == mine
        n_planted = len(planted & set(mine))
        assert set(names[:n_planted]) == planted & set(mine)
        assert f"showing {len(mine)} of {len(results)}" in driver.find_element(By.ID,
                                                                               "shown").text
        driver.execute_script("window.scrollTo(0, document.getElementById('review').offsetTop)")
        driver.save_screenshot(str(ARTIFACTS / "report-filtered.png"))

        # A matrix cell filters the grid to its given -> suggested pair.
        cell = driver.find_element(By.CSS_SELECTOR, "#matrix button.cell")
        pair = (cell.get_attribute("data-given"), cell.get_attribute("data-suggested"))
        cell.click()
        shown = [(c.get_attribute("data-label"), c.get_attribute("data-suggested"))
                 for c in visible()]
        want = results[(results["label"] == pair[0]) & (results["corrected_label"] == pair[1])]
        assert shown == [pair] * len(want) and len(shown) >= int(cell.text)

        # Lower the sensitivity: issues whose p_suggestion is above 0.4 but not above 0.6
        # now count as relabelled too.
        Select(driver.find_element(By.ID, "f-given")).select_by_value("")
        Select(driver.find_element(By.ID, "f-suggested")).select_by_value("")
        driver.execute_script("const s = document.getElementById('f-sens'); s.value = 40;"
                              "s.dispatchEvent(new Event('input'))")
        Select(driver.find_element(By.ID, "f-state")).select_by_value("relabel")
        lower = set(select_rows(results, 40, 2)["filename"])
        assert lower > set(select_rows(results, 60, 2)["filename"])
        assert {c.get_attribute("data-name") for c in visible()} == lower

        # A file name that is also HTML reaches the script intact: the name filter finds it.
        driver.find_element(By.ID, "f-reset").click()
        assert driver.find_element(By.ID, "sens-value").text == "60%"
        driver.find_element(By.ID, "f-text").send_keys(HOSTILE)
        assert [c.get_attribute("data-name") for c in visible()] == [HOSTILE]
        assert visible()[0].find_element(By.CSS_SELECTOR, ".fname").text == HOSTILE

        # Nothing left the page: the only request is the page itself (and its data: images).
        urls = set(_urls(_network(driver)).values())
        assert url in urls
        assert [u for u in urls if u != url and not u.startswith("data:")] == []
        assert driver.execute_script(
            "return performance.getEntriesByType('resource').length") == 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors

        # And the policy blocks what a tampered page would try to load.
        blocked = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            document.addEventListener('securitypolicyviolation',
                                      (e) => done(e.blockedURI + ' ' + e.effectiveDirective));
            const img = document.createElement('img');
            img.src = 'http://127.0.0.1:9/pixel.png';
            document.body.append(img);
        """)
        assert blocked == "http://127.0.0.1:9/pixel.png img-src"
        events = _network(driver)
        tried = [i for i, u in _urls(events).items() if u.startswith("http")]
        failed = {p["requestId"]: p.get("blockedReason") for m, p in events
                  if m == "Network.loadingFailed"}
        assert tried and all(failed.get(i) == "csp" for i in tried), (tried, failed)
        assert not [p for m, p in events
                    if m == "Network.responseReceived" and p["requestId"] in tried]
    finally:
        driver.quit()


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_audit_writes_the_report(tmp_path):
    """A real tiny audit (two 1-epoch trainings) writes report.html with the time taken."""
    from tasks.audit import run_audit

    ds = tmp_path / "ds"
    write_sample(ds, 80, 0.2, seed=2)
    cfg = AuditConfig(data_path=str(ds), work_uri=str(tmp_path / "work"), n_repeats=2,
                      test_split=0.5, num_epochs=1, num_workers=0, report_top_n=30)
    results = run_audit(cfg, emit=lambda line: None)
    p = Page((Path(results).parent / "report.html").read_text())
    assert len(p.cards) == 30
    assert p.text("s-images").startswith("80 images")
    assert p.text("s-time").endswith("time taken")
