"""SIGHUP reload (Provider.reload): a new certificate is used by the next
handshake; a broken config changes nothing; listener changes wait for a restart."""

from __future__ import annotations

import hashlib
import ssl

import trustme

from conftest import write_config
from fermoposta.config import load_provider_config
from fermoposta.provider.server import Provider
from fermoposta.store import open_store
from support.dialog import Dialog


async def peer_fingerprint(port: int, ca: trustme.CA) -> str:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    d = await Dialog.connect("127.0.0.1", port)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.starttls(context)
    der = d.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await d.cmd("QUIT", 221)
    await d.close()
    return hashlib.sha256(der).hexdigest()


async def test_reload_picks_up_a_new_certificate(tmp_path, certs):
    path = write_config(tmp_path, certs)
    # Own copies of the certificate files, so that replacing them is local.
    text = path.read_text()
    for name in ("cert", "key"):
        source = certs.cert_file if name == "cert" else certs.key_file
        copy = tmp_path / f"own.{name}"
        copy.write_bytes(source.read_bytes())
        text = text.replace(f'{name} = "{source}"', f'{name} = "{copy}"')
    text = text.replace(f'client_ca = "{certs.ca_file}"\n', "")
    path.write_text(text)
    config = load_provider_config(path)
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    ports = await provider.start()
    try:
        before = await peer_fingerprint(ports["mx"][1], certs.ca)
        new_ca = trustme.CA()
        leaf = new_ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "own.cert"))
        leaf.private_key_pem.write_to_path(str(tmp_path / "own.key"))
        assert provider.reload(load_provider_config(path)) == []
        after = await peer_fingerprint(ports["mx"][1], new_ca)
        assert after != before
        assert after == hashlib.sha256(ssl.PEM_cert_to_DER_cert(
            leaf.cert_chain_pems[0].bytes().decode())).hexdigest()
        # The ODMR listener uses it too.
        assert await peer_fingerprint(ports["odmr"][1], new_ca) == after

        # Limits apply to new sessions; a listener change waits for a restart.
        path.write_text(path.read_text().replace('mx = "127.0.0.1:0"', 'mx = "127.0.0.1:1"')
                        + "\n[limits]\nmax_recipients = 3\n")
        ignored = provider.reload(load_provider_config(path))
        assert ignored == ["listen"]
        assert provider.limits.max_recipients == 3
    finally:
        await provider.stop(grace=1.0)
        store.close()
