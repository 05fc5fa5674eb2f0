"""The web chat page in headless Chromium: upload an image, chat with streaming, see a tool call and grounding
boxes drawn over the image. Keeps a screenshot (path printed; set N2EYE_SCREENSHOT to choose it)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_server import EXAMPLES, Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
selenium = pytest.importorskip("selenium", reason="selenium comes with the [dev] extra")

BOXES = '[{"label": "circle", "bbox": [0.2, 0.2, 0.8, 0.8]}]'


@pytest.fixture
def scripted_engine(trained_tiny, monkeypatch):
    """The tiny model answers; for a 'Detect' question it is scripted to answer with boxes, and with a tool call
    when tools are offered (the tiny model can do neither); the page and the server are what is tested."""
    import n2eye

    engine = n2eye.load(trained_tiny)
    original = engine.chat

    def chat(messages, tools=None, stream=False, **options):
        last = messages[-1]["content"]
        text = last if isinstance(last, str) else " ".join(i.get("text", "") for i in last if i.get("type") == "text")
        if messages[-1]["role"] == "user" and tools:
            return iter(['<|tool_call_start|>[lookup_price(item="red circle")]<|tool_call_end|>'])
        if "Detect" in text:
            return iter([BOXES[:20], BOXES[20:]])
        return original(messages, tools=tools, stream=stream, **options)

    monkeypatch.setattr(engine, "chat", chat)
    return engine


def test_web_chat_in_headless_chromium(scripted_engine, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    server = Server(scripted_engine)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(EXAMPLES / "red_circle.png"))
        wait_for(lambda: driver.execute_script("return document.getElementById('canvas').width") > 0)

        def ask(text: str) -> None:
            box = driver.find_element(By.ID, "prompt")
            box.send_keys(text)
            driver.find_element(By.CSS_SELECTOR, "#form button").click()

        ask("What colour is the shape?")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
                 and driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].text.strip() != "")  # fmt: skip
        ask("Detect all instances of: circle.")
        wait_for(lambda: BOXES in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        orange = driver.execute_script(
            "const c = document.getElementById('canvas'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] > 230 && d[i+1] > 100 && d[i+1] < 140 && d[i+2] < 60) n++;"
            "return n;"
        )
        assert orange > 100, "the grounding box was not drawn over the image"
        driver.find_element(By.ID, "tools").click()
        ask("How much is it?")
        wait_for(lambda: any("lookup_price" in e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.tool")))
        shot = Path(os.environ.get("N2EYE_SCREENSHOT", tmp_path / "web-chat.png"))
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
        server.stop()


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the page")
