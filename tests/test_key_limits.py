"""Named keys without a daemon: the config (key paths, exit 2), the lookup, the scopes and
the limits' pure decisions with an injected clock (docs/keys.md)."""

from __future__ import annotations

import calendar
import datetime
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.config.keys import digest
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.types import KeyConfig, KeyRole, ModelConfig
from swapd.http.keys import allows_model, allows_peer, identify, locks, may
from swapd.http.limits import (
    DAY,
    MIN_WAIT,
    Limit,
    Limits,
    Refusal,
    Slot,
    concurrency_wait,
    day_start,
    quota_wait,
    rate_wait,
)


def load(tmp_path: Path, extra: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "config.yaml"
    config = {"models": {"qwen-7b": {"cmd": "x", "aliases": ["fast"]},
                         "llama": {"cmd": "y"}}, **extra}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(path, env or {}).config


# -- config ------------------------------------------------------------------------------


def test_named_keys_load_with_their_settings_and_only_digests_are_kept(tmp_path):
    sha = hashlib.sha256(b"bob-secret").hexdigest()
    cfg = load(tmp_path, {"keys": {
        "alice": {"key": "${env.ALICE_KEY}", "models": ["qwen*"], "role": "operator",
                  "maxConcurrent": 2, "requestsPerMinute": 60, "tokensPerDay": 2000000,
                  "expires": datetime.date(2027, 1, 1), "swap": False},
        "bob": {"keySha256": sha.upper(), "peers": []},
    }, "apiKeys": ["old-api"], "adminKeys": ["old-admin"]}, {"ALICE_KEY": "alice-secret"})
    alice = cfg.keys[digest("alice-secret")]
    assert alice == KeyConfig(
        name="alice", sha256=digest("alice-secret"), role=KeyRole.OPERATOR, models=("qwen*",),
        peers=None, max_concurrent=2, requests_per_minute=60, tokens_per_day=2000000,
        expires=float(calendar.timegm((2027, 1, 1, 0, 0, 0))), swap=False)
    bob = cfg.keys[digest("bob-secret")]
    assert (bob.name, bob.role, bob.models, bob.peers, bob.swap) == (
        "bob", KeyRole.INFERENCE, None, (), True)
    # The old lists are unnamed keys named by their key path; the lists themselves stay.
    assert cfg.keys[digest("old-api")].name == "apiKeys[0]"
    assert cfg.keys[digest("old-admin")].role == KeyRole.ADMIN
    assert cfg.api_keys == ("old-api",) and cfg.admin_keys == ("old-admin",)
    assert "alice-secret" not in repr(cfg)


@pytest.mark.parametrize(("entry", "path", "words"), [
    ({"models": ["x"]}, "keys.k", "exactly one of key"),
    ({"key": "a", "keySha256": "b"}, "keys.k", "exactly one of key"),
    ({"keySha256": "abc"}, "keys.k.keySha256", "64 hexadecimal"),
    ({"key": "a b"}, "keys.k.key", "without spaces"),
    ({"key": "a", "role": "root"}, "keys.k.role", "inference, operator or admin"),
    ({"key": "a", "model": ["x"]}, "keys.k.model", "did you mean models"),
    ({"key": "a", "maxConcurrent": -1}, "keys.k.maxConcurrent", "integer"),
    ({"key": "a", "requestsPerMinute": 1.5}, "keys.k.requestsPerMinute", "integer"),
    ({"key": "a", "expires": "next year"}, "keys.k.expires", "must be a date"),
    ({"key": "a", "swap": "no"}, "keys.k.swap", "true or false"),
    ({"key": "a", "models": [""]}, "keys.k.models[0]", "glob"),
    ({"key": "${env.NOPE}"}, "keys.k.key", "NOPE is not set"),
])
def test_a_bad_key_entry_names_its_key_path(tmp_path, entry, path, words):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"keys": {"k": entry}})
    assert err.value.key_path == path, str(err.value)
    assert words in str(err.value)


def test_bad_key_names_and_repeated_secrets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"keys\.a b: a key's name"):
        load(tmp_path, {"keys": {"a b": {"key": "x"}}})
    with pytest.raises(ConfigError, match=r"keys\.b: the same key as keys\.a"):
        load(tmp_path, {"keys": {"a": {"key": "x"}, "b": {"key": "x"}}})
    with pytest.raises(ConfigError, match=r"apiKeys\[0\]: the same key as keys\.a"):
        load(tmp_path, {"keys": {"a": {"key": "x"}}, "apiKeys": ["x"]})
    with pytest.raises(ConfigError, match=r"activity\.size: 0"):
        load(tmp_path, {"keys": {"a": {"key": "x", "tokensPerDay": 5}}, "activity": {"size": 0}})


