"""The configuration: a flag wins over ``HITL_*`` in the environment, which wins over the
default; a bad value names where it came from; settings, fields and flags agree."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from hitl.cli import build_parser, load_config
from hitl.config import SETTINGS, Config, Setting, default_of, env_var, is_shared
from hitl.errors import ConfigError

from .serverproc import run_cli

# Per kind of setting: (flag's raw value, what it gives), (environment's raw value, ...).
SAMPLES: dict[str, tuple[tuple[str, Any], tuple[str, Any]]] = {
    "text": (("from-flag", "from-flag"), ("from-env", "from-env")),
    "path": (("/flag/hitl.db", "/flag/hitl.db"), ("/env/hitl.db", "/env/hitl.db")),
    "port number": (("9001", 9001), ("9002", 9002)),
    "integer": (("7", 7), ("8", 8)),
    "number": (("1.5", 1.5), ("2.5", 2.5)),
    "list of hosts": (("a.example", ("a.example",)),
                      ("b.example, C.example:81", ("b.example", "c.example:81"))),
    "mode": (("none", "none"), ("accounts", "accounts")),  # proxy needs --trusted-proxies
    "list of CIDRs": (("10.0.0.0/8", ("10.0.0.0/8",)),
                      ("127.0.0.1, 192.168.1.7/24", ("127.0.0.1/32", "192.168.1.0/24"))),
    "role": (("viewer", "viewer"), ("reviewer", "reviewer")),
    "outcome": (("reject", "reject"), ("approve", "approve")),
    "log format": (("json", "json"), ("text", "text")),
    "token": (("flag-token-0123456789", "flag-token-0123456789"),
              ("env-token-0123456789", "env-token-0123456789")),
    "broker URL": (("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
                   ("rediss://:pw@cache.example:6380/2?prefix=hitl-eu.1",
                    "rediss://:pw@cache.example:6380/2?prefix=hitl-eu.1")),
}
BAD: dict[str, list[str]] = {
    "text": [], "path": [],
    "port number": ["x", "65536", "-1", "80.5"],
    "integer": ["x", "0", "1.5"],
    "number": ["x", "-1", "nan"],
    "list of hosts": [" , ", "a b", "x/y"],
    "mode": ["x", "Accounts", "password"],
    "list of CIDRs": ["x", "10.0.0.0/33", "10.0.0.1, y"],
    "role": ["x", "Admin", "root"],
    "outcome": ["x", "Fail", "escalate"],
    "log format": ["x", "JSON", "logfmt"],
    "token": ["short", "a" * 257, "has a space 0123456789", "\u00e9" * 20],
    "broker URL": ["redis", "Memory", "http://127.0.0.1:6379/0", "redis://", "redis://h:x/0",
                   "redis://h:70000/0", "redis://h:6379/zero", "redis://h/0?db=1",
                   "redis://h/0?prefix=", "redis://h/0?prefix=a b", "redis://h/0#x"],
}


def flag(setting: Setting) -> str:
    return "--" + setting.name.replace("_", "-")


def value(setting: Setting, flags: dict[str, str | None], environ: dict[str, str]) -> Any:
    return getattr(Config.load(flags, environ), setting.name)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_a_flag_wins_over_the_environment_which_wins_over_the_default(setting: Setting
                                                                      ) -> None:
    (flag_raw, from_flag), (env_raw, from_env) = SAMPLES[setting.kind]
    environ = {env_var(setting.name): env_raw}
    assert value(setting, {}, {}) == default_of(setting.name)
    assert value(setting, {}, environ) == from_env
    assert value(setting, {setting.name: flag_raw}, environ) == from_flag
    assert value(setting, {setting.name: flag_raw}, {}) == from_flag
    assert value(setting, {setting.name: None}, environ) == from_env  # a flag not given


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_each_default_written_out_reads_back_as_itself(setting: Setting) -> None:
    default = default_of(setting.name)
    if default in ((), None):  # unset: one derived from other settings, or kept in the store
        return
    raw = ",".join(default) if isinstance(default, tuple) else str(default)
    assert value(setting, {}, {env_var(setting.name): raw}) == default


def test_the_environment_wins_over_a_default_the_caller_gives() -> None:
    assert Config.load({}, {}, db="/default/hitl.db").db == "/default/hitl.db"
    assert Config.load({}, {"HITL_DB": "/env/hitl.db"}, db="/default/hitl.db").db == \
        "/env/hitl.db"
    assert Config.load({"db": "/flag/hitl.db"}, {"HITL_DB": "/env/hitl.db"},
                       db="/default/hitl.db").db == "/flag/hitl.db"


def test_without_an_environment_given_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HITL_PORT", "9100")
    assert Config.load().port == 9100
    assert Config.load({"port": "9200"}).port == 9200
    assert Config.load(environ={}).port == default_of("port")


@pytest.mark.parametrize(("setting", "raw"), [(s, raw) for s in SETTINGS for raw in BAD[s.kind]],
                         ids=lambda x: x.name if isinstance(x, Setting) else repr(x))
def test_a_bad_value_is_a_config_error_naming_its_source(setting: Setting, raw: str) -> None:
    with pytest.raises(ConfigError) as from_flag:
        Config.load({setting.name: raw}, {})
    assert str(from_flag.value).startswith(f"{flag(setting)}={raw!r} is not a valid ")
    with pytest.raises(ConfigError) as from_env:
        Config.load({}, {env_var(setting.name): raw})
    assert str(from_env.value).startswith(f"{env_var(setting.name)}={raw!r} is not a valid ")
    assert "\n" not in str(from_flag.value) + str(from_env.value)  # one line for stderr


def test_a_flag_overrides_a_bad_environment_value() -> None:
    assert Config.load({"port": "9001"}, {"HITL_PORT": "x"}).port == 9001


@pytest.mark.parametrize("raw", ["", "off", "OFF", " off ", "none", "None", "0"])
def test_retain_days_empty_or_off_means_keep_everything(raw: str) -> None:
    assert Config.load({"retain_days": raw}, {"HITL_RETAIN_DAYS": "3"}).retain_days is None
    assert Config.load({}, {"HITL_RETAIN_DAYS": raw}).retain_days is None


def test_retain_days_takes_fractions_of_a_day() -> None:
    assert Config.load({}, {"HITL_RETAIN_DAYS": "0.5"}).retain_days == 0.5
    assert Config.load({"retain_days": "2"}, {"HITL_RETAIN_DAYS": "off"}).retain_days == 2.0


def test_every_setting_is_a_config_field_and_every_field_a_setting() -> None:
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names)), names
    assert set(names) == {field.name for field in fields(Config)}
    assert set(SAMPLES) >= {setting.kind for setting in SETTINGS}  # each kind tested here


def test_the_cli_leaves_settings_it_was_not_given_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HITL_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("HITL_PORT", "9002")
    monkeypatch.setenv("HITL_HEARTBEAT", "3")
    config = load_config(build_parser().parse_args(["serve", "--port", "9001"]))
    assert (config.port, config.heartbeat, config.db) == (9001, 3.0, str(tmp_path / "env.db"))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_a_flag_of_serve(setting: Setting) -> None:
    (raw, _), _ = SAMPLES[setting.kind]
    assert getattr(build_parser().parse_args(["serve", flag(setting), raw]), setting.name) == raw


def test_serve_help_lists_every_flag() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for setting in SETTINGS:
        assert re.search(rf"(?<![\w-]){flag(setting)}(?![\w-])", result.stdout), flag(setting)


@pytest.mark.parametrize("raw", ["memory", "redis://127.0.0.1", "redis://h:6379",
                                 "redis://h:6379/15?prefix=t-1", "redis://u:p@[::1]:6379/0"])
def test_a_broker_is_memory_or_a_redis_url(raw: str) -> None:
    assert Config.load({}, {"HITL_BROKER": raw}).broker == raw


@pytest.mark.parametrize(("db", "broker", "shared"), [
    ("postgresql://h/hitl", "redis://h:6379/0", True),
    ("postgres://h/hitl", "rediss://h:6379/0", True),
    ("postgresql://h/hitl", "memory", False),  # news would reach one process's watchers
    ("/var/lib/hitl/hitl.db", "redis://h:6379/0", False),  # one process's file
    (":memory:", "memory", False),
])
def test_shared_means_postgresql_and_a_broker_between_processes(db: str, broker: str,
                                                                  shared: bool) -> None:
    assert is_shared(Config(db=db, broker=broker)) is shared


@pytest.mark.parametrize("raw", ["0", "0.5", "3601"])
def test_a_lease_is_one_second_to_an_hour(raw: str) -> None:
    with pytest.raises(ConfigError, match="must be between 1 and 3600 seconds"):
        Config.load({}, {"HITL_LEASE": raw})
    assert Config.load({}, {"HITL_LEASE": "1"}).lease == 1.0
