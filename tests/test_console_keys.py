"""The console's Keys view, driven in a real browser (headless Chromium through
Playwright) against a real stack: it lists every key with its running jobs and budget
use, creates a key and shows it once, rotates, disables and revokes; the gateway obeys
each change, and no key ever travels in a URL or stays in the tab's storage."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gpugate.testing.keys import Key, write_keys_file
from tests.conftest import StackFactory, slow_sim_fixture
from tests.processes import Process

ADMIN_KEY = "console-keys-admin-7d1e"
GEN = {"model": "llama3.2", "prompt": "hello", "stream": False}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
REFRESH_MS = 3000
"""The view refreshes every second; a change shows within that plus the calls' time."""

# 5 tokens at 0.4 s: a job holds its slot for two seconds, long enough to be seen running.
slow_sim = slow_sim_fixture(0.4)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(binary).exists():
        raise RuntimeError("chromium is not installed: run `make chromium` (Debian's package)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def status_of(url: str, key: str) -> int:
    r = httpx.post(
        url + "/api/generate", json=GEN, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    return r.status_code


def test_the_keys_view_creates_rotates_disables_and_revokes(
    browser: Browser, make_stack: StackFactory, slow_sim: Process, tmp_path: Path
) -> None:
    keys_file = write_keys_file(tmp_path / "keys.toml", [Key("from-file", "file-secret")])
    stack = make_stack(
        ollama_url=slow_sim.url,
        admin_key=ADMIN_KEY,
        keys_file=str(keys_file),
        gpu_concurrency=2,
    )
    url = stack.url
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page: Page = context.new_page()
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(url + "/admin/ui")
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Open console").click()

    rows = page.locator("#keys tr")
    file_row = page.locator('#keys tr[data-key="from-file"]')
    expect(file_row).to_contain_text("keys file", timeout=REFRESH_MS)
    expect(file_row.locator("button")).to_have_count(0)  # the file owns it

    # create: the key is shown once
    page.get_by_label("Name").fill("web-app")
    page.get_by_label("Max running").fill("1")
    page.get_by_label("Budget").fill("100000/day")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key")).to_be_visible()
    key = page.locator("#new-key-value").inner_text()
    assert re.fullmatch(r"gg_[A-Za-z0-9_-]{32,}", key), key
    assert page.locator("#new-key-name").inner_text() == "web-app"
    row = page.locator('#keys tr[data-key="web-app"]')
    expect(row.locator("[data-cell=max_running]")).to_have_text("1", timeout=REFRESH_MS)
    page.locator("#new-key-done").click()
    expect(page.locator("#new-key")).to_be_hidden()
    assert key not in page.content(), "the key stays in the page once dismissed"

    # its running jobs and its budget use
    job = httpx.post(
        url + "/v1/jobs",
        json={"endpoint": "/api/generate", "body": GEN},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert job.status_code == 202, job.text
    expect(row.locator("[data-cell=running]")).to_have_text("1", timeout=REFRESH_MS)
    expect(row.locator("[data-cell=budget]")).to_have_text(
        re.compile(r"^[1-9]\d* / 100,000 per day$"), timeout=REFRESH_MS + 3000
    )
    expect(row.locator("[data-cell=running]")).to_have_text("0", timeout=REFRESH_MS + 3000)

    # disable, enable
    row.get_by_role("button", name="Disable").click()
    expect(row.locator("[data-cell=state]")).to_have_text("disabled", timeout=REFRESH_MS)
    assert status_of(url, key) == 401
    row.get_by_role("button", name="Enable").click()
    expect(row.locator("[data-cell=state]")).to_have_text("active", timeout=REFRESH_MS)
    assert status_of(url, key) == 200

    # rotate: the new key shown once, the old one refused
    row.get_by_role("button", name="Rotate").click()
    expect(page.locator("#new-key")).to_be_visible()
    expect(page.locator("#new-key-value")).not_to_have_text(key)
    new_key = page.locator("#new-key-value").inner_text()
    assert new_key.startswith("gg_")
    assert status_of(url, key) == 401
    assert status_of(url, new_key) == 200
    page.locator("#new-key-done").click()

    # revoke: a second click confirms
    row.get_by_role("button", name="Revoke").click()
    row.get_by_role("button", name="Confirm revoke").click()
    expect(page.locator("#keys-result")).to_have_text("Key web-app revoked.")
    expect(row).to_have_count(0, timeout=REFRESH_MS)
    expect(rows).to_have_count(1)
    assert status_of(url, new_key) == 401

    stored = page.evaluate("() => JSON.stringify({...sessionStorage, ...localStorage})")
    for secret in (key, new_key):
        assert secret not in stored
        assert not [u for u in requested if secret in u]
    assert not [u for u in requested if ADMIN_KEY in u]
    assert not errors, errors
    context.close()
