"""The status page's HTTP application (aiohttp) and its listener.

Contract:
- `make_app(deps)` is the aiohttp application; `WebServer(deps)` serves it
  on `[web] listen` (`start(host, port)` returns the bound address; port 0
  allowed), over TLS when `deps.tls_context` is set.
- Pages: ``/login`` (customers: account name and password, checked against
  the account's stored SCRAM-SHA-256 verifier), ``/operator/login``
  (operators: `[web] operators_file` password, or a client certificate
  that verified against ``[tls] client_ca`` and whose fingerprint the file
  lists), ``/operator`` (the whole queue: `views.operator_overview`, the
  in-memory rings of `history` and `provider.activity`), ``/customer`` and
  ``/customer/message/<id>`` (one account's domains only), ``POST
  /operator/queue`` (hold, release, delete), ``POST /logout``.
- Authorization is by the session's kind alone: ``/operator*`` needs an
  operator session, ``/customer*`` a customer one (else 303 to the login
  page for a GET, 403 for a POST).  A customer asking for a message with no
  recipient in its domains gets 404, the same as for a message that does
  not exist.
- Every POST carries the session's CSRF token (the login forms: the token
  of their own cookie); a missing or wrong one is 403 and changes nothing.
- Logins are throttled by the provider's `AuthThrottle`, as AUTH is: a
  locked-out address gets 429 before any check; a locked account gets 429
  from a suspect address whatever the password; a failure waits the
  throttle's delay, then 401, and counts as ``auth_failed`` in
  `fermoposta_smtp_rejects_total{listener="web"}`.  Unknown names cost the
  same hashing as known ones.
- Hold, release and delete go through `queue_admin` (its per-message log
  lines, with ``by``) and log one audit line on ``fermoposta.web``:
  ``audit: operator NAME: hold 2 messages: ID1 ID2``.
- Templates autoescape everything (senders and replies are the peers'
  text); responses carry a Content-Security-Policy without scripts,
  ``X-Frame-Options: DENY``, ``no-store`` caching and ``nosniff``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
from aiohttp import web

from fermoposta.mail.anvil import AuthThrottle
from fermoposta.ops import certs, metrics
from fermoposta.provider import queue_admin
from fermoposta.provider.activity import Activity
from fermoposta.provider.web import sessions as S
from fermoposta.provider.web import views
from fermoposta.provider.web.chart import line_chart
from fermoposta.provider.web.history import History
from fermoposta.provider.web.operators import (
    Operator,
    OperatorsFileError,
    check_password,
    load_operators,
    operator_for_certificate,
)
from fermoposta.smtp.sasl import certificate_fingerprint, make_scram_secret, verify_password
from fermoposta.store.base import QUEUE_STATES, Account, Store, StoreError

log = logging.getLogger("fermoposta.web")

_ID = re.compile(r"[0-9A-F]{1,40}")
_ACTIONS = ("hold", "release", "delete")
_DUMMY_SCRAM = make_scram_secret("not a password of anybody")
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@dataclass(slots=True)
class WebDeps:
    """What the page reads: the store and what the provider keeps in memory."""

    store: Store
    throttle: AuthThrottle
    activity: Activity
    history: History
    hostname: str
    node: str
    engine: str
    operators_file: Path | None = None
    session_idle: float = 1800.0
    tls_context: ssl.SSLContext | None = None
    certificate: Callable[[], certs.Validity | None] = lambda: None
    listeners: Callable[[], dict[str, tuple[str, int]]] = dict
    clock: Callable[[], float] = time.time
    started_at: float = field(default_factory=time.time)

    @property
    def secure(self) -> bool:
        return self.tls_context is not None


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("fermoposta.provider.web", "templates"),
                             autoescape=True)
    env.filters["size"] = _size
    env.filters["age"] = _age
    env.filters["utc"] = _utc
    return env


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _utc(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


DEPS = web.AppKey("deps", WebDeps)
SESSIONS = web.AppKey("sessions", S.Sessions)
ENV = web.AppKey("env", jinja2.Environment)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _render(request: web.Request, template: str, status: int = 200, **context: object
            ) -> web.Response:
    session: S.Session | None = request.get("session")
    page = request.app[ENV].get_template(template).render(
        session=session, hostname=request.app[DEPS].hostname, **context)
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    request["session"] = request.app[SESSIONS].get(request.cookies.get(S.COOKIE))
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects, 403, 429: the same headers
        _secure(exc.headers)
        raise
    except StoreError as exc:
        log.warning("status page: store error: %s", exc)
        response = web.Response(status=503, text="The queue store cannot answer now; "
                                "try again in a moment.\n")
    _secure(response.headers)
    return response


def _secure(headers: MutableMapping[str, str]) -> None:
    headers.setdefault("Content-Security-Policy", CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-store"


async def _need(kind: str, request: web.Request) -> S.Session:
    """The request's session of this kind, whose login still holds: the
    operator still in the operators file with the same password hashes (or
    certificate), the account still there with the same SCRAM secret.
    Else the session ends and the browser goes to the login page."""
    session: S.Session | None = request.get("session")
    if session is not None and session.kind == kind and not await _still_valid(request,
                                                                                session):
        request.app[SESSIONS].drop(session.token)
        log.info("status page: session of %s %s ended: its login no longer holds "
                 "(removed, or its password or certificate changed)", session.kind,
                 session.name, extra={"component": "web", "fields": {
                     "who": f"{session.kind}:{session.name}", "status": "revoked"}})
        session = None
    if session is None or session.kind != kind:
        if request.method == "GET":
            raise web.HTTPSeeOther("/operator/login" if kind == "operator" else "/login")
        raise web.HTTPForbidden(text="Not logged in for this.\n")
    return session


def _hashes_credential(operator: Operator) -> str:
    return hashlib.sha256("\n".join(sorted(operator.hashes)).encode()).hexdigest()


def _account_credential(account: Account) -> str:
    scram = account.scram
    return "" if scram is None else hashlib.sha256(scram.stored_key).hexdigest()


async def _still_valid(request: web.Request, session: S.Session) -> bool:
    deps = request.app[DEPS]
    if session.kind == "customer":
        account = await asyncio.to_thread(deps.store.get_account, session.name)
        return account is not None and hmac.compare_digest(
            _account_credential(account), session.credential)
    if deps.operators_file is None:
        return False
    try:
        operator = load_operators(deps.operators_file).get(session.name)
    except OperatorsFileError as exc:
        log.error("status page: %s", exc)
        return False  # fail closed: nothing to check the session against
    if operator is None:
        return False
    if session.via == "certificate":
        return session.credential in operator.fingerprints
    return hmac.compare_digest(_hashes_credential(operator), session.credential)


async def _form(request: web.Request, session: S.Session | None) -> dict[str, list[str]]:
    """The POSTed form, after its CSRF check (403 without a valid token)."""
    data = await request.post()
    values: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, str):
            values.setdefault(key, []).append(value)
    given = _one(values, "csrf")
    if session is not None:
        ok = S.check_csrf(session, given)
    else:
        ok = S.tokens_equal(request.cookies.get(S.LOGIN_COOKIE, ""), given)
    if not ok:
        raise web.HTTPForbidden(text="Missing or wrong CSRF token; reload the page.\n")
    return values


def _redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the page."""
    return web.Response(status=303, headers={"Location": location})


