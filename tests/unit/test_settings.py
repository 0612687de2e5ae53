"""Settings: one object from TOML then TALLY_* variables, failing in one line."""

import pytest

from deploy.settings import Secret, SettingsError, load_settings, settings_environ
from deploy.wiring import sink_config, stream_config


def test_environment_overrides_toml(tmp_path):
    """A TALLY_* variable wins over the TOML file, which wins over the default."""
    config = tmp_path / "tally.toml"
    config.write_text('kafka_port = 9999\nclickhouse_backend = "server"\n')
    settings = load_settings({"TALLY_CONFIG": str(config), "TALLY_KAFKA_PORT": "9100"})
    assert settings.kafka_port == 9100
    assert settings.clickhouse_backend == "server"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TALLY_KAFKA_PORT": "ninety"}, "TALLY_KAFKA_PORT: not a valid integer"),
        ({"TALLY_KAFKA_PORT": "70000"}, "TALLY_KAFKA_PORT: not a TCP port"),
        ({"TALLY_CLICKHOUSE_BACKEND": "sqlite"}, "TALLY_CLICKHOUSE_BACKEND"),
        (
            {"TALLY_KAFKA_COMPRESSION": "brotli"},
            "TALLY_KAFKA_COMPRESSION: not a valid choice (none, gzip, snappy, lz4 or zstd)",
        ),
        ({"TALLY_KAFKA_COMPRESSION": "LZ4"}, "TALLY_KAFKA_COMPRESSION: not a valid choice"),
        ({"TALLY_KAFKA_BOOTSTARP": "x"}, "TALLY_KAFKA_BOOTSTARP: unknown setting"),
        ({"TALLY_SINK_BATCH_SIZE": "0"}, "TALLY_SINK_BATCH_SIZE: must be at least 1"),
        ({"TALLY_CONFIG": "/nonexistent.toml"}, "TALLY_CONFIG: cannot read"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_variable(environ, message):
    """Each invalid setting fails at start with one line that names its variable."""
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_kafka_compression_reaches_every_producer(codec):
    """Each standard codec is a valid TALLY_KAFKA_COMPRESSION, handed to the stream worker's
    and the sink's producers as Kafka clients name it (none: None)."""
    settings = load_settings({"TALLY_KAFKA_COMPRESSION": codec})
    expected = None if codec == "none" else codec
    assert settings.kafka_compression == codec
    assert settings.kafka_compression_type == expected
    assert stream_config(settings, "b:1").compression_type == expected
    assert sink_config(settings, "b:1").compression_type == expected
    assert load_settings(settings_environ(settings)) == settings


def test_kafka_compression_defaults_to_zstd(tmp_path):
    """Unset, batches are zstd; a TOML file may choose another codec but not a made-up one."""
    assert load_settings({}).kafka_compression == "zstd"
    config = tmp_path / "tally.toml"
    config.write_text('kafka_compression = "lz4"\n')
    assert load_settings({"TALLY_CONFIG": str(config)}).kafka_compression == "lz4"
    config.write_text("kafka_compression = 4\n")
    with pytest.raises(SettingsError, match=r"^TALLY_KAFKA_COMPRESSION: not a valid choice"):
        load_settings({"TALLY_CONFIG": str(config)})


def test_secrets_never_show(tmp_path):
    """Passwords and keys stay out of reprs and of the error naming a bad key."""
    settings = load_settings(
        {"TALLY_CLICKHOUSE_PASSWORD": "hunter2-pw", "TALLY_HMAC_KEY": "k9:hunter2-not-hex"}
    )
    assert "hunter2" not in repr(settings) + str(settings.clickhouse_password)
    with pytest.raises(SettingsError) as caught:
        settings.hmac_keys()
    assert "hunter2" not in str(caught.value)
    assert Secret("x").reveal() == "x"


def test_hmac_key_is_made_once_with_private_mode(tmp_path):
    """Without a configured key, one is generated under the state folder, mode 0600, and
    the same key is read back next time."""
    settings = load_settings({"TALLY_STATE_DIR": str(tmp_path)})
    first = settings.hmac_keys()
    key_file = tmp_path / "secrets" / "hmac.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert settings.hmac_keys() == first and len(first[0].secret) == 32


def test_key_file_lists_active_key_first(tmp_path):
    """A key file of several keys makes the first one active (rotation)."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"k2:{'22' * 32}\nk1:{'11' * 32}\n")
    keys = load_settings({"TALLY_HMAC_KEY_FILE": str(key_file)}).hmac_keys()
    assert [k.key_id for k in keys] == ["k2", "k1"]


def test_settings_round_trip_through_a_child_environment(tmp_path):
    """The variables handed to a child process rebuild equal settings."""
    settings = load_settings({"TALLY_STATE_DIR": str(tmp_path), "TALLY_CLICKHOUSE_PASSWORD": "pw"})
    assert load_settings(settings_environ(settings)) == settings


def test_clickhouse_password_comes_from_a_file_read_when_needed(tmp_path):
    """TALLY_CLICKHOUSE_PASSWORD_FILE holds the password (its line break is not part of it);
    the file is read when ClickHouse is opened, so a settings object without the file loads
    (a host that never opens ClickHouse needs none); and the password never shows."""
    password_file = tmp_path / "ch-password"
    settings = load_settings({"TALLY_CLICKHOUSE_PASSWORD_FILE": str(password_file)})
    password_file.write_text("hunter2-from-file\n")
    secret = settings.clickhouse_secret()
    assert isinstance(secret, Secret) and secret.reveal() == "hunter2-from-file"
    assert "hunter2" not in repr(settings) + str(secret) + repr(secret)
    assert load_settings(settings_environ(settings)) == settings
    plain = load_settings({"TALLY_CLICKHOUSE_PASSWORD": "pw"})
    assert plain.clickhouse_secret().reveal() == "pw"
    assert load_settings({}).clickhouse_secret().reveal() == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "TALLY_CLICKHOUSE_PASSWORD_FILE: no file at "),
        ("\n", "TALLY_CLICKHOUSE_PASSWORD_FILE: "),
        (b"\xffhunter2\xfe", "TALLY_CLICKHOUSE_PASSWORD_FILE: cannot read "),
    ],
    ids=["missing", "empty", "not text"],
)
def test_a_bad_clickhouse_password_file_fails_in_one_line(tmp_path, content, message):
    """A missing, empty or unreadable password file fails in one line naming the variable,
    and never quotes the file."""
    password_file = tmp_path / "ch-password"
    if isinstance(content, bytes):
        password_file.write_bytes(content)
    elif content is not None:
        password_file.write_text(content)
    settings = load_settings({"TALLY_CLICKHOUSE_PASSWORD_FILE": str(password_file)})
    with pytest.raises(SettingsError) as caught:
        settings.clickhouse_secret()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value) and "hunter2" not in str(caught.value)


def test_clickhouse_password_and_its_file_are_exclusive(tmp_path):
    """Both a password and a password file is a mistake, refused at load in one line."""
    environ = {
        "TALLY_CLICKHOUSE_PASSWORD": "hunter2",
        "TALLY_CLICKHOUSE_PASSWORD_FILE": str(tmp_path / "ch-password"),
    }
    with pytest.raises(SettingsError, match=r"^TALLY_CLICKHOUSE_PASSWORD_FILE: .*not both$"):
        load_settings(environ)


def test_open_backend_uses_the_password_file(tmp_path, monkeypatch):
    """The server backend is opened with the file's password."""
    import deploy.wiring
    import sinks.backends

    opened: dict[str, object] = {}
    monkeypatch.setattr(sinks.backends, "ServerClickHouse", lambda *a, **kw: opened.update(kw))
    password_file = tmp_path / "ch-password"
    password_file.write_text("hunter2-from-file\n")
    settings = load_settings(
        {
            "TALLY_CLICKHOUSE_BACKEND": "server",
            "TALLY_CLICKHOUSE_PASSWORD_FILE": str(password_file),
        }
    )
    deploy.wiring.open_backend(settings)
    assert opened["password"] == "hunter2-from-file"


def test_collector_defaults_reach_its_config():
    """Unset, the collector listens on 127.0.0.1:8750 with 1 MiB, 500 events and no trusted
    proxy; set, the values reach its config, the proxies parsed."""
    from deploy.wiring import collector_config

    default = collector_config(load_settings({}))
    assert (default.write_key_rate.per_s, default.write_key_rate.burst) == (1000.0, 2000)
    assert (default.secret_key_rate.per_s, default.secret_key_rate.burst) == (10000.0, 20000)
    assert default.max_pending_events == 50_000
    assert (default.host, default.port) == ("127.0.0.1", 8750)
    assert (default.max_body_bytes, default.max_events, default.trusted_proxies) == (
        1024 * 1024, 500, ()
    )  # fmt: skip
    settings = load_settings(
        {
            "TALLY_COLLECTOR_HOST": "0.0.0.0",
            "TALLY_COLLECTOR_PORT": "9750",
            "TALLY_COLLECTOR_MAX_EVENTS": "2000",
            "TALLY_COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7,::1",
        }
    )
    config = collector_config(settings)
    assert (config.host, config.port, config.max_events) == ("0.0.0.0", 9750, 2000)
    assert config.max_pending_events == 50_000
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]
    assert load_settings(settings_environ(settings)) == settings


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TALLY_COLLECTOR_PORT": "0"}, "TALLY_COLLECTOR_PORT: not a TCP port"),
        ({"TALLY_WORKER_METRICS_PORT": "70000"}, "TALLY_WORKER_METRICS_PORT: not a TCP port"),
        ({"TALLY_COLLECTOR_PORT": "http"}, "TALLY_COLLECTOR_PORT: not a valid integer"),
        ({"TALLY_COLLECTOR_MAX_EVENTS": "0"}, "TALLY_COLLECTOR_MAX_EVENTS: must be at least 1"),
        ({"TALLY_COLLECTOR_MAX_BODY_BYTES": "10"}, "TALLY_COLLECTOR_MAX_BODY_BYTES: must be"),
        ({"TALLY_COLLECTOR_HOST": " "}, "TALLY_COLLECTOR_HOST: must name an address"),
        (
            {"TALLY_COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8,proxy one"},
            "TALLY_COLLECTOR_TRUSTED_PROXIES: item 2 is not an IP address or network",
        ),
        (
            {"TALLY_COLLECTOR_PRODUCE_TIMEOUT_S": "0"},
            "TALLY_COLLECTOR_PRODUCE_TIMEOUT_S: must be positive",
        ),
        ({"TALLY_COLLECTOR_RATE_PER_KEY": "0"}, "TALLY_COLLECTOR_RATE_PER_KEY: must be"),
        ({"TALLY_COLLECTOR_RATE_PER_KEY": "nan"}, "TALLY_COLLECTOR_RATE_PER_KEY: must be"),
        ({"TALLY_COLLECTOR_RATE_BURST": "0"}, "TALLY_COLLECTOR_RATE_BURST: must be at least 1"),
        (
            {"TALLY_COLLECTOR_SECRET_RATE_PER_KEY": "-1"},
            "TALLY_COLLECTOR_SECRET_RATE_PER_KEY: must be positive",
        ),
        ({"TALLY_COLLECTOR_SECRET_RATE_BURST": "1.5"}, "TALLY_COLLECTOR_SECRET_RATE_BURST: not a"),
        (
            {"TALLY_COLLECTOR_MAX_PENDING_EVENTS": "499"},
            "TALLY_COLLECTOR_MAX_PENDING_EVENTS: must be at least TALLY_COLLECTOR_MAX_EVENTS",
        ),
    ],
)
def test_bad_collector_settings_fail_in_one_line(environ, message):
    """Each bad collector setting fails at load in one line naming its variable."""
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_the_apps_file_defaults_to_the_state_folder(tmp_path):
    """Unset, the apps registry is state_dir/apps.json; TALLY_COLLECTOR_APPS_FILE moves it,
    and a file that is not a registry stops the collector in one line naming the setting."""
    from deploy.wiring import collector_apps

    assert load_settings({"TALLY_STATE_DIR": str(tmp_path)}).collector_apps_path == (
        tmp_path / "apps.json"
    )
    elsewhere = tmp_path / "etc" / "apps.json"
    settings = load_settings({"TALLY_COLLECTOR_APPS_FILE": str(elsewhere)})
    assert settings.collector_apps_path == elsewhere
    assert load_settings(settings_environ(settings)) == settings
    elsewhere.parent.mkdir()
    elsewhere.write_text("[1, 2]")
    with pytest.raises(SettingsError) as caught:
        collector_apps(settings)
    assert str(caught.value).startswith("TALLY_COLLECTOR_APPS_FILE: the apps file")
