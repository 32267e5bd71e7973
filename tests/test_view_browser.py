"""`asl view` pages in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it), driven over the
Chrome DevTools Protocol on a pipe (--remote-debugging-pipe: no websocket, no port).

What a person sees is asserted: the token strip, the charts, the text a hover shows, the FAIL highlight; and what
they must not get: a console error, a network request, a script from a trace. A machine without chromium skips
these tests, saying so (in CI, where .ci/run installs it, its absence fails them). The pages come from the builders
in tests/test_view.py.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reference.oracle.bundle import check_trace
from reference.oracle.trace import load_trace
from reference.oracle.view import PAGE_TOKENS, Text, render_page, write_view
from test_view import (
    HOSTILE_NAME,
    HOSTILE_PIECES,
    hostile_checkpoint,
    hostile_trace,
    long_trace,
    planted_candidates,
    tiny_bundle,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="headless Chromium is not "
                                "installed (Debian's `chromium` package; .ci/run installs it with apt-get): the pages "
                                "are not opened in a browser")


# ---------------------------------------------------------------- a minimal DevTools client


def _high(fd: int) -> int:
    """The descriptor moved to 10 or above, clear of the 3 and 4 that Chromium is handed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium; commands and events over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated
    JSON)."""

    def __init__(self, width: int = 1320, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="asl-view-chromium-")
        to_chrome, self._out = (_high(fd) for fd in os.pipe())
        self._in, from_chrome = (_high(fd) for fd in os.pipe())
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps", "--mute-audio", "about:blank"]
        shell = f'exec 3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-; exec "$@"'
        self.proc = subprocess.Popen(["bash", "-c", shell, "chromium", *args], pass_fds=(to_chrome, from_chrome),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._id = 0
        self._cond = threading.Condition()
        self._replies: dict = {}
        self.events: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", page=True)
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _read(self):
        buf = b""
        while chunk := os.read(self._in, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    (self._replies.__setitem__(msg["id"], msg) if "id" in msg else self.events.append(msg))
                self._cond.notify_all()
        with self._cond:
            self._replies[None] = "closed"
            self._cond.notify_all()

    def call(self, method: str, page: bool = False, timeout: float = 30, **params):
        with self._cond:
            self._id += 1
            mid = self._id
        msg = {"id": mid, "method": method, "params": params} | ({"sessionId": self.session} if page else {})
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._replies or None in self._replies, timeout):
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            reply = self._replies.pop(mid, None)
        if reply is None:
            raise RuntimeError(f"Chromium closed before answering {method}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, path: Path, fragment: str = "", timeout: float = 60) -> float:
        """Load a page and wait for its load event; the seconds it took."""
        self.events.clear()
        start = time.perf_counter()
        self.call("Page.navigate", page=True, url=Path(path).resolve().as_uri() + fragment)
        with self._cond:
            if not self._cond.wait_for(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events),
                                       timeout):
                raise TimeoutError(f"{path} did not load within {timeout} s")
        return time.perf_counter() - start

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
        self.call("Input.dispatchMouseEvent", page=True, type=kind, x=x, y=y, **extra)

    def point(self, selector: str) -> tuple[float, float]:
        """The centre of the first element matching `selector`, scrolled into view."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                        "{block: 'center'}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, "
                        "r.y + r.height / 2, r.width, r.height]; })()")
        assert box[2] > 0 and box[3] > 0, f"{selector} is not visible"
        return box[0], box[1]

    def hover(self, selector: str) -> str:
        """Move the mouse over an element, as a person would; the inspector's text after it."""
        self.mouse("mouseMoved", *self.point(selector))
        return self.eval("document.getElementById('inspector').innerText")

    def click(self, selector: str) -> None:
        x, y = self.point(selector)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, the browser's own errors (a refused script among them)."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"{p['entry']['level']}: {p['entry']['text']}")
        return out

    def requests(self, page: Path) -> list[str]:
        """Every request the page made beyond loading itself."""
        own = Path(page).resolve().as_uri()
        return [u for e in self.events if e["method"] == "Network.requestWillBeSent"
                if (u := e["params"]["request"]["url"]) != own and not u.startswith(own + "#")]

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", page=True, format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        self._reader.join(timeout=5)  # Chromium is gone: its end of the pipe is closed, the reader sees EOF
        if not self._reader.is_alive():
            os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:  # only in CI, where .ci/run installs it: a missing browser there is a failure
        pytest.fail("CI has no chromium, though .ci/run installs it (apt-get install chromium)")
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict:
    """The pages a person would open: a run, a FAIL, a hostile trace, a 100K-token prompt."""
    root = tmp_path_factory.mktemp("browser")
    bundle = tiny_bundle(root / "bundle")
    candidates = planted_candidates(bundle, root / "candidate")
    long, long_arrays = long_trace()
    (root / "long.html").write_text(render_page(long, long_arrays, Text(None, "token ids")), encoding="utf-8")
    return {
        "bundle": bundle, "candidates": candidates,
        "run": write_view(bundle / "tiny-llama-asl.trace.json", root / "run.html"),
        "fail": write_view(candidates / "tiny-llama-asl.trace.json", root / "fail.html", golden=bundle),
        "hostile": write_view(hostile_trace(bundle, root), root / "hostile.html",
                              model=str(hostile_checkpoint(root / "ckpt"))),
        "long": root / "long.html", "long_trace": long,
    }


