"""The Prefect UI in a real browser, on the end-to-end stack (conftest.py) and its one finished
`train-all-fusions/nightly` run: the run's page carries its readable name; its Artifacts tab lists
the summary, the metrics table, the key plots and one training progress per fusion, and each of
them shows its content (the summary's markdown, the table's rows, plot images that loaded, 100%);
the nightly deployment's "Run" page is a typed form; the run's report.html shows every plot.

The browser is the system's headless Chromium (Debian's `chromium` package: `make browser`, or
`apt-get install chromium`), driven by Playwright with a fresh profile; nothing downloads a browser
(no `playwright install`). Without chromium the test fails saying so; DEEPFAKE_SKIP_BROWSER=1
skips it instead. Screenshots go to a temporary folder, or to DEEPFAKE_SCREENSHOTS when set:

    DEEPFAKE_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest tests/e2e/test_browser.py
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from scripts import stack as stack_mod
from scripts.stack import StackState
from tests.e2e.conftest import BUCKET, RUN, bucket_keys

pytestmark = pytest.mark.e2e

FUSIONS = ("early", "mid", "late")
KEY_PLOTS = ("roc-curves", "det-curves", "metric-comparison", "reliability", "score-histograms")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_ENV = "DEEPFAKE_SKIP_BROWSER"  # "1": skip when chromium is missing, instead of failing
SHOTS_ENV = "DEEPFAKE_SCREENSHOTS"  # a folder for the screenshots (default: a temporary one)
TIMEOUT_MS = 60_000  # a page of the UI on a loaded 2-core machine


def chromium() -> str:
    """The system's Chromium; a clear failure (or a skip, when asked for) without it."""
    path = shutil.which("chromium")
    if path:
        return path
    message = (
        "chromium not found: the UI test drives Debian's headless Chromium; install it with "
        "`apt-get install chromium` (or `make browser`), never `playwright install`; "
        f"{SKIP_ENV}=1 skips this test instead"
    )
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get(SHOTS_ENV)
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium context on a fresh profile; requests leave for 127.0.0.1, file: and
    data: URLs only (anything else is aborted and listed in `browser.blocked`)."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(TIMEOUT_MS)
        blocked: list[str] = []

        def local_only(route: Any) -> None:
            url = urlsplit(route.request.url)
            if url.scheme in {"file", "data"} or url.hostname == stack_mod.HOST:
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", local_only)
        context.blocked = blocked  # type: ignore[attr-defined]
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    yield page
    page.close()


def shoot(page: Any, path: Path) -> None:
    """A screenshot of the viewport once the page has stopped loading (the side panels too)."""
    page.wait_for_load_state("networkidle")
    page.screenshot(path=path)


def images_loaded(page: Any) -> list[int]:
    """naturalWidth of every <img> on the page, once each has finished loading."""
    page.wait_for_function("[...document.images].every(img => img.complete)")
    return list(page.evaluate("[...document.images].map(img => img.naturalWidth)"))


def artifact_links(page: Any, state: StackState, flow_run_id: str) -> dict[str, str]:
    """{artifact key: its page} from the flow run's Artifacts tab."""
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    panel = page.get_by_role("tabpanel")
    # The cards are in a virtual scroller, drawn once they come into view: scroll down to them.
    panel.get_by_text("Task runs", exact=True).scroll_into_view_if_needed()
    page.mouse.wheel(0, 500)
    cards = panel.locator("a[href^='/artifacts/artifact/']")
    cards.first.wait_for(state="attached")
    page.wait_for_load_state("networkidle")
    return {
        card.locator(".artifact-card__title").inner_text().strip(): state.ui_url
        + card.get_attribute("href")
        for card in cards.all()
    }


# --- tests ----------------------------------------------------------------------------------------


