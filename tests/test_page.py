"""The page at `/`, driven in headless Chromium (Playwright) against a real `python -m runtime serve` on 127.0.0.1.

Needs Debian's `chromium` and the `playwright` package (the dev extra); no browser download. Outside CI a missing
browser skips these tests; under CI=true it fails them (scripts/ci_browser.sh installs it there).
Screenshots go to $PERCEPIANO_TEST_ARTIFACTS or tests/artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest
from conftest import REPO

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("PERCEPIANO_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("PERCEPIANO_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
TOKEN = "page-test-token-0123456789"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
GARBAGE = b"this is not audio at all\n" * 200


def shown(number: float) -> str:
    """How the page writes a score: JavaScript's toFixed(3) (round half up on the exact binary value)."""
    return str(Decimal(number).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def colour(number: float) -> str:
    return "high" if number >= 0.7 else "mid" if number >= 0.5 else "low"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m runtime serve` over a model on a free local port, until stop()."""

    def __init__(self, model: Path, log: Path, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.pop("PERCEPIANO_API_TOKEN", None)
        if token:
            env["PERCEPIANO_API_TOKEN"] = token
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port", str(self.port),
             "--device", "cpu"], cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server was not ready within 90 s:\n{log.read_text()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def analyze(self, name: str, data: bytes) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/analyze", files={"audio": (name, data)}, headers=self.headers(), timeout=60)

    def model(self) -> dict:
        res = httpx.get(f"{self.url}/v1/model", headers=self.headers(), timeout=10)
        res.raise_for_status()
        return res.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is None and not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PERCEPIANO_CHROMIUM)"
    if problem:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{problem}: CI must run the page tests (scripts/ci_browser.sh installs them)")
        pytest.skip(problem)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])  # a fake microphone
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = Server(tiny_model, tmp_path_factory.mktemp("page") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clips(piano_clips) -> list[Path]:
    """The two shortest real clips (fewest chunks, fastest)."""
    return sorted(piano_clips, key=lambda p: p.stat().st_size)[:2]


@pytest.fixture(scope="module")
def api(server, clips) -> list[dict]:
    """The API's own answers for the two clips."""
    out = []
    for clip in clips:
        res = server.analyze(clip.name, clip.read_bytes())
        assert res.status_code == 200, res.text
        out.append(res.json())
    return out


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=DESKTOP)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_page(page, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("#app:not([hidden])")


def upload(page, slot: str, clip: Path) -> None:
    page.set_input_files(f"#take-{slot} input.file", str(clip))
    page.wait_for_selector(f"#take-{slot} .status-text.done", timeout=60_000)


def drop(page, slot: str, clip: Path) -> None:
    """Drop a file on a take's drop zone, as a drag from the desktop does."""
    page.evaluate("""([slot, name, data]) => {
        const file = new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, {type: "audio/flac"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        const zone = document.querySelector(`#take-${slot} .drop`);
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [slot, clip.name, base64.b64encode(clip.read_bytes()).decode()])
    page.wait_for_selector(f"#take-{slot} .status-text.done", timeout=60_000)


def table(page, slot: str) -> dict[str, tuple[str, str]]:
    """{key: (shown number, colour class)} of one take's column."""
    rows = page.eval_on_selector_all("#score-table tbody tr[data-key]", """(rows, slot) => rows.map((r) => {
        const td = r.querySelector(`td[data-slot="${slot}"]`);
        return [r.dataset.key, td.textContent, td.className];
    })""", slot)
    out = {}
    for key, number, classes in rows:
        out[key] = (number, next((c for c in ("low", "mid", "high") if c in classes.split()), ""))
    return out


def expected(body: dict) -> dict[str, tuple[str, str]]:
    return {key: (shown(v), colour(v)) for key, v in body["scores"].items()}


def timeline_values(page, slot: str) -> list[str]:
    return page.eval_on_selector_all(f"#timeline circle.dot.{slot}", "(dots) => dots.map((d) => d.dataset.value)")