def _clean(browser: Browser, page: Path) -> None:
    assert browser.problems() == [], browser.problems()
    assert browser.requests(page) == [], browser.requests(page)


# ---------------------------------------------------------------- the tests


def test_the_browser_reports_errors_and_requests_when_there_are_some(browser, tmp_path):
    """The two 'nothing happened' assertions below can fail: a page that errs and loads an image is seen doing so."""
    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><img src="{(tmp_path / "missing.png").as_uri()}"><script>nope();</script>')
    browser.open(bad)
    time.sleep(0.2)
    assert any("nope" in p for p in browser.problems())
    assert any(u.endswith("missing.png") for u in browser.requests(bad))


def test_a_run_page_shows_the_strip_the_charts_and_a_tokens_ranks_on_hover(browser, pages):
    page = pages["run"]
    trace, arrays = load_trace(pages["bundle"] / "tiny-llama-asl.trace.json")
    browser.open(page)
    assert browser.eval("document.body.dataset.ready") == "1"
    N, sel = trace["num_prompt_tokens"], trace["select_layer"]
    assert browser.eval("document.querySelectorAll('#strip .t').length") == N
    kept = browser.eval("[...document.querySelectorAll('#strip .t.kept')].map(e => +e.dataset.i)")
    assert kept == trace["kept_positions"]
    assert browser.eval("document.querySelectorAll('#strip .t.win').length") == trace["params"]["window"]
    charts = browser.eval("[...document.querySelectorAll('svg.chart')].map(s => [s.getAttribute('aria-label'), "
                          "s.getBoundingClientRect().width, s.getBoundingClientRect().height])")
    assert [c[0] for c in charts] == ["Tokens per layer", "ASL ratio against tau"] and all(c[1] > 300 and c[2] > 80
                                                                                            for c in charts)
    assert f"fired at layer {sel}" in browser.eval("document.querySelector('svg[aria-label^=ASL]').textContent")
    q = trace["kept_positions"][0]
    text = browser.hover(f'#strip .t[data-i="{q}"]')
    rank = int(arrays[f"ranks/{sel}"][q])
    assert f"position {q} · token id {trace['prompt_ids'][q]}" in text and f"kept at layer {sel}" in text
    assert f"layer {sel} (decided)\t{rank}\t" in text and f"rank (of {N - trace['params']['window']})" in text, text
    scored = [e["layer"] for e in trace["layers"] if e["scored"]]
    assert all(f"layer {layer}" in text for layer in scored)
    dropped = next(i for i in range(N) if i not in set(trace["kept_positions"]))
    assert f"dropped at layer {sel}" in browser.hover(f'#strip .t[data-i="{dropped}"]')
    _clean(browser, page)


