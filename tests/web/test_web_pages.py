"""The status page over real HTTP(S) (issue 12): logins, what each audience
sees, isolation between accounts, CSRF, escaping, throttling, hold/release/
delete and their audit lines.  A provider runs with `[web] listen` on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD, Certs, RunningProvider
from fermoposta.smtp.sasl import make_scram_secret
from fermoposta.store.base import RecipientState
from support.web import (
    OPERATOR,
    OPERATOR_PASSWORD,
    WebClient,
    base_url,
    csrf_of,
    enqueue,
    operators_file,
    web_extra,
)

EVIL = "<script>alert(1)</script>@x.test"


@pytest.fixture
async def web(provider_factory: Callable[..., Any], tmp_path: Path, certs: Certs
              ) -> AsyncIterator[Callable[..., Any]]:
    clients: list[WebClient] = []

    async def start(*, tls: bool = True, extra: str = "", ops_extra: str = ""
                    ) -> tuple[RunningProvider, Callable[..., WebClient]]:
        ops = operators_file(tmp_path, ops_extra)
        running: RunningProvider = await provider_factory(
            tls=tls, extra=web_extra(ops) + extra)

        def client(cert: Path | None = None) -> WebClient:
            c = WebClient(base_url(running), certs.client_context() if tls else None, cert)
            clients.append(c)
            return c

        return running, client

    yield start
    for c in clients:
        await c.close()


def state_of(running: RunningProvider, message_id: str) -> set[RecipientState]:
    message = running.store.get_message(message_id)
    assert message is not None
    return {r.state for r in message.recipients}


async def test_operator_page_numbers_and_escaping(web: Callable[..., Any]) -> None:
    running, client = await web()
    enqueue(running.store, EVIL, "bob@example.org")
    enqueue(running.store, "carol@sender.test", "bob@example.org", body=b"x" * 5000)
    enqueue(running.store, "dave@sender.test", "eve@other.test")
    assert running.provider.web is not None
    await running.provider.web.deps.history.sample_held()  # as every 10 minutes
    browser = client()
    page = await browser.login("operator", OPERATOR, OPERATOR_PASSWORD)
    assert page.status == 200 and page.url.endswith("/operator")
    row = re.search(r'<tr id="held-example.org">.*?class="num messages">(\d+)<', page.text, re.S)
    assert row is not None and row.group(1) == "2"
    other = re.search(r'<tr id="held-other.test">.*?class="num messages">(\d+)<', page.text, re.S)
    assert other is not None and other.group(1) == "1"
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@x.test" in page.text
    assert '<tr id="account-acme">' in page.text and "example.org" in page.text
    assert "Expires " in page.text  # the [tls] certificate's date
    chart = page.text.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert "example.org (2)" in chart and "other.test (1)" in chart
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # The live nodes: this one, its process, and the three messages it accepted.
    nodes = page.text.split('<table id="nodes">', 1)[1].split("</table>", 1)[0]
    node = running.store.node
    live = re.search(rf"<td>{re.escape(node)} <b>\(this node\)</b></td>"
                     r'<td class="num">(\d+)</td><td>(\d+) s ago</td><td class="num">(\d+)</td>',
                     nodes)
    assert live is not None and int(live.group(1)) >= 1 and live.group(3) == "3", nodes
    # A customer's page escapes the sender too.
    customer = client()
    page = await customer.login("customer", "acme", PASSWORD)
    assert page.status == 200 and page.url.endswith("/customer")
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    assert 'every = "10m"' in page.text  # acme may not wait for its ATRN reply
    account = running.store.get_account("acme")
    assert account is not None
    running.store.update_account(dataclasses.replace(account, atrn_wait=300.0))
    page = await customer.get("/customer")
    assert 'every = "push"' in page.text and 'every = "10m"' not in page.text


async def test_customer_sees_only_its_own_mail(web: Callable[..., Any]) -> None:
    running, client = await web()
    mine = enqueue(running.store, "a@sender.test", "bob@example.org")
    foreign = enqueue(running.store, "secret-sender@sender.test", "eve@other.test")
    both = enqueue(running.store, "c@sender.test", "bob@example.org", "eve@other.test")
    acme = client()
    page = await acme.login("customer", "acme", PASSWORD)
    assert mine in page.text and both in page.text
    assert foreign not in page.text and "secret-sender" not in page.text
    assert "eve@other.test" not in page.text  # another account's recipient of a shared message
    assert (await acme.get(f"/customer/message/{mine}")).status == 200
    shared = await acme.get(f"/customer/message/{both}")
    assert shared.status == 200 and "eve@other.test" not in shared.text
    by_url = await acme.get(f"/customer/message/{foreign}")
    assert by_url.status == 404 and "secret-sender" not in by_url.text
    assert (await acme.get("/customer/message/FFFFFFFFFFFF")).status == 404
    # The operator pages and actions: not for a customer, whatever the id.
    csrf = csrf_of(page.text)
    assert (await acme.get("/operator", allow_redirects=False)).status == 303
    for action in ("hold", "delete"):
        post = await acme.post("/operator/queue", {"csrf": csrf, "action": action,
                                                   "id": foreign})
        assert post.status == 403
    assert state_of(running, foreign) == {RecipientState.HELD}
    # The other account sees its message and not acme's.
    other = client()
    page = await other.login("customer", "other", PASSWORD)
    assert foreign in page.text and mine not in page.text
    assert (await other.get(f"/customer/message/{mine}")).status == 404


async def test_hold_release_delete_with_audit_lines(web: Callable[..., Any],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    running, client = await web()
    message_id = enqueue(running.store, "a@sender.test", "bob@example.org")
    browser = client()
    page = await browser.login("operator", OPERATOR, OPERATOR_PASSWORD)
    csrf = csrf_of(page.text)
    caplog.set_level(logging.INFO, logger="fermoposta")
    page = await browser.post("/operator/queue", {"csrf": csrf, "action": "hold",
                                                  "id": message_id})
    assert page.status == 200 and "Placed on hold: " + message_id in page.text
    assert state_of(running, message_id) == {RecipientState.HOLD}
    assert f"audit: operator {OPERATOR}: hold 1 message: {message_id}" in caplog.text
    assert f"{message_id}: placed on hold" in caplog.text
    await browser.post("/operator/queue", {"csrf": csrf, "action": "release", "id": message_id})
    assert state_of(running, message_id) == {RecipientState.HELD}
    assert f"audit: operator {OPERATOR}: release 1 message: {message_id}" in caplog.text
    page = await browser.post("/operator/queue", {"csrf": csrf, "action": "delete",
                                                  "id": [message_id, "ABCDEF012345"]})
    assert running.store.get_message(message_id) is None
    assert "not in the queue: ABCDEF012345" in page.text
    assert f"{message_id}: removed" in caplog.text
    bad = await browser.post("/operator/queue", {"csrf": csrf, "action": "bounce",
                                                 "id": message_id})
    assert bad.status == 400


async def test_csrf_is_checked_on_every_post(web: Callable[..., Any]) -> None:
    running, client = await web()
    message_id = enqueue(running.store, "a@sender.test", "bob@example.org")
    browser = client()
    page = await browser.login("operator", OPERATOR, OPERATOR_PASSWORD)
    assert page.status == 200
    for data in ({"action": "hold", "id": message_id},
                 {"csrf": "wrong", "action": "hold", "id": message_id}):
        assert (await browser.post("/operator/queue", data)).status == 403
    assert state_of(running, message_id) == {RecipientState.HELD}
    assert (await browser.post("/logout", {})).status == 403
    # Logins too: the form's token must come back with it.
    fresh = client()
    login = await fresh.post("/operator/login", {"name": OPERATOR,
                                                 "password": OPERATOR_PASSWORD})
    assert login.status == 403
    # Logged out: the old cookie no longer works.
    assert (await browser.post("/logout", {"csrf": csrf_of(page.text)})).status == 200
    assert (await browser.post("/operator/queue", {"csrf": csrf_of(page.text), "action": "hold",
                                                   "id": message_id})).status == 403


async def test_wrong_password_and_cookie_flags(web: Callable[..., Any]) -> None:
    _running, client = await web()
    browser = client()
    for kind, name in (("customer", "acme"), ("customer", "nobody"),
                       ("operator", OPERATOR), ("operator", "mallory")):
        page = await browser.login(kind, name, "wrong")
        assert page.status == 401 and "Wrong name or password." in page.text
    assert "fermoposta_session" not in {c.key for c in browser.session.cookie_jar}
    assert (await browser.get("/operator", allow_redirects=False)).status == 303
    async with browser.session.get(browser.base + "/login", ssl=browser.ssl) as r:
        csrf = csrf_of(await r.text())
    async with browser.session.post(browser.base + "/login", ssl=browser.ssl,
                                    allow_redirects=False,
                                    data={"csrf": csrf, "name": "acme",
                                          "password": PASSWORD}) as r:
        assert r.status == 303
        cookie = next(v for v in r.headers.getall("Set-Cookie") if "fermoposta_session" in v)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie


async def test_plain_http_cookie_is_not_secure(web: Callable[..., Any]) -> None:
    running, client = await web(tls=False)
    browser = client()
    assert base_url(running).startswith("http://")
    async with browser.session.get(browser.base + "/login") as r:
        csrf = csrf_of(await r.text())
    async with browser.session.post(browser.base + "/login", allow_redirects=False,
                                    data={"csrf": csrf, "name": "acme",
                                          "password": PASSWORD}) as r:
        assert r.status == 303
        cookie = next(v for v in r.headers.getall("Set-Cookie") if "fermoposta_session" in v)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie


async def test_logins_are_throttled_like_auth(web: Callable[..., Any]) -> None:
    _running, client = await web(extra="\n[auth_throttle]\nfailure_delay = 0\n"
                                      "max_failures_per_ip = 3\n")
    browser = client()
    for _ in range(3):
        assert (await browser.login("customer", "acme", "wrong")).status == 401
    # Locked out: even the right password gets 429, and so do operators.
    assert (await browser.login("customer", "acme", PASSWORD)).status == 429
    assert (await browser.login("operator", OPERATOR, OPERATOR_PASSWORD)).status == 429
    page = await browser.get("/operator")
    assert "Operator login" in page.text


async def test_operator_logs_in_with_a_client_certificate(web: Callable[..., Any],
                                                          certs: Certs) -> None:
    _running, client = await web(ops_extra=f"bob:sha256:{certs.client_fingerprint}\n")
    browser = client(cert=certs.client_cert_file)
    form = await browser.get("/operator/login")
    assert "Log in as bob with your certificate" in form.text
    page = await browser.post("/operator/login", {"csrf": csrf_of(form.text),
                                                  "method": "certificate"})
    assert page.status == 200 and page.url.endswith("/operator")
    assert '<b id="who">bob</b>' in page.text
    # Without a certificate: no such button, and the POST is refused.
    plain = client()
    form = await plain.get("/operator/login")
    assert "with your certificate" not in form.text
    refused = await plain.post("/operator/login", {"csrf": csrf_of(form.text),
                                                   "method": "certificate"})
    assert refused.status == 403


async def test_customer_page_shows_pulls_from_activity(web: Callable[..., Any]) -> None:
    running, client = await web()
    activity = running.provider.activity
    handle = activity.started("acme", ["example.org"])
    activity.finished(handle, messages=3, delivered=3, deferred=0, failed=0, aborted=None)
    activity.started("acme", ["example.org"])
    activity.finished(activity.started("other", ["other.test"]), messages=1, delivered=0,
                      deferred=0, failed=0, aborted="peer closed")
    browser = client()
    page = await browser.login("customer", "acme", PASSWORD)
    pulls = page.text.split('<table id="pulls">', 1)[1].split("</table>", 1)[0]
    assert "in progress" in pulls and ">ok<" in pulls and "peer closed" not in pulls
    operator = client()
    page = await operator.login("operator", OPERATOR, OPERATOR_PASSWORD)
    row = page.text.split('<tr id="account-acme">', 1)[1].split("</tr>", 1)[0]
    assert "in progress" in row and "(3 delivered)" in row


async def test_web_listener_errors(tmp_path: Path, certs: Certs) -> None:
    import socket

    from conftest import write_config
    from fermoposta.config import ConfigError, load_provider_config
    from fermoposta.provider.server import ListenError, Provider
    from fermoposta.store import open_store

    missing = write_config(tmp_path, certs, extra=web_extra(tmp_path / "no-such-file"))
    with pytest.raises(ConfigError, match=r"\[web\] operators_file: file .* does not exist"):
        load_provider_config(missing)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, certs, extra=f'[web]\nlisten = "127.0.0.1:{port}"\n')
        config = load_provider_config(path)
        store = open_store(config.data_dir)
        try:
            with pytest.raises(ListenError, match=f"cannot listen on web 127.0.0.1:{port}"):
                await Provider(config, store).start()
        finally:
            store.close()


async def test_logins_sent_in_parallel_cannot_outrun_the_throttle(
        web: Callable[..., Any]) -> None:
    # 20 guesses at once, the right password last: at most 3 are checked
    # (max_failures_per_ip), the rest get 429 unchecked, the right one too.
    _running, client = await web(tls=False, extra="\n[auth_throttle]\nfailure_delay = 1\n"
                                                  "max_failures_per_ip = 3\n")
    browser = client()
    csrf = await browser.csrf("/login")

    async def guess(password: str) -> int:
        page = await browser.post("/login", {"csrf": csrf, "name": "acme",
                                             "password": password}, allow_redirects=False)
        return page.status

    codes = await asyncio.gather(*(guess(f"wrong{i}") for i in range(19)), guess(PASSWORD))
    assert codes.count(401) <= 3 and codes[-1] != 303, codes
    assert set(codes) <= {401, 429}, codes


async def test_a_revoked_login_ends_its_session(web: Callable[..., Any], tmp_path: Path) -> None:
    running, client = await web(tls=False)
    mid = enqueue(running.store, "a@sender.test", "bob@example.org")
    operator, customer = client(), client()
    page = await operator.login("operator", OPERATOR, OPERATOR_PASSWORD)
    csrf = csrf_of(page.text)
    await customer.login("customer", "acme", PASSWORD)
    assert (await customer.get("/customer", allow_redirects=False)).status == 200
    # The operator's line leaves the operators file: the old session can no
    # longer delete anything.
    (tmp_path / "operators").write_text("# alice is gone\n")
    refused = await operator.post("/operator/queue", {"csrf": csrf, "action": "delete",
                                                      "id": mid}, allow_redirects=False)
    assert refused.status == 403
    assert running.store.get_message(mid) is not None
    assert (await operator.get("/operator", allow_redirects=False)).status == 303
    # The customer's password changes: its session ends too.
    account = running.store.get_account("acme")
    assert account is not None
    running.store.update_account(dataclasses.replace(
        account, scram=make_scram_secret("a new password")))
    assert (await customer.get("/customer", allow_redirects=False)).status == 303


async def test_customer_logins_cannot_push_an_operator_out(
        web: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fermoposta.provider.web import sessions
    from fermoposta.provider.web.app import SESSIONS

    running, client = await web(tls=False)
    running.provider.web.app[SESSIONS].max_sessions = 5  # stands for 10,000
    monkeypatch.setattr(sessions, "MAX_PER_NAME", 2)  # stands for 20
    operator = client()
    await operator.login("operator", OPERATOR, OPERATOR_PASSWORD)
    for _ in range(6):
        await client().login("customer", "acme", PASSWORD)
    assert (await operator.get("/operator", allow_redirects=False)).status == 200
    assert len(running.provider.web.app[SESSIONS]) == 3  # the operator and acme's last 2


async def test_log_out_from_a_login_page(web: Callable[..., Any]) -> None:
    _running, client = await web(tls=False)
    browser = client()
    await browser.login("customer", "acme", PASSWORD)
    page = await browser.get("/login")  # logged in, on the login page
    csrf = re.search(r'action="/logout".*?name="csrf" value="([^"]+)"', page.text, re.S)
    assert csrf is not None
    out = await browser.post("/logout", {"csrf": csrf.group(1)}, allow_redirects=False)
    assert out.status == 303
    assert (await browser.get("/customer", allow_redirects=False)).status == 303
