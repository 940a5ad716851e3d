"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium),
against a real uvicorn server on 127.0.0.1 and a dataset written by `rlaif label` with the embedded judge.

- label three pairs by keyboard and one by mouse, reload, see them persisted (and in SQLite);
- the export round-trips into `rlaif eval`'s loader and `rlaif train-rm`'s loader;
- XSS payloads in responses are shown as text and run nothing (checked inside the browser);
- two logged-in browser sessions labeling at the same time keep both sets of answers;
- the agreement page renders its reliability picture;
- the write API's guards (CSRF token, JSON only, cross-site, Host header, keys, size limits).

Screenshots are saved under each test's temp folder (and copied to $RLAIF_REVIEW_SCREENSHOTS when set,
which is how docs/review.md's pictures are made).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from rlaif.judge.labeling.review import HumanLabelStore, load_review_source

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DATA = Path(__file__).parent / "data" / "review" / "pairs.jsonl"

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (installed by .ci/run)")


@pytest.fixture(scope="module")
def labeled_dir(tmp_path_factory, default_engine):
    """A real `rlaif label` output: the pairs of tests/data/review relabeled by the embedded judge."""
    from rlaif.judge.labeling import LabelConfig, run_label

    out = tmp_path_factory.mktemp("labeled") / "job"
    summary = run_label(LabelConfig(prompts=DATA, out=out, prompt_column="prompt", responses_from=("response_1", "response_2"),
                                    export=("jsonl",), progress=False),
                        policy_engine=default_engine, judge_engine=default_engine)
    assert summary["rows"] == 7, summary
    return out


@pytest.fixture()
def job(labeled_dir, tmp_path):
    """A fresh copy of the labeled folder per test (its human_labels.sqlite starts empty)."""
    target = tmp_path / "job"
    shutil.copytree(labeled_dir, target)
    return target


class Server:
    def __init__(self, folder: Path, **settings) -> None:
        import uvicorn

        from rlaif.service.review.app import create_review_app
        from rlaif.service.review.settings import ReviewSettings
        from tests.conftest import free_port

        self.port = free_port()
        self.source = load_review_source(folder)
        settings.setdefault("max_display_chars", 2000)
        self.app = create_review_app(ReviewSettings(port=self.port, **settings), self.source)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "review server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture()
