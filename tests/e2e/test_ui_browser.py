"""The /ui page in headless Chromium (Selenium) against the real stack: Redis, uvicorn, Celery worker.

Two tenants with API keys: sign in, submit a tiny job from the form, watch it reach 100% over the
SSE stream, read its timeline (stage, block i/N, ETA, message per row), see the plot load, download an
artifact and check its sha256, see the API's validation error next to its field, check that the
second tenant's key does not see the first's jobs, and follow a sweep in its variant table.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.stack import Stack
from tests import tiny_models
from tests.service_fixtures import DATA_DIR, SIGNING_KEY

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEYS = {"alpha": "key-alpha-0123456789", "beta": "key-beta-0123456789"}
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

webdriver = pytest.importorskip("selenium.webdriver")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium not installed (scripts/install.sh installs it)", allow_module_level=True)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("ui-home")
    env = {
        "PRUNE_SIGNING_KEY": SIGNING_KEY,
        "PRUNE_DATA_DIR": str(DATA_DIR),
        "PRUNE_MODEL_ROOTS": str(tmp_path_factory.getbasetemp()),
        "PRUNE_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
    }
    s = Stack(home, env=env)
    try:
        s.start_all()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save("llama", tmp_path_factory.mktemp("ui-models") / "tiny")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2200"):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, cond, timeout: float = 240):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: cond(d))


def sign_in(driver: webdriver.Chrome, base: str, key: str) -> None:
    driver.get(f"{base}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{base}/ui/")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(driver, lambda d: d.find_element(By.ID, "app").is_displayed(), 30)


def fill(driver: webdriver.Chrome, values: dict[str, str]) -> None:
    for loc, value in values.items():
        field = driver.find_element(By.CSS_SELECTOR, f'#submit-form [data-loc="{loc}"]')
        if field.tag_name == "select":
            field.find_element(By.CSS_SELECTOR, f'option[value="{value}"], option:nth-child(1)')
            driver.execute_script("arguments[0].value = arguments[1]", field, value)
        else:
            field.clear()
            field.send_keys(value)


def test_browser_flow(stack: Stack, model: Path, browser: webdriver.Chrome, downloads: Path) -> None:
    base, d = stack.api_url, browser
    sign_in(d, base, KEYS["alpha"])
    assert d.execute_script("return sessionStorage.getItem('prune.apiKey')") == KEYS["alpha"]
    assert d.execute_script("return localStorage.length") == 0

    # a bad value: the API's 422 `errors[].loc` message appears next to its field, no job is created
    fill(d, {"model.source": str(model), "prune.sparsity": "1.5", "calibration.nsamples": "4"})
    d.find_element(By.ID, "submit-button").click()
    slot = d.find_element(By.CSS_SELECTOR, '[data-err-for="prune.sparsity"]')
    wait(d, lambda _: slot.text, 30)
    assert "sparsity must be in [0, 1)" in slot.text
    assert d.find_element(By.CSS_SELECTOR, '[data-err-for="model.source"]').text == ""
    headers = {"Authorization": f"Bearer {KEYS['alpha']}"}
    assert httpx.get(f"{base}/v1/jobs", headers=headers).json()["items"] == []

    # a tiny job from the form, followed live to 100%
    fill(d, {"prune.sparsity": "", "prune.pattern": "2:4", "calibration.seqlen": "32",
             "evaluation.max_windows": "2", "gate.max_ppl_ratio": "50"})  # fmt: skip
    # every text the progress cell is given is recorded in the page itself (each mutation record's
    # added text node), so a stage shorter than the test's polling interval is still seen
    d.execute_script(
        "window.__progress = [];"
        "new MutationObserver(records => { for (const r of records) {"
        " if (r.target.id !== 'job-progress') continue;"
        " for (const n of r.addedNodes) window.__progress.push(n.textContent); } })"
        ".observe(document.body, {subtree: true, childList: true});"
    )
    d.find_element(By.ID, "submit-button").click()
    job_id = wait(d, lambda _: d.find_element(By.ID, "job-id").text, 30)
    wait(d, lambda _: d.find_element(By.ID, "job-status").text == "succeeded")
    seen = set(d.execute_script("return window.__progress"))
    assert d.find_element(By.ID, "job-progress").text.startswith("100%")
    assert any("block " in s and "/2" in s for s in seen), seen  # live SSE progress named the block
    row = d.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"] .progress')
    assert row.text.startswith("100%")
    assert "quality gate passed" in d.find_element(By.ID, "gate").text
    check_timeline(d)

    # the plot image is loaded (decoded with a real size), the report is shown
    img = wait(d, lambda _: d.find_element(By.CSS_SELECTOR, "#plots img.plot"), 60)
    wait(d, lambda _: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img), 60)
    assert d.execute_script("return arguments[0].naturalWidth", img) > 100
    d.switch_to.frame(d.find_element(By.ID, "report"))
    wait(d, lambda _: "Pruning report" in d.find_element(By.TAG_NAME, "body").text, 30)
    d.switch_to.default_content()
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(DOCS_IMG / "ui-job.png"))
    d.execute_script("document.getElementById('report').scrollIntoView()")
    d.find_element(By.ID, "report").screenshot(str(DOCS_IMG / "ui-report.png"))

    # download an artifact through its signed link; its bytes match the listed sha256
    link = d.find_element(By.CSS_SELECTOR, 'a.artifact[data-name="report.json"]')
    expected = link.get_attribute("data-sha256")
    api_list = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts", headers=headers).json()["artifacts"]
    assert expected == next(a["sha256"] for a in api_list if a["name"] == "report.json")
    link.click()
    target = downloads / "report.json"
    deadline = time.monotonic() + 60
    while not (target.exists() and target.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected

    # the other tenant sees none of it, neither in the list nor by id
    sign_in(d, base, KEYS["beta"])
    wait(d, lambda _: d.execute_script("return document.readyState") == "complete", 10)
    time.sleep(1)
    assert d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr") == []
    d.execute_script(f"showJob('{job_id}').catch(e => document.title = 'E' + e.status)")
    wait(d, lambda _: d.title == "E404", 10)
    beta = {"Authorization": f"Bearer {KEYS['beta']}"}
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=beta).status_code == 404


def screenshot(d: webdriver.Chrome, element_id: str, name: str) -> None:
    """The window, scrolled to put the element at its top, into docs/img/<name>."""
    d.execute_script(f"document.getElementById('{element_id}').scrollIntoView(true)")
    d.save_screenshot(str(DOCS_IMG / name))


def timeline(d: webdriver.Chrome) -> list[dict[str, str]]:
    """The timeline's rows as {column: text}."""
    return d.execute_script(
        "return [...document.querySelectorAll('#timeline tbody tr')].map(tr =>"
        " Object.fromEntries([...tr.cells].map(td => [td.className, td.textContent])))"
    )


