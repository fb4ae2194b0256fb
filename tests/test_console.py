"""The operators' console, `GET /admin/ui`: served by the gateway itself with a strict CSP
and no external URL, off with the admin API, and driven in a real browser (headless
Chromium through Playwright) against a real stack under load: the numbers it shows are
those of `/v1/queue`, its chart is drawn, its cap control sets the cap the workers obey,
and the admin key never leaves the tab's sessionStorage except as the X-Admin-Key header.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    Response,
    expect,
    sync_playwright,
)

from tests.conftest import Stack, StackFactory, build_stack, sim_configure, slow_sim_fixture
from tests.processes import Process, start_redis, start_sim, wait_until

ADMIN_KEY = "console-admin-secret-3f9c"
ADMIN = {"X-Admin-Key": ADMIN_KEY}
GEN = {"model": "llama3.2", "prompt": "hello", "stream": False}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = ("/admin/ui", "/admin/ui/console.js", "/admin/ui/console.css")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path(
    os.environ.get("GPUGATE_SCREENSHOT") or Path(tempfile.gettempdir()) / "gpugate-console.png"
)
"""Every run takes the screenshot; `GPUGATE_SCREENSHOT=docs/console.png make test` renews
the README's (a test run leaves the checkout as it was)."""
REFRESH_S = 1.5
"""The page refreshes every second; a change shows within that plus the calls' own time."""

# Jobs of 5 tokens at 1 s: five seconds each, so that the queue holds still between the
# changes a test makes and the page can be compared with /v1/queue.
slow_sim = slow_sim_fixture(1.0)

SHOWN = """() => Object.fromEntries([...document.querySelectorAll('[data-field]')]
    .map(n => [n.dataset.field, {text: n.textContent, value: n.dataset.value}]))"""

BACKEND_ROWS = """() => Object.fromEntries([...document.querySelectorAll('#backends tr')]
    .map(r => [r.dataset.backend, {
        running: r.querySelector('[data-cell=running]').textContent,
        gpu_concurrency: r.querySelector('[data-cell=gpu_concurrency]').textContent,
        health: r.querySelector('.health').textContent}]))"""

CHART_PIXELS = """(names) => {
    const canvas = document.querySelector('#chart');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const css = getComputedStyle(canvas);
    const counts = {};
    for (const name of names) {
        const hex = css.getPropertyValue(name).trim();
        const rgb = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
        let n = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i + 3] > 200 && Math.abs(data[i] - rgb[0]) < 10
                && Math.abs(data[i + 1] - rgb[1]) < 10 && Math.abs(data[i + 2] - rgb[2]) < 10) n++;
        }
        counts[name] = n;
    }
    return counts;
}"""


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(binary).exists():
        raise RuntimeError("chromium is not installed: run `make chromium` (Debian's package)")
    browser = playwright.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