def test_a_fail_page_highlights_what_each_side_kept_and_says_why(browser, pages):
    page = pages["fail"]
    result = check_trace(pages["bundle"] / "tiny-llama-asl.trace.json",
                         pages["candidates"] / "tiny-llama-asl.trace.json")
    expected, _ = load_trace(pages["bundle"] / "tiny-llama-asl.trace.json")
    got, _ = load_trace(pages["candidates"] / "tiny-llama-asl.trace.json")
    browser.open(page)
    assert browser.eval("document.getElementById('verdict').innerText") == "FAIL"
    assert browser.eval("document.getElementById('first-field').innerText") == result.findings[0].field
    only_o = browser.eval("[...document.querySelectorAll('#strip .t.only-o')].map(e => +e.dataset.i)")
    only_c = browser.eval("[...document.querySelectorAll('#strip .t.only-c')].map(e => +e.dataset.i)")
    assert only_o == sorted(set(expected["kept_positions"]) - set(got["kept_positions"]))
    assert only_c == sorted(set(got["kept_positions"]) - set(expected["kept_positions"]))
    focus = result.findings[0].position
    assert browser.eval("[...document.querySelectorAll('#strip .t.focus')].map(e => +e.dataset.i)") == [focus]
    text = browser.hover(f'#strip .t[data-i="{only_o[0]}"]')
    assert "kept only by the oracle" in text and "place(s)" in text and "from the boundary score" in text
    assert "kept only by the candidate" in browser.hover(f'#strip .t[data-i="{only_c[0]}"]')
    browser.click("#goto-focus")
    assert browser.eval("[...document.querySelectorAll('#strip .t.pinned')].map(e => +e.dataset.i)") == [focus]
    assert f"position {focus} ·" in browser.eval("document.getElementById('inspector').innerText")
    _clean(browser, page)


def test_markup_from_a_trace_or_a_tokenizer_is_shown_as_text_and_runs_nothing(browser, pages):
    page = pages["hostile"]
    browser.open(page)
    time.sleep(0.2)
    assert browser.eval("typeof window.__pwned") == "undefined"
    assert browser.eval("document.querySelectorAll('img, marquee, script:not([id]) ~ script').length") == 0
    assert browser.eval("document.scripts.length") == 2
    title = browser.eval("document.querySelector('h1').textContent")
    assert title.startswith("asl on " + HOSTILE_NAME.replace("\x1b", "\\x1b"))
    strip = browser.eval("document.getElementById('strip').textContent")
    assert HOSTILE_PIECES[0] in strip and "</script><script>window.__pwned=3</script>" in strip
    assert "\\x1b[31mred\\x00" in strip, "control characters are shown, not sent to the screen"
    text = browser.hover('#strip .t[data-i="0"]')
    assert HOSTILE_PIECES[0] in text
    _clean(browser, page)


def test_a_100k_token_prompt_opens_pages_and_scrolls(browser, pages):
    page, trace = pages["long"], pages["long_trace"]
    N = trace["num_prompt_tokens"]
    seconds = browser.open(page)
    assert seconds < 10, f"the 100K-token page took {seconds:.1f} s to load"
    assert browser.eval("document.querySelectorAll('#strip .t').length") == PAGE_TOKENS
    assert browser.eval("document.getElementById('page-label').innerText").startswith(f"tokens 0–{PAGE_TOKENS - 1} "
                                                                                      f"of {N}")
    start = time.perf_counter()
    browser.click("#next")
    assert browser.eval("document.getElementById('page-label').innerText").startswith(
        f"tokens {PAGE_TOKENS}–{2 * PAGE_TOKENS - 1}")
    browser.eval("const s = document.getElementById('strip'); s.scrollTop = s.scrollHeight")
    assert browser.eval("document.getElementById('strip').scrollTop") > 0
    browser.eval("const g = document.getElementById('goto'); g.value = 99999; g.dispatchEvent(new Event('change'))")
    assert browser.eval("[...document.querySelectorAll('#strip .t.pinned')].map(e => +e.dataset.i)") == [N - 1]
    browser.click(".overview .bin")
    assert browser.eval("document.getElementById('page-label').innerText").startswith("tokens 0–")
    assert time.perf_counter() - start < 5
    text = browser.hover('#strip .t[data-i="7"]')
    assert "position 7" in text and "layer 4 (decided)" in text
    _clean(browser, page)
    assert np.frombuffer(browser.screenshot()[:8], np.uint8).tolist() == [137, 80, 78, 71, 13, 10, 26, 10]
