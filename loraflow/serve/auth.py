"""API keys and per-key rate limits for `loraflow serve`.

Clients send a key the OpenAI way, `Authorization: Bearer <key>` (the `openai` client's `api_key=`). Keys come
from a file (`--api-keys FILE`, or `LORAFLOW_API_KEYS_FILE`), YAML or JSON:

    keys:
      - name: support-team          # recorded with each feedback event the key sends
        key: sk-lf-...              # or key_sha256: <hex>, to keep the key itself off the server's disk
        train: true                 # its feedback may train the modes (default false: recorded, never trained)
        rpm: 120                    # requests per minute (default: --rate-limit)

or one key from `LORAFLOW_API_KEY` (named `default`, allowed to train; vLLM's `VLLM_API_KEY` works alike).
With no keys the server answers anyone, as before, and refuses to listen beyond loopback unless `--insecure`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraflow.errors import ConfigError

ENV_KEY, ENV_FILE = "LORAFLOW_API_KEY", "LORAFLOW_API_KEYS_FILE"


@dataclasses.dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key: the key itself is never kept
    train: bool = False
    rpm: int | None = None  # None: the server's --rate-limit


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    key: str | None = Field(None, min_length=16)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    train: bool = False
    rpm: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_key(self):
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_KeyEntry] = Field(min_length=1)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(path: str | Path | None = None, environ: dict[str, str] | None = None) -> list[ApiKey]:
    """The keys from `path` (else $LORAFLOW_API_KEYS_FILE), plus $LORAFLOW_API_KEY; [] when neither is set."""
    import yaml

    env = os.environ if environ is None else environ
    path = path or env.get(ENV_FILE) or None
    keys: list[ApiKey] = []
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            parsed = _KeysFile.model_validate(raw)
        except OSError as e:
            raise ConfigError(f"API keys file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"API keys file {path}: not valid YAML/JSON: {e}") from None
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"API keys file {path}: {where}: {err['msg']} "
                              "(expected `keys:` with entries {name, key or key_sha256, train, rpm})") from None
        keys += [ApiKey(k.name, (k.key_sha256 or "").lower() or digest(k.key or ""), k.train, k.rpm) for k in parsed.keys]
    if env.get(ENV_KEY):
        keys.append(ApiKey("default", digest(env[ENV_KEY]), train=True))
    names = [k.name for k in keys]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"API keys: the name {name!r} is given twice (each feedback event records the name)")
    digests = [k.sha256 for k in keys]
    if len(set(digests)) < len(digests):
        raise ConfigError("API keys: the same key is given twice under different names")
    return keys


def find(keys: list[ApiKey], authorization: str | None) -> ApiKey | None:
    """The key an `Authorization: Bearer <key>` header names, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    d = digest(token.strip())
    found = None
    for k in keys:  # compare with every key in constant time: no timing hint of how close a guess was
        if hmac.compare_digest(k.sha256, d):
            found = k
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, keys: list[ApiKey], insecure: bool) -> None:
    """Refuse to listen beyond loopback with no keys (anyone could generate, and post feedback that trains)."""
    if keys or insecure or is_loopback(host):
        return
    raise ConfigError(f"--host {host}: listening beyond loopback without API keys lets anyone who can reach it "
                      f"generate and post feedback. Give --api-keys FILE (or set {ENV_KEY}), or pass --insecure to "
                      "listen anyway (e.g. behind a proxy that authenticates)")


class RateLimiter:
    """Token buckets per key name: `rpm` requests per minute, bursts up to `rpm`. Thread-safe."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def take(self, name: str, rpm: int) -> float:
        """0 when the request may go ahead (and it is counted); otherwise the seconds until it may."""
        now = self.clock()
        with self.lock:
            tokens, at = self.buckets.get(name, (float(rpm), now))
            tokens = min(float(rpm), tokens + (now - at) * rpm / 60.0)
            if tokens >= 1.0:
                self.buckets[name] = (tokens - 1.0, now)
                return 0.0
            self.buckets[name] = (tokens, now)
            return (1.0 - tokens) * 60.0 / rpm


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
