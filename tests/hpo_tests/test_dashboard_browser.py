"""`hpo dashboard` checked in a real browser: headless Debian Chromium driven by Selenium.

A smoke study is run with `hpo run`, `hpo dashboard` serves it from a subprocess, and the study
page must draw the optimisation history and the intermediate values with one data point per
value in the store; the trial page must show a trial's config, metrics and failure reason; the
browser console must stay free of errors. Screenshots are kept in test-artifacts/ (git-ignored)
and their paths printed.

This test never skips: without /usr/bin/chromium and /usr/bin/chromedriver it fails and says how
to install them (`bash scripts/test.sh` installs both when they are missing), so CI cannot pass
without it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from hpo.testing import environment
from storage.testing import fresh_postgres_database
from tests.hpo_tests._dashboard_store import EditStudy, edit_study, snapshot
from tests.hpo_tests._results_study import results_study

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Flags from the Debian package's headless use here: without the background-networking ones
# Chromium keeps trying (refused, no network) to reach Google services.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
STARTUP_TIMEOUT_S = 90  # hpo imports torch before it serves; slow on a shared 2-core machine
DRAW_TIMEOUT_S = 30


def require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the dashboard browser test needs Debian's "
            "chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
            "bash scripts/test.sh installs them). It fails rather than skips so that CI cannot "
            "pass without it."
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def study(request, tmp_path_factory):
    """The results study made by `hpo run`, in a SQLite file and in a PostgreSQL database."""
    if request.param == "postgresql":
        return results_study(tmp_path_factory, request.getfixturevalue("postgres_url"))
    return results_study(tmp_path_factory)


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[str]
    base: str  # http://127.0.0.1:PORT


def start_dashboard(url: str, study: str, cwd: Path, *options: str) -> Served:
    """`hpo dashboard` on the store at `url`, in a subprocess; `await_dashboard` waits for it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", "dashboard", "--storage", url, "--study", study,
         "--port", str(port), *options],
        cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return Served(process, f"http://127.0.0.1:{port}")


def await_dashboard(served: Served) -> str:
    """The study page's URL, once the dashboard answers."""
    process, base = served.process, served.base
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"hpo dashboard exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"hpo dashboard did not answer on {base} in {STARTUP_TIMEOUT_S} s")
        time.sleep(0.3)
    first_line = process.stdout.readline().strip()
    url = first_line.rsplit(" ", 1)[-1]
    assert url.startswith(f"{base}/dashboard/studies/"), first_line
    return url


def stop_dashboard(served: Served) -> str:
    """Ctrl-C: it stops cleanly, exit 0, and nothing went wrong while it served (an exception
    in a request would be on stderr). Returns its stderr."""
    process = served.process
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)  # generous: a loaded CI machine
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return stderr


@pytest.fixture(scope="module")
def dashboard(study):
    """`hpo dashboard` on the study, in a subprocess; yields the study page's URL."""
    served = start_dashboard(study.url, study.name, study.directory)
    yield await_dashboard(served)
    stop_dashboard(served)


@contextlib.contextmanager
def launched_browser() -> Iterator[Any]:
    """Headless Chromium under Selenium, with its console log kept."""
    require_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        # Both paths are given, so Selenium Manager has nothing to find; should it run anyway,
        # it must not try to download (there is no network).
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(dashboard):
    # One per dashboard, closed before it stops: a page left polling a stopped dashboard would
    # put connection errors in the console the next test reads.
    with launched_browser() as driver:
        yield driver


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


# optuna-dashboard 0.21's page parses the empty body of its own server's 204 answers to a
# successful edit (a trial's state, a note) as JSON and then reads `.status` of nothing: the edit
# is made (the test checks the store), the page logs these. Only the --allow-edit test meets them.
UPSTREAM_204_ERRORS = ("Cannot read properties of undefined (reading 'status')",)


def assert_console_clean(driver, allow: tuple[str, ...] = ()) -> None:
    """No console entry at error level but those containing one of `allow`. All entries are
    printed; with optuna-dashboard 0.21 and Chromium 156 the console stays empty on these pages
    unless something is edited."""
    entries = driver.get_log("browser")
    for entry in entries:
        print(f"console {entry['level']}: {entry['message']}")
    errors = [entry for entry in entries if entry["level"] == "SEVERE"
              and not any(known in entry["message"] for known in allow)]
    assert errors == [], errors


