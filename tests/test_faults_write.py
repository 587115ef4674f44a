"""Faults during a write, injected for real (issue 23): SIGKILL of each step mid-write, and a full disk.

SIGKILL: each step runs as its own process, with the command line dvc.yaml gives it, and is killed by a real SIGKILL
at an exact point of its writes: tests/killpoint/sitecustomize.py (an audit hook) kills the process at the n-th
matching file event, e.g. just before the second file of a new output folder is renamed into it. Before the kill
the test replaces the step's outputs by marked copies of a complete earlier run's (the "previous" outputs), so a
visible file of the killed run's, whole or not, cannot pass for a previous one. After the kill the visible outputs
must be exactly the previous ones (evaluate: its set's marker metrics.json gone and every file whole); the re-run
must complete, remove what the killed run left, and give what the uninterrupted run gave.

Disk full: a size-limited tmpfs mounted as the step's output folder, holding the previous outputs and filled so
the step's write finds no room: one clear error line naming the path, the space needed and free; the previous
outputs byte-identical; no temporary sibling left; for promote nothing registered and no alias moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from loraflow import io
from loraflow.config import apply_overrides
from loraflow.errors import DiskFull
from tests.conftest import MODE, ROOT, SHRUNK, mlflow_client

KILLPOINT = Path(__file__).parent / "killpoint"
BIN = Path(sys.executable).parent
M = MODE

# What dvc.yaml runs, per step (its cmd, with ${item} = MODE), and what each step writes.
COMMANDS = {
    "curate": ["steps.curate", f"data/raw/{M}", f"data/curated/{M}", "--feedback", f"data/raw/feedback/{M}"],
    "validate": ["steps.validate", f"data/curated/{M}", f"data/validation/{M}", f"data/profiles/{M}.json"],
    "train": ["steps.train", "--mode", M, f"data/validation/{M}/report.json", f"data/curated/{M}", f"data/adapters/{M}"],
    "evaluate": ["steps.evaluate", "--mode", M, f"data/curated/{M}/eval.jsonl", f"data/adapters/{M}", f"data/eval/{M}"],
    "promote": ["steps.promote", "--mode", M, f"data/eval/{M}/metrics.json", f"data/adapters/{M}", f"data/promotion/{M}"],
    "model_card": ["steps.model_card", "--mode", M, f"data/curated/{M}/stats.json", f"data/adapters/{M}/train_info.json",
                   f"data/eval/{M}/metrics.json", f"data/promotion/{M}/decision.json", f"model_cards/{M}.md"],
}
OUTPUTS = {
    "curate": f"data/curated/{M}", "validate": f"data/validation/{M}", "train": f"data/adapters/{M}",
    "evaluate": f"data/eval/{M}", "promote": f"data/promotion/{M}", "model_card": f"model_cards/{M}.md",
}
# Where each step is killed: (audit event, glob of its path, n-th match). Always mid-write of the step's output:
# a new output folder half filled, or (evaluate) the second file of its set about to replace the previous one.
KILL_AT = {
    "curate": ("os.rename", f"*data/curated/.{M}.tmp-*/.eval.jsonl.tmp-*", 1),  # train.jsonl in, eval.jsonl not
    "validate": ("os.rename", f"*data/validation/.{M}.tmp-*/.report.html.tmp-*", 1),  # report.json in, html not
    "train": ("os.rename", f"*data/adapters/.{M}.tmp-*/.train_info.json.tmp-*", 1),  # weights in, train_info not
    "evaluate": ("os.rename", f"*data/eval/{M}/.comparison.png.tmp-*", 1),  # predictions replaced, the rest not
    "promote": ("os.rename", f"*data/promotion/.{M}.tmp-*/.decision.json.tmp-*", 1),  # registry done, file not
    "model_card": ("os.rename", f"*model_cards/.{M}.md.tmp-*", 1),  # the card staged whole, not renamed
}
# Fields that differ between two uninterrupted runs on the same inputs (clocks, run ids); everything else must match.
VOLATILE = {"timing_seconds", "wall_seconds", "tokens_per_second", "mlflow_run_id", "mlflow_run_ids", "seconds",
            "started", "finished", "at", "load_seconds", "peak_memory_mb", "samples_per_second", "elapsed"}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def _step(project: Path, step: str, sets: list[str], kill: tuple | None = None, timeout: int = 1800):
    env = _env()
    if kill:
        env.update(PYTHONPATH=f"{KILLPOINT}{os.pathsep}{env['PYTHONPATH']}", LORAFLOW_KILL_AT="|".join(map(str, kill)),
                   LORAFLOW_KILL_IN=f"*/steps/{step}.py", LORAFLOW_KILL_LOG=str(project / "kill.log"))
    args = [a for o in sets for a in ("-S", o)]
    return subprocess.run([sys.executable, "-m", *COMMANDS[step], *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- comparing outputs ----------------------------------------------------------------------------------

def _files(path: Path) -> dict[str, bytes]:
    """Every file of an output (a folder or one file) by its name relative to it, temporary siblings excluded."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".tmp-" not in p.relative_to(path).as_posix()}