def test_a_bad_keys_config_exits_2_naming_the_key_path(tmp_path, capsys):
    from swapd.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"cmd": "x"}},
                                    "keys": {"agent": {"key": "k", "swap": "maybe"}}}))
    assert main(["check", "--config", str(path)]) == 2
    assert "keys.agent.swap: must be true or false" in capsys.readouterr().err


# -- lookup, roles, scopes ---------------------------------------------------------------


def test_identify_finds_a_key_by_its_digest_only(tmp_path):
    cfg = load(tmp_path, {"keys": {"alice": {"key": "s1"}}, "apiKeys": ["s2"]})
    assert identify(cfg, "s1").name == "alice"
    assert identify(cfg, "s2").name == "apiKeys[0]"
    assert identify(cfg, "s3") is None and identify(cfg, None) is None
    assert identify(cfg, "s1\udcff") is None  # bytes that were not UTF-8


def test_roles_include_the_ones_below_them():
    def key(role: KeyRole) -> KeyConfig:
        return KeyConfig("k", b"", role)

    assert may(key(KeyRole.ADMIN), KeyRole.OPERATOR) and may(key(KeyRole.ADMIN), KeyRole.ADMIN)
    assert may(key(KeyRole.OPERATOR), KeyRole.INFERENCE)
    assert not may(key(KeyRole.OPERATOR), KeyRole.ADMIN)
    assert not may(key(KeyRole.INFERENCE), KeyRole.OPERATOR)


def test_what_needs_a_key(tmp_path):
    assert locks(load(tmp_path, {})) == (False, False)
    # adminKeys alone leave inference open, as before named keys.
    assert locks(load(tmp_path, {"adminKeys": ["a"]})) == (False, True)
    assert locks(load(tmp_path, {"apiKeys": ["a"]})) == (True, False)
    assert locks(load(tmp_path, {"keys": {"k": {"key": "a"}}})) == (True, False)
    assert locks(load(tmp_path, {"keys": {"k": {"key": "a", "role": "operator"}}})) == (
        True, True)


def test_scopes_are_globs_over_ids_and_aliases_and_peer_names():
    qwen = ModelConfig(id="qwen-7b", cmd=("x",), aliases=("fast",))
    llama = ModelConfig(id="llama", cmd=("x",))
    key = KeyConfig("k", b"", models=("qwen*",), peers=("spark2/gpt*",))
    assert allows_model(key, qwen) and not allows_model(key, llama)
    assert allows_model(KeyConfig("k", b"", models=("fast",)), qwen)
    assert allows_model(None, llama) and allows_model(KeyConfig("k", b""), llama)
    assert not allows_model(KeyConfig("k", b"", models=()), qwen)
    assert allows_peer(key, "spark2", "gpt-oss") and not allows_peer(key, "spark2", "llama")
    assert allows_peer(KeyConfig("k", b"", peers=("spark2",)), "spark2", "anything")
    assert not allows_peer(KeyConfig("k", b"", peers=()), "spark2", "gpt-oss")


# -- the pure decisions ------------------------------------------------------------------


def test_rate_window_waits_until_the_oldest_request_leaves_the_minute():
    assert rate_wait([], 2, 100.0) == 0
    assert rate_wait([100.0], 2, 100.5) == 0
    assert rate_wait([100.0, 110.0], 2, 130.0) == pytest.approx(30.0)
    # Of three, the one that must leave for a third slot is the older of the last two.
    assert rate_wait([90.0, 100.0, 110.0], 2, 130.0) == pytest.approx(30.0)
    assert rate_wait([100.0, 110.0], 0, 130.0) == 0  # no limit


def test_concurrency_waits_for_the_first_request_expected_to_end():
    assert concurrency_wait([10.0], 2, 5.0, 12.0) == 0
    assert concurrency_wait([10.0, 11.0], 2, 5.0, 12.0) == pytest.approx(3.0)
    assert concurrency_wait([10.0, 11.0], 2, None, 12.0) == MIN_WAIT  # no history yet
    assert concurrency_wait([10.0, 11.0], 2, 1.0, 30.0) == MIN_WAIT  # overdue


