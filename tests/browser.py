"""Headless Chromium for the report's browser tests and benchmarks/report_bench.py.

Debian's `chromium` and `chromium-driver` (installed by `scripts/setup.sh dev`). The network
is logged and every host name is unresolvable (belt and braces: nothing may leave this
machine); downloads go to `download_dir` when one is given.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

HAVE_CHROMIUM = bool(shutil.which("chromium") and shutil.which("chromedriver"))
NEEDS_CHROMIUM = ("needs Debian packages chromium and chromium-driver "
                  "(bash scripts/setup.sh dev installs them)")


def chrome(download_dir: Path | None = None, window: str = "1366,900"):
    """A fresh headless Chromium (its own new profile) through the Debian chromedriver."""
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no usage stats
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window}", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--host-resolver-rules=MAP * ~NOTFOUND"):
        opts.add_argument(arg)
    if download_dir is not None:
        opts.add_experimental_option("prefs", {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        })
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    if download_dir is not None:  # headless Chromium honours this, the prefs not always
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def network(driver) -> list[tuple[str, dict]]:
    """The Network.* DevTools events logged since the last call: (method, params)."""
    msgs = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return [(m["method"], m["params"]) for m in msgs if m["method"].startswith("Network.")]


def urls(events: list[tuple[str, dict]]) -> dict[str, str]:
    """requestId -> URL of every request the page started."""
    return {p["requestId"]: p["request"]["url"] for m, p in events
            if m == "Network.requestWillBeSent"}
