"""MLflow wiring shared by the steps: one experiment per mode, a local SQLite registry by default."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from loraflow.config import Params, registered_model_name


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative sqlite path is made absolute (against the cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.base.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def use(uri: str) -> None:
    """Point this process's mlflow client at `uri`, leaving the environment as it was.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; left there, the first store used in a process
    would look like a person's choice and pin every later params file (or test) to it.
    """
    import mlflow

    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def setup(params: Params, mode: str) -> str:
    """Point mlflow at the store and return the id of the mode's experiment (created if missing)."""
    import mlflow

    uri = tracking_uri(params)
    use(uri)
    name = registered_model_name(mode)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database rather than in ./mlruns of whatever the cwd is.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and create.
        return mlflow.get_experiment_by_name(name).experiment_id


def champion_adapter(params: Params, mode: str, dest: Path) -> tuple[str | None, Path | None]:
    """Download the registry's current champion adapter, if any. Returns (version, folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    setup(params, mode)
    name = registered_model_name(mode)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest)))
    found = next(iter(sorted(local.rglob("adapter_config.json"))), None)
    if found is None:
        raise FileNotFoundError(f"champion {name} v{mv.version} holds no adapter_config.json under {local}")
    return str(mv.version), found.parent


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def flat_params(params: Params, *sections: str) -> dict[str, str]:
    d = params.to_dict()
    return {f"{s}.{k}": str(v) for s in sections for k, v in d[s].items()}


def dvc_hashes(adapter_dir: Path, mode: str) -> dict[str, str]:
    """DVC's own hashes of the curated data and the adapter, from the nearest dvc.lock above the adapter.

    Under `dvc repro` the lock already holds the train and curate outputs when promote runs; outside DVC
    there is no lock and the content hashes (adapter_sha256, train_data_sha256) stand alone.
    """
    for folder in [Path.cwd(), *Path(adapter_dir).resolve().parents]:
        lock = folder / "dvc.lock"
        if lock.exists():
            break
    else:
        return {"dvc.lock": "absent"}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    out = {"dvc.lock": str(lock)}
    for key, stage, path in (("dvc.curated_md5", f"curate@{mode}", f"data/curated/{mode}"),
                             ("dvc.adapter_md5", f"train@{mode}", f"data/adapters/{mode}")):
        for o in stages.get(stage, {}).get("outs", []):
            if o.get("path") == path and o.get("md5"):
                out[key] = o["md5"]
    return out