def test_page_shows_the_api_scores_of_a_real_clip(page, server, clips, api):
    model = server.model()
    open_page(page, server)
    identity = page.text_content("#model")
    for part in (model["version"], model["precision"], model["device"]):
        assert part in identity
    assert page.is_visible("#demo-banner") == (model["source"].get("demo") is True)
    assert f"up to {model['limits']['max_bytes'] / 1e6:.0f} MB" in page.text_content("#limits")
    assert not page.is_visible("#results")

    upload(page, "a", clips[0])
    page.wait_for_selector("#radar svg polygon.a")
    keys = [d["key"] for d in model["dimensions"]]
    got = table(page, "a")
    assert list(got) == keys and len(keys) == 19  # every dimension, in model order, named by /v1/model
    assert got == expected(api[0])
    points = page.get_attribute("#radar polygon.a", "points").split()
    assert len(points) == 19
    assert page.locator("#radar .family-label").count() == 8  # the eight families of the spec's dimensions

    timeline = api[0]["timeline"]
    assert timeline_values(page, "a") == [shown(w["scores"][keys[0]]) for w in timeline]
    page.select_option("#dimension", keys[-1])
    assert timeline_values(page, "a") == [shown(w["scores"][keys[-1]]) for w in timeline]
    assert page.locator("#timeline polyline.b").count() == 0


def test_garbage_gets_a_readable_error(page, server):
    answer = server.analyze("garbage.wav", GARBAGE)
    assert answer.status_code == 415, answer.text
    open_page(page, server)
    page.set_input_files("#take-a input.file", files=[{"name": "garbage.wav", "mimeType": "audio/wav",
                                                       "buffer": GARBAGE}])
    page.wait_for_selector("#take-a .take-error:not([hidden])")
    message = page.text_content("#take-a .take-error")
    assert message.startswith("This file could not be read as audio.")
    assert answer.json()["error"] in message
    assert not page.is_visible("#results")


def test_second_take_overlays_the_first_and_screenshots(page, server, clips, api):
    open_page(page, server)
    upload(page, "a", clips[0])
    drop(page, "b", clips[1])
    page.wait_for_selector("#radar svg polygon.b")
    assert page.locator("#radar polygon.a").count() == 1
    assert table(page, "a") == expected(api[0])
    assert table(page, "b") == expected(api[1])
    deltas = page.eval_on_selector_all("#score-table tbody tr[data-key] td.delta",
                                       "(tds) => tds.map((t) => t.textContent)")
    want = []
    for key in api[0]["scores"]:
        milli = round(1000 * (api[1]["scores"][key] - api[0]["scores"][key]))
        want.append(("+" if milli > 0 else "−" if milli < 0 else "") + f"{abs(milli) / 1000:.3f}")
    assert deltas == want
    key = page.input_value("#dimension")
    assert timeline_values(page, "b") == [shown(w["scores"][key]) for w in api[1]["timeline"]]
    assert page.locator("#timeline polyline.a").count() == 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(400)  # the timeline redraws at the new width
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than a phone
    page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)

    page.click("#take-b .clear")
    assert page.locator("#radar polygon.b").count() == 0
    assert page.locator("#timeline polyline.b").count() == 0


RECORD_STATUS = """document.addEventListener("DOMContentLoaded", () => {
    window.statuses = [];
    const node = document.querySelector("#take-a .status-text");
    new MutationObserver(() => window.statuses.push(node.textContent)).observe(node, {childList: true});
})"""


def test_progress_is_shown_while_it_uploads_and_is_analysed(page, server, clips):
    page.add_init_script(RECORD_STATUS)
    cdp = page.context.new_cdp_session(page)  # a slow uplink (about 3 s for the clip), so progress is visible
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": clips[0].stat().st_size // 3})
    open_page(page, server)
    page.set_input_files("#take-a input.file", str(clips[0]))
    page.wait_for_selector("#take-a progress:not([hidden])")
    assert page.is_disabled("#take-a input.file")  # no second upload into a busy take
    page.wait_for_selector("#take-a .status-text.done", timeout=60_000)
    assert not page.is_visible("#take-a progress")
    statuses = page.evaluate("window.statuses")
    percents = {int(s.split(": ")[1].rstrip(" %")) for s in statuses if s.startswith(f"Uploading {clips[0].name}: ")}
    assert any(0 < p < 100 for p in percents), statuses  # progress part-way through the upload
    analysing = [i for i, s in enumerate(statuses) if s.startswith(f"Analysing {clips[0].name}")]
    uploading = [i for i, s in enumerate(statuses) if s.startswith("Uploading")]
    assert analysing and max(uploading) < min(analysing), statuses  # upload first, then the analysis
    assert statuses[-1].startswith(f"{clips[0].name}: "), statuses