def plot_data(driver, element_id: str) -> list[dict]:
    """The traces plotly drew in the element (plotly keeps them on the graph div as `data`)."""
    return driver.execute_script(
        "const node = document.getElementById(arguments[0]);"
        "if (!node || !node.data) { return null; }"
        "return node.data.map(t => ({name: t.name, mode: t.mode, x: t.x, y: t.y}));",
        element_id,
    )


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, DRAW_TIMEOUT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        screenshot(driver, "dashboard-timeout.png")
        pytest.fail(f"the dashboard did not draw {what} within {DRAW_TIMEOUT_S} s")


def count(driver, selector: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def test_study_page_draws_history_and_intermediate_values(study, dashboard, browser):
    from selenium.webdriver.common.by import By

    trials = study.load().get_trials()
    # The history plot shows complete trials at their value and, with its default "include
    # PRUNED trials" switch on, pruned ones at their last reported value; failed ones have none.
    history = sorted(
        (t.number, t.value if t.state == TrialState.COMPLETE else t.intermediate_values[max(
            t.intermediate_values)])
        for t in trials
        if t.state == TrialState.COMPLETE
        or (t.state == TrialState.PRUNED and t.intermediate_values)
    )  # fmt: skip
    reported = [t for t in trials if t.intermediate_values]
    n_values = sum(len(t.intermediate_values) for t in reported)
    assert len(history) >= 3 and n_values > len(reported)  # something to see, and lines

    browser.get(dashboard)
    # SVG point elements: what a person sees, one per value.
    wait_for(
        browser,
        lambda d: count(d, "#plot-history .scatterlayer .point") == len(history)
        and count(d, "#graph-intermediate-values .scatterlayer .point") == n_values,
        "the history and intermediate-value points",
    )
    # ... and they are the store's numbers, trial by trial.
    traces = plot_data(browser, "plot-history")
    objective = [t for t in traces if t["mode"] == "markers" and t["x"]]
    assert len(objective) == 1, traces
    assert sorted(zip(objective[0]["x"], objective[0]["y"], strict=True)) == history

    traces = plot_data(browser, "graph-intermediate-values")
    drawn = {trace["name"].strip(): dict(zip(trace["x"], trace["y"], strict=True))
             for trace in traces}  # fmt: skip
    assert drawn == {f"trial #{t.number}": t.intermediate_values for t in reported}

    assert count(browser, "#graph-hyperparameter-importances .bars path") >= 1
    path = screenshot(browser, "dashboard-study.png")
    assert path.stat().st_size > 10_000
    graph = browser.find_element(By.ID, "graph-intermediate-values")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", graph)
    path = ARTIFACTS / "dashboard-intermediate-values.png"
    assert graph.screenshot(str(path))
    print(f"screenshot: {path}")
    assert_console_clean(browser)


def test_trial_page_shows_config_metrics_and_failure_reason(study, dashboard, browser):
    from selenium.webdriver.common.by import By

    trials = study.load().get_trials()
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith("NumericalError: ")
    browser.get(dashboard + f"/trials?numbers={failed.number}")
    heading = f"Trial {failed.number} (trial_id="
    wait_for(browser, lambda d: heading in d.find_element(By.TAG_NAME, "body").text,
             f"trial {failed.number}")  # fmt: skip
    text = browser.find_element(By.TAG_NAME, "body").text
    detail = text[text.index(heading):]
    lines = detail.splitlines()
    assert f"fail_reason {reason}" in lines
    config = failed.user_attrs["config"]
    for field in ("lr", "batch_size", "fault_nonfinite_epoch", "n_ris_rows"):
        assert f"config.{field} {config[field]}" in lines, field
    # The reason is a row of the trial's "User Attributes" box; scroll it into view and keep it.
    rows = browser.find_elements(
        By.XPATH, f"//*[normalize-space(string(.))={json.dumps(f'fail_reason {reason}')}]"
    )
    assert rows, "no element holds the failure reason"
    row = rows[-1]  # the innermost: descendants come after their ancestors in document order
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
    assert row.is_displayed()
    screenshot(browser, "dashboard-failed-trial.png")

    best = study.load().best_trial
    browser.get(dashboard + f"/trials?numbers={best.number}")
    heading = f"Trial {best.number} (trial_id="
    wait_for(browser, lambda d: heading in d.find_element(By.TAG_NAME, "body").text,
             f"trial {best.number}")  # fmt: skip
    text = browser.find_element(By.TAG_NAME, "body").text
    lines = text[text.index(heading):].splitlines()
    metrics = best.user_attrs["metrics"]
    assert f"metrics.composite {metrics['composite']}" in lines
    assert f"metrics.val_nmse {metrics['val_nmse']}" in lines
    per_epoch = [epoch["composite"] for epoch in best.user_attrs["history"]]
    assert f"history.composite {json.dumps(per_epoch)}" in lines
    assert_console_clean(browser)


def test_api_shows_every_config_field_whole(study, dashboard):
    base = dashboard.split("/dashboard/")[0]
    study_id = dashboard.rsplit("/", 1)[-1]
    with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=30) as response:
        detail = json.load(response)
    stored = {t.number: t for t in study.load().get_trials()}
    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        config = stored[trial["number"]].user_attrs["config"]
        # Every field has its own cell, and no cell reaches the dashboard's 1,024-character cut.
        assert {f"config.{k}" for k in config} <= set(attrs)
        assert all(len(value) < 1024 for value in attrs.values())
        assert "config" not in attrs and "history" not in attrs


