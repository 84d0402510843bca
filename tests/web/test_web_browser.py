"""The status page in a real browser (issue 12): headless Chromium, driven over
the DevTools protocol, logs in as an operator, reads the held-mail numbers,
holds and releases a message by clicking its buttons, then logs in as a
customer and reads its page.  With FERMOPOSTA_SCREENSHOTS=DIR it saves
operator.png and customer.png there (docs/web-operator.png and
docs/web-customer.png were made so).

Skipped only when /usr/bin/chromium is absent and CI is not set; with CI set
it fails instead (.ci/run installs Debian's `chromium`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import PASSWORD, RunningProvider
from fermoposta.store.base import RecipientState
from support.web import OPERATOR, OPERATOR_PASSWORD, base_url, enqueue, operators_file, web_extra

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (CI is set: .ci/run installs chromium)")
        pytest.skip("chromium is not installed")


class Browser:
    """One page of a headless Chromium, over its DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        await self.ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if message.get("id") == number:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(AssertionError):
                value = await self.js(expression)
                if value:
                    return value
            assert loop.time() < deadline, f"timed out waiting for {expression}"
            await asyncio.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"document.readyState === 'complete' && location.href.startsWith("
                            f"{json.dumps(url)})")

    async def click_and_wait(self, selector: str, path: str) -> None:
        """Click (a real form submission) and wait for the page at `path` to load."""
        marker = await self.js("window.__mark = Math.random(); window.__mark")
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")
        await self.wait_for(f"window.__mark !== {marker} && document.readyState === 'complete'"
                            f" && location.pathname === {json.dumps(path)}")

    async def screenshot(self, path: Path) -> None:
        await self.send("Emulation.clearDeviceMetricsOverride")
        height = await self.js("document.body.scrollHeight + 16")
        await self.send("Emulation.setDeviceMetricsOverride", width=1200,
                        height=int(height), deviceScaleFactor=1, mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    _need_chromium()
    profile = tmp_path / "chromium"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
        "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions",
        "--window-size=1200,900", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert process.returncode is None, "chromium exited at start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                b = Browser(ws)
                await b.send("Page.enable")
                yield b
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_browser_login_numbers_hold_release(browser: Browser, tmp_path: Path,
                                                  provider_factory: Callable[..., Any]) -> None:
    running: RunningProvider = await provider_factory(extra=web_extra(operators_file(tmp_path)))
    store = running.store
    message_id = enqueue(store, "alice@sender.test", "bob@example.org", body=b"x" * 3000)
    enqueue(store, "<script>alert(1)</script>@x.test", "bob@example.org")
    enqueue(store, "carol@sender.test", "eve@other.test")
    assert running.provider.web is not None
    await running.provider.web.deps.history.sample_held()
    base = base_url(running)
    assert base.startswith("https://")

    await browser.goto(base + "/operator/login")
    await browser.js(f"document.querySelector('#name').value = {json.dumps(OPERATOR)};"
                     f"document.querySelector('#password').value = "
                     f"{json.dumps(OPERATOR_PASSWORD)}")
    await browser.click_and_wait("#login", "/operator")
    assert await browser.js("document.querySelector('#who').textContent") == OPERATOR
    held = await browser.js(
        "document.querySelector('#held-example\\\\.org .messages').textContent")
    assert held == "2"
    assert await browser.js(
        "document.querySelector('#held-other\\\\.test .messages').textContent") == "1"
    # The sender is text, not markup: no script element came from it.
    assert await browser.js("document.querySelectorAll('script').length") == 0
    assert "<script>alert(1)</script>@x.test" in await browser.js(
        "document.querySelector('#messages').textContent")

    await browser.click_and_wait(f"#hold-{message_id}", "/operator")
    assert "Placed on hold: " + message_id in await browser.js(
        "document.querySelector('#notice').textContent")
    assert {r.state for r in store.get_message(message_id).recipients} == {  # type: ignore[union-attr]
        RecipientState.HOLD}
    row = await browser.js(f"document.querySelector('#msg-{message_id}').textContent")
    assert "hold" in row
    shots = os.environ.get("FERMOPOSTA_SCREENSHOTS")
    if shots:
        await browser.screenshot(Path(shots) / "operator.png")
    await browser.click_and_wait(f"#release-{message_id}", "/operator")
    assert "Released from hold: " + message_id in await browser.js(
        "document.querySelector('#notice').textContent")
    assert {r.state for r in store.get_message(message_id).recipients} == {  # type: ignore[union-attr]
        RecipientState.HELD}

    await browser.click_and_wait("header button", "/operator/login")
    await browser.goto(base + "/login")
    await browser.js("document.querySelector('#name').value = 'acme';"
                     f"document.querySelector('#password').value = {json.dumps(PASSWORD)}")
    await browser.click_and_wait("#login", "/customer")
    assert await browser.js("document.querySelector('#held-count').textContent") == "2"
    assert await browser.js("document.querySelector('#domains').textContent") == "example.org"
    assert "eve@other.test" not in await browser.js("document.body.textContent")
    if shots:
        await browser.screenshot(Path(shots) / "customer.png")
