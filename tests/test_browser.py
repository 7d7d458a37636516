"""The page in a real browser (Debian's chromium + chromium-driver through selenium): it uploads a digit photo,
draws a digit on the canvas and reads both answers from the page, lays a segmenter's mask exactly over a smear,
reaches every control with the Tab key and renders the API docs without the internet. Screenshots of the answers
are kept as artifacts in runs/test-artifacts/ (or $OCULA_TEST_ARTIFACTS). Skips with the reason when the browser
is not installed."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import ocula

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SAMPLES = Path(ocula.__file__).parent / "samples"
ARTIFACTS = Path(os.environ.get("OCULA_TEST_ARTIFACTS",
                               Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"))

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    """A folder of synthetic smears and a tiny segmenter trained on it (smears/segment.ocula)."""
    import shutil as sh

    import synthetic

    root = tmp_path_factory.mktemp("browser")
    data = synthetic.mask_folder(root / "smears")
    model = ocula.train(str(data), "unet", runs_dir=root / "runs", progress=False, threads=1, epochs=8,
                        batch_size=4, lr=1e-2, crop=32, arch_args={"widths": [4, 8, 16]}, cell_diameter=24)
    sh.copy(model.path, data / "segment.ocula")
    return data


@pytest.fixture(scope="module")
def server_url(smears):
    """`ocula serve` with the bundled digit model and the tiny segmenter, on 127.0.0.1 in a thread."""
    import uvicorn

    from ocula.serve.app import create_app
    from ocula.serve.models import load_served
    from ocula.weights import DIGIT_MODEL

    port = free_port()
    app = create_app(load_served([DIGIT_MODEL, smears / "segment.ocula"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def answer_of(browser, source: str, seconds: float = 20) -> str:
    """The label the page shows once it has answered for `source` ('photo' or 'drawing')."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver):
        error = driver.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error: {error.text}")
        answer = driver.find_element(By.ID, "answer")
        labels = answer.find_elements(By.ID, "label")
        return labels[0].text if labels and answer.get_attribute("data-source") == source else False

    # The page replaces the previous answer when the next one arrives, which can stale an element just found.
    return WebDriverWait(browser, seconds, ignored_exceptions=[StaleElementReferenceException]).until(shown)


def test_the_page_reads_an_uploaded_photo_and_a_drawn_digit(browser, server_url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get(server_url)
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "digit-4.jpg"))
    assert answer_of(browser, "photo") == "4"
    stages = browser.find_elements(By.CSS_SELECTOR, "#answer .stages img")
    assert len(stages) >= 5 and all(img.get_attribute("naturalWidth") != "0" for img in stages)
    browser.save_screenshot(str(ARTIFACTS / "page-photo.png"))

    pad = browser.find_element(By.ID, "pad")
    size = pad.size["height"]
    # A "7": the bar left to right, then the stroke down to the bottom left (offsets from the pad's centre).
    (ActionChains(browser).move_to_element_with_offset(pad, -size // 4, -size // 3).click_and_hold()
     .move_by_offset(size // 2, 0).move_by_offset(-size // 6, size // 3).move_by_offset(-size // 8, size // 3)
     .release().perform())
    browser.find_element(By.ID, "pad-read").click()
    assert answer_of(browser, "drawing") == "7"
    browser.save_screenshot(str(ARTIFACTS / "page-drawing.png"))

    browser.set_window_size(390, 844)  # a phone: everything fits the width, nothing scrolls sideways
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(ARTIFACTS / "page-phone.png"))


def test_the_page_lays_the_mask_over_a_smear(browser, server_url, smears):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.set_window_size(1000, 1200)
    browser.get(server_url)
    Select(browser.find_element(By.ID, "model")).select_by_value("segment")
    assert not browser.find_element(By.ID, "draw-panel").is_displayed()  # no drawing pad for smears
    browser.find_element(By.ID, "file").send_keys(str(smears / "images" / "s0.png"))
    assert answer_of(browser, "photo").endswith(("cell", "cells"))
    picture, mask = browser.find_elements(By.CSS_SELECTOR, "#answer .picture img")
    assert mask.get_attribute("alt") == "the predicted mask"
    assert (mask.rect["x"], mask.rect["y"], mask.size) == (picture.rect["x"], picture.rect["y"], picture.size)
    assert browser.find_elements(By.CSS_SELECTOR, "#answer table")  # the counts and the cell table
    trained = ocula.load(smears / "segment.ocula").info.preprocess["training_cell_diameter"]
    scale = browser.find_element(By.ID, "scale").text  # a blood model says what cell size it assumed
    assert scale.startswith(f"scale unknown: assumed white cells {trained:.1f} px")
    browser.save_screenshot(str(ARTIFACTS / "page-smear.png"))


def test_the_api_docs_render_without_the_internet(browser, server_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server_url}/docs")
    paths = WebDriverWait(browser, 20).until(
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")] or False)
    assert "/v1/predict" in paths and "/v1/models" in paths


def test_every_control_is_reached_with_the_tab_key(browser, server_url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(server_url)
    reached = []
    for _ in range(10):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.execute_script("return document.activeElement.id"))
    for control in ("model", "drop", "file", "camera-start", "pad-read", "pad-clear"):
        assert control in reached, (control, reached)
