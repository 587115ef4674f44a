"""Issue 23, the MLflow tracking server failing under promotion and under serving, for real: a `mlflow server`
(SQLite backend, artifacts in tmp) killed with SIGKILL and started again on the same port and database.

1. Down before promote: promote retries with backoff, then fails within a bounded time naming the server and
   the attempts; the previous decision.json is untouched and nothing is registered; once the server is back the
   same command completes.
2. Killed mid-promotion, the moment the new version appears in its database (the test holds the alias lock, so
   the kill always lands after registration and before any alias move), then restarted: promote's retries carry
   it through, with exactly one version for the adapter and the champion on a version whose adapter downloads
   back with the registered hash; files lost from the artifact store stop an alias from moving onto a version.
3. `loraflow serve` with the registry gone: the mode it serves keeps answering with the same version and words,
   /health says the registry is unreachable within a few polls, and says ok again once it is back.

Adapters in 1 and 2 are stand-in folders (registration copies files and never loads them); 3 uses a real LoRA.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loraflow import registry
from loraflow.config import load_params
from loraflow.io import sha256_file
from loraflow.promotion import decide
from steps import promote
from tests.conftest import MODE, ROOT
from tests.test_registry import make_candidate
from tests.test_registry_server import free_port

pytestmark = pytest.mark.slow
NAME = f"loraflow-{MODE}"
BIN = Path(sys.executable).parent


class MlflowServer:
    """`mlflow server` on a fixed port, database and artifact root, so that it can be killed and started again as
    the same server. Its own process group (it spawns workers): kill() takes the whole group down at once."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.db, self.artifacts = folder / "srv.db", folder / "srv-artifacts"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180) -> float:
        self.starts += 1
        log = self.folder / f"server-{self.starts}.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
                 str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"mlflow server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # the port is free again: nothing answers there
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{self.url}/health", timeout=2)

    def sql(self, query: str, *args) -> list[tuple]:
        """Read the server's database directly: works while the server is down, and sees a row the moment the
        server commits it."""
        with sqlite3.connect(self.db, timeout=10) as db:
            return db.execute(query, args).fetchall()


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=30)


def _params(server: MlflowServer, *extra: str):
    return load_params(ROOT / "params.yaml", [f"base.tracking_uri={server.url}", "promote.parity.targets=[]", *extra])


def _client(server: MlflowServer):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _versions(server: MlflowServer, sha: str | None = None) -> list[str]:
    if sha is None:
        return [str(v) for v, in server.sql("SELECT version FROM model_versions WHERE name = ?", NAME)]
    return [str(v) for v, in server.sql("SELECT version FROM model_version_tags WHERE name = ? AND key = "
                                        "'adapter_sha256' AND value = ?", NAME, sha)]


def _aliases(server: MlflowServer) -> dict[str, str]:
    return {a: str(v) for a, v in server.sql("SELECT alias, version FROM registered_model_aliases WHERE name = ?", NAME)}


def _sha(adapter: Path) -> str:
    return sha256_file(adapter / "adapter_model.safetensors")


