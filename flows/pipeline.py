"""The Prefect flow: one task per step, each wrapping the same step function that DVC runs.

    python -m flows.pipeline --mode retail_media -S train.max_steps=5

(`loraflow run` calls this flow.) Without PREFECT_API_URL, Prefect starts its ephemeral server in-process.
A failed validation fails its task, so the flow ends Failed and nothing downstream runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from loraflow.config import Params, Paths, load_params
from steps import curate as curate_step
from steps import evaluate as evaluate_step
from steps import model_card as model_card_step
from steps import promote as promote_step
from steps import train as train_step
from steps import validate as validate_step


@task(name="curate", cache_policy=NO_CACHE)
def curate(params: Params, p: Paths) -> dict[str, Any]:
    return curate_step.run(params, p.raw, p.curated, p.feedback if p.feedback.is_dir() else None)


@task(name="validate", cache_policy=NO_CACHE)
def validate(params: Params, p: Paths) -> dict[str, Any]:
    return validate_step.run(params, p.curated, p.validation, p.profile)


@task(name="train", cache_policy=NO_CACHE)
def train(params: Params, p: Paths) -> dict[str, Any]:
    return train_step.run(params, p.mode, p.validation / "report.json", p.curated, p.adapter)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(params: Params, p: Paths) -> dict[str, Any]:
    return evaluate_step.run(params, p.mode, p.curated / "eval.jsonl", p.adapter, p.eval)


# The registry may be a server across a network: the only step worth retrying.
@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def promote(params: Params, p: Paths) -> dict[str, Any]:
    return promote_step.run(params, p.mode, p.eval / "metrics.json", p.adapter, p.promotion)


@task(name="model_card", cache_policy=NO_CACHE)
def model_card(params: Params, p: Paths) -> str:
    return model_card_step.run(params, p.mode, p.curated / "stats.json", p.adapter / "train_info.json",
                               p.eval / "metrics.json", p.promotion / "decision.json", p.card)


@flow(name="loraflow", flow_run_name="{mode}")
def pipeline(mode: str, params_file: str = "params.yaml", overrides: list[str] | None = None,
             root: str = ".") -> dict[str, Any]:
    """Run the whole DAG for one mode; returns the decision and the headline numbers."""
    params = load_params(params_file, overrides)
    if mode not in params.base.modes:
        raise ValueError(f"mode {mode!r} is not in base.modes {params.base.modes} ({params_file})")
    p = Paths(Path(root).resolve(), mode)
    curate(params, p)
    validate(params, p)
    train(params, p)
    metrics = evaluate(params, p)
    decision = promote(params, p)
    model_card(params, p)
    m = params.promote.primary_metric
    return {"mode": mode, "decision": decision["decision"], "version": decision["version"],
            f"base_{m}": metrics["base"][m]["mean"], f"candidate_{m}": metrics["candidate"][m]["mean"]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[])
    a = ap.parse_args()
    print(pipeline(a.mode, a.params, a.set))