def _norm(name: str, data: bytes):
    """A file's content with what legitimately differs between two runs taken out (JSON: clocks and run ids)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in VOLATILE}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    if name.endswith(".json"):
        return strip(json.loads(data))
    if name.endswith(".jsonl"):
        return [strip(json.loads(line)) for line in data.decode().splitlines() if line.strip()]
    return hashlib.sha256(data).hexdigest()


def _same_run(got: dict[str, bytes], want: dict[str, bytes], skip: set[str] = frozenset()) -> list[str]:
    """Names of files that differ beyond VOLATILE fields (or exist on one side only)."""
    diff = sorted(set(got) ^ set(want))
    return diff + [n for n in sorted(set(got) & set(want)) if n not in skip and _norm(n, got[n]) != _norm(n, want[n])]


def _plant_previous(out: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Replace the output by a marked copy of `files` (each file's bytes plus a trailing newline): a "previous"
    output that no file of the coming run can equal by accident."""
    prev = {n: b + b"\n" for n, b in files.items()}
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    if len(files) == 1 and out.name in files:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(prev[out.name])
    else:
        for n, b in prev.items():
            (out / n).parent.mkdir(parents=True, exist_ok=True)
            (out / n).write_bytes(b)
    return prev


def _residue(project: Path) -> list[str]:
    return sorted(str(p.relative_to(project)) for p in project.rglob("*.tmp-*"))


# ---- loraflow.io on its own: a killed writer's temporary sibling, a live writer's -----------------------------

WRITER = """
import os, sys, pathlib
from loraflow import io
final = pathlib.Path(sys.argv[1])
with io.atomic_dir(final) as tmp:
    (tmp / "part").write_text("half")
    print(tmp, flush=True)
    sys.stdin.read()
"""


def test_a_killed_writers_temporary_folder_goes_with_the_next_write_a_live_writers_stays(tmp_path):
    final = tmp_path / "out"
    io.write_bytes(tmp_path / "keep", b"x")
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        assert live_tmp.name.startswith(f".out.tmp-{io._HOST}-{live.pid}-") and (live_tmp / "part").exists()
        with io.atomic_dir(final) as tmp:  # a second writer beside a live one: its temporary folder is left alone
            (tmp / "a").write_text("1")
        assert (live_tmp / "part").exists() and (final / "a").read_text() == "1"
        os.kill(live.pid, signal.SIGKILL)
        live.wait(timeout=30)
    finally:
        if live.poll() is None:
            live.kill()
    assert live_tmp.exists()  # what a SIGKILL leaves
    assert io.remove_stale(final) == [live_tmp] and not live_tmp.exists()
    # a pid reused since: the sibling of a pid that now runs a process started after it was written goes too
    reused = tmp_path / f".out.tmp-{io._HOST}-{os.getpid()}-abc"
    reused.mkdir()
    os.utime(reused, (time.time() - 10 * 86400,) * 2)
    other_host = tmp_path / ".out.tmp-zzzzzz-1-abc"  # another machine's writer (a shared file system): left alone
    other_host.mkdir()
    with io.atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert not reused.exists() and other_host.exists()
    assert _files(final) == {"b": b"2"}  # replaced whole, the previous folder gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-zzzzzz-1-abc", "keep", "out"]


SET_WRITER = """
import sys, pathlib
from loraflow import io
io.write_set(pathlib.Path(sys.argv[1]), {"a": b"new a", "b": b"new b", "m": b"new m"}, marker="m")
"""


