"""API keys for `loraflow serve` without a model: the keys file, Bearer matching, the bind refusal, rate limits.
The keys on a running server (401, 429, feedback per key) are tested in test_serve.py."""

from __future__ import annotations

import pytest

from loraflow.cli import main
from loraflow.errors import ConfigError
from loraflow.serve import auth
from tests.conftest import ROOT

KEY_A, KEY_B = "sk-lf-alice-0123456789", "sk-lf-bob-0123456789ab"


def test_keys_file_env_key_and_bearer_matching(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - {{name: alice, key: {KEY_A}, train: true, rpm: 5}}\n"
                 f"  - {{name: bob, key_sha256: {auth.digest(KEY_B).upper()}}}\n")
    keys = auth.load_keys(f, environ={auth.ENV_KEY: "sk-lf-ops-0123456789abc"})
    assert [(k.name, k.train, k.rpm) for k in keys] == [("alice", True, 5), ("bob", False, None), ("default", True, None)]
    assert all(KEY_A not in k.sha256 for k in keys)  # only digests are kept
    assert auth.find(keys, f"Bearer {KEY_B}").name == "bob"
    assert auth.find(keys, f"bearer {KEY_A}").name == "alice"
    for header in (None, "", KEY_A, f"Basic {KEY_A}", "Bearer ", "Bearer sk-lf-wrong-0123456789"):
        assert auth.find(keys, header) is None, header
    assert auth.load_keys(None, environ={}) == []
    assert [k.name for k in auth.load_keys(None, environ={auth.ENV_FILE: str(f)})] == ["alice", "bob"]


@pytest.mark.parametrize("text, expected", [
    ("keys:\n  - {name: a, key: short}\n", r"keys\.0\.key: String should have at least 16"),
    ("keys:\n  - {name: a}\n", "exactly one of 'key' and 'key_sha256'"),
    (f"keys:\n  - {{name: a, key: {KEY_A}}}\n  - {{name: a, key: {KEY_B}}}\n", "name 'a' is given twice"),
    (f"keys:\n  - {{name: a, key: {KEY_A}}}\n  - {{name: b, key: {KEY_A}}}\n", "same key is given twice"),
    (f"keys:\n  - {{name: a, key: {KEY_A}, admin: true}}\n", r"keys\.0\.admin: Extra inputs"),
    ("keys: [\n", "not valid YAML"),
])
def test_a_bad_keys_file_names_the_entry_and_field(tmp_path, text, expected):
    f = tmp_path / "keys.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        auth.load_keys(f, environ={})


def test_binding_beyond_loopback_needs_keys_or_insecure():
    keys = [auth.ApiKey("a", auth.digest(KEY_A))]
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        auth.check_bind(host, [], insecure=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ConfigError, match="without API keys"):
            auth.check_bind(host, [], insecure=False)
        auth.check_bind(host, keys, insecure=False)
        auth.check_bind(host, [], insecure=True)


def test_serve_command_refuses_a_public_bind_without_keys_before_loading_anything(capsys, monkeypatch):
    monkeypatch.delenv(auth.ENV_KEY, raising=False)
    monkeypatch.delenv(auth.ENV_FILE, raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--params", str(ROOT / "params.yaml")]) == 1
    assert "--insecure" in capsys.readouterr().err


def test_rate_limiter_refills_per_key():
    now = [0.0]
    rl = auth.RateLimiter(clock=lambda: now[0])
    assert [rl.take("a", 2) for _ in range(2)] == [0.0, 0.0]
    assert rl.take("a", 2) == pytest.approx(30.0)  # 2 per minute: the next one in 30 s
    assert rl.take("b", 2) == 0.0  # buckets are per key
    now[0] = 29.0
    assert rl.take("a", 2) == pytest.approx(1.0) and auth.retry_after(0.2) == "1"
    now[0] = 30.0
    assert rl.take("a", 2) == 0.0