def test_server_down_at_promote_fails_in_bounded_time_naming_it_then_completes_once_back(server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = _params(server, "promote.registry_retries=3", "promote.registry_backoff_s=0.5")
    out_dir = tmp_path / "promotion"
    first = promote.run(params, MODE, *reversed(make_candidate(params, tmp_path, "a", 0.5)), out_dir)
    assert first["aliases_after"] == {"champion": "1"}
    before = (out_dir / "decision.json").read_bytes()
    adapter, metrics = make_candidate(params, tmp_path, "b", 0.6, champion=("1", 0.5))  # its run made while up

    server.kill()
    t0 = time.monotonic()
    with pytest.raises(registry.RegistryUnreachable) as e:
        promote.run(params, MODE, metrics, adapter, out_dir)
    took = time.monotonic() - t0
    msg = str(e.value)
    print(f"server down: promote failed after {took:.1f} s: {msg}")
    assert server.url in msg and "4 attempts" in msg and "promote.registry_retries=3" in msg and "re-run" in msg
    assert 0.5 + 1 + 2 <= took < 60  # the three waits happened, and nothing waited on MLflow's own 4-minute retries
    assert (out_dir / "decision.json").read_bytes() == before  # the previous run's decision, untouched
    assert _versions(server) == ["1"] and not _versions(server, _sha(adapter)) and _aliases(server) == {"champion": "1"}

    server.start()
    again = promote.run(params, MODE, metrics, adapter, out_dir)
    assert again["decision"] == "promote" and again["version"] == "2" and again["aliases_after"] == {"champion": "2"}
    assert sorted(_versions(server)) == ["1", "2"] and _versions(server, _sha(adapter)) == ["2"]


PROMOTE = f"""
import sys
from pathlib import Path
from loraflow.config import load_params
from steps import promote
params = load_params(sys.argv[1], sys.argv[4:])
out = promote.run(params, "{MODE}", Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[2]).parent / "promotion")
print("RESULT", out["version"], out["registry_note"])
"""


def test_server_killed_mid_promotion_and_restarted_leaves_one_version_and_a_servable_champion(server, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # waits 1, 2, 4, 8, 16, 32 s: longer than the server takes to come back on this machine (10-30 s)
    sets = ["promote.registry_retries=6", "promote.registry_backoff_s=1"]
    params = _params(server, *sets)
    adapter, metrics = make_candidate(params, tmp_path, "a", 0.5)
    sha = _sha(adapter)
    # Another promoter holds the alias lock (host "elsewhere": alive as far as anyone here can tell), so the
    # alias cannot move before the kill, wherever in registration the kill lands.
    client = _client(server)
    client.create_registered_model(registry.lock_name(NAME), tags={"holder": "elsewhere:1:1", "since": f"{time.time()}"})

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PROMOTE, str(ROOT / "params.yaml"), str(metrics), str(adapter),
                             f"base.tracking_uri={server.url}", "promote.parity.targets=[]", *sets],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not server.sql("SELECT 1 FROM model_versions WHERE name = ?", NAME):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "promote registered nothing in 300 s"
            time.sleep(0.02)
        server.kill()
        t_kill = time.monotonic()
        tags_at_kill = server.sql("SELECT key FROM model_version_tags WHERE name = ?", NAME)
        assert _aliases(server) == {}  # the kill landed after registration, before any alias move
        assert _versions(server, sha) == ["1"]  # created with its hash tag, in one transaction
        time.sleep(3)  # promote now retries against a dead port
        assert proc.poll() is None, proc.communicate()
        back = server.start()
        # the other promoter finishes and releases its lock
        _client(server).delete_registered_model(registry.lock_name(NAME))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed with {len(tags_at_kill)} tags on v1; server back after {back:.1f} s; promote done "
          f"{time.monotonic() - t_kill:.1f} s after the kill")
    assert proc.returncode == 0, err[-3000:]
    assert "RESULT 1 champion moved to v1" in out, out + err[-2000:]
    assert "retrying in" in err and server.url in err  # the outage was seen and retried, not slept through

    client = _client(server)
    assert _versions(server) == ["1"] and _versions(server, sha) == ["1"]  # never two versions for one adapter
    assert registry.aliases(client, NAME) == {"champion": "1"}
    assert client.get_model_version(NAME, "1").tags["decision"] == "promote"  # every evidence tag is there
    assert not client.search_registered_models(f"name='{registry.lock_name(NAME)}'")  # no lock left behind
    from loraflow import tracking

    tracking.use(server.url)
    assert registry.verify_artifacts(client, NAME, "1") == sha  # the champion downloads, with its registered hash
    # a re-run registers nothing and moves nothing
    again = promote.run(_params(server, *sets), MODE, metrics, adapter, tmp_path / "promotion")
    assert again["version"] == "1" and "already champion" in again["registry_note"] and _versions(server) == ["1"]

    # files lost from the artifact store: no alias moves onto that version, the champion stays
    params = _params(server, *sets)
    b_adapter, b_metrics = make_candidate(params, tmp_path, "b", 0.6, champion=("1", 0.5))
    b_sha = _sha(b_adapter)
    m = json.loads(b_metrics.read_text())
    decision = decide(m["candidate"], m["base"], m["champion"], params.promote, m["deltas"], None)
    version = registry.register_version(params, MODE, b_adapter, m, decision)
    lost = [f for f in server.artifacts.rglob("adapter_model.safetensors") if sha256_file(f) == b_sha]
    assert len(lost) == 1
    lost[0].unlink()
    with pytest.raises(registry.RegistryError, match=rf"v{version}: its artifacts .* hold no adapter_model"):
        registry.move(params, MODE, version, m, decision)
    assert registry.aliases(client, NAME) == {"champion": "1"}


def test_serve_keeps_its_champion_while_the_registry_is_down_and_health_says_so(server, tmp_path, monkeypatch):
    import httpx

    from loraflow.serve import ServeSettings, create_app
    from tests.test_serve import chat, make_adapter, register, serving

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"base.tracking_uri={server.url}"]
    params = load_params(ROOT / "params.yaml", overrides)
    register(params, "alpha", make_adapter(params, tmp_path / "alpha", seed=0))
    register(params, "beta", make_adapter(params, tmp_path / "beta", seed=1))
    settings = ServeSettings(root=tmp_path, overrides=overrides, poll_interval=0.5, max_tokens_limit=64)
    with serving(create_app(params, settings)) as url:
        before = chat(url, "alpha", max_tokens=8)
        assert before["version"] == "1" and before["fallback"] is None
        assert httpx.get(f"{url}/health").json()["registry"]["error"] is None

        server.kill()
        t0 = time.monotonic()
        while (h := httpx.get(f"{url}/health").json())["registry"]["error"] is None:
            assert time.monotonic() - t0 < 30, "/health did not notice the registry was gone in 30 s"
            time.sleep(0.2)
        noticed = time.monotonic() - t0
        assert h["status"] == "degraded" and h["registry"]["uri"] == server.url
        assert "Connection refused" in h["registry"]["error"] or "Max retries" in h["registry"]["error"], h
        assert h["modes"]["alpha"]["version"] == "1"  # the last known champions are kept
        t1 = time.monotonic()
        during = chat(url, "alpha", max_tokens=8)
        assert during["version"] == "1" and during["answer"] == before["answer"] and during["fallback"] is None
        # a mode never loaded before the outage cannot be downloaded now: the base model answers, and says why
        beta = chat(url, "beta", max_tokens=8)
        answered = time.monotonic() - t1
        assert beta["fallback"] and "failed to load" in beta["fallback"], beta
        assert httpx.get(f"{url}/health").json()["failed_loads"]["beta"]["version"] == "1"
        print(f"/health said unreachable {noticed:.1f} s after the kill; alpha and the beta fallback answered "
              f"in {answered:.1f} s")
        assert answered < 60

        server.start()
        t2 = time.monotonic()
        while httpx.get(f"{url}/health").json()["registry"]["error"] is not None:
            assert time.monotonic() - t2 < 30, "/health still says unreachable 30 s after the registry came back"
            time.sleep(0.2)
        assert chat(url, "beta", max_tokens=8)["fallback"] is None  # loads now
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
