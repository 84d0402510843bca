"""A provider with its status page on, and an HTTP client that logs in like a browser."""

from __future__ import annotations

import io
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from fermoposta.provider.web.operators import hash_password
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState, Store

OPERATOR, OPERATOR_PASSWORD = "alice", "operator secret"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def operators_file(directory: Path, extra: str = "") -> Path:
    path = directory / "operators"
    path.write_text(f"# operators\n{OPERATOR}:{hash_password(OPERATOR_PASSWORD)}\n{extra}")
    return path


def web_extra(operators: Path, more: str = "") -> str:
    return f'[web]\nlisten = "127.0.0.1:0"\noperators_file = "{operators}"\n{more}'


def enqueue(store: Store, sender: str, *recipients: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n",
            state: RecipientState = RecipientState.HELD) -> str:
    rcpts = tuple(NewRecipient(r, r.rpartition("@")[2], state) for r in recipients)
    return store.enqueue(NewMessage(sender=sender, recipients=rcpts, origin=MessageOrigin.MX),
                         io.BytesIO(body))


def csrf_of(page: str) -> str:
    match = _CSRF.search(page)
    assert match is not None, page[:500]
    return match.group(1)


@dataclass
class Page:
    status: int
    text: str
    url: str
    headers: Any


class WebClient:
    """One browser: its own cookie jar (cookies for 127.0.0.1 allowed)."""

    def __init__(self, base: str, ssl_context: ssl.SSLContext | None = None,
                 cert: Path | None = None) -> None:
        self.base = base
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else False
        if cert is not None and isinstance(self.ssl, ssl.SSLContext):
            self.ssl.load_cert_chain(str(cert))
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.session.get(self.base + path, ssl=self.ssl, **kw) as r:
            return Page(r.status, await r.text(), str(r.url), r.headers)

    async def post(self, path: str, data: Any, **kw: Any) -> Page:
        async with self.session.post(self.base + path, data=data, ssl=self.ssl, **kw) as r:
            return Page(r.status, await r.text(), str(r.url), r.headers)

    async def login(self, kind: str, name: str, password: str) -> Page:
        path = "/operator/login" if kind == "operator" else "/login"
        form = await self.get(path)
        return await self.post(path, {"csrf": csrf_of(form.text), "name": name,
                                      "password": password})

    async def csrf(self, path: str) -> str:
        return csrf_of((await self.get(path)).text)


def base_url(provider: Any) -> str:
    host, port = provider.provider.addresses["web"]
    scheme = "https" if provider.provider.tls_context is not None else "http"
    return f"{scheme}://{host}:{port}"


ClientFactory = Callable[..., WebClient]
