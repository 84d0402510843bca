"""`fermoposta customer check` shows the provider certificate's notAfter and
warns, exit code unchanged, when it expires within 21 days (issue 11, item 7)."""

from __future__ import annotations

import datetime

from conftest import PASSWORD, add_customer, write_config
from fermoposta.config import load_provider_config
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.pull import check
from fermoposta.ops import certs as certdates
from fermoposta.provider.server import Provider
from fermoposta.store import open_store
from support.customer_config import write_customer_config


def customer(tmp_path, port, certs):
    return load_customer_config(write_customer_config(
        tmp_path / "site", port=port, password=PASSWORD, ca_file=certs.ca_file))


async def test_check_shows_the_certificate_expiry(provider, certs, tmp_path):
    code, lines = await check(customer(tmp_path, provider.odmr[1], certs))
    assert code == 0, lines
    not_after = certdates.validity_of_file(certs.cert_file).not_after
    expected = f"certificate expires on {certdates.format_date(not_after)} (notAfter), in "
    index = next(i for i, line in enumerate(lines) if line.startswith(expected))
    assert lines[index - 1].startswith("TLS: ")  # right after the handshake's line
    assert not any(line.startswith("warning:") for line in lines), lines
    assert lines[-1] == "OK: ready to pull"


async def test_check_warns_when_the_certificate_expires_soon(certs, tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", not_before=now - datetime.timedelta(1),
                               not_after=now + datetime.timedelta(days=10))
    directory = tmp_path / "provider"
    directory.mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(directory / "own.cert"))
    leaf.private_key_pem.write_to_path(str(directory / "own.key"))
    path = write_config(directory, None)
    path.write_text(path.read_text() + f'\n[tls]\ncert = "{directory / "own.cert"}"\n'
                    f'key = "{directory / "own.key"}"\n')
    config = load_provider_config(path, warn=None)
    store = open_store(config.data_dir)
    add_customer(store)
    provider = Provider(config, store)
    addresses = await provider.start()
    try:
        code, lines = await check(customer(tmp_path, addresses["odmr"][1], certs))
    finally:
        await provider.stop(grace=1.0)
        store.close()
    assert code == 0, lines  # a warning, not a failure
    date = certdates.format_date(certdates.validity_of_file(directory / "own.cert").not_after)
    assert f"certificate expires on {date} (notAfter), in 10 days" in lines
    assert (f"warning: the provider's certificate expires on {date}, in 10 days; pulls fail "
            "once it has expired (tell the provider)") in lines
    assert lines[-1] == "OK: ready to pull"
