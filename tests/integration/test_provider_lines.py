"""`fermoposta provider run` as a process (issue 11, item 10): a port in use
is reported with the listener and the address (exit 71); SIGTERM ends the
log with ``stopped``; an expiring certificate is warned about at start."""

from __future__ import annotations

import datetime
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import write_config
from peers import free_port, wait_for_port

FERMOPOSTA = [sys.executable, "-m", "fermoposta"]


def test_a_busy_port_is_named_and_exits_71(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, None, ports=(port, free_port()))
        result = subprocess.run([*FERMOPOSTA, "-c", str(config), "provider", "run"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 71, result.stderr
    assert (f"error: cannot listen on mx 127.0.0.1:{port}: [Errno 98] Address already in use"
            in result.stderr)
    assert "stopped" not in result.stderr  # it never started


def test_sigterm_ends_the_log_with_stopped(tmp_path: Path, certs) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", not_before=now - datetime.timedelta(1),
                               not_after=now + datetime.timedelta(days=7))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "own.cert"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "own.key"))
    mx, odmr = free_port(), free_port()
    config = write_config(tmp_path, None, ports=(mx, odmr))
    config.write_text(config.read_text() + f'\n[tls]\ncert = "{tmp_path / "own.cert"}"\n'
                      f'key = "{tmp_path / "own.key"}"\n')
    log = tmp_path / "provider.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([*FERMOPOSTA, "-c", str(config), "provider", "run"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_port(mx)
            wait_for_port(odmr)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = log.read_text().splitlines()
    assert lines[-1].endswith("]: stopped"), lines[-3:]
    warnings = [line for line in lines if "expires on " in line]
    # Once, as the daemon's log line (config check prints it on stderr instead).
    assert len(warnings) == 1, warnings
    assert "fermoposta/provider[" in warnings[0] and "warning: TLS certificate " in warnings[0]
    assert "in 7 days" in warnings[0], warnings


# A provider whose start is followed at once by a SIGTERM and a SIGHUP, both
# before the provider says it is ready (as a supervisor that stops or reloads
# a provider it has just started).
_SIGNALLED_DURING_START = """
import asyncio, os, signal, sys
from fermoposta import cli
from fermoposta.provider.server import Provider

real_start = Provider.start

async def start(self):
    addresses = await real_start(self)  # the listeners are open
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.2)  # the loop takes both while start is still under way
    return addresses

Provider.start = start
sys.exit(cli.main(["-c", sys.argv[1], "provider", "run"]))
"""


def test_signals_during_start_up_stop_it_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path, None, ports=(free_port(), free_port()))
    result = subprocess.run([sys.executable, "-c", _SIGNALLED_DURING_START, str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # not killed by the default action
    lines = result.stderr.splitlines()
    assert lines[-1].endswith("]: stopped"), lines[-3:]
    assert any("SIGHUP before the provider was ready: nothing to reload" in line
               for line in lines)