def browsers():
    """Factory of headless Chromium sessions, each with its own fresh profile; all quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make():
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1100", f"--user-data-dir={tempfile.mkdtemp(prefix='rlaif-chromium-')}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("RLAIF_REVIEW_SCREENSHOTS"):
        target = Path(os.environ["RLAIF_REVIEW_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting in the browser"
        time.sleep(0.05)


def current_key(driver) -> str:
    return driver.find_element("id", "review").get_attribute("data-item")


def press(driver, key: str) -> None:
    """Press a key on the page and wait for the page of the next pair."""
    from selenium.webdriver.common.action_chains import ActionChains

    before = current_key(driver)
    ActionChains(driver).send_keys(key).perform()
    wait_for(lambda: _key_or_none(driver) not in (None, before))


def _key_or_none(driver):
    try:
        return current_key(driver)
    except Exception:
        return None


def expected_answer(source, key: str, side: str) -> str:
    """The canonical answer ('1'/'2') a click on the displayed side means."""
    item = source.by_key[key]
    return ("1" if item.left_is_1 else "2") if side == "left" else ("2" if item.left_is_1 else "1")


def test_label_by_keyboard_and_mouse_then_reload(job, browsers, tmp_path):
    with Server(job, annotator="ada") as server:
        driver = browsers()
        driver.get(server.url + "/")
        keys = []
        for key, meaning in (("1", "left"), ("2", "right"), ("3", "tie")):
            keys.append((current_key(driver), meaning))
            press(driver, key)
        keys.append((current_key(driver), "left"))
        before = current_key(driver)
        driver.find_element("id", "btn-left").click()  # the mouse
        wait_for(lambda: _key_or_none(driver) not in (None, before))
        screenshot(driver, tmp_path, "review-item")
        # Reload each answered pair: the answer is shown, from the server.
        for key, meaning in keys:
            driver.get(f"{server.url}/item/{key}")
            driver.refresh()
            assert driver.find_element("id", "current-answer").text == meaning
            assert "chosen" in driver.find_element("id", {"left": "btn-left", "right": "btn-right", "tie": "btn-tie"}[meaning]).get_attribute("class")
        assert driver.find_element("id", "progress").text.startswith(f"4 / {len(server.source.items)} answered by ada")
        # The queue put the pairs whose orders disagree first (active selection).
        priorities = [server.source.by_key[k].priority()[0] for k, _ in keys]
        assert priorities == sorted(priorities, reverse=True)
    rows = sqlite3.connect(job / "human_labels.sqlite").execute("SELECT item, answer, annotator FROM labels ORDER BY id").fetchall()
    expected = [(k, "tie" if m == "tie" else expected_answer(server.source, k, m), "ada") for k, m in keys]
    assert rows == expected


def test_export_round_trips(job, browsers, tmp_path):
    from typer.testing import CliRunner

    from rlaif.cli import build_app
    from rlaif.judge.data import load_preferences_with_stats
    from rlaif.policy_training.reward_model.data import load_labeled_pairs

    with Server(job, annotator="ada") as server:
        driver = browsers()
        driver.get(server.url + "/")
        answered = []
        for key in ("2", "1", "3"):  # right, left, tie
            answered.append((current_key(driver), {"1": "left", "2": "right", "3": "tie"}[key]))
            press(driver, key)
    out = tmp_path / "human.jsonl"
    result = CliRunner().invoke(build_app(), ["review", "export", str(job), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["exported"], summary["tie"]) == (2, 1)
    source = load_review_source(job)
    loaded = load_preferences_with_stats(out)
    assert loaded.format.value == "trl" and len(loaded.examples) == 2
    by_prompt = {e.prompt: e for e in loaded.examples}
    for key, side in answered[:2]:
        item = source.by_key[key]
        human = expected_answer(source, key, side)
        chosen = item.response_1 if human == "1" else item.response_2
        assert by_prompt[item.prompt].chosen == chosen
    # The corrected dataset: every row, human verdicts replacing the judge's, readable by train-rm.
    corrected = [json.loads(line) for line in Path(summary["corrected"]).read_text().splitlines()]
    assert len(corrected) == len(source.items)
    assert sum(r["label_source"] == "human" for r in corrected) == 3
    pairs = load_labeled_pairs(summary["corrected"], eval_split=0.0)
    assert len(pairs.train) + len(pairs.eval) == len(source.items) and pairs.soft_labels
    assert sorted(p.target for p in pairs.train + pairs.eval).count(1.0) >= 2  # the human verdicts, as hard targets
    for key, side in answered:
        item = source.by_key[key]
        row = corrected[item.index]
        if side == "tie":
            assert row["judge_prob"] == 0.5 and row["human_label"] == "tie"
        else:
            human = expected_answer(source, key, side)
            assert row["human_label"] == human and row["judge_prob"] == 1.0
            assert (row["chosen"] == json.loads((job / "data.jsonl").read_text().splitlines()[item.index])["chosen"]) == (human == "1")


def test_xss_payloads_are_shown_as_text(job, browsers, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    with Server(job) as server:
        hostile = next(i for i in server.source.items if "<script>" in i.response_1 + i.response_2)
        huge = next(i for i in server.source.items if len(i.response_1 + i.response_2) > 2_000)
        driver = browsers()
        driver.get(f"{server.url}/item/{hostile.key}")
        time.sleep(0.5)
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 - no alert() ran
        assert driver.execute_script("return [window.__xss, window.__xss_img, window.__xss_link, window.__xss_frame]") == [None] * 4
        page_text = driver.find_element("id", "review").text
        assert "<script>window.__xss = 1; alert('xss')</script>" in page_text
        assert '<img src=x onerror="window.__xss_img = 1">' in page_text
        assert driver.find_elements("css selector", "#review script, #review img, #review iframe") == []
        links = [a.get_attribute("href") or "" for a in driver.find_elements("css selector", "#review a")]
        assert not any(href.lower().startswith("javascript:") for href in links), links
        screenshot(driver, tmp_path, "review-xss")
        driver.get(f"{server.url}/item/{huge.key}")
        assert "more characters not shown" in driver.find_element("id", "review").text
        assert driver.find_elements("css selector", "#review iframe") == []
        assert driver.execute_script("return window.__xss_frame") is None
        # The prompt's own HTML is text too.
        assert "<b>bold?</b>" in driver.find_element("id", "prompt").text


def test_two_sessions_label_concurrently(job, browsers, tmp_path):
    with Server(job, api_keys="alice:key-alice-123,bob:key-bob-456") as server:
        sessions = {}
        for name, key in (("alice", "key-alice-123"), ("bob", "key-bob-456")):
            driver = browsers()
            driver.get(server.url + "/")
            assert "/login" in driver.current_url  # keys configured: the page asks for one
            driver.find_element("id", "key").send_keys(key)
            driver.find_element("id", "login").click()
            wait_for(lambda d=driver: _key_or_none(d))
            sessions[name] = driver
        keys = {name: [] for name in sessions}
        errors = []

        def label(name: str, presses: str) -> None:
            try:
                for key in presses:
                    keys[name].append((current_key(sessions[name]), key))
                    press(sessions[name], key)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=label, args=("alice", "1213")), threading.Thread(target=label, args=("bob", "2212"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        sessions["alice"].get(server.url + "/agreement")
        summary = sessions["alice"].find_element("id", "agreement-summary").text
        assert "alice (" in summary and "bob (" in summary
        screenshot(sessions["alice"], tmp_path, "review-agreement")
        assert sessions["alice"].execute_script(
            "const i = document.getElementById('reliability'); return i.complete && i.naturalWidth > 0")
    store = HumanLabelStore(job / "human_labels.sqlite")
    try:
        current = store.current()
        for name, answered in keys.items():
            assert len(answered) == 4
            for key, _ in answered:
                assert name in current[key], f"{name}'s answer to {key} was lost"
        both = set(k for k, _ in keys["alice"]) & set(k for k, _ in keys["bob"])
        assert both, "both started at the same first pair, so at least one pair has two answers"
        assert all(len(current[k]) == 2 for k in both)
    finally:
        store.close()


def test_write_guards(job):
    with Server(job, api_keys="alice:key-alice-123", max_note_chars=50) as server:
        item = server.source.items[0].key
        good = {"item": item, "answer": "1"}
        auth = {"Authorization": "Bearer key-alice-123"}
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/api/labels", json=good).status_code == 401
            assert client.get("/item/" + item).status_code == 303  # to /login
            assert client.post("/api/labels", json=good, headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = client.post("/api/labels", json=good, headers=auth)
            assert ok.status_code == 200 and ok.json()["annotator"] == "alice"
            assert client.post("/api/labels", content="item=x", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
            assert client.post("/api/labels", json=good, headers={**auth, "Sec-Fetch-Site": "cross-site"}).status_code == 403
            assert client.get("/healthz", headers={"Host": "evil.example:80"}).status_code == 421
            assert client.post("/api/labels", json={**good, "note": "x" * 51}, headers=auth).status_code == 422
            assert client.post("/api/labels", json={**good, "answer": "A"}, headers=auth).status_code == 422
            assert client.post("/api/labels", json={**good, "note": "x" * 70_000}, headers=auth).status_code == 413
            assert client.post("/api/labels", json={**good, "item": "nope"}, headers=auth).status_code == 404
            # A browser session must send the page's CSRF token.
            login = client.post("/login", data={"key": "key-alice-123", "next": "/"})
            assert login.status_code == 303 and "rlaif_review_session" in client.cookies
            assert client.post("/api/labels", json=good).status_code == 403
            page = client.get("/item/" + item).text
            token = page.split('name="csrf-token" content="')[1].split('"')[0]
            assert client.post("/api/labels", json=good, headers={"X-CSRF-Token": token}).status_code == 200
            assert "default-src 'none'" in client.get("/item/" + item).headers["content-security-policy"]
    rows = sqlite3.connect(job / "human_labels.sqlite").execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    assert rows == 2
