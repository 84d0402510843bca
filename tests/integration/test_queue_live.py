"""The queue tools on the store of a running provider: its outbound runner
defers a message, and `fermoposta queue retry|hold|release|delete` (run in
another thread, on its own connection to the store, as from a shell) steer
what the runner does next."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningProvider, free_port
from fermoposta.cli import main
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState


async def run(capsys: pytest.CaptureFixture[str], config: object, *argv: str
              ) -> tuple[int, str]:
    code = await asyncio.to_thread(main, ["-c", str(config), "queue", *argv])
    return code, capsys.readouterr().out


async def attempts_reach(running: RunningProvider, message_id: str, count: int,
                         timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.to_thread(running.store.get_message, message_id)
        assert message is not None
        attempts = message.recipients[0].attempts
        if attempts >= count or time.monotonic() > deadline:
            return attempts
        await asyncio.sleep(0.05)


async def test_queue_tools_steer_a_running_provider(
        provider_factory: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    # dead.test is routed to a loopback port where nothing listens: every
    # attempt defers at once, and the next one is due an hour later.
    running: RunningProvider = await provider_factory(
        tls=False, extra=f'[outbound]\nresolver = "127.0.0.1:{free_port()}"\n'
        'queue_interval = "0.1s"\nretry_initial = "1h"\nretry_max = "2h"\n'
        f'[outbound.transport]\n"dead.test" = "127.0.0.1:{free_port()}"\n')
    config = running.config_path
    message_id = running.store.enqueue(
        NewMessage("alice@example.org", (NewRecipient("bob@dead.test", "dead.test",
                                                      RecipientState.OUTBOUND),),
                   MessageOrigin.SUBMISSION),
        io.BytesIO(b"Subject: live\r\n\r\nhello\r\n"))
    assert await attempts_reach(running, message_id, 1) == 1

    code, out = await run(capsys, config, "list", "--state", "deferred")
    assert code == 0 and f"\n{message_id}" in out and "bob@dead.test  outbound attempts=1 (" in out

    # retry: due now, so the runner tries again at its next queue run.
    code, out = await run(capsys, config, "retry", message_id)
    assert code == 0 and out.startswith("Due now: 1 outbound recipient of 1 message;")
    assert await attempts_reach(running, message_id, 2) == 2

    # hold: the runner leaves it alone, even when told to retry.
    assert (await run(capsys, config, "hold", message_id))[0] == 0
    code, out = await run(capsys, config, "retry")
    assert out.startswith("Due now: 0 outbound recipients")
    await asyncio.sleep(0.5)
    assert await attempts_reach(running, message_id, 3, timeout=0.1) == 2

    # release: back to outbound with its schedule (an hour away); retry sends it.
    assert (await run(capsys, config, "release", message_id))[0] == 0
    message = running.store.get_message(message_id)
    assert message is not None and message.recipients[0].state == RecipientState.OUTBOUND
    assert (await run(capsys, config, "retry", "--domain", "dead.test"))[0] == 0
    assert await attempts_reach(running, message_id, 3) == 3

    assert await run(capsys, config, "delete", message_id) == (0, "Deleted: 1 message\n")
    assert running.store.get_message(message_id) is None
    assert await run(capsys, config, "list") == (0, "Mail queue is empty\n")