@pytest.mark.parametrize(("status", "body", "headers", "text"), [
    (503, {"error_type": "busy", "error": "the server is at capacity; retry shortly"}, {"Retry-After": "3"},
     "The server is busy. the server is at capacity; retry shortly. Try again in 3 s."),
    (413, {"error_type": "audio_too_long", "error": "the audio lasts 700.0 s, over the limit of 600 s"}, {},
     "The recording is too long. the audio lasts 700.0 s, over the limit of 600 s."),
])
def test_api_errors_read_as_sentences(page, server, clips, status, body, headers, text):
    answer = json.dumps({"status": "error", **body})
    page.route("**/v1/analyze", lambda route: route.fulfill(status=status, headers=headers,
                                                            content_type="application/json", body=answer))
    open_page(page, server)
    page.set_input_files("#take-a input.file", str(clips[0]))
    page.wait_for_selector("#take-a .take-error:not([hidden])")
    assert page.text_content("#take-a .take-error") == text


@pytest.mark.parametrize(("demo", "source_demo", "shown"), [(True, True, True), (True, False, True),
                                                            (False, True, True), (False, False, False)])
def test_demo_model_gets_a_banner(page, server, demo, source_demo, shown):
    def edit(route):  # /v1/model's `demo` and its source's mark, as a model exported either way would give them
        doc = route.fetch().json()
        doc["demo"], doc["source"] = demo, {**doc["source"], "demo": source_demo}
        route.fulfill(json=doc)

    page.route("**/v1/model", edit)
    open_page(page, server)
    assert page.is_visible("#demo-banner") is shown
    if shown:
        assert "Demo model" in page.text_content("#demo-banner")


def test_recording_from_the_microphone(browser, server):
    context = browser.new_context(viewport=DESKTOP, permissions=["microphone"])
    page = context.new_page()
    try:
        open_page(page, server)
        page.click("#take-a .record")
        page.wait_for_selector("#take-a .record.recording")
        page.wait_for_timeout(3500)
        page.click("#take-a .record")
        page.wait_for_selector("#take-a .status-text.done", timeout=60_000)
        status = page.text_content("#take-a .status-text")
        assert status.startswith("recording-A.") and " s, " in status
        assert len(table(page, "a")) == 19
    finally:
        context.close()


def test_token_is_asked_for_and_sent(browser, tiny_model, tmp_path, clips):
    srv = Server(tiny_model, tmp_path / "server.log", token=TOKEN)
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    sent = []
    page.on("request", lambda req: sent.append(req.headers.get("authorization"))
            if req.url.endswith("/v1/analyze") else None)
    try:
        page.goto(srv.url + "/")
        page.wait_for_selector("#token-form:not([hidden])")
        assert not page.is_visible("#app")
        page.fill("#token", "wrong-token")
        page.click("#token-form button")
        page.wait_for_selector("#token-error:not([hidden])")
        assert "refused" in page.text_content("#token-error")

        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("#app:not([hidden])")
        upload(page, "a", clips[0])
        want = srv.analyze(clips[0].name, clips[0].read_bytes()).json()
        assert table(page, "a") == expected(want)
        assert sent == [f"Bearer {TOKEN}"]
        stored = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]  # the token lives in the page's memory only
    finally:
        context.close()
        srv.stop()


def test_the_page_ships_in_the_package():
    """Every file of the page is package data (so a wheel carries it), and the page loads nothing from elsewhere."""
    import re
    import tomllib
    from fnmatch import fnmatch

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["runtime"]
    static = REPO / "runtime" / "serve" / "static"
    files = sorted(p.relative_to(REPO / "runtime").as_posix() for p in static.iterdir())  # as package-data names
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    html = (static / "index.html").read_text()
    for asset in ("static/app.js", "static/style.css"):
        assert f'"{asset}"' in html
    assert 'from "./charts.js"' in (static / "app.js").read_text()  # the charts module, shared with clients/web
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(re.match(r"(static/|docs$|data:)", link) for link in links), links