class Console:
    """A browser tab on a stack's console that records every URL it requested, the status
    of every PUT it made, and every script error or CSP refusal."""

    def __init__(self, browser: Browser, stack: Stack) -> None:
        self.stack = stack
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.urls: list[str] = []
        self.puts: list[int] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.on("response", self._response)
        self.page.on("console", self._console_message)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(stack.url + "/admin/ui")

    def _response(self, response: Response) -> None:
        if response.request.method == "PUT":
            self.puts.append(response.status)

    def _console_message(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def sign_in(self, key: str = ADMIN_KEY) -> None:
        expect(self.page.get_by_label("Admin key")).to_be_visible()
        self.page.get_by_label("Admin key").fill(key)
        self.page.get_by_role("button", name="Open console").click()

    def shown(self) -> dict[str, dict[str, str]]:
        return self.page.evaluate(SHOWN)  # type: ignore[no-any-return]

    def chart_pixels(self, *names: str) -> dict[str, int]:
        return self.page.evaluate(CHART_PIXELS, list(names))  # type: ignore[no-any-return]

    def assert_key_kept_to_the_tab(self) -> None:
        """The key is in sessionStorage and sent as a header: never in a URL, a cookie, a log."""
        assert ADMIN_KEY not in self.page.url
        assert self.urls and not [u for u in self.urls if ADMIN_KEY in u], self.urls
        assert self.context.cookies() == []
        assert self.page.evaluate("localStorage.length") == 0
        assert self.stack.api is not None
        assert ADMIN_KEY not in self.stack.api.log()
        assert not self.errors, self.errors

    def close(self) -> None:
        self.context.close()


OpenConsole = Callable[[Stack], Console]


@pytest.fixture
def open_console(browser: Browser) -> Iterator[OpenConsole]:
    consoles: list[Console] = []

    def open_(stack: Stack) -> Console:
        console = Console(browser, stack)
        consoles.append(console)
        return console

    yield open_
    for console in consoles:
        console.close()


def submit(client: httpx.Client, key: str) -> httpx.Response:
    return client.post(
        "/v1/jobs", json={"endpoint": "/api/generate", "body": GEN}, headers={"X-API-Key": key}
    )


def queue(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/v1/queue").json())


def shows_the_queue(console: Console, client: httpx.Client) -> bool:
    q = queue(client)
    shown = console.shown()
    return (
        all(
            shown[f]["text"] == f"{q[f]:,}"
            for f in (
                "queue_depth",
                "running",
                "gpu_concurrency",
                "max_queue_depth",
                "batch_running",
                "batch_queued",
            )
        )
        and float(shown["estimated_wait_seconds"]["value"]) == q["estimated_wait_seconds"]
    )


# ---- served by the gateway ------------------------------------------------------------


def test_console_is_one_self_contained_page_with_a_strict_csp(make_stack: StackFactory) -> None:
    stack = make_stack(workers=0, admin_key=ADMIN_KEY)
    with stack.client() as client:  # no admin key: the page holds no data
        page, script, style = (client.get(path) for path in ASSETS)
        missing = client.get("/admin/ui/secrets.txt")
    for r, kind in ((page, "text/html"), (script, "text/javascript"), (style, "text/css")):
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(kind)
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"https?://", r.text, re.IGNORECASE), "an external URL"
        assert not re.search(r"""(src|href)=["']//|url\(|@import""", r.text), "another origin"
        assert "set-cookie" not in r.headers
    html = page.text
    assert re.findall(r"<script[^>]*>.*?</script>", html, re.DOTALL) == [
        '<script src="ui/console.js" defer></script>'  # no inline script
    ]
    assert re.findall(r"<link[^>]*>", html) == [
        '<link rel="icon" href="data:,">',  # no favicon request
        '<link rel="stylesheet" href="ui/console.css">',
    ]
    assert "<style" not in html and " style=" not in html, "inline style breaks the CSP"
    assert not re.search(r"\son[a-z]+=", html), "inline handlers break the CSP"
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_console_is_off_while_the_admin_api_is(make_stack: StackFactory) -> None:
    stack = make_stack(workers=0)
    with stack.client() as client:
        for path in ASSETS:
            r = client.get(path, headers=ADMIN)
            assert r.status_code == 404, path
            assert r.json()["error"] == "not_found"
            assert "message" in r.json()


# ---- in the browser -------------------------------------------------------------------


def test_console_shows_batch_lines_beside_the_queue(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, admin_key=ADMIN_KEY)
    console = open_console(stack)
    console.sign_in()
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/api/generate",
                "body": GEN,
            }
        )
        + "\n"
        for i in range(30)
    )
    with stack.client() as client:
        upload = client.post(
            "/v1/files",
            files={"file": ("in.jsonl", lines.encode())},
            data={"purpose": "batch"},
            headers={"X-API-Key": "night"},
        )
        assert upload.status_code == 200, upload.text
        batch = client.post(
            "/v1/batches",
            json={"input_file_id": upload.json()["id"], "endpoint": "/api/generate"},
            headers={"X-API-Key": "night"},
        )
        assert batch.status_code == 200, batch.text
        wait_until(lambda: queue(client)["batch_running"] == 1, what="a batch line running")
        wait_until(lambda: shows_the_queue(console, client), timeout=REFRESH_S, what="the page")
        shown = console.shown()
        assert shown["batch_running"]["text"] == "1"
        assert 0 < int(shown["batch_queued"]["text"]) < 30
        assert shown["queue_depth"]["text"] == "0"  # batch lines are not the queue