def _one(values: dict[str, list[str]], key: str) -> str:
    return (values.get(key) or [""])[0]


# --- logins ---------------------------------------------------------------------------------


def _login_page(request: web.Request, template: str, status: int = 200,
                **context: object) -> web.Response:
    token = request.cookies.get(S.LOGIN_COOKIE) or S.new_token()
    response = _render(request, template, status, login_csrf=token, **context)
    response.set_cookie(S.LOGIN_COOKIE, token, **S.cookie_options(request.app[DEPS].secure))
    return response


def _peer_fingerprint(request: web.Request) -> str | None:
    """The SHA-256 of the client certificate, when one verified (CERT_OPTIONAL)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return certificate_fingerprint(der) if der else None


def _logged_in(request: web.Request, kind: str, name: str, via: str,
               credential: str) -> web.Response:
    deps = request.app[DEPS]
    old = request.get("session")
    if old is not None:
        request.app[SESSIONS].drop(old.token)
    session = request.app[SESSIONS].create(kind, name, via, credential)
    log.info("status page: %s %s logged in (%s) from [%s]", kind, name, via, request.remote,
             extra={"component": "web", "fields": {"who": f"{kind}:{name}", "via": via}})
    response = _redirect("/operator" if kind == "operator" else "/customer")
    response.set_cookie(S.COOKIE, session.token, **S.cookie_options(deps.secure))
    response.del_cookie(S.LOGIN_COOKIE, path="/")
    return response


async def _throttled_check(request: web.Request, key: str | None,
                           check: Callable[[], bool]) -> str | None:
    """Run `check` under the throttle; None on success, else the page's message."""
    throttle, ip = request.app[DEPS].throttle, request.remote or ""
    locked = throttle.address_locked(ip)
    if locked > 0:
        metrics.AUTH_THROTTLED.labels("address").inc()
        raise web.HTTPTooManyRequests(
            text=f"Too many failed logins from your address; try again in {int(locked) + 1} s.\n")
    if throttle.account_refused(ip, key):
        metrics.AUTH_THROTTLED.labels("account").inc()
        raise web.HTTPTooManyRequests(text="Temporary login failure; try again later.\n")
    if not throttle.begin(ip):  # parallel logins cannot outrun the count
        metrics.AUTH_THROTTLED.labels("address").inc()
        raise web.HTTPTooManyRequests(text="Too many logins at once from your address; "
                                      "try again later.\n")
    try:
        if await asyncio.to_thread(check):
            if key is not None:
                throttle.success(ip, key)
            return None
        verdict = throttle.failure(ip, key)
    finally:
        throttle.end(ip)
    metrics.reject("web", "auth_failed")
    log.info("status page: failed login as %s from [%s]", key or "an unknown name",
             request.remote, extra={"component": "web", "fields": {"status": "auth_failed"}})
    if verdict.delay > 0:
        await asyncio.sleep(verdict.delay)
    return "Wrong name or password."


