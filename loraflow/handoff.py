"""Hand folders between checkouts through the DVC remote, by content hash: no shared working tree.

A controller pushes the validated curated data and its validation report; a GPU worker in its own checkout
(another machine) pulls exactly those by DVC md5, trains, and pushes the adapter back the same way; the
controller pulls that adapter by md5 and checks its sha256 against train_info.json, the worker's record and
the MLflow run before evaluating it. Each side needs only the same DVC remote (its default remote) and the same
MLflow server.

A folder travels through a scratch DVC repository (`dvc init --no-scm` under the project's git-ignored
`.dvc/tmp/`) configured with the project's default remote: curate and train own `data/curated/<mode>` and
`data/adapters/<mode>` as dvc.yaml outputs, so the project itself cannot `dvc add` them, and the receiving
checkout has no dvc.lock naming the sender's hashes. The md5 is DVC's own (`<hex>.dir`), the one
`dvc add` / dvc.lock would record for that folder.

    python -m loraflow.handoff push data/adapters/retail_media          # prints the md5
    python -m loraflow.handoff pull 1b2c...e9.dir data/adapters/retail_media
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from loraflow import codedeps, tracking
from loraflow.config import Params, Paths
from loraflow.io import atomic_dir, read_json, sha256_file, sha256_tree

# The train step that ran in this checkout: steps/ and loraflow/ are one package set, installed or put on the
# path together, so it is the steps/train.py beside this package (named without importing steps).
TRAIN_STEP = Path(__file__).resolve().parents[1] / "steps" / "train.py"


class HandoffError(RuntimeError):
    """A folder could not be pushed or pulled, or what arrived is not what was sent."""


# ---- the code that trains: the controller's and the worker's must be the same ------------------------------

def _git_out(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def code_identity(root: Path | None = None) -> dict[str, Any]:
    """What a checkout's train step runs: the sha256 of every project module in its import closure
    (loraflow.codedeps, the files dvc.yaml lists as the train stage's code deps), their combined hash, and
    the git commit with the closure's files that differ from it ("dirty"). The hash decides: two clones of
    one commit have different commit ids but the same code, and a dirty tree is different code at one commit."""
    root = Path(root) if root is not None else TRAIN_STEP.parents[1]
    files = {f: sha256_file(root / f) for f in codedeps.step_modules("train", root)}
    h = hashlib.sha256()
    for f, sha in sorted(files.items()):
        h.update(f"{f}\0{sha}\n".encode())
    commit = (_git_out(root, "rev-parse", "HEAD") or "").strip() or None
    status = _git_out(root, "status", "--porcelain", "--", *files) if commit else None
    dirty = sorted(line[3:] for line in (status or "").splitlines() if line.strip())  # "XY path"
    return {"code_sha256": h.hexdigest(), "files": files, "commit": commit, "dirty": dirty,
            "checkout": str(root), "host": socket.gethostname()}


def _describe(ident: dict[str, Any]) -> str:
    commit = ident.get("commit")
    where = f"commit {commit[:12]}" if commit else "no git commit"
    if ident.get("dirty"):
        where += f" dirty ({', '.join(ident['dirty'])})"
    return f"{where} in {ident.get('host')}:{ident.get('checkout')}"


def check_code(sent: dict[str, Any] | None, root: Path | None = None) -> dict[str, Any]:
    """Worker: refuse to train unless this checkout's train step code is the controller's (`sent`, its
    code_identity()). Returns this checkout's identity. Raises HandoffError naming both commits, whether
    each is dirty, and the files that differ."""
    mine = code_identity(root)
    if not sent or "code_sha256" not in sent:
        raise HandoffError(f"the controller sent no identity of its train step code, so this worker ({_describe(mine)}) "
                           "cannot tell whether it would train with the same code: update the controller's checkout")
    if sent["code_sha256"] == mine["code_sha256"]:
        return mine
    theirs, ours = sent.get("files") or {}, mine["files"]
    diff = [f"{f} ({'only on the controller' if f not in ours else 'only on this worker' if f not in theirs else 'differs'})"
            for f in sorted(set(theirs) | set(ours)) if theirs.get(f) != ours.get(f)]
    raise HandoffError(
        f"this worker's train step code differs from the controller's: controller at {_describe(sent)}, worker at "
        f"{_describe(mine)}; files: {', '.join(diff) or 'the same names and contents, yet another hash'}. "
        "Check out the controller's commit (with its uncommitted changes, if dirty) in the worker's checkout")


def _dvc(cwd: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise HandoffError(f"dvc {' '.join(args)} failed (in {cwd}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def remote_config(root: Path, remote: str | None = None) -> tuple[str, dict[str, Any]]:
    """(name, settings) of the project's DVC remote: `remote`, else the default one; paths come back absolute."""
    from dvc.config import Config

    conf = Config(dvc_dir=str(Path(root) / ".dvc"))
    name = remote or conf["core"].get("remote")
    if not name:
        raise HandoffError(f"{root}/.dvc/config: no default DVC remote; every checkout needs the same one: "
                           "dvc remote add -d NAME URL (or --local, in .dvc/config.local)")
    if name not in conf["remote"]:
        raise HandoffError(f"{root}/.dvc/config: no DVC remote named {name!r} (have {sorted(conf['remote'])})")
    return name, dict(conf["remote"][name])


@contextlib.contextmanager
def _scratch(root: Path, remote: str | None) -> Iterator[Path]:
    """A throwaway DVC repository with the project's remote, under the project's .dvc/tmp (same filesystem)."""
    from dvc.config import Config

    name, settings = remote_config(root, remote)
    parent = Path(root) / ".dvc" / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="handoff-", dir=parent) as d:
        scratch = Path(d)
        _dvc(scratch, "init", "--no-scm", "-q")
        with Config(dvc_dir=str(scratch / ".dvc")).edit("repo") as conf:
            conf["core"].update({"remote": name, "analytics": False,
                                 "site_cache_dir": str(scratch / ".dvc" / "site")})  # not /var/tmp/dvc
            conf["remote"][name] = settings
        yield scratch


