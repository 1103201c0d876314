"""The web page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

Upload an image, ask, wait for the streamed answer, ask a follow-up: both answers equal the API's for
the same conversation. A screenshot is kept in runs/test-artifacts/serve_page.png.
"""

import shutil
from pathlib import Path

import pytest
from test_serve_utils import QUESTIONS, image_message, make_images, make_model_dir, running_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "runs" / "test-artifacts"

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[serve]')"
)
openai = pytest.importorskip("openai")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        "chromium is not installed: apt-get install -y chromium chromium-driver (.ci/run does it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with both paths given, selenium downloads nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _answers(driver) -> list:
    return driver.find_elements("css selector", ".assistant[data-state=done], .error[data-state=error]")


def test_page_streams_the_api_answer_and_keeps_the_conversation(browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir = make_model_dir(tmp_path)
    image = make_images(tmp_path / "images")[0]
    with running_server(model_dir) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        wait = WebDriverWait(browser, 180)
        browser.get(server.url + "/")
        wait.until(lambda d: d.find_element("id", "model").text == "tiny")
        browser.find_element("id", "image").send_keys(str(image))
        wait.until(lambda d: d.find_element("id", "preview").is_displayed())
        answers = []
        for question in (QUESTIONS[0], "Are you sure?"):
            browser.find_element("id", "question").send_keys(question)
            browser.find_element("id", "send").click()
            n_done = len(answers) + 1
            wait.until(lambda d, n=n_done: len(_answers(d)) == n)
            last = _answers(browser)[-1]  # textContent: the text exactly, not as laid out
            answers.append(
                browser.execute_script("return arguments[0].querySelector('span').textContent", last)
            )
        shot = tmp_path / "serve_page.png"
        browser.save_screenshot(str(shot))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ARTIFACTS / shot.name)

        first = [image_message(image, QUESTIONS[0])]
        api_first = client.chat.completions.create(model="tiny", messages=first, temperature=0)
        follow = [
            *first,
            {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "Are you sure?"},
        ]
        api_second = client.chat.completions.create(model="tiny", messages=follow, temperature=0)
        assert answers == [api_first.choices[0].message.content, api_second.choices[0].message.content]
        assert all(answers)
        assert (
            len(browser.find_elements("css selector", ".user img")) == 1
        )  # the image went with turn one only
        assert server.engine.stats()["batches"] >= 4
