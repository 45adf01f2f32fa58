"""The page of `minisd serve` in a real browser: Debian's chromium, headless, driven by playwright with the system
browser (never `playwright install`). It loads without console errors, a prompt produces the image and one
preview per step, the CFG comparison shows three images, and the attention tab draws a chosen word's map.
Screenshots are written to the test's tmp dir."""
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (tests/run.sh tries `apt-get install chromium`)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from minisd.serve import start_in_thread  # noqa: E402
from minisd.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 6


@pytest.fixture(scope="module")
def page(one_thread, tmp_path_factory):
    """The tiny model's server and a fresh chromium on its page; the console's errors collected."""
    srv, url = start_in_thread(create_app({"minisd-tiny": None}, prepack=False, log=lambda *_: None))
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=ARGS,
                                                       headless=True)
        tab = browser.new_page()
        tab.errors = []
        tab.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
        tab.on("pageerror", lambda e: tab.errors.append(str(e)))
        tab.set_default_timeout(60_000)
        tab.goto(url + "/")
        tab.wait_for_function("document.querySelectorAll('#sampler option').length > 5")
        yield tab
        browser.close()
    srv.should_exit = True


def test_page_loads_without_console_errors(page, tmp_path):
    assert page.title().startswith("minisd")
    assert page.locator("#sampler").input_value() == "DPM++ 2M"
    page.screenshot(path=str(tmp_path / "loaded.png"))
    assert page.errors == []


def test_a_prompt_gives_the_image_and_a_preview_per_step(page, tmp_path):
    page.fill("#steps", str(STEPS))
    page.fill("#seed", "5")
    page.click("#run")
    page.wait_for_function("document.querySelector('#params').value.length > 0")
    assert page.locator("#strip img.preview").count() >= STEPS
    assert page.locator("#result").get_attribute("src").startswith("data:image/png;base64,")
    params = page.locator("#params").input_value()
    assert params.startswith("a red circle on a blue background\nSteps: 6, Sampler: DPM++ 2M") and "Seed: 5" in params
    assert page.locator("#live-caption").inner_text().startswith(f"step {STEPS}/{STEPS}, sigma ")
    titles = [page.locator("#strip img.preview").nth(i).get_attribute("title") for i in range(STEPS)]
    sigmas = [float(t.split("sigma ")[1]) for t in titles]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > 10 * sigmas[-1]   # noise level falls each step
    page.screenshot(path=str(tmp_path / "generated.png"), full_page=True)
    assert page.locator("#error").inner_text() == "" and page.errors == []


def test_learn_tab_compares_cfg_and_maps_a_word(page, tmp_path):
    page.fill("#steps", "3")
    page.click("#tab-learn")
    page.click("#cfg-run")
    page.wait_for_function("document.querySelectorAll('#cfg-row img').length === 3")
    page.click("#attention-run")
    page.wait_for_function("document.querySelectorAll('#words button').length > 0")
    words = page.locator("#words button").all_inner_texts()
    assert words[:3] == ["a", "red", "circle"]
    page.locator("#words button", has_text="red").click()
    assert page.locator("#attention").get_attribute("data-word") == "red"
    # the canvas shows the image under a map: many distinct colours, not one blank fill
    colours = page.evaluate("""() => {
        const data = document.querySelector('#attention').getContext('2d').getImageData(0, 0, 256, 256).data;
        const seen = new Set();
        for (let i = 0; i < data.length; i += 4) seen.add(data[i] << 16 | data[i + 1] << 8 | data[i + 2]);
        return seen.size; }""")
    assert colours > 100
    page.locator("#words button", has_text="blue").click()         # another word, another map over the same image
    canvas = "() => document.querySelector('#attention').getContext('2d').getImageData(0, 0, 256, 256).data" \
             ".reduce((sum, v, i) => (sum + v * (i % 9973 + 1)) % 1000000007, 0)"     # a checksum of the pixels
    blue = page.evaluate(canvas)
    page.locator("#words button", has_text="red").click()
    assert page.evaluate(canvas) != blue
    page.screenshot(path=str(tmp_path / "attention.png"), full_page=True)
    assert page.locator("#learn-error").inner_text() == "" and page.errors == []
