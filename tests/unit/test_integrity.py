"""The cache entries' seal (core.integrity, core.cache_layout) and the log redaction (scoring_service.logging)."""

from __future__ import annotations

import sys

import pytest

from scoring_service import logging as fs_logging
from scoring_service.core.cache_layout import CacheEntry, open_sealed, seal
from scoring_service.core.integrity import MacKeyError, MacKeys

KEY = "fs:1:xgb-1:0:c:42"
NEW, OLD = ("k2", b"the-new-secret-0123456789"), ("k1", b"the-old-secret-0123456789")


def _payload() -> bytes:
    return CacheEntry(0.42, {"n": 1.0}, "xgb-1", 1.7e9, [("A", "a", 0.5)]).encode()


def test_a_sealed_entry_opens_under_its_key_and_decodes_without_checking() -> None:
    sealed = seal(MacKeys([NEW]), KEY, _payload())
    assert sealed.startswith(b"$m1$k2$")
    assert open_sealed(MacKeys([NEW]), KEY, sealed) == _payload()
    assert CacheEntry.decode(sealed).risk_score == 0.42  # tools read it as it is


@pytest.mark.parametrize("tamper", [
    lambda s: s.replace(b'"s":0.42', b'"s":0.01'),  # the risk edited
    lambda s: s[:-1],  # truncated
    lambda s: s.split(b"$", 4)[4],  # the seal stripped: plain JSON, as redis-cli would write it
    lambda s: s.replace(b"$k2$", b"$k9$"),  # a key id nobody configured
    lambda s: b"$m1$k2$" + b"0" * 32 + b"$" + s.split(b"$", 4)[4],  # a made-up tag
    lambda s: b"$m1$k2",  # a fragment
])
def test_an_altered_or_forged_value_does_not_open(tamper) -> None:  # type: ignore[no-untyped-def]
    sealed = seal(MacKeys([NEW]), KEY, _payload())
    assert open_sealed(MacKeys([NEW]), KEY, tamper(sealed)) is None


def test_an_entry_moved_to_another_key_does_not_open() -> None:
    sealed = seal(MacKeys([NEW]), KEY, _payload())
    assert open_sealed(MacKeys([NEW]), "fs:1:xgb-1:0:c:43", sealed) is None


def test_rotation_the_first_key_signs_every_key_verifies() -> None:
    rotating = MacKeys([NEW, OLD])
    by_old = seal(MacKeys([OLD]), KEY, _payload())
    assert open_sealed(rotating, KEY, by_old) == _payload()
    assert seal(rotating, KEY, _payload()).startswith(b"$m1$k2$")
    assert open_sealed(MacKeys([NEW]), KEY, by_old) is None  # once the old key is dropped


def test_bad_key_lists_are_refused_without_showing_the_secret() -> None:
    assert MacKeys.parse(" k2:the-new-secret-0123456789 , k1:the-old-secret-0123456789").key_ids == ["k2", "k1"]
    for spec, message in (("", "no MAC key"), ("nosecret", "not id:secret"), ("k1:short-secret", "at least 16"),
                          ("k1:the-old-secret-0123456789,k1:the-old-secret-0123456789", "twice"),
                          ("bad id:the-old-secret-0123456789", "key id")):
        with pytest.raises(MacKeyError, match=message) as err:
            MacKeys.parse(spec)
        assert "FRAUDSCORE_CACHE_MAC_KEYS" in str(err.value) and "secret-0123456789" not in str(err.value)
    assert "the-new-secret" not in repr(MacKeys([NEW]))


def test_log_redaction_hashes_ids_with_the_key_and_strips_secrets_and_card_numbers() -> None:
    fs_logging.set_log_id_key("unit-test-log-key-000")
    fs_logging.register_secret("hunter2-password")
    event = fs_logging.redact(None, "info", {
        "event": "x", "customer_id": "42", "request_id": "order-4111111111111111-" + "z" * 80,
        "url": "rediss://scorer:hunter2-password@redis:6380/0", "x-api-key": "fsk_abc", "detail": "AUTH hunter2-password",
        "settings": {"redis_password": "p", "nested": ["redis://:pw-in-list@h/0"]},
    })
    assert event["customer_id"] == fs_logging.hash_id("42") != "42"
    assert event["request_id"].startswith("order-[digits]-") and len(event["request_id"]) == 64
    assert "hunter2" not in str(event) and "pw-in-list" not in str(event) and "fsk_abc" not in str(event)
    assert event["url"] == "rediss://scorer:***@redis:6380/0"
    before = fs_logging.hash_id("42")
    fs_logging.set_log_id_key("another-log-key-0000")
    assert fs_logging.hash_id("42") != before  # keyed: without the key, a candidate id cannot be checked


def test_the_local_secret_is_made_once_readable_by_its_owner_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scoring_service.adapters.redis.embedded import local_secret

    first = local_secret(tmp_path, "cache-mac.key")
    assert len(first) >= 40 and local_secret(tmp_path, "cache-mac.key") == first
    assert (tmp_path / "secrets" / "cache-mac.key").stat().st_mode & 0o777 == 0o600
    assert local_secret(tmp_path, "log-id.key") != first


def test_logs_follow_the_current_stderr_not_a_closed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run twice in one process (CliRunner, embedding) logged to the first run's stream,
    closed since: "I/O operation on closed file" failed the second run."""
    import io

    from scoring_service.logging import configure_logging, get_logger

    configure_logging("json", "info")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    get_logger("t").info("first.line")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("t").info("second.line")
    assert "second.line" in second.getvalue()