def test_console_asks_for_the_key_then_shows_what_v1_queue_says_under_load(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole
) -> None:
    stack = make_stack(
        workers=1,
        ollama_url=slow_sim.url,
        gpu_concurrency=1,
        max_queue_depth=4,
        admin_key=ADMIN_KEY,
        log_level="info",
    )
    console = open_console(stack)
    page = console.page
    expect(page.get_by_label("Admin key")).to_be_visible()
    expect(page.locator("#console")).to_be_hidden()  # nothing shown before the key
    console.sign_in()
    expect(page.locator("#console")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('gpugate.adminKey')") == ADMIN_KEY

    with stack.client() as client:
        for i in range(3):
            assert submit(client, f"load-{i}").status_code == 202
        wait_until(lambda: queue(client)["running"] == 1, what="one job running")
        wait_until(lambda: shows_the_queue(console, client), timeout=REFRESH_S, what="the page")

        for i in range(3, 5):  # the queue grows; the page follows within a second
            assert submit(client, f"load-{i}").status_code == 202
        wait_until(lambda: queue(client)["queue_depth"] == 4, what="a full queue")
        wait_until(lambda: shows_the_queue(console, client), timeout=REFRESH_S, what="the page")
        assert console.shown()["running"]["text"] == "1"
        assert console.shown()["queue_depth"]["text"] == "4"

        refused = [submit(client, f"over-{i}").status_code for i in range(6)]
        assert refused == [429] * 6
        page.wait_for_function(  # rejections per second: a difference of two reads
            "() => Number(document.querySelector('[data-field=rejections_per_second]')"
            ".dataset.value) > 0",
            timeout=3000,
        )
        total = int(client.get("/admin/status", headers=ADMIN).json()["rejections"]["queue_full"])
        assert total >= 6
        expect(page.locator("[data-reason=queue_full] [data-cell=total]")).to_have_text(
            f"{total:,}", timeout=REFRESH_S * 1000
        )

        workers = client.get("/admin/status", headers=ADMIN).json()["workers"]
        rows = page.locator("#workers tr")
        expect(rows).to_have_count(len(workers))
        expect(rows.first).to_contain_text(str(workers[0]["pid"]))
        expect(rows.first).to_contain_text(re.compile(r"\d+\.\d s ago"))

        page.wait_for_function(
            "() => Number(document.querySelector('#chart').dataset.samples) >= 5"
        )
        lines = console.chart_pixels("--c-queue", "--c-running", "--c-rejected")
        assert all(n > 20 for n in lines.values()), lines
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size > 10_000
    console.assert_key_kept_to_the_tab()


def test_setting_the_cap_from_the_page_lets_the_workers_run_more(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole
) -> None:
    stack = make_stack(
        workers=1,
        ollama_url=slow_sim.url,
        gpu_concurrency=1,
        worker_concurrency=8,
        admin_key=ADMIN_KEY,
        log_level="info",
    )
    with stack.client() as client:
        for i in range(8):
            assert submit(client, f"load-{i}").status_code == 202
        wait_until(lambda: queue(client)["running"] == 1, what="one job running")
        console = open_console(stack)
        console.sign_in()
        page = console.page
        cap_input = page.locator("#backends input").first
        expect(cap_input).to_be_visible()
        cap_input.fill("3")
        cap_input.press("Enter")
        set_at = time.monotonic()
        wait_until(lambda: queue(client)["gpu_concurrency"] == 3, timeout=1, what="cap 3")
        expect(page.locator("[data-field=gpu_concurrency]")).to_have_text("3", timeout=1000)
        assert time.monotonic() - set_at < REFRESH_S
        expect(page.locator("#cap-result")).to_contain_text("set to 3")
        wait_until(lambda: queue(client)["running"] == 3, timeout=3, what="3 jobs running")
        expect(page.locator("[data-field=running]")).to_have_text("3", timeout=REFRESH_S * 1000)
    assert console.puts == [200]
    console.assert_key_kept_to_the_tab()


def test_a_wrong_key_shows_403_and_changes_nothing(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole
) -> None:
    stack = make_stack(workers=1, ollama_url=slow_sim.url, gpu_concurrency=2, admin_key=ADMIN_KEY)
    console = open_console(stack)
    page = console.page
    console.sign_in("not-the-admin-key")
    error = page.locator("#login-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("403 forbidden")
    expect(page.locator("#console")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('gpugate.adminKey')") is None

    # A key that went stale (the gateway restarted with another one) while the tab was open:
    # the cap control's PUT is refused, said so, and the cap stays.
    console.sign_in()
    expect(page.locator("#backends input").first).to_be_visible()
    with page.expect_response(lambda r: r.request.method == "PUT") as put:
        page.evaluate(
            """() => {
                sessionStorage.setItem('gpugate.adminKey', 'a-stale-key');
                document.querySelector('#backends input').value = '7';
                document.querySelector('#backends form').requestSubmit();
            }"""
        )
    assert put.value.status == 403
    expect(error).to_contain_text("403 forbidden")
    expect(page.locator("#console")).to_be_hidden()
    assert console.puts == [403]
    with stack.client() as client:
        assert queue(client)["gpu_concurrency"] == 2
    console.assert_key_kept_to_the_tab()


def test_redis_down_shows_the_503_plainly(slow_sim: Process, open_console: OpenConsole) -> None:
    redis_proc = start_redis()
    stack = build_stack(redis_proc, slow_sim, admin_key=ADMIN_KEY)
    try:
        console = open_console(stack)
        console.sign_in()
        page = console.page
        expect(page.locator("[data-field=gpu_concurrency]")).to_have_text("2")
        redis_proc.stop()
        banner = page.locator("#banner")
        expect(banner).to_be_visible(timeout=5000)
        expect(banner).to_contain_text("503 unavailable")
        expect(banner).to_contain_text("Redis is unavailable")
        expect(page.locator("#updated")).to_contain_text("stale", timeout=5000)
        assert not console.errors, console.errors
    finally:
        stack.stop()
        redis_proc.stop()


# ---- what waits on the fleet and the usage counters -----------------------------------


def test_each_backend_shows_its_cap_and_running_and_takes_its_own_cap(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole
) -> None:
    other = start_sim("--tokens", "5", "--token-delay", "1.0", "--parallel", "64")
    try:
        backends = [
            {"name": "gpu-a", "url": slow_sim.url, "gpu_concurrency": 1},
            {"name": "gpu-b", "url": other.url, "gpu_concurrency": 1},
        ]
        stack = make_stack(
            workers=1, worker_concurrency=8, backends=json.dumps(backends), admin_key=ADMIN_KEY
        )
        with stack.client() as client:
            for i in range(8):
                assert submit(client, f"load-{i}").status_code == 202
            wait_until(lambda: queue(client)["running"] == 2, what="one job on each backend")
            console = open_console(stack)
            console.sign_in()
            page = console.page

            def rows_match() -> bool:
                want = {
                    b["name"]: {
                        "running": f"{b['running']:,}",
                        "gpu_concurrency": f"{b['gpu_concurrency']:,}",
                        "health": "healthy" if b["healthy"] else "down",
                    }
                    for b in queue(client)["backends"]
                }
                return sorted(want) == ["gpu-a", "gpu-b"] and page.evaluate(BACKEND_ROWS) == want

            wait_until(rows_match, timeout=REFRESH_S, what="a row per backend as in /v1/queue")
            expect(page.locator("#backends tr")).to_have_count(2)

            cap_b = page.get_by_label("New cap for gpu-b")
            cap_b.fill("2")
            cap_b.press("Enter")

            def caps() -> dict[str, int]:
                return {b["name"]: b["gpu_concurrency"] for b in queue(client)["backends"]}

            wait_until(lambda: caps() == {"gpu-a": 1, "gpu-b": 2}, timeout=1, what="gpu-b at 2")
            row_b = page.locator('#backends tr[data-backend="gpu-b"]')
            expect(row_b.locator("[data-cell=gpu_concurrency]")).to_have_text("2", timeout=1000)
            wait_until(lambda: queue(client)["running"] == 3, timeout=4, what="2 on gpu-b")
            wait_until(rows_match, timeout=REFRESH_S, what="the rows after the change")
        assert console.puts == [200]
    finally:
        other.stop()


def _keys_file(tmp_path: Path) -> Path:
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[tiers.free]
rate = "600/minute"
burst = 50
max_queued = 20
[[keys]]
name = "team-small"
sha256 = "{digest("small-key")}"
[[keys]]
name = "team-big"
sha256 = "{digest("big-key")}"
"""
    )
    return path


def test_keys_using_the_most_tokens_come_from_admin_usage(
    make_stack: StackFactory, slow_sim: Process, open_console: OpenConsole, tmp_path: Path
) -> None:
    sim_configure(slow_sim, token_delay_s=0, tokens=5)
    stack = make_stack(
        workers=1, ollama_url=slow_sim.url, keys_file=_keys_file(tmp_path), admin_key=ADMIN_KEY
    )
    with stack.client() as client:
        for key, n in (("small-key", 1), ("big-key", 3)):
            for _ in range(n):
                r = client.post("/api/generate", json=GEN, headers={"X-API-Key": key})
                assert r.status_code == 200, r.text

        def counted() -> dict[str, Any] | None:  # the workers add usage every 0.5 s
            r = client.get("/admin/usage", headers=ADMIN)
            assert r.status_code == 200, r.text
            keys = r.json()["keys"]
            served = {name: keys.get(name, {}).get("output_tokens") for name in keys}
            return keys if served == {"team-big": 15, "team-small": 5} else None

        usage = wait_until(counted, what="the usage of every job in /admin/usage")
        assert usage["team-big"]["requests"] == 3
        console = open_console(stack)
        console.sign_in()
        rows = console.page.locator("#usage tr")
        expect(rows.first).to_have_attribute("data-key", "team-big")
        expect(rows.nth(1)).to_have_attribute("data-key", "team-small")
        for name in ("team-big", "team-small"):
            u = usage[name]
            tokens = u["input_tokens"] + u["output_tokens"]
            row = console.page.locator(f'#usage tr[data-key="{name}"]')
            expect(row.locator("[data-cell=tokens]")).to_have_text(f"{tokens:,}")
            expect(row).to_contain_text(f"{u['requests']:,}")
