"""The dashboard over real sockets: its feed (paging, sorting, search, bad queries, auth,
redaction, several workers) and its page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.server import REPO, RunningServer, start_server

TINY = """import numpy as np
from meshserve import Model


class Tiny(Model):
    def load(self):
        if self.name == "broken":
            raise RuntimeError("cannot fetch https://alice:hunter22@weights.example.com/w.npy")
        self.w = np.load(self.path / "weights.npy")

    def size_bytes(self):
        return self.w.nbytes

    async def predict(self, request):
        return {"y": request.inputs[0].data * self.w[0]}
"""
NAMES = [f"model-{i:02d}" for i in range(30)] + ["needle", "broken"]
TOKEN = "dash-token-7f3a"


def make_models(root: Path) -> Path:
    for i, name in enumerate(NAMES):
        d = root / name
        d.mkdir(parents=True)
        (d / "model.py").write_text(TINY)
        np.save(d / "weights.npy", np.full(256 * (i + 1), float(i), dtype=np.float32))
        (d / "model-settings.json").write_text(json.dumps({"implementation": "model.py:Tiny"}))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return make_models(tmp_path_factory.mktemp("dash") / "models")


def _server(models: Path, log: Path, *args: str) -> RunningServer:
    return start_server(models, log, "--no-preload", *args)


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    srv = _server(models, tmp_path_factory.mktemp("plain") / "log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(models, tmp_path_factory):
    srv = _server(models, tmp_path_factory.mktemp("guarded") / "log", "--auth-token", TOKEN)
    yield srv
    srv.stop()


def infer(srv: RunningServer, name: str, headers: dict | None = None) -> httpx.Response:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    return httpx.post(f"{srv.http_url}/v2/models/{name}/infer", json=doc, headers=headers, timeout=30)


def feed(srv: RunningServer, headers: dict | None = None, **params) -> dict:
    r = httpx.get(f"{srv.http_url}/v2/dashboard/state", params=params, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def rows(doc: dict) -> list[dict]:
    cols = doc["models"]["columns"]
    return [dict(zip(cols, r, strict=True)) for r in doc["models"]["rows"]]


# -- the feed ------------------------------------------------------------------------
def test_feed_pages_sorts_and_searches(plain):
    for name in ("model-03", "model-07", "model-07", "needle"):
        assert infer(plain, name).status_code == 200
    doc = feed(plain, limit=10)
    assert doc["models"]["total"] == len(NAMES) and doc["models"]["matched"] == len(NAMES)
    assert [r["name"] for r in rows(doc)] == sorted(NAMES)[:10]
    assert doc["cache"]["loads"] == 3 and doc["cache"]["resident"] == 3
    assert doc["cache"]["used_bytes"] > 0 and doc["states"]["READY"] == 3
    assert doc["fleet"] is None and doc["llm"] == []

    second = feed(plain, limit=10, offset=10)
    assert [r["name"] for r in rows(second)] == sorted(NAMES)[10:20]
    by_requests = rows(feed(plain, sort="requests", order="desc", limit=2))
    assert [(r["name"], r["requests"]) for r in by_requests] == [("model-07", 2), ("model-03", 1)]
    assert by_requests[0]["hits"] == 1  # the first request loaded it, the second hit
    by_size = rows(feed(plain, sort="size", order="desc", limit=3))
    assert by_size[0]["name"] == "needle" and by_size[0]["size_bytes"] >= 256 * 31 * 4  # plus overhead
    found = feed(plain, q="NEED")
    assert found["models"]["matched"] == 1 and rows(found)[0]["state"] == "READY"
    ready = feed(plain, state="ready")
    assert {r["name"] for r in rows(ready)} == {"model-03", "model-07", "needle"}


@pytest.mark.parametrize(
    "params",
    [{"limit": "501"}, {"limit": "-1"}, {"offset": "x"}, {"sort": "evil"}, {"order": "up"}, {"q": "x" * 300},
     {"state": "S" * 40}],
)  # fmt: skip
def test_feed_rejects_bad_queries(plain, params):
    r = httpx.get(f"{plain.http_url}/v2/dashboard/state", params=params, timeout=10)
    assert r.status_code == 400, r.text
    assert "error" in r.json()


def test_feed_redacts_credentials_in_failures(plain):
    assert infer(plain, "broken").status_code >= 400
    text = httpx.get(f"{plain.http_url}/v2/dashboard/state", params={"q": "broken"}, timeout=10).text
    assert "hunter22" not in text and "alice" not in text
    (row,) = rows(json.loads(text))
    assert row["state"] == "FAILED" and "https://***@weights.example.com" in row["reason"]


def test_page_and_files_carry_a_strict_policy(plain):
    for path, ctype in (("/dashboard", "text/html"), ("/dashboard/dashboard.js", "text/javascript"),
                        ("/dashboard/dashboard.css", "text/css")):  # fmt: skip
        r = httpx.get(plain.http_url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(plain.http_url + "/dashboard", timeout=10).text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assert httpx.get(plain.http_url + "/dashboard/secrets.txt", timeout=10).status_code == 404


def test_auth_guards_the_feed_not_the_empty_page(guarded):
    assert httpx.get(guarded.http_url + "/dashboard", timeout=10).status_code == 200
    assert httpx.get(guarded.http_url + "/dashboard/dashboard.js", timeout=10).status_code == 200
    refused = httpx.get(guarded.http_url + "/v2/dashboard/state", timeout=10)
    assert refused.status_code == 401 and "needle" not in refused.text
    bad = httpx.get(guarded.http_url + "/v2/dashboard/state", headers={"authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401
    assert feed(guarded, {"authorization": f"Bearer {TOKEN}"})["models"]["total"] == len(NAMES)
    assert feed(guarded, {"x-api-key": TOKEN})["models"]["total"] == len(NAMES)


def test_workers_feed_gathers_every_worker(models, tmp_path):
    srv = _server(models, tmp_path / "log", "--workers", "2")
    try:
        loaded = [f"model-{i:02d}" for i in range(12)]
        for name in loaded:
            assert infer(srv, name).status_code == 200
        for name in loaded[:4]:
            assert infer(srv, name).status_code == 200
        doc = feed(srv, sort="requests", order="desc", limit=5)
        assert doc["models"]["total"] == len(NAMES)  # each model once, from its owner
        assert doc["cache"]["loads"] == 12 and doc["cache"]["resident"] == 12
        assert doc["cache"]["hits"] == 4 and doc["states"]["READY"] == 12
        assert [r["requests"] for r in rows(doc)] == [2, 2, 2, 2, 1]
        page = feed(srv, limit=7, offset=7)
        assert [r["name"] for r in rows(page)] == sorted(NAMES)[7:14]
        assert feed(srv, q="needle")["models"]["matched"] == 1
        deep = feed(srv, limit=500, offset=20)  # each peer sends its first 520 rows: past one page's limit
        assert [r["name"] for r in rows(deep)] == sorted(NAMES)[20:]
    finally:
        srv.stop()


# -- the page in a real browser ----------------------------------------------------------
def _chromium():
    """A headless Chromium (Debian's chromium and chromium-driver) with its console log kept."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    out = Path(os.environ["MESHSERVE_TEST_ARTEFACTS"]) if "MESHSERVE_TEST_ARTEFACTS" in os.environ else None
    out = out or tmp_path_factory.mktemp("dashboard-artefacts")
    out.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots in {out}")
    return out


def _wait(predicate, timeout: float = 10.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _table(browser) -> dict[str, str]:
    """Model name -> state, as the table shows them now (read in one script: the page
    redraws the table at every refresh, so element handles go stale)."""
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#rows tr')].map(tr => [...tr.cells].slice(0, 3).map(c => c.textContent))"
    )
    return {c[0]: c[2] for c in cells if len(c) == 3}


def _retype(browser, text: str) -> None:
    """Replace the search box's text as a person would (``clear()`` fires no input event)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)


def _console_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_the_page_in_headless_chromium(plain, artefacts):
    from selenium.webdriver.common.by import By

    browser = _chromium()
    try:
        browser.get(plain.http_url + "/dashboard")
        _wait(lambda: _table(browser), what="the model table")
        assert _table(browser).get("model-20") == "REGISTERED"
        # A model loaded through the API appears within a refresh.
        r = httpx.post(f"{plain.http_url}/v2/repository/models/model-20/load", json={}, timeout=30)
        assert r.status_code == 200, r.text
        _wait(lambda: _table(browser).get("model-20") == "READY", 6, "model-20 READY in the table")
        figures = browser.find_element(By.ID, "model-figures").text
        assert "resident" in figures and "registered" in figures
        assert "of" in browser.find_element(By.ID, "mem-text").text
        # Search filters on the server: only the match is left.
        browser.find_element(By.ID, "search").send_keys("needle")
        _wait(lambda: list(_table(browser)) == ["needle"], 6, "the search to filter")
        _retype(browser, "model-2")
        _wait(lambda: set(_table(browser)) == {f"model-2{i}" for i in range(10)}, 6, "a second search")
        # Sorting by requests (descending) puts the busiest first.
        for _ in range(3):
            infer(plain, "model-21")
        browser.find_element(By.CSS_SELECTOR, "th[data-sort=requests]").click()
        _wait(lambda: next(iter(_table(browser)), None) == "model-21", 6, "sorted by requests")
        time.sleep(2.5)  # a few refreshes, so the plots have points
        _retype(browser, "")
        _wait(lambda: len(_table(browser)) > 10, 6, "the full table again")
        shot = artefacts / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        if os.environ.get("MESHSERVE_UPDATE_DOCS_SCREENSHOT"):
            shutil.copy(shot, REPO / "docs" / "dashboard.png")
        assert _console_errors(browser) == []
    finally:
        browser.quit()


def test_the_page_asks_for_a_token(guarded, artefacts):
    from selenium.webdriver.common.by import By

    browser = _chromium()
    try:
        browser.get(guarded.http_url + "/dashboard")
        login = _wait(lambda: (f := browser.find_element(By.ID, "login")).is_displayed() and f, what="the token form")
        assert not browser.find_element(By.ID, "main").is_displayed()
        browser.find_element(By.ID, "token").send_keys("wrong-token")
        login.submit()
        _wait(lambda: "refused" in browser.find_element(By.ID, "login-error").text, what="the refusal")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        login.submit()
        _wait(lambda: len(_table(browser)) > 10, what="the table after the token")
        assert not browser.find_element(By.ID, "login").is_displayed()
        browser.save_screenshot(str(artefacts / "dashboard-auth.png"))
        # The 401s the page handled show up as failed fetches in the log; nothing else may.
        errors = [e for e in _console_errors(browser) if "401" not in e["message"]]
        assert errors == []
    finally:
        browser.quit()
