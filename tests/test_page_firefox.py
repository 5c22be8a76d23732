"""The page in headless Firefox (Debian's firefox-esr) against a real local server.

Playwright's Firefox needs its own patched build (not downloadable here) and geckodriver is not packaged, so this
drives Firefox through Marionette, its built-in remote protocol: length-prefixed JSON over a local TCP socket.
Under CI=true a missing Firefox fails these tests (scripts/ci_browser.sh installs it); elsewhere it skips them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_page import ARTIFACTS, Server, expected, free_port

pytestmark = pytest.mark.browser

FIREFOX = os.environ.get("PERCEPIANO_FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
PREFS = {
    "media.navigator.streams.fake": True,  # a fake microphone, no permission prompt
    "media.navigator.permission.disabled": True,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
}


class Firefox:
    """A headless Firefox and one Marionette session (WebDriver commands as [0, id, name, params] messages)."""

    def __init__(self, profile: Path):
        port = free_port()
        prefs = {**PREFS, "marionette.port": port}
        (profile / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n"
                                                 for k, v in prefs.items()))
        self.proc = subprocess.Popen([FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
                                     env={**os.environ, "HOME": str(profile)}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise AssertionError(f"Firefox ({FIREFOX}) did not open Marionette on port {port}") from None
                time.sleep(0.2)
        self.stream = self.sock.makefile("rb")
        self.id = 0
        assert self.read()["applicationType"] == "gecko"
        self.version = self.command("WebDriver:NewSession", {"capabilities": {}})["capabilities"]["browserVersion"]

    def read(self):
        size = b""
        while (byte := self.stream.read(1)) != b":":
            if not byte:
                raise AssertionError("Marionette closed the connection")
            size += byte
        return json.loads(self.stream.read(int(size)))

    def command(self, name: str, params: dict | None = None):
        self.id += 1
        data = json.dumps([0, self.id, name, params or {}]).encode()
        self.sock.sendall(str(len(data)).encode() + b":" + data)
        _, _, error, result = self.read()
        if error:
            raise AssertionError(f"{name}: {error}")
        return result

    def js(self, script: str, *args):
        return self.command("WebDriver:ExecuteScript", {"script": script, "args": list(args)})["value"]

    def wait(self, condition: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(f"return {condition}")):
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {condition}")
            time.sleep(0.1)
        return value

    def upload(self, selector: str, path: Path) -> None:
        element = self.command("WebDriver:FindElement", {"using": "css selector", "value": selector})["value"]
        self.command("WebDriver:ElementSendKeys", {"id": next(iter(element.values())), "text": str(path)})

    def table(self, slot: str) -> dict[str, tuple[str, str]]:
        rows = self.js("""return [...document.querySelectorAll("#score-table tbody tr[data-key]")].map((r) => {
            const td = r.querySelector(`td[data-slot="${arguments[0]}"]`);
            return [r.dataset.key, td.textContent, td.className];
        })""", slot)
        return {key: (text, next((c for c in ("low", "mid", "high") if c in classes.split()), ""))
                for key, text, classes in rows}

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.command("WebDriver:TakeScreenshot", {"full": True})["value"]))

    def close(self) -> None:
        try:
            self.command("WebDriver:DeleteSession")
        finally:
            self.sock.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    if not FIREFOX:
        problem = "no Firefox (apt-get install firefox-esr, or set PERCEPIANO_FIREFOX)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{problem}: CI must run the page tests (scripts/ci_browser.sh installs it)")
        pytest.skip(problem)
    browser = Firefox(tmp_path_factory.mktemp("firefox-profile"))
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = Server(tiny_model, tmp_path_factory.mktemp("page-firefox") / "server.log")
    yield srv
    srv.stop()


def test_page_in_firefox(firefox, server, piano_clips):
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:2]
    want = [server.analyze(c.name, c.read_bytes()).json() for c in clips]
    firefox.command("WebDriver:SetWindowRect", {"width": 1280, "height": 900})
    firefox.command("WebDriver:Navigate", {"url": server.url + "/"})
    firefox.wait("!document.querySelector('#app').hidden")
    assert want[0]["model"]["version"] in firefox.js("return document.querySelector('#model').textContent")

    firefox.upload("#take-a input.file", clips[0])
    firefox.wait("document.querySelector('#take-a .status-text.done')")
    assert firefox.table("a") == expected(want[0])
    firefox.upload("#take-b input.file", clips[1])
    firefox.wait("document.querySelector('#take-b .status-text.done')")
    assert firefox.table("b") == expected(want[1])
    assert firefox.js("return document.querySelectorAll('#radar polygon').length") == 2
    assert firefox.js("return document.querySelectorAll('#timeline circle.dot.b').length") == len(want[1]["timeline"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    firefox.screenshot(ARTIFACTS / "page-firefox-desktop.png")



PHONE_FRAME = """const frame = document.createElement("iframe");
frame.src = "./"; frame.id = "phone"; frame.style.cssText = "width: 390px; height: 2300px; border: 0";
document.body.style.cssText = "margin: 0; padding: 0"; document.body.replaceChildren(frame);"""


def test_page_in_firefox_at_phone_width(firefox, server, piano_clips):
    """The page in a 390 px wide frame (headless Firefox's window is at least 500 px wide)."""
    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    firefox.command("WebDriver:SetWindowRect", {"width": 600, "height": 2400})
    firefox.command("WebDriver:Navigate", {"url": server.url + "/"})
    firefox.js(PHONE_FRAME)
    frame = next(iter(firefox.command("WebDriver:FindElement", {"using": "css selector", "value": "#phone"})
                      ["value"].values()))
    firefox.command("WebDriver:SwitchToFrame", {"element": frame})
    try:
        # the frame's document may still be the initial about:blank (no #app yet) right after the switch
        firefox.wait("document.querySelector('#app')?.hidden === false")
        assert firefox.js("return innerWidth") == 390
        firefox.upload("#take-a input.file", clip)
        firefox.wait("document.querySelector('#take-a .status-text.done')")
        assert firefox.table("a") == expected(server.analyze(clip.name, clip.read_bytes()).json())
        assert firefox.js("return document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    finally:
        firefox.command("WebDriver:SwitchToParentFrame")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = firefox.command("WebDriver:TakeScreenshot", {"id": frame, "full": False})["value"]
    (ARTIFACTS / "page-firefox-phone.png").write_bytes(base64.b64decode(png))


def test_recording_in_firefox(firefox, server):
    firefox.command("WebDriver:Navigate", {"url": server.url + "/"})
    firefox.wait("!document.querySelector('#app').hidden")
    firefox.js("document.querySelector('#take-a .record').click()")
    firefox.wait("document.querySelector('#take-a .record.recording')", timeout=10)
    time.sleep(3.5)
    firefox.js("document.querySelector('#take-a .record').click()")
    status = firefox.wait("document.querySelector('#take-a .status-text.done')?.textContent || "
                          "document.querySelector('#take-a .take-error:not([hidden])')?.textContent")
    assert status.startswith("recording-A."), status
    assert len(firefox.table("a")) == 19