# ------------------------------------------- changing the store from the page: refused, or not

EDIT_MODES = {"read-only": (), "allow-edit": ("--allow-edit",)}


@dataclass(frozen=True)
class EditSetup:
    url: str  # a PostgreSQL database of its own
    studies: dict[str, EditStudy]  # by mode: the study each dashboard's page tries to change
    pages: dict[str, str]  # by mode: that study's page on the dashboard started in that mode


@pytest.fixture(scope="module")
def edits(tmp_path_factory) -> Iterator[EditSetup]:
    """Two studies in a fresh PostgreSQL database, and `hpo dashboard` on it twice: read-only
    (the default) and with --allow-edit, started together."""
    directory = tmp_path_factory.mktemp("dashboard-edits")
    with fresh_postgres_database() as url:
        studies = {mode: edit_study(url) for mode in EDIT_MODES}
        served = {
            mode: start_dashboard(url, studies[mode].name, directory, *options)
            for mode, options in EDIT_MODES.items()
        }
        try:
            pages = {mode: await_dashboard(one) for mode, one in served.items()}
            yield EditSetup(url=url, studies=studies, pages=pages)
        finally:
            stderr = {mode: stop_dashboard(one) for mode, one in served.items()}
        assert "read-only" in stderr["read-only"] and "read-only" not in stderr["allow-edit"]


@pytest.fixture(scope="module")
def edit_browser(edits):
    with launched_browser() as driver:
        yield driver


def messages(driver) -> list[str]:
    """The texts of the messages (notistack snackbars) the page shows now."""
    from selenium.webdriver.common.by import By

    return [node.text for node in driver.find_elements(By.CSS_SELECTOR, "#notistack-snackbar")]


def wait_for_message(driver, text: str) -> None:
    wait_for(driver, lambda d: text in messages(d), f"the message {text!r}")


def click_button(driver, label: str, within: str = "") -> None:
    """The displayed button reading `label` (as shown: MUI upper-cases them)."""
    from selenium.webdriver.common.by import By

    def find(d):
        found = [b for b in d.find_elements(By.XPATH, f"{within}//button") if b.is_displayed()]
        return next((b for b in found if b.text == label), False)

    wait_for(driver, find, f"a {label!r} button").click()


