"""The MLflow UI as a person sees it: headless Chromium against the store of a reproduced project.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver);
skipped without them. Screenshots land in the test's tmp folder (runs.png, val_acc.png).
"""

import shutil
from pathlib import Path

import pytest

from pipeline.tracking.store import Tracking, runs_page
from tests.conftest import project_client, run, variant_run_ids
from tests.mlflow_server import start_server, stop
from tests.shared_project import reproduced_project

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
    pytest.mark.timeout(600),
]
WAIT_S = 30


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_mirror):
    """(server uri, project path) with `mlflow server` serving the project's own store."""
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    # The shared project's queued experiments (test_queue, when it ran first in this process) each
    # ran a compare that took the workspace's unchanged variant run as its child: the workspace's
    # variants may sit under two compare runs. A compare of the workspace groups them again.
    run(["dvc", "repro", "--force", "--single-item", "compare"], path, env, timeout=180)
    folder = tmp_path_factory.mktemp("ui_server")
    process, uri = start_server(folder, f"sqlite:///{path / 'mlflow.db'}")
    yield uri, path
    stop(process)


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium", reason="pip install selenium (the project's `test` extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_runs_grouped_under_compare_and_a_val_acc_chart(ui, browser, tmp_path):
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    uri, path = ui
    wait = WebDriverWait(browser, WAIT_S)
    client = project_client(path)
    variant_ids = {v: variant_run_ids(client, path, v) for v in ("batchnorm", "no_norm")}
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    group_id = client.get_run(variant_ids["batchnorm"]["variant"]).data.tags["mlflow.parentRunId"]

    def click(element_or_locator) -> None:
        """Click once nothing covers the target (the UI animates panels in after loading)."""
        def attempt(driver):
            try:
                target = (driver.find_element(*element_or_locator)
                          if isinstance(element_or_locator, tuple) else element_or_locator)
                target.click()
            except (ElementClickInterceptedException, NoSuchElementException, StaleElementReferenceException):
                return False
            return True
        wait.until(attempt)

    def row(run_id: str):
        return wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, f"[role='row'][row-id='{run_id}']")))

    def expand(run_id: str, name: str, child_id: str) -> None:
        """Unfold a run until its child's row shows: a click the UI takes while it is still
        rendering (CI, two busy cores) is lost without a sign, so a lost click is clicked again."""
        child = (By.CSS_SELECTOR, f"[role='row'][row-id='{child_id}']")
        for _ in range(3):
            cell = row(run_id).find_element(By.XPATH, f".//*[@role='gridcell'][.//a[normalize-space(.)='{name}']]")
            click(cell.find_element(By.TAG_NAME, "button"))
            try:
                WebDriverWait(browser, WAIT_S / 3).until(EC.visibility_of_element_located(child))
                return
            except TimeoutException:
                continue
        browser.save_screenshot(str(tmp_path / f"unfold-{name}.png"))
        raise AssertionError(f"{name}: its child run {child_id} never showed after three clicks")

    # A person opens the link the compare stage prints and sees the training runs, nothing to
    # dismiss or switch first. (MLflow 3.17's UI opens on its global workflow type, GenAI by
    # default, whatever the experiment's kind: the link asks for model training.)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    browser.get(runs_page(Tracking(uri, path, "tiny"), experiment_id))
    try:
        row(group_id)
    except TimeoutException:
        browser.save_screenshot(str(tmp_path / "experiment.png"))
        raise

    # The comparison is a parent run; unfolded, it holds both variants, and each its seeds.
    assert row(group_id).find_element(By.TAG_NAME, "a").text == "compare"
    expand(group_id, "compare", variant_ids["batchnorm"]["variant"])
    for variant, ids in variant_ids.items():
        assert row(ids["variant"]).find_element(By.TAG_NAME, "a").text == variant
    expand(variant_ids["batchnorm"]["variant"], "batchnorm", variant_ids["batchnorm"]["seeds"][0])
    for seed, seed_run_id in zip((0, 1), variant_ids["batchnorm"]["seeds"], strict=True):
        assert row(seed_run_id).find_element(By.TAG_NAME, "a").text == f"batchnorm-seed{seed}"
    browser.save_screenshot(str(tmp_path / "runs.png"))

    # The variant's page: its place in the group, then its per-epoch val_acc curve.
    click(row(variant_ids["batchnorm"]["variant"]).find_element(By.LINK_TEXT, "batchnorm"))
    wait.until(EC.url_contains(f"/runs/{variant_ids['batchnorm']['variant']}"))
    wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "Child runs"))
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Parent run\ncompare" in page
    assert "batchnorm-seed0" in page and "batchnorm-seed1" in page
    click((By.XPATH, "//*[@role='tab'][normalize-space(.)='Model metrics']"))
    wait.until(EC.presence_of_element_located((By.XPATH, "//input[@placeholder='Search metric charts']"))).send_keys("val_acc")
    card = wait.until(EC.visibility_of_element_located((By.XPATH,
        "//*[normalize-space(text())='val_acc']/ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]")))
    line = WebDriverWait(card, WAIT_S).until(
        lambda c: c.find_element(By.CSS_SELECTOR, ".js-plotly-plot g.scatterlayer path.js-line"))
    assert line.get_attribute("d").count("L") == 1, "one segment: epochs 1 and 2"
    assert "batchnorm (val_acc)" in card.text and "Step" in card.text
    browser.save_screenshot(str(tmp_path / "val_acc.png"))
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path / 'runs.png'} {tmp_path / 'val_acc.png'}")
