"""Writes customer.toml files for tests (the documented schema, nothing private)."""

from __future__ import annotations

from pathlib import Path


def toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def write_customer_config(
    directory: Path,
    *,
    port: int,
    password: str | None,
    ca_file: Path | None,
    tls: str = "starttls",
    username: str | None = "acme",
    mechanisms: tuple[str, ...] = (),
    server_name: str = "localhost",
    client_cert: Path | None = None,
    pulls: list[dict] | None = None,
    site_domains: tuple[str, ...] | None = None,
    extra_provider: str = "",
    atrn_timeout: str = "10m",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    provider = ['host = "127.0.0.1"', f"port = {port}", f'tls = "{tls}"',
                f'server_name = "{server_name}"', f'atrn_timeout = "{atrn_timeout}"',
                'connect_timeout = "5s"', 'command_timeout = "30s"']
    if ca_file is not None:
        provider.append(f'ca_file = "{ca_file}"')
    if username is not None:
        provider.append(f'username = "{username}"')
    if password is not None:
        (directory / "password").write_text(password + "\n")
        provider.append(f'password_file = "{directory / "password"}"')
    if mechanisms:
        provider.append(f"mechanisms = {toml_list(mechanisms)}")
    if client_cert is not None:
        provider.append(f'client_cert = "{client_cert}"')
        provider.append(f'client_key = "{client_cert}"')
    if extra_provider:
        provider.append(extra_provider)
    lines = ['hostname = "mail.example.org"', f'data_dir = "{directory / "state"}"']
    if site_domains is not None:
        lines.append(f"domains = {toml_list(site_domains)}")
    lines += ["", "[provider]", *provider, ""]
    for pull in pulls or [{"domains": ["example.org"]}]:
        lines.append("[[pull]]")
        if "name" in pull:
            lines.append(f'name = "{pull["name"]}"')
        lines.append(f"domains = {toml_list(pull.get('domains', []))}")
        lines.append(f'every = "{pull.get("every", "10m")}"')
        lines.append("[pull.delivery]")
        delivery = pull.get("delivery", {"type": "maildir",
                                         "path": str(directory / "mail/{domain}/{local}/Maildir"),
                                         "create": True})
        for key, value in delivery.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            else:
                lines.append(f'{key} = "{value}"')
        lines.append("")
    path = directory / "customer.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