def test_quota_waits_until_the_utc_day_ends():
    noon = calendar.timegm((2026, 12, 7, 12, 0, 0))
    assert day_start(noon) == calendar.timegm((2026, 12, 7, 0, 0, 0))
    assert quota_wait(999, 1000, noon) == 0
    assert quota_wait(1000, 1000, noon) == pytest.approx(12 * 3600)
    assert quota_wait(10**9, 0, noon) == 0


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = float(calendar.timegm((2026, 12, 7, 23, 50, 0)))

    def step(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def test_limits_admit_release_and_count_with_an_injected_clock():
    clocks = Clocks()
    limits = Limits(clock=lambda: clocks.mono, wall=lambda: clocks.wall)
    key = KeyConfig("agent", b"", max_concurrent=1, requests_per_minute=2, tokens_per_day=100)
    first = limits.admit(key)
    assert isinstance(first, Slot)
    busy = limits.admit(key)
    assert busy == Refusal(Limit.CONCURRENCY, MIN_WAIT)
    clocks.step(4.0)
    limits.release(first)  # took 4 s: the typical duration
    second = limits.admit(key)
    assert isinstance(second, Slot)
    clocks.step(1.0)
    busy = limits.admit(key)
    assert isinstance(busy, Refusal) and busy.limit == Limit.CONCURRENCY
    assert busy.wait == pytest.approx(3.0)  # 4 s typical, 1 s gone
    limits.release(second)
    # Two in the last minute: the third waits for the first to leave the window.
    rate = limits.admit(key)
    assert isinstance(rate, Refusal) and rate.limit == Limit.RATE
    assert rate.wait == pytest.approx(55.0)
    clocks.step(rate.wait)
    third = limits.admit(key)
    assert isinstance(third, Slot)
    # The request that crosses the quota finishes and is counted; the next one waits for
    # midnight UTC.
    limits.add_tokens("agent", 150)
    limits.release(third)
    clocks.step(1.0)
    quota = limits.admit(key)
    assert isinstance(quota, Refusal) and quota.limit == Limit.QUOTA
    assert quota.reset_at == day_start(clocks.wall) + DAY
    assert quota.wait == pytest.approx(quota.reset_at - clocks.wall)
    assert limits.today("agent") == (0, 3, 150)
    clocks.step(quota.wait)
    assert isinstance(limits.admit(key), Slot)  # a new day
    assert limits.today("agent")[1:] == (1, 0)


def test_seeded_from_the_store_a_restart_does_not_reset_the_day():
    clocks = Clocks()
    limits = Limits(clock=lambda: clocks.mono, wall=lambda: clocks.wall)
    limits.seed({"tuner": (3, 100)})
    refused = limits.admit(KeyConfig("tuner", b"", tokens_per_day=100))
    assert isinstance(refused, Refusal) and refused.limit == Limit.QUOTA
    assert limits.today("tuner") == (0, 3, 100)


def test_check_lists_the_named_keys_without_their_secrets(tmp_path, capsys):
    from swapd.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"cmd": "x"}}, "keys": {
        "agent": {"key": "agent-secret", "models": ["m*"], "swap": False,
                  "requestsPerMinute": 30}}}))
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "keys: 1 named" in out
    assert "  agent: role inference, models m*, peers all, limits 30/min, no swap" in out
    assert "agent-secret" not in out


def test_usage_sums_read_concurrently_both_see_every_record(tmp_path, monkeypatch):
    """The status page asks by key and by model at once: the second reader must wait for
    the first one's write of the pending records, not read the store before it lands. The
    write is held until a read is done (or half a second passes): a reader that does not
    wait for it reads the store without the records."""
    import asyncio
    import threading
    import time

    from swapd.observe import activity
    from swapd.observe.activity import ActivityLog, Record

    read_done = threading.Event()
    write, sums = activity._write, activity._sums

    def held_write(*args: Any) -> None:
        read_done.wait(0.5)
        write(*args)

    def noted_sums(*args: Any) -> Any:
        try:
            return sums(*args)
        finally:
            read_done.set()

    monkeypatch.setattr(activity, "_write", held_write)
    monkeypatch.setattr(activity, "_sums", noted_sums)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        log = ActivityLog(100, db_path=tmp_path / "activity.sqlite3")
        for i in range(50):
            log.add(Record(id=log.next_id(), time=time.time(), model=f"m{i % 2}", path="/v1",
                           status=200, stream=False, duration=0.1, prompt_tokens=3,
                           completion_tokens=4, key="alice"))
        by_key, by_model = await asyncio.gather(log.usage("key", 0), log.usage("model", 0))
        await log.close()
        return by_key, by_model

    by_key, by_model = asyncio.run(main())
    assert by_key == [{"name": "alice", "requests": 50, "errors": 0, "prompt_tokens": 150,
                       "completion_tokens": 200, "tokens": 350}]
    assert [(r["name"], r["requests"]) for r in by_model] == [("m0", 25), ("m1", 25)]
