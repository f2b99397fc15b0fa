"""The review in report.html, in headless Chromium: 20 cards decided by keyboard alone (one
undo), a reload keeps them, the exported decisions.csv is exactly those decisions as
tasks.decisions reads and validates them, and a decisions file loaded into a fresh browser
shows on the cards. The report is written with a page of 8 cards, so the review crosses the
lazily shown pages.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tasks import report, storage
from tasks.decisions import (
    COLUMNS,
    parse_decisions,
    validate_decisions,
    write_decisions,
)
from tasks.index import read_manifest
from tests.browser import HAVE_CHROMIUM, NEEDS_CHROMIUM, chrome, network, urls
from tests.test_report import ARTIFACTS, HOSTILE, flagged_of, make_run

pytestmark = pytest.mark.skipif(not HAVE_CHROMIUM, reason=NEEDS_CHROMIUM)

PAGE = 8
REVIEWER = 'Ada, "the" <reviewer> & co'  # a comma, quotes and HTML: CSV and page must cope


@pytest.fixture(scope="module")
def review_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A run (planted noise, real index and merge) and its report with pages of 8 cards."""
    run, _ = make_run(tmp_path_factory.mktemp("review"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "PAGE_CARDS", PAGE)
        page = report.write_report(run)
    return run, Path(page).resolve().as_uri()


def classes_of(run: str) -> list[str]:
    _, classes = read_manifest(run)
    return list(classes)


def for_class(row: dict, cls: str) -> tuple[str, str]:
    """What choosing class `cls` records for a card (the page's rule)."""
    if cls == row["label"]:
        return "keep", ""
    if cls == row["corrected_label"]:
        return "accept", cls
    return "other", cls


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def shown_cards(driver) -> list:
    from selenium.webdriver.common.by import By

    return [c for c in driver.find_elements(By.CSS_SELECTOR, "#grid .card") if c.is_displayed()]


def review_filter(driver, value: str) -> list:
    """Cards under the review filter `value`, every page of them (End shows the last)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    select = driver.find_element(By.ID, "f-review")
    Select(select).select_by_value(value)
    select.send_keys(Keys.ESCAPE)  # leave the field: the keys act on the cards again
    press(driver, Keys.END)
    return shown_cards(driver)


def wait_for(path: Path, timeout: float = 10) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and not list(path.parent.glob("*.crdownload")):
            return path.read_text(encoding="utf-8")
        time.sleep(0.1)
    raise AssertionError(f"{path} was not downloaded")


def loads(driver, path: Path) -> str:
    """Load a decisions file through the page's file input; the message it then shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    message = driver.find_element(By.ID, "message")
    driver.execute_script("arguments[0].textContent = ''", message)
    driver.find_element(By.ID, "load-file").send_keys(str(path))
    WebDriverWait(driver, 10).until(lambda d: message.text)
    return message.text


def progress(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "progress").text


def counts(expected: dict[str, tuple[str, str]]) -> str:
    n = pd.Series([d for d, _ in expected.values()]).value_counts()
    return (f"reviewed {len(expected)} of 151, {n.get('accept', 0)} accepted, "
            f"{n.get('keep', 0)} kept, {n.get('other', 0)} other, {n.get('skip', 0)} skipped")


def decisions_on_cards(cards: list) -> dict[str, tuple[str, str]]:
    """name -> (decision, text of its badge) for the given cards."""
    from selenium.webdriver.common.by import By

    return {c.get_attribute("data-name"): (c.get_attribute("data-decision"),
                                           c.find_element(By.CSS_SELECTOR, ".decision").text)
            for c in cards}


BADGE = {"accept": "accepted", "keep": "kept", "other": "other", "skip": "skipped"}


def badge(decision: str, new_label: str) -> str:
    return BADGE[decision] + (f" → {new_label}" if new_label else "")


def test_review_20_cards_by_keyboard_reload_and_export(review_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run, url = review_run
    results = flagged_of(run)
    rows = results.to_dict("records")
    classes = classes_of(run)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    driver = chrome(download_dir=downloads)
    started = datetime.now(UTC).replace(microsecond=0)
    try:
        driver.get(url)
        assert driver.execute_script("return document.body.dataset.ready") == "1"
        # Pages of 8 cards, as many as reach near the window; the rest wait in the <template>.
        shown = len(shown_cards(driver))
        assert PAGE < shown < 100 and shown % PAGE == 0
        assert progress(driver).startswith("reviewed 0 of 151, 0 accepted")
        assert [b.get_attribute("data-class") for b in driver.find_elements(
            By.CSS_SELECTOR, "#picker-list button")] == classes
        name = driver.find_element(By.ID, "reviewer")
        name.send_keys(REVIEWER, Keys.ESCAPE)  # Esc leaves the field for the review keys

        # The plan: a key sequence per card, and what each records. `expected` is kept by
        # replaying the plan: 20 decided cards, card 5 passed over, one decision undone.
        expected: dict[str, tuple[str, str]] = {}

        def digit(cls: str) -> str:
            assert classes.index(cls) < 9, f"{cls} has no number key"
            return str(classes.index(cls) + 1)

        def neither(row: dict) -> str:
            """A class among the first nine that is neither the label nor the suggestion."""
            return next(c for c in classes[:9] if c not in (row["label"],
                                                             row["corrected_label"]))

        press(driver, "j")  # the first key shows the cursor on the first card
        for i in range(21):
            row = rows[i]
            assert row["label"] != row["corrected_label"]  # the top 21 are all suspects
            if i == 5:
                press(driver, "j")  # passed over: no decision
                continue
            if i in (0, 8, 11, 14, 17, 19):
                keys, want = ["a"], ("accept", row["corrected_label"])
            elif i in (1, 12, 18):
                keys, want = ["n"], ("keep", "")
            elif i in (3, 13, 20):
                keys, want = ["s"], ("skip", "")
            elif i == 2:
                cls = neither(row)
                keys, want = ["o", digit(cls)], ("other", cls)  # o, then the class's number
            elif i == 6:
                # o, then type to filter: a class whose name matches only itself
                cls = next(c for c in classes if c not in (row["label"], row["corrected_label"])
                           and [x for x in classes if c in x] == [c])
                keys, want = ["o", cls, Keys.ENTER], ("other", cls)
            elif i == 7:
                keys, want = [digit(row["corrected_label"])], ("accept", row["corrected_label"])
            elif i == 10:
                keys, want = [digit(row["label"])], ("keep", "")  # its own class: keep
            elif i in (9, 15):
                cls = neither(row)
                keys, want = [digit(cls)], ("other", cls)
            elif i == 16:
                cls = neither(row)
                keys, want = ["o", digit(cls)], ("other", cls)
            else:  # 4: accept, undo, then keep
                press(driver, "a")
                assert driver.find_element(By.CSS_SELECTOR, ".card.current").get_attribute(
                    "data-name") == rows[5]["filename"]
                press(driver, "u")
                keys, want = ["n"], ("keep", "")
            assert driver.find_element(By.CSS_SELECTOR, ".card.current").get_attribute(
                "data-name") == row["filename"], i
            press(driver, *keys)
            expected[row["filename"]] = want
            if i == 9:  # the arrows move too: back one card, forward again
                press(driver, Keys.ARROW_LEFT, Keys.ARROW_RIGHT)
        assert len(expected) == 20
        assert progress(driver) == counts(expected)
        driver.save_screenshot(str(ARTIFACTS / "review.png"))
        press(driver, "?")
        assert driver.find_element(By.ID, "help").is_displayed()
        driver.save_screenshot(str(ARTIFACTS / "review-help.png"))
        press(driver, Keys.ESCAPE)
        assert not driver.find_element(By.ID, "help").is_displayed()

        def check_cards() -> None:
            done = review_filter(driver, "done")
            assert [c.get_attribute("data-name") for c in done] == list(expected)  # rank order
            assert decisions_on_cards(done) == {n: (d, badge(d, new))
                                                for n, (d, new) in expected.items()}
            todo = {c.get_attribute("data-name") for c in review_filter(driver, "todo")}
            assert todo == set(results["filename"]) - set(expected)
            assert rows[5]["filename"] in todo
            review_filter(driver, "")

        check_cards()
        driver.refresh()  # a reload loses nothing
        assert driver.execute_script("return document.body.dataset.ready") == "1"
        assert progress(driver) == counts(expected)
        assert driver.find_element(By.ID, "reviewer").get_attribute("value") == REVIEWER
        check_cards()

        driver.find_element(By.ID, "export").click()
        text = wait_for(downloads / "decisions.csv")
        finished = datetime.now(UTC)

        # Nothing left the page: the download is a blob: URL of the page itself.
        page_urls = set(urls(network(driver)).values())
        assert [u for u in page_urls if u != url and not u.startswith(("data:", "blob:"))] == []
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()

    decisions = parse_decisions(text)
    assert list(decisions.columns) == [*COLUMNS, "run_id"]
    assert list(decisions["filename"]) == list(expected)
    got = {r["filename"]: (r["decision"], r["new_label"]) for r in decisions.to_dict("records")}
    assert got == expected
    assert set(decisions["label"]) <= set(classes)
    assert (decisions["label"] == results.set_index("filename").loc[
        decisions["filename"], "label"].to_numpy()).all()
    assert set(decisions["reviewer"]) == {REVIEWER}
    run_id = storage.basename(run)
    assert set(decisions["run_id"]) == {run_id}
    for stamp in decisions["decided_at"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
        assert started <= datetime.fromisoformat(stamp) <= finished
    moves = validate_decisions(decisions, results, classes, run_id)
    assert {(m["filename"], m["decision"], m["new_label"]) for m in moves.to_dict("records")} == {
        (n, d, new) for n, (d, new) in expected.items() if d in ("accept", "other")}


def test_a_decisions_file_loads_into_a_fresh_browser(review_run, tmp_path):
    from selenium.webdriver.common.by import By

    run, url = review_run
    results = flagged_of(run)
    classes = classes_of(run)
    row = results.set_index("filename")
    hostile = row.loc[HOSTILE]
    other = next(c for c in classes if c not in (hostile["label"], hostile["corrected_label"]))
    names = results["filename"].tolist()
    chosen = [  # rank order; the HTML-named file among them, well past the first page
        (names[0], "accept", row.loc[names[0], "corrected_label"]),
        (names[1], "keep", ""),
        (names[9], "skip", ""),
        (names[30], "keep", ""),
        (HOSTILE, "other", other),
    ]
    chosen.sort(key=lambda c: names.index(c[0]))
    frame = pd.DataFrame([{"filename": n, "label": row.loc[n, "label"], "decision": d,
                           "new_label": new, "reviewer": "Grace, colleague",
                           "decided_at": f"2026-05-01T10:0{i}:00Z", "run_id": storage.basename(run)}
                          for i, (n, d, new) in enumerate(chosen)])
    validate_decisions(frame, results, classes, storage.basename(run))
    good = tmp_path / "decisions.csv"
    write_decisions(frame, str(good))
    stray = tmp_path / "with-a-stray-row.csv"
    write_decisions(pd.concat([frame, pd.DataFrame([{
        "filename": "coat/not-in-this-run.png", "label": "coat", "decision": "keep",
        "new_label": "", "reviewer": "", "decided_at": "", "run_id": storage.basename(run)}])]),
        str(stray))
    foreign = tmp_path / "another-run.csv"
    write_decisions(frame.assign(run_id="another-run"), str(foreign))

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome(download_dir=downloads)  # a new profile: nothing stored yet
    try:
        driver.get(url)
        assert progress(driver).startswith("reviewed 0 of 151")
        said = loads(driver, foreign)
        assert "is for run another-run" in said and "nothing loaded" in said
        assert progress(driver).startswith("reviewed 0 of 151")

        assert loads(driver, stray) == (f"loaded {len(chosen)} decisions from {stray.name}; 1 "
                                        "row left out, e.g. line 7 (coat/not-in-this-run.png): "
                                        "not in this report")
        done = review_filter(driver, "done")
        assert [c.get_attribute("data-name") for c in done] == [n for n, _, _ in chosen]
        assert decisions_on_cards(done) == {n: (d, badge(d, new)) for n, d, new in chosen}
        assert progress(driver) == counts({n: (d, new) for n, d, new in chosen})
        driver.save_screenshot(str(ARTIFACTS / "review-loaded.png"))

        # The same decisions again: nothing changes.
        assert loads(driver, good) == f"loaded {len(chosen)} decisions from decisions.csv"
        driver.find_element(By.ID, "export").click()
        exported = wait_for(downloads / "decisions.csv")
    finally:
        driver.quit()
    # Handed on unchanged: the colleague's name and times are kept.
    assert exported == good.read_text()


def test_tier_filter_and_untrusted_banner(review_run, tmp_path):
    """An audit whose summary.json says it cannot be trusted shows its banner above the
    summary; the tier filter lists exactly the cards of a tier (across the lazy pages), and
    a card decided under it is a decision like any other."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from tests.test_report import untrusted_copy

    run, _ = review_run
    results = flagged_of(run)
    copy = untrusted_copy(run, tmp_path, ["the models are near chance"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "PAGE_CARDS", PAGE)
        url = Path(report.write_report(copy)).resolve().as_uri()
    driver = chrome()
    try:
        driver.get(url)
        assert driver.execute_script("return document.body.dataset.ready") == "1"
        banner = driver.find_element(By.ID, "guard")
        assert banner.is_displayed() and "This audit cannot be trusted" in banner.text
        assert "the models are near chance" in banner.text and "--force" in banner.text
        summary = driver.find_element(By.ID, "summary")
        assert banner.rect["y"] + banner.rect["height"] <= summary.rect["y"]
        # The page's style sheet applies (not blocked by the policy): a warning colour.
        assert driver.execute_script(
            "return getComputedStyle(arguments[0]).backgroundColor", banner) != \
            "rgba(0, 0, 0, 0)"
        driver.save_screenshot(str(ARTIFACTS / "report-untrusted.png"))

        tier = driver.find_element(By.ID, "f-tier")
        for value in ("review", "issue", "ok"):
            Select(tier).select_by_value(value)
            tier.send_keys(Keys.ESCAPE)
            press(driver, Keys.END)  # every page of them
            cards = shown_cards(driver)
            want = results.loc[results["tier"] == value, "filename"].tolist()
            assert want, value
            assert [c.get_attribute("data-name") for c in cards] == want, value
            assert {c.get_attribute("data-tier") for c in cards} == {value}
        Select(tier).select_by_value("review")
        tier.send_keys(Keys.ESCAPE)
        press(driver, Keys.HOME, "n")  # keep the first review card's label
        first = results.loc[results["tier"] == "review"].iloc[0]
        card = driver.find_element(By.CSS_SELECTOR, "#grid .card")
        assert card.get_attribute("data-name") == first["filename"]
        assert card.get_attribute("data-decision") == "keep"
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text.lower() == "to review"
        assert card.find_element(By.CSS_SELECTOR, ".tier").text.lower() == "review"
        driver.find_element(By.ID, "f-reset").click()
        names = [c.get_attribute("data-name") for c in shown_cards(driver)]  # all tiers again
        assert len(names) >= PAGE and names == results["filename"].tolist()[:len(names)]
        assert progress(driver).startswith("reviewed 1 of 151, 0 accepted, 1 kept")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