def delete_study_from_list(driver, base: str, made: EditStudy) -> None:
    """The study list's delete button on the study's card, then "Yes" in the dialog."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/dashboard")
    card = (
        "//div[contains(@class, 'MuiCard-root')]"
        f"[contains(normalize-space(.), {json.dumps(made.name)})]"
    )
    wait_for(
        driver,
        lambda d: d.find_elements(By.XPATH, f"{card}//button[@aria-label='delete study']"),
        f"the card of {made.name}",
    )[0].click()
    click_button(driver, "YES", within="//div[@role='dialog']")


def fail_trial_from_its_page(driver, page: str, number: int) -> None:
    driver.get(f"{page}/trials?numbers={number}")
    click_button(driver, "FAIL TRIAL")


def write_trial_note(driver, page: str, number: int, note: str) -> None:
    """The pencil of the trial's Note box, the note typed into the editor, "Save"."""
    from selenium.webdriver.common.by import By

    driver.get(f"{page}/trials?numbers={number}")
    heading = f"Trial {number} (trial_id="
    wait_for(driver, lambda d: heading in d.find_element(By.TAG_NAME, "body").text,
             f"trial {number}")  # fmt: skip
    # The pencil is the page's last icon button (the Note box comes after the trial list).
    driver.find_elements(By.CSS_SELECTOR, "button.MuiIconButton-root")[-1].click()
    editor = wait_for(
        driver,
        lambda d: [
            t for t in d.find_elements(By.XPATH, "//textarea")
            if t.is_displayed()
        ],
        "the note editor",
    )[0]  # fmt: skip
    editor.send_keys(note)
    click_button(driver, "SAVE")


def banner(driver) -> str | None:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, "hpo-read-only")
    return found[0].text if found and found[0].is_displayed() else None


def test_a_read_only_dashboard_refuses_changes_with_a_visible_message(edits, edit_browser):
    from hpo._dashboard import READ_ONLY_BANNER, READ_ONLY_MESSAGE

    driver, made, page = edit_browser, edits.studies["read-only"], edits.pages["read-only"]
    base = page.split("/dashboard/")[0]
    before = snapshot(edits.url)

    delete_study_from_list(driver, base, made)
    # optuna-dashboard's message for a failed deletion leaves out the server's reason: the banner
    # on every page of a read-only dashboard gives it.
    wait_for_message(driver, f"Failed to delete study (id={made.study_id})")
    assert banner(driver) == READ_ONLY_BANNER
    screenshot(driver, "dashboard-read-only-delete-study.png")

    fail_trial_from_its_page(driver, page, made.running_trial_number)
    wait_for_message(
        driver,
        f"Failed to update trial (id={made.running_trial_id}, state=Fail). "
        f"Reason: {READ_ONLY_MESSAGE}",
    )
    screenshot(driver, "dashboard-read-only-fail-trial.png")

    write_trial_note(driver, page, made.finished_trial_number, "changed from the page")
    wait_for_message(driver, f"Failed: {READ_ONLY_MESSAGE}")
    screenshot(driver, "dashboard-read-only-note.png")

    assert snapshot(edits.url) == before
    # The page's console holds the refused requests, and nothing else.
    entries = driver.get_log("browser")
    for entry in entries:
        print(f"console {entry['level']}: {entry['message']}")
    errors = [e for e in entries if e["level"] == "SEVERE"]
    refused = ("status of 403 (Forbidden)", READ_ONLY_MESSAGE)  # the response, the page's error
    assert errors and all(any(r in e["message"] for r in refused) for e in errors), errors


def test_with_allow_edit_the_same_changes_are_made(edits, edit_browser):
    driver, made, page = edit_browser, edits.studies["allow-edit"], edits.pages["allow-edit"]
    base = page.split("/dashboard/")[0]
    other = edits.studies["read-only"].name
    before = snapshot(edits.url)
    note = "changed from the page"

    fail_trial_from_its_page(driver, page, made.running_trial_number)
    # The page says nothing when this works; the trial's chip turns to "Fail".
    wait_for(
        driver,
        lambda d: {n: st for n, st, *_ in snapshot(edits.url)[made.name]["trials"]}[
            made.running_trial_number
        ]
        == TrialState.FAIL,
        "the trial failed",
    )
    write_trial_note(driver, page, made.finished_trial_number, note)
    wait_for(
        driver,
        lambda d: note in json.dumps(snapshot(edits.url)[made.name]["system_attrs"]),
        "the note saved",
    )
    assert banner(driver) is None
    after = snapshot(edits.url)[made.name]
    states = {number: state for number, state, *_ in after["trials"]}
    assert states[made.running_trial_number] == TrialState.FAIL
    assert note in json.dumps(after["system_attrs"])  # notes are study system attributes

    delete_study_from_list(driver, base, made)
    wait_for(driver, lambda d: made.name not in snapshot(edits.url), "the study deleted")
    after = snapshot(edits.url)
    assert made.name in before and made.name not in after
    assert after[other] == before[other]  # the other study is untouched
    assert_console_clean(driver, allow=UPSTREAM_204_ERRORS)