def check_timeline(d: webdriver.Chrome) -> None:
    """One row per step: the status changes, every pruned block as i/N, a message; no raw JSON."""
    rows = timeline(d)
    statuses = [r["stage"] for r in rows if r["stage"] in ("queued", "running", "succeeded")]
    assert statuses == ["queued", "running", "succeeded"], rows
    assert "queued → running (attempt 1)" in [r["message"] for r in rows]
    blocks = [r["block"] for r in rows if r["stage"] == "pruning" and r["block"]]
    assert blocks == ["1/2", "2/2"], rows  # a block's advancing progress stays one row
    assert all(r["time"].count(":") == 2 for r in rows), rows
    assert {"loading", "calibrating", "evaluating", "exporting"} <= {r["stage"] for r in rows}
    assert not any(v.lstrip().startswith(("{", "[")) for r in rows for v in r.values()), rows
    etas = [r["eta"] for r in rows if r["eta"]]
    assert etas and all(re.fullmatch(r"\d+s|\d+m\d\ds", e) for e in etas), rows  # the worker's ETA, formatted
    d.execute_script(
        "for (const id of ['plots', 'report']) document.getElementById(id).style.display = 'none'"
    )
    screenshot(d, "job", "ui-timeline.png")
    d.execute_script("for (const id of ['plots', 'report']) document.getElementById(id).style.display = ''")


def test_sweep_view(stack: Stack, model: Path, browser: webdriver.Chrome) -> None:
    """A sweep's variant table: one row per variant with its state while it runs, then its perplexity."""
    base, d = stack.api_url, browser
    headers = {"Authorization": f"Bearer {KEYS['alpha']}"}
    body = {
        "model": {"source": str(model)},
        "calibration": {"nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2},
        "outputs": {"model": False},
        "sweep": {"sparsities": [0.3, 0.5, 0.7]},
        "gate": {"max_ppl_ratio": 50},
    }
    r = httpx.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    sign_in(d, base, KEYS["alpha"])
    d.execute_script(
        "window.__states = new Set();"
        "new MutationObserver(() => { for (const td of document.querySelectorAll('#variants td.state'))"
        " window.__states.add(td.parentElement.dataset.variant + ' ' + td.textContent); })"
        ".observe(document.body, {subtree: true, childList: true, characterData: true});"
    )
    d.execute_script(f"showJob('{job_id}')")
    wait(d, lambda _: d.find_element(By.ID, "job-status").text == "succeeded")
    wait(d, lambda _: len(d.find_elements(By.CSS_SELECTOR, "#variants tbody tr")) == 3, 30)
    rows = d.execute_script(
        "return [...document.querySelectorAll('#variants tbody tr')]"
        ".map(tr => [...tr.cells].map(c => c.textContent))"
    )
    assert [r[:3] for r in rows] == [
        ["1/3", "wanda-0.3", "done"],
        ["2/3", "wanda-0.5", "done"],
        ["3/3", "wanda-0.7", "done"],
    ], rows
    summary = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()["summary"]
    ppl = {v["label"]: v["pruned_ppl"] for v in summary["variants"]}
    for row in rows:
        assert float(row[3]) == pytest.approx(ppl[row[1]], rel=1e-3), (row, ppl)
        assert row[4].startswith("×") and row[5] in ("passed", "failed")
    states = set(d.execute_script("return [...window.__states]"))
    assert "wanda-0.5 running" in states or "wanda-0.7 running" in states, states  # seen live
    assert not d.find_element(By.ID, "sweep").get_attribute("hidden")
    d.execute_script("document.getElementById('report').style.height = '4em'")  # timeline in view too
    screenshot(d, "job", "ui-sweep.png")


def test_cancel_from_the_page(stack: Stack, browser: webdriver.Chrome, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    big = tiny_models.save("llama", tmp_path_factory.mktemp("ui-big") / "big", layers=12, hidden=256)
    base, d = stack.api_url, browser
    sign_in(d, base, KEYS["beta"])
    cleared = {"prune.pattern": "", "prune.sparsity": "", "gate.max_ppl_ratio": ""}
    fill(d, {"model.source": str(big), "calibration.nsamples": "64", "calibration.seqlen": "128", **cleared})
    d.find_element(By.ID, "submit-button").click()
    wait(d, lambda _: d.find_element(By.ID, "job-status").text in ("queued", "running"), 30)
    d.find_element(By.ID, "job-cancel").click()
    wait(d, lambda _: d.find_element(By.ID, "job-status").text == "cancelled", 240)