def test_flow_run_page_shows_every_artifact(
    stack: StackState, nightly_run: str, page: Any, shots: Path
) -> None:
    page.goto(f"{stack.ui_url}/runs/flow-run/{nightly_run}")
    title = page.get_by_text(re.compile(r"^nightly \d{4}-\d{2}-\d{2} "), exact=True).first
    title.wait_for()
    assert re.fullmatch(r"nightly \d{4}-\d{2}-\d{2} early,mid,late 1 epoch", title.inner_text())
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_text("train-all-fusions", exact=True).first.wait_for()
    shoot(page, shots / "flow-run.png")  # with the run graph drawn

    links = artifact_links(page, stack, nightly_run)
    expected = {
        "evaluation-summary",
        "evaluation-metrics",
        *(f"plot-{name}" for name in KEY_PLOTS),
        *(f"training-progress-{f}" for f in FUSIONS),
    }
    assert expected <= set(links), f"missing {expected - set(links)}; the tab lists {links}"
    shoot(page, shots / "flow-run-artifacts.png")

    page.goto(links["evaluation-summary"])  # the markdown, rendered
    page.get_by_role("heading", name=f"Evaluation of run {RUN}").wait_for()
    page.get_by_text("Champions:", exact=True).wait_for()
    assert page.get_by_role("table").count() >= 1  # the summary's metrics table
    for fusion in FUSIONS:
        assert page.get_by_role("cell", name=fusion, exact=True).count() >= 1, fusion
    shoot(page, shots / "artifact-evaluation-summary.png")

    page.goto(links["evaluation-metrics"])  # the table artifact: a row per fusion
    table = page.get_by_role("table")
    table.wait_for()
    headers = [h.strip() for h in table.get_by_role("columnheader").all_inner_texts()]
    assert {"fusion", "roc_auc", "eer", "accuracy"} <= set(headers), headers
    rows = [r.strip().split()[0] for r in table.get_by_role("row").all_inner_texts()[1:]]
    assert sorted(rows) == sorted(FUSIONS), rows
    shoot(page, shots / "artifact-evaluation-metrics.png")

    plots = sorted(key for key in links if key.startswith("plot-"))
    for key in plots:  # the image artifacts: a PNG that loaded
        page.goto(links[key])
        page.locator("img[src^='data:image/png']").first.wait_for()
        widths = images_loaded(page)
        assert widths and all(w > 0 for w in widths), f"{key}: image widths {widths}"
        if key == "plot-roc-curves":
            shoot(page, shots / "artifact-plot-roc-curves.png")

    for fusion in FUSIONS:  # each training's progress reached 100%
        page.goto(links[f"training-progress-{fusion}"])
        page.get_by_text(f"{fusion}, run {RUN}: 1/1 epochs done").wait_for()
        page.get_by_text("Progress: 100%", exact=True).wait_for()
    shoot(page, shots / "artifact-training-progress.png")


def test_nightly_run_form_is_typed(stack: StackState, page: Any, shots: Path) -> None:
    """The deployment's "Run" page: one field per parameter, with its help; fusions a choice
    (a select, not free text), epochs a number."""
    with stack_mod.prefect_client(stack) as client:
        deployment = client.read_deployment_by_name("train-all-fusions/nightly")
    page.goto(f"{stack.ui_url}/deployments/deployment/{deployment.id}/run")

    def field(name: str) -> Any:
        label = page.get_by_text(f"{name} (Optional)", exact=True)
        return page.locator("div.p-label.schema-form-property").filter(has=label).last

    for name in ("config_path", "overrides", "fusions", "epochs", "dataset_prefix"):
        field(name).wait_for()
    assert field("config_path").get_by_role("textbox").input_value() == "config/config.yaml"
    page.get_by_text("the fusions to train; empty: the config's training.fusions.").wait_for()
    epochs = field("epochs")
    epochs.get_by_role("button", name="int", exact=True).click()
    epochs.get_by_role("spinbutton").fill("2")  # <input type=number>
    assert epochs.get_by_role("spinbutton").get_attribute("type") == "number"
    fusions = field("fusions")
    fusions.get_by_role("button", name="list", exact=True).click()
    fusions.get_by_role("button", name="No items selected").wait_for()  # a select of the enum
    assert fusions.get_by_role("textbox").count() == 0
    shoot(page, shots / "deployment-run-form.png")


def test_report_shows_every_plot(
    stack: StackState, nightly_run: str, page: Any, shots: Path, tmp_path: Path
) -> None:
    """report.html from the bucket, opened from a file: one loaded image per plot of the run."""
    body = stack_mod.s3_client(stack).get_object(
        Bucket=BUCKET, Key=f"outputs/reports/{RUN}/report.html"
    )["Body"]
    report = tmp_path / "report.html"
    report.write_bytes(body.read())
    plots = fnmatch.filter(bucket_keys(stack), f"outputs/plots/{RUN}/*.png")
    assert len(plots) >= 19, plots

    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    widths = images_loaded(page)
    assert len(widths) == len(plots), f"{len(widths)} <img> in report.html, {len(plots)} plots"
    assert all(w > 0 for w in widths), f"images that did not load: {widths}"
    shoot(page, shots / "report.png")