async def customer_login_page(request: web.Request) -> web.Response:
    return _login_page(request, "login.html", kind="customer")


async def customer_login(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    values = await _form(request, None)
    name, password = _one(values, "name").strip(), _one(values, "password")
    account = await asyncio.to_thread(deps.store.get_account, name) if name else None
    secret = account.scram if account is not None and account.scram is not None \
        else _DUMMY_SCRAM
    problem = await _throttled_check(
        request, account.name if account is not None else None,
        lambda: verify_password(secret, password) and account is not None
        and account.scram is not None)
    if problem is not None or account is None:
        return _login_page(request, "login.html", 401, kind="customer", error=problem,
                           name=name)
    return _logged_in(request, "customer", account.name, "password",
                      _account_credential(account))


async def operator_login_page(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    fingerprint = _peer_fingerprint(request)
    cert_name = None
    if fingerprint is not None and deps.operators_file is not None:
        try:
            cert_name = operator_for_certificate(load_operators(deps.operators_file),
                                                 fingerprint)
        except OperatorsFileError as exc:
            log.error("status page: %s", exc)
    return _login_page(request, "login.html", kind="operator", cert_name=cert_name,
                       configured=deps.operators_file is not None)


async def operator_login(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    values = await _form(request, None)
    if deps.operators_file is None:
        return _login_page(request, "login.html", 403, kind="operator", configured=False,
                           error="No operators are configured ([web] operators_file).")
    try:
        operators = load_operators(deps.operators_file)
    except OperatorsFileError as exc:
        log.error("status page: %s", exc)
        return _login_page(request, "login.html", 503, kind="operator", configured=True,
                           error="The operators file cannot be read; see the log.")
    if _one(values, "method") == "certificate":
        fingerprint = _peer_fingerprint(request)
        name = operator_for_certificate(operators, fingerprint) if fingerprint else None
        if name is None or fingerprint is None:
            raise web.HTTPForbidden(text="No client certificate of an operator was presented.\n")
        return _logged_in(request, "operator", name, "certificate", fingerprint)
    name, password = _one(values, "name").strip(), _one(values, "password")
    key = f"operator:{name}" if name in operators else None
    problem = await _throttled_check(request, key,
                                     lambda: check_password(operators, name, password))
    if problem is not None:
        return _login_page(request, "login.html", 401, kind="operator", configured=True,
                           error=problem, name=name)
    return _logged_in(request, "operator", name, "password",
                      _hashes_credential(operators[name]))


async def logout(request: web.Request) -> web.Response:
    session = request.get("session")
    await _form(request, session)
    if session is not None:
        request.app[SESSIONS].drop(session.token)
    response = _redirect("/login" if session is None or session.kind == "customer"
                         else "/operator/login")
    response.del_cookie(S.COOKIE, path="/")
    return response


async def index(request: web.Request) -> web.Response:
    session = request.get("session")
    target = "/login" if session is None else f"/{session.kind}"
    raise web.HTTPSeeOther(target)


# --- operator -------------------------------------------------------------------------------


async def operator_page(request: web.Request) -> web.Response:
    session = await _need("operator", request)
    deps = request.app[DEPS]
    domain = request.query.get("domain", "").strip().lower()
    state = request.query.get("state", "")
    if state not in QUEUE_STATES:
        state = ""
    now = deps.clock()
    overview = await asyncio.to_thread(views.operator_overview, deps.store, now,
                                       domain=domain, state=state)
    rejects, since = deps.history.rejects_last_hour(now)
    chart = line_chart({d: deps.history.held_series(d) for d in deps.history.domains()}, now)
    validity = deps.certificate()
    notices, session.notices = session.notices, []
    return _render(request, "operator.html", o=overview, now=now, rejects=rejects,
                   rejects_since=since, chart=chart, cert=validity,
                   cert_left=None if validity is None
                   else validity.not_after_timestamp - now,
                   activity=deps.activity, node=deps.node, engine=deps.engine,
                   listeners=deps.listeners(), started_at=deps.started_at,
                   states=QUEUE_STATES, notices=notices, csrf=session.csrf)


async def operator_queue(request: web.Request) -> web.Response:
    session = await _need("operator", request)
    values = await _form(request, session)
    action = _one(values, "action")
    ids = list(dict.fromkeys(i.strip().upper() for i in values.get("id", []) if i.strip()))
    if action not in _ACTIONS or not ids or not all(_ID.fullmatch(i) for i in ids):
        raise web.HTTPBadRequest(text="Expected an action (hold, release, delete) and "
                                 "queue ids.\n")
    store = request.app[DEPS].store
    by = f"operator:{session.name}"
    if action == "delete":
        done = await asyncio.to_thread(queue_admin.delete, store, ids, by=by)
        changed = len(done)
    else:
        func = queue_admin.hold if action == "hold" else queue_admin.release
        result = await asyncio.to_thread(func, store, ids, by=by)
        done, changed = list(result), sum(result.values())
    log.info("audit: operator %s: %s %d message%s: %s", session.name, action, len(ids),
             "" if len(ids) == 1 else "s", " ".join(ids),
             extra={"component": "web", "fields": {
                 "who": by, "action": action, "queue_ids": " ".join(ids),
                 "found": len(done), "changed": changed}})
    unknown = [i for i in ids if i not in set(done)]
    verb = {"hold": "Placed on hold", "release": "Released from hold",
            "delete": "Deleted"}[action]
    note = f"{verb}: {' '.join(i for i in ids if i in set(done)) or 'nothing'}"
    if action != "delete":
        note += f" ({changed} recipient{'s' if changed != 1 else ''} changed)"
    if unknown:
        note += f"; not in the queue: {' '.join(unknown)}"
    session.notices.append(note)
    back = _one(values, "back")
    raise web.HTTPSeeOther(back if back.startswith("/operator") else "/operator")


# --- customer -------------------------------------------------------------------------------


async def customer_page(request: web.Request) -> web.Response:
    session = await _need("customer", request)
    deps = request.app[DEPS]
    account = await asyncio.to_thread(deps.store.get_account, session.name)
    if account is None:
        request.app[SESSIONS].drop(session.token)
        raise web.HTTPSeeOther("/login")
    domains, held = await asyncio.to_thread(views.customer_held, deps.store, session.name)
    return _render(request, "customer.html", account=account, domains=domains, held=held,
                   now=deps.clock(), pulls=deps.activity.pulls(session.name),
                   running=deps.activity.in_progress(session.name), csrf=session.csrf)


async def customer_message(request: web.Request) -> web.Response:
    session = await _need("customer", request)
    deps = request.app[DEPS]
    message_id = request.match_info["id"].upper()
    row = None
    if _ID.fullmatch(message_id):
        row = await asyncio.to_thread(views.customer_message, deps.store, session.name,
                                      message_id)
    if row is None:
        return _render(request, "message.html", 404, row=None, now=deps.clock(),
                       csrf=session.csrf)
    return _render(request, "message.html", row=row, now=deps.clock(), csrf=session.csrf)


async def stylesheet(request: web.Request) -> web.Response:
    css = resources.files("fermoposta.provider.web").joinpath("templates/style.css").read_text()
    return web.Response(text=css, content_type="text/css")


def make_app(deps: WebDeps) -> web.Application:
    app = web.Application(middlewares=[_headers], client_max_size=64 * 1024)
    app[DEPS] = deps
    app[SESSIONS] = S.Sessions(deps.session_idle)
    app[ENV] = _environment()
    app.router.add_get("/", index)
    app.router.add_get("/style.css", stylesheet)
    app.router.add_get("/login", customer_login_page)
    app.router.add_post("/login", customer_login)
    app.router.add_get("/operator/login", operator_login_page)
    app.router.add_post("/operator/login", operator_login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/operator", operator_page)
    app.router.add_post("/operator/queue", operator_queue)
    app.router.add_get("/customer", customer_page)
    app.router.add_get("/customer/message/{id}", customer_message)
    return app


class WebServer:
    """The `[web] listen` listener."""

    def __init__(self, deps: WebDeps) -> None:
        self.deps = deps
        self.app = make_app(deps)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.deps.history.start()
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.deps.tls_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await self.deps.history.stop()
            raise
        self._runner = runner
        server = site._server
        assert server is not None and isinstance(server, asyncio.Server)
        name = server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.deps.history.stop()
