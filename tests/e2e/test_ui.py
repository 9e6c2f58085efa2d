"""/ui in a real browser (Debian's chromium, headless, driven by playwright) against the real
Ray Serve instance: the status shows the served model, a chat answer streams in token by
token, and an SFT job submitted from the form completes and its adapter appears in the list.

Without chromium or the playwright package these tests skip, unless KILN_REQUIRE_BROWSER=1
(CI) turns that into a failure. The page's screenshot is written to build/test-artifacts/ui.png
(build/ is git-ignored), or to $KILN_TEST_ARTIFACTS/ui.png when that is set.
"""

import os
import re
import time
from pathlib import Path

import pytest

# chromium first: without a browser the tests skip (or fail) before Ray Serve is started for them.
pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.usefixtures("chromium")]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADAPTER = "ui-e2e"


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set KILN_CHROMIUM)"
    return None


@pytest.fixture(scope="module")  # sync_playwright keeps an event loop running on this thread until it exits
def chromium():
    missing = _missing_browser()
    if missing:
        if os.environ.get("KILN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KILN_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # a fresh profile
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(chromium, serve_app):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.problems = []  # uncaught exceptions and console errors of the page
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
    page.goto(f"{serve_app}/ui")
    yield page
    context.close()


def artifact_path() -> Path:
    folder = Path(os.environ.get("KILN_TEST_ARTIFACTS") or ROOT / "build" / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "ui.png"


def test_status_shows_the_served_model(page, model_id):
    from playwright.sync_api import expect

    expect(page.get_by_test_id("status-model")).to_have_text(model_id)
    expect(page.get_by_test_id("health-state")).to_have_text("healthy")
    expect(page.get_by_test_id("status-device")).to_have_text("cpu")
    expect(page.get_by_test_id("status-dtype")).to_have_text("bfloat16")
    expect(page.get_by_test_id("status-memory-engine")).to_contain_text("rss")
    expect(page.get_by_test_id("status-memory-trainer")).to_contain_text("rss")
    expect(page.get_by_test_id("status-kv")).to_have_text(re.compile(r"^\d+ / [1-9]\d* \("))


def test_a_chat_answer_streams_in_token_by_token(page):
    from playwright.sync_api import expect

    # Record the answer's length at every change of the chat log, to see it grow while streaming.
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll('[data-testid=chat-assistant]')].pop();
            if (answer && answer.dataset.state === 'streaming') window.answerLengths.push(answer.textContent.length);
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_test_id("chat-temperature").fill("0")
    page.get_by_test_id("chat-max-tokens").fill("48")
    page.get_by_test_id("chat-input").fill("Tell me about the ocean.")
    page.get_by_test_id("chat-send").click()
    answer = page.locator("[data-testid=chat-assistant]").last
    expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    assert answer.inner_text().strip()
    growing = sorted(set(n for n in page.evaluate("window.answerLengths") if n > 0))
    assert len(growing) >= 3, growing  # several partial answers were on screen before the end
    expect(page.get_by_test_id("chat-error")).to_be_hidden()
    expect(page.get_by_test_id("chat-stats")).to_contain_text("first token after")


def test_the_page_reads_the_servers_metrics(page):
    """The page's own Prometheus parser, on the server's /metrics after the chat above."""
    totals = page.evaluate("""async () => {
        const { parsePrometheus, total } = await import('/ui/metrics.js');
        const samples = parsePrometheus(await (await fetch('/metrics')).text());
        return [total(samples, 'kiln_generation_tokens_total'), total(samples, 'kiln_time_to_first_token_seconds_count')];
    }""")
    assert totals[0] > 0 and totals[1] >= 1, totals


def test_an_sft_job_from_the_form_completes_and_its_adapter_is_listed(page):
    from playwright.sync_api import expect

    started = time.time()
    page.get_by_test_id("sft-adapter").fill(ADAPTER)
    page.get_by_test_id("sft-steps").fill("4")  # the prefilled sample: one Zorblatt correction
    page.get_by_test_id("sft-submit").click()
    expect(page.get_by_test_id("train-result")).to_contain_text("submitted job-")
    job_id = page.get_by_test_id("train-result").inner_text().split()[1]
    job = page.locator(f"[data-testid=job-row][data-job-id='{job_id}']")
    expect(job).to_have_attribute("data-state", "completed", timeout=120_000)
    expect(page.get_by_test_id("loss-title")).to_contain_text(f"{job_id} · {ADAPTER} · completed")
    adapter = page.locator(f"[data-testid=adapter-row][data-name='{ADAPTER}']")
    expect(adapter).to_be_visible(timeout=20_000)
    expect(adapter.get_by_test_id("adapter-serving")).to_have_text("v1")
    expect(page.locator(f"[data-testid=chat-model] option[value='{ADAPTER}']")).to_have_count(1)
    print(f"\nSFT job from the form: completed and listed {time.time() - started:.1f} s after submission")
    page.wait_for_timeout(2_500)  # one more metrics poll, so the charts have a recent point
    shot = artifact_path()
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert page.problems == []
