"""The web chat page in headless Chromium, in every state a user meets: empty, image loaded, streaming, an answer
with grounding boxes drawn, a tool call, an error, a narrow window, an API key, and a NaFlex model's image settings
(fixed-resolution models have none). Each state is checked for what a user would see wrong (text outside its box, a
control off screen) and kept as a screenshot (folder printed; set N2EYE_SCREENSHOTS to choose it)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from test_server import EXAMPLES, Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
selenium = pytest.importorskip("selenium", reason="selenium comes with the [dev] extra")

BOXES = '[{"label": "circle", "bbox": [0.2, 0.2, 0.8, 0.8]}]'


def _script(engine, monkeypatch):
    """The model answers; for a 'Detect' question it is scripted to answer with boxes, with a tool call when tools
    are offered, and 'slowly' holds its answer half-way until `engine.release` is set (the tiny models can do none
    of these on cue); the page and the server are what is tested. `engine.image_settings_seen` lists the image
    settings each chat call got from the server."""
    original = engine.chat
    engine.release = threading.Event()

    def slow():
        yield "The circle "
        engine.release.wait(60)
        yield "is red."

    engine.image_settings_seen = []

    def chat(messages, tools=None, stream=False, **options):
        engine.image_settings_seen.append(options.get("image_settings"))
        last = messages[-1]["content"]
        text = last if isinstance(last, str) else " ".join(i.get("text", "") for i in last if i.get("type") == "text")
        if messages[-1]["role"] == "user" and tools:
            return iter(['<|tool_call_start|>[lookup_price(item="red circle")]<|tool_call_end|>'])
        if "Detect" in text:
            return iter([BOXES[:20], BOXES[20:]])
        if "slowly" in text:
            return slow()
        if "briefly" in text:
            return iter(["A red circle."])
        return original(messages, tools=tools, stream=stream, **options)

    monkeypatch.setattr(engine, "chat", chat)
    return engine


@pytest.fixture
def scripted_engine(trained_tiny, monkeypatch):
    """The trained tiny model (a fixed-resolution encoder: no image settings), scripted."""
    import n2eye

    return _script(n2eye.load(trained_tiny), monkeypatch)


@pytest.fixture
def scripted_naflex(naflex_checkpoint, monkeypatch):
    """A tiny NaFlex checkpoint (LFM2-VL's image policy: 64-256 tokens per image or tile, splitting on), scripted."""
    import n2eye

    return _script(n2eye.load(naflex_checkpoint), monkeypatch)


def _rect(driver, selector: str) -> dict:
    return driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, height: r.height};",
        selector,
    )


def _inside(inner: dict, outer: dict) -> bool:
    return (inner["left"] >= outer["left"] - 0.5 and inner["right"] <= outer["right"] + 0.5
            and inner["top"] >= outer["top"] - 0.5 and inner["bottom"] <= outer["bottom"] + 0.5)  # fmt: skip


def _fits_the_window(driver) -> bool:
    """No horizontal scrolling, and the prompt box and Send button in view."""
    width = driver.execute_script("return window.innerWidth")
    scroll = driver.execute_script("return document.documentElement.scrollWidth")
    return scroll <= width and all(_rect(driver, s)["right"] <= width for s in ("#prompt", "#form button"))


