"""[connections] and [auth_throttle] in the provider config (issue 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fermoposta.config import (
    AuthThrottleConfig,
    ConfigError,
    LimitsConfig,
    ListenerLimits,
    load_provider_config,
)


def load(tmp_path: Path, text: str):
    path = tmp_path / "provider.toml"
    path.write_text(f'hostname = "mx.test"\ndata_dir = "data"\n{text}')
    return load_provider_config(path)


def test_defaults_apply_to_every_listener(tmp_path):
    config = load(tmp_path, "")
    assert config.auth_throttle == AuthThrottleConfig()
    assert config.auth_throttle.failure_delay == 1.0
    assert config.auth_throttle.max_failures_per_ip == 10
    for name in ("mx", "odmr", "odmr_tls", "submission", "submissions"):
        assert config.connections.limits_for(name, LimitsConfig()) == (200, 20)


def test_per_listener_values_and_the_limits_fallback(tmp_path):
    config = load(tmp_path, """
[limits]
max_connections = 50
max_connections_per_ip = 5
[connections]
mx = { max_connections = 500, max_connections_per_ip = 10 }
[connections.odmr]
max_connections_per_ip = 2
""")
    assert config.connections.mx == ListenerLimits(500, 10)
    assert config.connections.limits_for("mx", config.limits) == (500, 10)
    assert config.connections.limits_for("odmr", config.limits) == (50, 2)
    assert config.connections.limits_for("submission", config.limits) == (50, 5)


def test_auth_throttle_keys(tmp_path):
    config = load(tmp_path, """
[auth_throttle]
failure_delay = "0"
max_delay = "30s"
max_failures_per_ip = 0
max_failures_per_account = 5
window = "1h"
lockout = "2h"
""")
    assert config.auth_throttle == AuthThrottleConfig(0.0, 30.0, 0, 5, 3600.0, 7200.0)


@pytest.mark.parametrize("text, message", [
    ("[connections]\nmx = 5\n", "[connections] mx: expected a table with max_connections"),
    ("[connections]\nmx = { max = 5 }\n", "[connections] mx: unknown key \"max\""),
    ("[connections]\nmx = { max_connections = 0 }\n",
     "[connections] mx: max_connections: expected an integer >= 1"),
    ("[connections]\nodmr = { max_connections_per_ip = \"x\" }\n",
     "max_connections_per_ip: expected an integer"),
    ("[connections]\nsmtp = { max_connections = 5 }\n", "smtp"),
    ("[auth_throttle]\nmax_failures_per_ip = -1\n",
     "[auth_throttle] max_failures_per_ip: expected an integer >= 0"),
    ("[auth_throttle]\nlockout = \"0\"\n", "[auth_throttle] lockout"),
    ("[auth_throttle]\nwindow = \"soon\"\n", "[auth_throttle] window: expected a duration"),
    ("[auth_throttle]\ndelay = \"1s\"\n", "delay"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)


def test_empty_string_means_the_limits_value(tmp_path):
    """As `config show` prints an unset listener limit, so that its output loads back."""
    config = load(tmp_path, '[connections]\n'
                            'mx = { max_connections = "", max_connections_per_ip = 3 }\n')
    assert config.connections.limits_for("mx", config.limits) == (200, 3)
