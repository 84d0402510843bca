"""A real DNS server for outbound tests: dnsmasq on 127.0.0.1 and a free port.

`dnsmasq_server(mx=..., hosts=...)` starts ``dnsmasq --no-daemon`` (by PID,
stopped at the end) with no upstream and no /etc/hosts: it answers only for
the records given, and is authoritative-like for ``.test`` (``--local``), so

- a name under ``.test`` without records → NXDOMAIN;
- a name with an A record and no MX → NOERROR/NODATA for MX (implicit MX);
- ``("nullmx.test", ".", 0)`` → a null MX (RFC 7505), which dnsmasq serves;
- a name outside ``.test`` → REFUSED (the resolver sees a server failure:
  a temporary DNS error).

The test is skipped, with the reason, when dnsmasq is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for dnsmasq")


def _ready(port: int, timeout: float) -> bool:
    import dns.message
    import dns.query

    deadline = time.monotonic() + timeout
    query = dns.message.make_query("probe.test", "A")
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def dnsmasq_server(*, mx: Sequence[tuple[str, str, int]] = (),
                   hosts: dict[str, str] | None = None,
                   txt: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[str, int]]:
    """Yield ("127.0.0.1", port) of a dnsmasq serving `mx` (domain, host,
    preference), `hosts` (name -> IPv4 address) and `txt` (name, text) records."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq; .ci/run installs it)")
    port = _free_port()
    args = [
        "dnsmasq", "--no-daemon", "--keep-in-foreground", f"--port={port}",
        "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
        "--conf-file=/dev/null", "--pid-file", "--local=/test/", "--cache-size=0",
    ]
    if os.geteuid() == 0:
        args.append("--user=root")  # do not drop to a user that may not exist
    for domain, host, preference in mx:
        args.append(f"--mx-host={domain},{host},{preference}")
    for name, address in (hosts or {}).items():
        args.append(f"--host-record={name},{address}")
    for name, text in txt:
        args.append(f"--txt-record={name},{text}")  # one argument: no shell quoting
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _ready(port, 5.0):
            proc.terminate()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"dnsmasq did not start: {err.decode(errors='replace')}")
        yield "127.0.0.1", port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