def test_web_chat_in_every_state(scripted_engine, scripted_naflex, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    server = Server(scripted_engine, max_image_pixels=200 * 200)
    shots = Path(os.environ.get("N2EYE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,700"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def shot(name: str) -> None:
        driver.save_screenshot(str(shots / f"{name}.png"))
        assert (shots / f"{name}.png").stat().st_size > 5_000, name

    def ask(text: str) -> None:
        wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#form button").is_enabled())
        driver.find_element(By.ID, "prompt").send_keys(text)
        driver.find_element(By.CSS_SELECTOR, "#form button").click()

    def assistant_texts() -> list[str]:
        return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]

    try:
        driver.get(server.url + "/")
        # Empty: the hint sits inside the drop zone on at most two lines (it once rendered outside the box, one
        # word per line, clipped at the page's edge: the hidden canvas was shown beside it).
        hint, stage = _rect(driver, "#hint"), _rect(driver, "#stage")
        line = driver.execute_script("return parseFloat(getComputedStyle(document.getElementById('hint')).fontSize)")
        assert _inside(hint, stage) and hint["left"] >= 0, (hint, stage)
        assert hint["height"] <= 3 * line, f"the hint wraps to {hint['height'] / line:.1f} lines"
        assert not driver.find_element(By.ID, "canvas").is_displayed()
        assert driver.find_element(By.ID, "empty").is_displayed() and _fits_the_window(driver)
        # A fixed-resolution model: no image settings to offer, and the page says why (one closed line).
        wait_for(lambda: driver.find_element(By.ID, "imageopts").is_displayed())
        assert driver.find_element(By.CSS_SELECTOR, "#imageopts summary").text == "Image settings (fixed resolution)"
        driver.find_element(By.CSS_SELECTOR, "#imageopts summary").click()
        assert "one fixed resolution" in driver.find_element(By.ID, "imagenote").text
        assert not driver.find_element(By.ID, "maxtokens").is_displayed()
        driver.find_element(By.CSS_SELECTOR, "#imageopts summary").click()
        shot("1-empty")

        driver.find_element(By.ID, "file").send_keys(str(EXAMPLES / "red_circle.png"))
        wait_for(lambda: driver.find_element(By.ID, "canvas").is_displayed())
        assert not driver.find_element(By.ID, "hint").is_displayed()
        assert _inside(_rect(driver, "#canvas"), _rect(driver, "#side"))
        assert driver.execute_script("const s = document.getElementById('side'); return s.scrollHeight <= "
                                     "s.clientHeight"), "the side panel scrolls (and its image shrinks)"
        shot("2-image-loaded")

        ask("Tell me slowly: what colour is the circle?")  # streaming: half an answer shown, Send held
        wait_for(lambda: assistant_texts() and assistant_texts()[-1].startswith("The circle"))
        assert not driver.find_element(By.CSS_SELECTOR, "#form button").is_enabled()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.pending")
        shot("3-streaming")
        scripted_engine.release.set()
        wait_for(lambda: assistant_texts()[-1] == "The circle is red.")
        wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.pending"))

        ask("Detect all instances of: circle.")
        wait_for(lambda: BOXES in assistant_texts()[-1])
        orange = driver.execute_script(
            "const c = document.getElementById('canvas'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] > 230 && d[i+1] > 100 && d[i+1] < 140 && d[i+2] < 60) n++;"
            "return n;"
        )
        assert orange > 100, "the grounding box was not drawn over the image"
        shot("4-grounding")

        driver.find_element(By.ID, "tools").click()
        ask("How much is it?")
        wait_for(lambda: any("lookup_price" in e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.tool")))
        shot("5-tool-call")
        driver.find_element(By.ID, "tools").click()

        # Error: the server refuses an image over its --max-image-pixels; the page says why, in red, and goes on.
        big = tmp_path / "big.png"
        Image.new("RGB", (400, 400), (200, 40, 40)).save(big)
        driver.find_element(By.ID, "reset").click()
        driver.find_element(By.ID, "file").send_keys(str(big))
        time.sleep(0.5)
        ask("What colour is it?")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.error"))
        error = driver.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        assert error.startswith("Error: ") and "pixels" in error, error
        assert _inside(_rect(driver, ".msg.error"), _rect(driver, "#log"))
        shot("6-error")

        # Narrow window (a phone): the image above the chat, nothing off screen, and the chat still works.
        driver.set_window_size(420, 800)
        driver.find_element(By.ID, "reset").click()
        driver.find_element(By.ID, "file").send_keys(str(EXAMPLES / "red_circle.png"))
        ask("Detect all instances of: circle.")
        wait_for(lambda: BOXES in assistant_texts()[-1])
        assert _fits_the_window(driver), "the page scrolls sideways or hides its controls in a narrow window"
        assert _rect(driver, "#canvas")["bottom"] <= _rect(driver, "#log")["top"] + 1
        shot("7-narrow")
        assert all(not s for s in scripted_engine.image_settings_seen), "image settings sent to a fixed-res model"

        # A server started with --api-key: the page asks for the key, says so on a 401, and works once given.
        keyed = Server(scripted_engine, api_key="sesame")
        try:
            driver.set_window_size(1200, 700)
            driver.get(keyed.url + "/")
            wait_for(lambda: driver.find_element(By.ID, "apikey").is_displayed())
            ask("Detect all instances of: circle.")
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.error"))
            assert "API key" in driver.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
            driver.find_element(By.ID, "apikey").send_keys("sesame\t")
            ask("Detect all instances of: circle.")
            wait_for(lambda: BOXES in assistant_texts()[-1])
            shot("8-api-key")
        finally:
            keyed.stop()

        # A NaFlex model: the image settings show the server's defaults and limits; a request carries only those
        # the user changed; a value the server refuses shows its message.
        naflex = Server(scripted_naflex)
        try:
            driver.get(naflex.url + "/")
            wait_for(lambda: driver.find_element(By.ID, "imageopts").is_displayed())
            summary = driver.find_element(By.CSS_SELECTOR, "#imageopts summary")
            assert summary.text == "Image settings"  # closed: the chat keeps its room
            summary.click()
            wait_for(lambda: driver.find_element(By.ID, "maxtokens").is_displayed())
            max_tokens, min_tokens = driver.find_element(By.ID, "maxtokens"), driver.find_element(By.ID, "mintokens")
            split = driver.find_element(By.ID, "split")
            assert max_tokens.get_attribute("value") == max_tokens.get_attribute("max") == "256"
            assert min_tokens.get_attribute("value") == "64" and split.is_selected() and split.is_enabled()
            assert "at most 256" in driver.find_element(By.ID, "imagenote").text
            for control in (max_tokens, min_tokens, split):  # each one named by its label
                label = driver.execute_script("return arguments[0].labels[0].textContent", control)
                assert "image" in label, label
            driver.find_element(By.ID, "file").send_keys(str(EXAMPLES / "red_circle.png"))
            ask("What is it? Say it briefly.")
            wait_for(lambda: assistant_texts()[-1] == "A red circle.")
            assert scripted_naflex.image_settings_seen[-1] == {}, "unchanged settings are the server's: none sent"

            max_tokens.clear()
            max_tokens.send_keys("1000")  # over the server's 256: the server says so, the page shows it
            ask("And now, briefly?")
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.error"))
            error = driver.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
            assert error == ("Error: max_image_tokens 1000 is over this server's 256; a request may lower it, not "
                             "raise it."), error
            seen = len(scripted_naflex.image_settings_seen)
            assert seen == 1, "a refused request reached the model"

            max_tokens.clear()
            max_tokens.send_keys("64")
            split.click()
            assert summary.text == "Image settings (changed)"
            ask("And now, briefly?")
            wait_for(lambda: len(scripted_naflex.image_settings_seen) > seen)
            wait_for(lambda: assistant_texts()[-1] == "A red circle.")
            assert scripted_naflex.image_settings_seen[-1] == {"max_image_tokens": 64, "do_image_splitting": False}
            assert _fits_the_window(driver)
            shot("9-image-settings")
        finally:
            naflex.stop()
        print(f"screenshots: {shots}")
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