def test_write_set_killed_between_its_renames_leaves_whole_files_and_no_marker(tmp_path):
    out = tmp_path / "set"
    io.write_set(out, {"a": b"old a", "b": b"old b", "m": b"old m"}, marker="m")
    env = _env(PYTHONPATH=f"{KILLPOINT}{os.pathsep}{_env()['PYTHONPATH']}", LORAFLOW_KILL_IN="-c",
               LORAFLOW_KILL_AT=f"os.rename|{out}/.b.tmp-*|1", LORAFLOW_KILL_LOG=str(tmp_path / "kill.log"))
    r = subprocess.run([sys.executable, "-c", SET_WRITER, str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len((tmp_path / "kill.log").read_text().splitlines()) == 1
    # a replaced, b not yet, the marker gone before the first rename: the set reads as incomplete, no file is torn
    assert _files(out) == {"a": b"new a", "b": b"old b"}
    assert sorted(p.name.split(".tmp-")[0] for p in out.glob(".*.tmp-*")) == [".b", ".m"]  # staged whole, left
    io.write_set(out, {"a": b"new a", "b": b"new b", "m": b"new m"}, marker="m")  # the re-run
    assert _files(out) == {"a": b"new a", "b": b"new b", "m": b"new m"}  # the killed run's siblings removed


# ---- disk full (real tmpfs) -------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount size-limited tmpfs folders (root, or CAP_SYS_ADMIN); unmounted whatever the test does."""
    mounted = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` until `leave` bytes (or fewer) are free."""
    with open(folder / "filler", "wb") as f:
        while (free := shutil.disk_usage(folder).free) > leave:
            try:
                f.write(bytes(min(free - leave, 1 << 20) or 4096))
                f.flush()
            except OSError:
                break


def test_disk_full_names_the_path_and_the_space_and_keeps_the_previous_output(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "1m")
    io.write_bytes(disk / "f.bin", b"previous")
    io.write_json(disk / "d" / "x.json", {"previous": True})
    _fill(disk, 64 << 10)
    with pytest.raises(DiskFull) as e:
        io.write_bytes(disk / "f.bin", bytes(200 << 10))
    msg = str(e.value)
    assert msg.startswith(f"{disk / 'f.bin'}: disk full: writing it needs 200.0 KiB (204,800 bytes), ") and " free " in msg
    with pytest.raises(DiskFull, match=rf"^{disk / 'd'}: disk full while writing it: .* free now"):
        with io.atomic_dir(disk / "d") as tmp:
            (tmp / "x.json").write_bytes(bytes(200 << 10))
    with pytest.raises(DiskFull, match=r"metrics\.json: disk full: writing a, metrics\.json .* needs 300\.0 KiB"):
        io.write_set(disk, {"a": bytes(100 << 10), "metrics.json": bytes(200 << 10)}, marker="metrics.json")
    with pytest.raises(DiskFull, match=r"are reserved for it before any other work"):
        with io.reserved(disk / "promotion", 256 << 10):
            raise AssertionError("the block must not run")
    assert (disk / "f.bin").read_bytes() == b"previous" and json.loads((disk / "d" / "x.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in disk.iterdir()) == ["d", "f.bin", "filler"]  # no temporary sibling left


# ---- the registry lock of a killed promote ------------------------------------------------------------------

LOCKER = """
import sys, mlflow
from loraflow import registry
uri = sys.argv[1]
client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
with registry.alias_lock(client, "loraflow-m"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_lock_holder_is_gone_when_its_pid_now_runs_a_later_process():
    """The alias lock and loraflow.io's temporary siblings judge a writer gone the same way (`io.owner_gone`):
    a pid that now runs a process started after the lock was taken is a reused one."""
    import socket

    from loraflow import registry

    me = f"{socket.gethostname()}:{os.getpid()}:1"
    later = subprocess.Popen(["sleep", "30"])
    try:
        other = f"{socket.gethostname()}:{later.pid}:1"
        assert registry._holder_gone(other, me, since=time.time() + 5) is None  # took it after sleep started: alive
        assert "no longer runs" in registry._holder_gone(other, me, since=time.time() - 100)  # before: a reused pid
        assert registry._holder_gone(f"elsewhere:{later.pid}:1", me, since=0.0) is None  # another host's: unknown
        assert "earlier attempt" in registry._holder_gone(me, me, since=0.0)
    finally:
        later.kill()
        later.wait()
    assert "no longer runs" in registry._holder_gone(f"{socket.gethostname()}:{later.pid}:1", me, since=time.time())


@pytest.mark.slow  # two MLflow SQLite stores opened on a busy machine: about a minute
def test_a_promote_killed_inside_the_registry_lock_blocks_the_next_one_for_no_time(tmp_path):
    from loraflow import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, uri], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        client = mlflow_client(tmp_path / "mlflow.db")
        with pytest.raises(registry.RegistryError, match=f"still held by .*:{holder.pid}(:\\d+)? after 1 s"):
            with registry.alias_lock(client, "loraflow-m", wait_s=1):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert client.get_registered_model(registry.lock_name("loraflow-m"))  # the killed holder's lock is still there
    t = time.monotonic()
    with registry.alias_lock(client, "loraflow-m", wait_s=60):  # broken at once, not after the 600 s TTL
        pass
    assert time.monotonic() - t < 10


# ---- each step, killed mid-write and on a full disk (real step processes, shrunk params) ---------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A project copy through which the six steps ran once, uninterrupted: their outputs are what every re-run
    must give again."""
    project = tmp_path_factory.mktemp("faults-write")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, project / name)
    for name in ("steps", "loraflow"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw", project / "data" / "raw")
    shutil.copytree(ROOT / "data" / "guard", project / "data" / "guard")
    # The shrunk params in params.yaml itself, so `dvc repro` runs the same commands. keep_checkpoints: a re-run of
    # train resumes from the final checkpoint instead of training again (cheap), as a re-run after a kill during
    # train's write does anyway (checkpoints go only once the adapter is written).
    params = yaml.safe_load((project / "params.yaml").read_text())
    # No guard sets and no parity gate (their own tests' subject): evaluate and promote cost a third of it.
    params = apply_overrides(params, [*SHRUNK, f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}",
                                      "train.keep_checkpoints=true", "evaluate.guard_sets=[]",
                                      "promote.parity.targets=[]"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sets: list[str] = []
    seconds = {}
    for step in COMMANDS:
        t = time.monotonic()
        r = _step(project, step, sets)
        seconds[step] = round(time.monotonic() - t, 1)
        assert r.returncode == 0, (step, r.stderr[-4000:])
    base = {step: _files(project / OUTPUTS[step]) for step in COMMANDS}
    print(f"uninterrupted run, seconds per step: {seconds}")
    return SimpleNamespace(project=project, sets=sets, base=base, registry=mlflow_client(project / "mlflow.db"))


def _registry_state(client) -> dict:
    """Every version of the mode's registered model (with its adapter hash) and its aliases; {} when none."""
    from mlflow.exceptions import MlflowException

    name = f"loraflow-{M}"
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return {}
    versions = {str(v.version): v.tags.get("adapter_sha256") for v in client.search_model_versions(f"name='{name}'")}
    return {"versions": versions, "aliases": {a: str(v) for a, v in rm.aliases.items()}}


def _forget_registry(client) -> None:
    """The registry as evaluate and promote first saw it in the uninterrupted run: no model for the mode (with a
    champion, evaluate would answer with it too, and promote would find the adapter registered already)."""
    if _registry_state(client):
        client.delete_registered_model(f"loraflow-{M}")


def _killed(project: Path, step: str, sets: list[str], at: tuple) -> None:
    log = project / "kill.log"
    log.unlink(missing_ok=True)
    r = _step(project, step, sets, kill=at)
    assert r.returncode == -signal.SIGKILL, (at, r.returncode, r.stderr[-3000:])
    assert len(log.read_text().splitlines()) == 1, log.read_text()  # killed exactly there, once


def _promote_killed_around_the_registry(p: SimpleNamespace) -> None:
    """promote on a registry that never saw this adapter, killed while MLflow copies the version's artifacts, then
    between registering the version and the parity gate / alias move: never a version without its artifacts or
    its adapter hash, never an alias on one, never a second version for the same adapter."""
    from mlflow.artifacts import download_artifacts

    client, name = p.registry, f"loraflow-{M}"
    sha = json.loads((p.project / OUTPUTS["train"] / "train_info.json").read_text())["adapter_sha256"]
    _forget_registry(client)
    _killed(p.project, "promote", p.sets, ("open", "*/mlartifacts/*/adapter_model.safetensors", 1))
    assert _registry_state(client).get("versions", {}) == {} and not _registry_state(client).get("aliases")
    # the second read of the adapter's chat template: after log_model's copy, in the tags written once the version
    # exists (version_tags), before the alias moves
    _killed(p.project, "promote", p.sets, ("open", f"*data/adapters/{M}/chat_template.jinja", 2))
    assert _registry_state(client) == {"versions": {"1": sha}, "aliases": {}}
    files = Path(download_artifacts(artifact_uri=f"models:/{name}/1", dst_path=str(p.project / "dl")))
    assert hashlib.sha256((files / "artifacts" / M / "adapter_model.safetensors").read_bytes()).hexdigest() == sha


@pytest.mark.campaign
@pytest.mark.slow
@pytest.mark.parametrize("step", list(COMMANDS))
def test_sigkill_mid_write_leaves_the_previous_output_and_the_rerun_gives_the_uninterrupted_one(pipeline, step):
    p, out = pipeline, pipeline.project / OUTPUTS[step]
    base = p.base[step]
    prev = _plant_previous(out, base)
    if step == "validate":  # as the uninterrupted run found it: no profile of a passed dataset yet (no drift check)
        (p.project / f"data/profiles/{M}.json").unlink()
    if step == "evaluate":
        _forget_registry(p.registry)
    if step == "promote":
        _promote_killed_around_the_registry(p)
    _killed(p.project, step, p.sets, KILL_AT[step])
    got = _files(out)
    if step == "evaluate":
        # the set's marker is gone before any file of the new set shows; every file is whole, old or new
        assert "metrics.json" not in got and set(got) == set(prev) - {"metrics.json"}, sorted(got)
        assert got["predictions.jsonl"] != prev["predictions.jsonl"] and not _same_run(
            {"predictions.jsonl": got["predictions.jsonl"]}, {"predictions.jsonl": base["predictions.jsonl"]})
        assert {n: got[n] for n in got if n != "predictions.jsonl"} == {n: prev[n] for n in got if n != "predictions.jsonl"}
    else:
        assert got == prev, sorted(set(got) ^ set(prev)) or [n for n in got if got[n] != prev[n]]
    assert _residue(p.project), "the kill landed after the write finished: no temporary sibling left behind"

    t = time.monotonic()
    r = _step(p.project, step, p.sets)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"{step}: re-run after the kill {time.monotonic() - t:.1f} s")
    assert not _residue(p.project)  # what the killed run left is gone
    skip = set()
    if step == "train":
        # Found by this test (December 7 2026), fixed since: the re-run takes the checkpoint at the last step as the
        # result (loraflow.training.load_finished) instead of training one batch more (HF Trainer takes a batch
        # before it checks max_steps). Its train_info.json says truly that it resumed there, and its train_loss is
        # recomputed from the logged losses (4 digits): those two fields apart it is the uninterrupted run's.
        got, want = (json.loads(f["train_info.json"]) for f in (_files(out), base))
        assert got["resumed_from_step"] == {"sft": got["steps"]} and want["resumed_from_step"] == {"sft": 0}
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-3)
        assert _norm("x.json", json.dumps({k: v for k, v in got.items() if k not in ("resumed_from_step", "train_loss")})) \
            == _norm("x.json", json.dumps({k: v for k, v in want.items() if k not in ("resumed_from_step", "train_loss")}))
        skip = {"train_info.json"}
    assert not _same_run(_files(out), base, skip), _same_run(_files(out), base, skip)
    if step == "promote":  # one version for the adapter, champion on it, as the uninterrupted run left it
        decision = json.loads((out / "decision.json").read_text())
        state = _registry_state(p.registry)
        assert list(state["versions"]) == [decision["version"]] and state["aliases"] == {"champion": decision["version"]}


MOUNT = {"curate": "data/curated", "validate": "data/validation", "train": "data/adapters", "evaluate": f"data/eval/{M}",
         "promote": "data/promotion", "model_card": "model_cards"}
# The path each step's error line names (as the step was given it, relative to the project).
FULL_AT = {"curate": f"data/curated/{M}: disk full while writing it", "validate": f"data/validation/{M}: disk full while",
           "train": f"data/adapters/{M}: disk full while writing it", "evaluate": f"data/eval/{M}/metrics.json: disk full: "
           "writing predictions.jsonl, comparison.png, report.html, metrics.json (staged whole before any is replaced) needs",
           "promote": f"data/promotion/{M}: disk full: 256.0 KiB (262,144 bytes) are reserved for it before any other work",
           "model_card": f"model_cards/{M}.md: disk full: writing it needs"}


@pytest.mark.campaign
@pytest.mark.slow
@pytest.mark.parametrize("step", list(COMMANDS))
def test_disk_full_during_the_write_fails_clearly_and_changes_nothing(pipeline, step, tmpfs):
    p = pipeline
    mount = p.project / MOUNT[step]
    keep = {str(f.relative_to(mount)): f.read_bytes() for f in mount.rglob("*") if f.is_file()}
    if step == "promote":
        _forget_registry(p.registry)  # a registry that never saw this adapter
    before = _registry_state(p.registry)
    tmpfs(mount, f"{sum(map(len, keep.values())) + (2 << 20)}")
    for rel, data in keep.items():  # the previous outputs, on the small disk
        (mount / rel).parent.mkdir(parents=True, exist_ok=True)
        (mount / rel).write_bytes(data)
    _fill(mount, 0)
    r = _step(p.project, step, p.sets)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {FULL_AT[step]}") and " free " in err, r.stderr[-3000:]
    assert {str(f.relative_to(mount)): f.read_bytes() for f in mount.rglob("*") if f.is_file() and f.name != "filler"} == keep
    assert not list(mount.rglob("*.tmp-*"))
    assert _registry_state(p.registry) == before  # nothing registered, no alias moved


@pytest.mark.campaign
@pytest.mark.slow
def test_dvc_repro_killed_mid_step_then_dvc_repro_completes_as_before(pipeline):
    """The real `dvc repro` and the step it runs, SIGKILLed together (a cancelled CI job) during evaluate's write;
    the next `dvc repro` re-runs what is stale and ends with the outputs the uninterrupted run recorded."""
    p, dvc = pipeline, str(BIN / "dvc")
    shutil.copy(ROOT / ".gitignore", p.project / ".gitignore")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "commit", "-f", "-q"]):  # record the run so far
        r = subprocess.run(cmd, cwd=p.project, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    before = yaml.safe_load((p.project / "dvc.lock").read_text())["stages"]
    _forget_registry(p.registry)
    log = p.project / "kill.log"
    log.unlink(missing_ok=True)
    env = _env(LORAFLOW_KILL_AT="|".join(map(str, KILL_AT["evaluate"])), LORAFLOW_KILL_IN="*/steps/evaluate.py",
               LORAFLOW_KILL_LOG=str(log), LORAFLOW_KILL_GROUP="1")
    env["PYTHONPATH"] = f"{KILLPOINT}{os.pathsep}{env['PYTHONPATH']}"
    killed = subprocess.run([dvc, "repro", "--force", "--single-item", f"evaluate@{M}"], cwd=p.project, env=env,
                            capture_output=True, text=True, timeout=900, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL and len(log.read_text().splitlines()) == 1, killed.stderr[-3000:]
    assert not (p.project / OUTPUTS["evaluate"] / "metrics.json").exists()
    t = time.monotonic()
    again = subprocess.run([dvc, "repro"], cwd=p.project, env=_env(), capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    print(f"dvc repro after the kill: {time.monotonic() - t:.1f} s\n{again.stdout}")
    assert f"Running stage 'evaluate@{M}'" in again.stdout and f"Running stage 'train@{M}'" not in again.stdout
    status = subprocess.run([dvc, "status", "-q"], cwd=p.project, env=_env(), capture_output=True, text=True)
    assert status.returncode == 0, status.stdout
    after = yaml.safe_load((p.project / "dvc.lock").read_text())["stages"]

    def outs(stage: str) -> dict[str, str]:
        return {o["path"]: o["md5"] for o in stage.get("outs", [])}
    for name in ("curate", "validate", "train"):  # untouched
        assert outs(after[f"{name}@{M}"]) == outs(before[f"{name}@{M}"]), name
    # evaluate's answers are the same bytes (greedy); its metrics.json differs only in clocks and run ids
    pred = f"data/eval/{M}/predictions.jsonl"
    assert outs(after[f"evaluate@{M}"])[pred] == outs(before[f"evaluate@{M}"])[pred]
    assert not _same_run(_files(p.project / OUTPUTS["evaluate"]), p.base["evaluate"])
    assert not _same_run(_files(p.project / OUTPUTS["promote"]), p.base["promote"])