def push(root: Path, folder: Path, remote: str | None = None) -> str:
    """Push a folder to the project's DVC remote; returns its DVC md5 (`<hex>.dir`), the name to pull it by."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HandoffError(f"{folder}: no such folder to push (run the step that writes it first)")
    with _scratch(Path(root), remote) as s:
        shutil.copytree(folder, s / "data")
        _dvc(s, "add", "-q", "data")
        md5 = yaml.safe_load((s / "data.dvc").read_text())["outs"][0]["md5"]
        _dvc(s, "push", "-q", "data.dvc")
    return md5


def pull(root: Path, md5: str, dest: Path, expect: dict[str, str] | None = None, remote: str | None = None) -> bool:
    """Fetch the folder whose DVC md5 is `md5` from the remote into `dest`, replacing it whole.

    Args:
        expect: {file relative to the folder: sha256}, checked on what arrived before `dest` is touched
            (DVC trusts the remote's copies; this does not).
    Returns:
        False when `dest` already held exactly those files (left alone, mtimes and all), True when replaced.
    """
    if not md5.endswith(".dir"):
        raise HandoffError(f"{md5!r}: expected the DVC md5 of a folder (`<hex>.dir`)")
    dest = Path(dest)
    with _scratch(Path(root), remote) as s:
        (s / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": "data"}]}))
        _dvc(s, "pull", "-q", "data.dvc")
        got = s / "data"
        for rel, sha in (expect or {}).items():
            actual = sha256_file(got / rel) if (got / rel).is_file() else "missing"
            if actual != sha:
                raise HandoffError(f"{rel} in the folder pulled by DVC md5 {md5} has sha256 {actual}, expected {sha}")
        if dest.is_dir() and sha256_tree(dest) == sha256_tree(got):
            return False
        with atomic_dir(dest) as tmp:  # copyfile: not the cache's read-only modes
            shutil.copytree(got, tmp, dirs_exist_ok=True, copy_function=shutil.copyfile)
    return True


# ---- the train step's handoff: controller -> worker -> controller ------------------------------------------

def push_inputs(p: Paths) -> dict[str, str]:
    """Controller: push what train reads (the curated folder, the validation folder); returns their md5s."""
    return {"curated_md5": push(p.root, p.curated), "validation_md5": push(p.root, p.validation),
            "report_sha256": sha256_file(p.validation / "report.json")}


def pull_inputs(p: Paths, sent: dict[str, str]) -> None:
    """Worker: fetch exactly the controller's validated data. The report is checked against the sha256 the
    controller sent, the data files against the report (train's own gate checks them again)."""
    pull(p.root, sent["validation_md5"], p.validation, {"report.json": sent["report_sha256"]})
    pull(p.root, sent["curated_md5"], p.curated, read_json(p.validation / "report.json").get("files", {}))


def push_adapter(params: Params, p: Paths, info: dict[str, Any], sent: dict[str, str]) -> dict[str, Any]:
    """Worker: push the trained adapter, tag its MLflow run with the DVC md5s; returns the record for the
    controller (what was trained where, and the names to fetch and check it by)."""
    hashes = {"adapter_md5": push(p.root, p.adapter), "curated_md5": sent["curated_md5"],
              "validation_md5": sent["validation_md5"]}
    client = _client(params)
    for k, v in hashes.items():
        client.set_tag(info["mlflow_run_id"], f"dvc.{k}", v)
    return {"checkout": str(p.root), "code": str(TRAIN_STEP), "host": socket.gethostname(),
            "adapter_sha256": info["adapter_sha256"], "mlflow_run_id": info["mlflow_run_id"], **hashes}


def pull_adapter(params: Params, p: Paths, record: dict[str, Any]) -> dict[str, Any]:
    """Controller: fetch the worker's adapter by md5 and prove it is the one trained and logged: the file's
    sha256 must equal the worker's record, train_info.json, and the MLflow run's tags. Returns train_info."""
    sha, run_id = record["adapter_sha256"], record["mlflow_run_id"]
    pull(p.root, record["adapter_md5"], p.adapter, {"adapter_model.safetensors": sha})
    info = read_json(p.adapter / "train_info.json")
    from mlflow.exceptions import MlflowException

    try:
        tags = _client(params).get_run(run_id).data.tags
    except MlflowException as e:
        raise HandoffError(f"MLflow run {run_id} (the worker's training run) is not in {tracking.tracking_uri(params)}: "
                           "the controller and the worker must use the same MLflow server (base.tracking_uri or "
                           f"MLFLOW_TRACKING_URI) ({e})") from None
    seen = {"train_info.json adapter_sha256": info.get("adapter_sha256"),
            f"MLflow run {run_id} tag adapter_sha256": tags.get("adapter_sha256")}
    bad = {k: v for k, v in seen.items() if v != sha}
    if info.get("mlflow_run_id") != run_id:
        bad["train_info.json mlflow_run_id"] = info.get("mlflow_run_id")
    if tags.get("dvc.adapter_md5") != record["adapter_md5"]:
        bad[f"MLflow run {run_id} tag dvc.adapter_md5"] = tags.get("dvc.adapter_md5")
    if bad:
        raise HandoffError(f"{p.adapter}: the pulled adapter (sha256 {sha}, md5 {record['adapter_md5']}, "
                           f"run {run_id}) disagrees with {bad}")
    return info


def _client(params: Params):
    import mlflow

    uri = tracking.tracking_uri(params)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="the project (its .dvc/config names the remote)")
    ap.add_argument("--remote", help="a DVC remote name (default: the project's default remote)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("push").add_argument("folder", type=Path)
    pl = sub.add_parser("pull")
    pl.add_argument("md5")
    pl.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "push":
            print(push(a.root, a.folder, a.remote))
        else:
            print("replaced" if pull(a.root, a.md5, a.dest, remote=a.remote) else "unchanged", a.dest)
    except HandoffError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
