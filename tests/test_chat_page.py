"""The server's chat page (GET /) in headless Chromium, driven by selenium against a real in-process server.

Needs selenium and Debian's chromium + chromium-driver (`.ci/chromium.sh` installs them); skipped where
any is missing. LAYERSTREAM_CHROMIUM / LAYERSTREAM_CHROMEDRIVER point at other binaries.
"""

import importlib.util
import os
import threading
import time
from contextlib import contextmanager

import pytest

CHROMIUM = os.environ.get("LAYERSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LAYERSTREAM_CHROMEDRIVER", "/usr/bin/chromedriver")


def _missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for what, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not os.access(path, os.X_OK):
            return f"no {what} at {path} (apt-get install chromium chromium-driver, or .ci/chromium.sh)"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"chat page test: {MISSING}")]


@pytest.fixture(scope="module")
def engine(embedded_store):
    from layerstream import AutoModel
    from layerstream.engine.scheduler import Engine

    return Engine(AutoModel.from_pretrained(embedded_store, progress=False), max_batch=4)


@contextmanager
def serving(engine, **kw):
    """A real uvicorn server of `build_app(engine, "smol", **kw)` on a free 127.0.0.1 port; yields its URL."""
    import uvicorn

    from layerstream.server.app import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(engine, "smol", **kw), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="chat-page-server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 30, "the server to start")
        assert server.started, "the server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(arg)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts.add_argument("--no-sandbox")   # Chromium refuses to run as root with its sandbox
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check, timeout: float, what: str, every: float = 0.02):
    """Poll `check()` until it returns something truthy (returned), or fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def by_id(driver, id_):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def set_value(driver, id_, value):
    el = by_id(driver, id_)
    el.clear()
    el.send_keys(str(value))


def transcript(driver):
    """[(class, text)] of the messages shown, oldest first."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#messages > *')].map(e => [e.className, e.textContent]);")


def last_reply(driver) -> str:
    msgs = transcript(driver)
    return msgs[-1][1] if msgs and msgs[-1][0] == "msg assistant" else ""


def idle(driver) -> bool:
    return by_id(driver, "stop").get_attribute("disabled") is not None and by_id(driver, "send").is_enabled()


def severe_logs(driver):
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_chat_page_streams_stops_and_clears(engine, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    d = browser
    with serving(engine) as url:
        d.get(url + "/")
        assert "smol" in d.title
        wait_for(lambda: by_id(d, "status").text == "Ready.", 10, "the model list (status 'Ready.')")
        assert by_id(d, "model").text == "smol"
        assert idle(d), "Stop must be disabled and Send enabled before anything streams"
        # plenty of tokens, greedy, so the reply is still streaming when Stop is pressed
        set_value(d, "max-tokens", 1000)
        set_value(d, "temperature", 0)
        by_id(d, "prompt").send_keys("Write a long story about a dragon who learns to bake bread.", Keys.ENTER)

        lengths = set()

        def grown():
            n = len(last_reply(d))
            if n:
                lengths.add(n)
            return len(lengths) >= 2

        wait_for(grown, 30, "the assistant's reply to stream (two different lengths)")
        assert by_id(d, "stop").is_enabled() and not by_id(d, "send").is_enabled()
        by_id(d, "stop").click()
        wait_for(lambda: idle(d), 5, "Stop to end the reply (Stop disabled, Send enabled)")
        partial = last_reply(d)
        assert partial, "the partial reply must stay in the conversation"
        assert by_id(d, "status").text == "Stopped."
        # the server cancels the abandoned request, and nothing more arrives
        wait_for(lambda: engine.pending() == 0, 10, "the server to cancel the stopped request")
        time.sleep(0.5)
        assert last_reply(d) == partial
        assert [c for c, _ in transcript(d)] == ["msg user", "msg assistant"]

        # a short second turn, run to its end: tokens/s is shown
        set_value(d, "max-tokens", 4)
        by_id(d, "prompt").send_keys("Thanks! Now say hello in French.")
        by_id(d, "send").click()
        wait_for(lambda: by_id(d, "status").text.startswith("Done"), 30, "the second reply to finish")
        assert idle(d)
        tps = by_id(d, "tps").text
        assert float(tps) > 0, f"#tps shows {tps!r}"
        msgs = transcript(d)
        assert [c for c, _ in msgs] == ["msg user", "msg assistant"] * 2
        assert msgs[1][1] == partial and msgs[3][1]
        assert by_id(d, "prompt").get_attribute("value") == ""

        shot = tmp_path / "chat.png"
        assert d.save_screenshot(str(shot))
        assert shot.exists() and shot.stat().st_size > 0

        by_id(d, "new-chat").click()
        assert transcript(d) == []
        assert by_id(d, "tps").text == "–"
        # everything the page loaded came from the server itself (no CDN, no fonts)
        loaded = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        assert all(u.startswith(url + "/") for u in loaded), loaded
        assert severe_logs(d) == []


def test_chat_page_reports_a_wrong_api_key(engine, browser):
    d = browser
    with serving(engine, api_key="k") as url:
        d.get(url + "/")
        status = by_id(d, "status")
        wait_for(lambda: "error" in status.get_attribute("class"), 10, "the 401 of /v1/models shown in #status")
        assert "API key" in status.text
        set_value(d, "api-key", "wrong")
        by_id(d, "prompt").send_keys("Hello")
        by_id(d, "send").click()
        wait_for(lambda: status.text.startswith("Error: 401"), 10, "the 401 of the chat request shown in #status")
        assert "API key" in status.text and "error" in status.get_attribute("class")
        # the failed turn is undone: nothing in the conversation, the message back in the box to resend
        assert transcript(d) == [] and idle(d)
        assert by_id(d, "prompt").get_attribute("value") == "Hello"

        set_value(d, "api-key", "k")
        by_id(d, "prompt").click()   # leaving the key field stores it and re-checks the model
        wait_for(lambda: status.text == "Ready.", 10, "the right key to be accepted by /v1/models")
        assert d.execute_script("return localStorage.getItem('layerstream.apiKey');") == "k"
        d.refresh()   # the key is remembered
        wait_for(lambda: by_id(d, "status").text == "Ready.", 10, "the stored key to be used after a reload")
        assert by_id(d, "api-key").get_attribute("value") == "k"
