"""The `loraflow` command (its entry point is flows/cli.py, which hands in what needs Prefect).

    loraflow run --mode retail_media -S train.max_steps=20   # the whole DAG through the Prefect flow
    loraflow report --mode retail_media                      # where the results are, and the headline numbers
    loraflow serve --port 8000                                # the registry's champions as modes, on 127.0.0.1
    loraflow serve --host 0.0.0.0 --api-keys keys.yaml        # beyond loopback: Bearer keys required
    loraflow promote retail_media 3                          # a person's decision: v3 becomes champion
    loraflow rollback retail_media                           # champion goes back to the previous champion
    loraflow export retail_media --to ollama                 # champion -> GGUF + Modelfile, replayed on llama.cpp
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflow.config import Paths, load_params, registered_model_name
from loraflow.errors import LoraflowError


def served_line(decision: dict[str, Any]) -> str:
    """Which version serving uses after this decision, in words."""
    champ = (decision.get("aliases_after") or {}).get("champion")
    name, version = decision.get("registered_model"), decision.get("version")
    if champ and version and champ == str(version):
        return f"{name} v{champ} is champion: `loraflow serve` answers with it"
    stays = f"champion stays {name} v{champ}" if champ else f"no champion yet: {name} modes are answered by the base model"
    if decision.get("decision") == "reject":
        cand = f"the candidate (v{version}, registered, no alias)" if version else "the candidate (not registered)"
        return f"{stays}; {cand} is not served"
    if decision.get("decision") == "challenger":
        return f"{stays}; the candidate v{version} is challenger (a person decides in the MLflow UI)"
    return stays


def _report(params_file: str, overrides: list[str], mode: str | None, root: str) -> int:
    from loraflow.io import read_json
    from loraflow.parity import line as parity_line
    from loraflow.tracking import tracking_uri

    params = load_params(params_file, overrides)
    mode = mode or params.base.modes[0]
    p = Paths(Path(root).resolve(), mode)
    if not (p.eval / "metrics.json").exists():
        print(f"no results yet for mode {mode!r}: run `loraflow run --mode {mode}` or `dvc repro`")
        return 1
    metrics = read_json(p.eval / "metrics.json")
    decision = read_json(p.promotion / "decision.json") if (p.promotion / "decision.json").exists() else {}
    m = params.promote.primary_metric
    uri = tracking_uri(params)
    print(f"\n== loraflow results for mode {mode!r} ==")
    print(f"held-out {m} F1 ({metrics['eval_set']['size']} conversations):")
    for name in ("base", "champion", "candidate"):
        s = metrics.get(name)
        if s:
            d = s.get("degeneration") or {}
            health = (f"  ended their turn {d['stop_rate']['mean']:.0%}, loop {d['loop_rate']['mean']:.0%}"
                      if "stop_rate" in d and "loop_rate" in d else "")
            print(f"  {name:<10} {s[m]['mean']:.4f}  [{s[m]['ci_low']:.4f}, {s[m]['ci_high']:.4f}]{health}")
    print(f"decision:  {decision.get('decision')} — {decision.get('reason')}")
    print(f"served:    {served_line(decision)}")
    par = decision.get("parity")
    if par:
        print(f"parity:    v{par['version']} replayed the {par['prompts']} eval prompts greedily on each serving target "
              f"({par['seconds']:.0f} s):")
        for target, r in par["targets"].items():
            print(f"  {parity_line(target, r)}")
    print(f"registry:  {uri}  model {registered_model_name(mode)}"
          + (f" v{decision['version']}" if decision.get("version") else "") + f", aliases {decision.get('aliases_after')}")
    print(f"metrics:   {p.eval / 'metrics.json'} (per-example answers: {p.eval / 'predictions.jsonl'})")
    print(f"card:      {p.card}")
    print(f"adapter:   {p.adapter}")
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    return 0


def _serve(args, trigger: Callable[..., dict[str, Any]] | None) -> int:
    import logging

    import uvicorn

    from loraflow.serve import ServeSettings, create_app
    from loraflow.serve.auth import check_bind, is_loopback, load_keys

    params = load_params(args.params, args.set)
    keys = load_keys(args.api_keys)
    check_bind(args.host, keys, args.insecure)  # before the model loads: a refusal is immediate
    if not keys and not is_loopback(args.host):
        print(f"warning: listening on {args.host} with no API keys (--insecure)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = ServeSettings(
        root=Path(args.root).resolve(), params_file=args.params, overrides=args.set, lru_size=args.lru_size,
        unknown_mode=args.unknown_mode, poll_interval=args.poll_interval, max_messages=args.max_messages,
        max_chars=args.max_chars, max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
        feedback_threshold=args.feedback_threshold, trigger_command=args.on_feedback, deployment=args.deployment,
        feedback_warm_start=args.feedback_warm_start,
        keys=keys, rate_limit=args.rate_limit, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
        trigger=trigger)
    uvicorn.run(create_app(params, settings), host=args.host, port=args.port, log_level="info")
    return 0


def _registry_cmd(args) -> int:
    import mlflow

    from loraflow import registry, tracking

    params = load_params(args.params, args.set)
    tracking.setup(params, args.mode)
    client = mlflow.MlflowClient()
    name = registered_model_name(args.mode)
    if args.cmd == "promote":
        after = registry.promote_version(client, name, args.version)
        print(f"{name}: champion is now v{after['champion']} (aliases {after})")
    else:
        r = registry.rollback(client, name)
        print(f"{name}: champion rolled back from v{r['from']} to v{r['to']} (aliases {r['aliases_after']})")
    return 0


def _export(args) -> int:
    from loraflow import export

    params = load_params(args.params, args.set)
    export.run(params, args.mode, args.to, version=args.version, alias=args.alias, root=Path(args.root).resolve(),
               out=Path(args.out) if args.out else None, eval_file=Path(args.eval_set) if args.eval_set else None)
    return 0


def main(argv: list[str] | None = None, run_pipeline: Callable[..., Any] | None = None,
         trigger: Callable[..., dict[str, Any]] | None = None) -> int:
    """`run_pipeline(mode, params_file, overrides, root)` runs the Prefect flow and `trigger` starts a run from the
    server's feedback; both come from the entry point (flows/cli.py): the library itself never imports flows."""
    ap = argparse.ArgumentParser(prog="loraflow", description="LoRA adapters proven better before anyone serves them.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run the whole pipeline for a mode through the Prefect flow"),
                        ("report", "print where the last run's results are and its headline numbers")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--mode", help="which mode (default: the first of base.modes)")
        sp.add_argument("--params", default="params.yaml")
        sp.add_argument("--root", default=".", help="project folder holding data/ and model_cards/")
        sp.add_argument("-S", "--set", action="append", default=[], metavar="section.key=value",
                        help="override a param, DVC style (repeatable)")
    sp = sub.add_parser("serve", help="serve the registry's champion adapters as modes (FastAPI, OpenAI-compatible)")
    sp.add_argument("--params", default="params.yaml")
    sp.add_argument("--root", default=".", help="project folder: feedback goes to <root>/data/raw/feedback/<mode>/")
    sp.add_argument("-S", "--set", action="append", default=[], metavar="section.key=value",
                    help="override a param, DVC style (repeatable); the server reads `base` only")
    sp.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-keys", default=None, metavar="FILE",
                    help="YAML/JSON file of named keys (name, key or key_sha256, train, rpm; see loraflow/serve/auth.py); "
                         "default $LORAFLOW_API_KEYS_FILE. $LORAFLOW_API_KEY adds one key named 'default' that may train")
    sp.add_argument("--insecure", action="store_true",
                    help="listen beyond loopback without API keys (e.g. behind a proxy that authenticates)")
    sp.add_argument("--rate-limit", type=int, default=60, metavar="RPM",
                    help="requests per minute per key, unless the key names its own rpm (default 60)")
    sp.add_argument("--lru-size", type=int, default=4, help="adapters kept loaded (default 4)")
    sp.add_argument("--unknown-mode", choices=("base", "404"), default="base",
                    help="an unknown mode is answered by the base model (default) or refused with 404")
    sp.add_argument("--poll-interval", type=float, default=30.0,
                    help="seconds between registry polls for moved champions; 0 = only POST /adapters/reload")
    sp.add_argument("--max-messages", type=int, default=64)
    sp.add_argument("--max-chars", type=int, default=32_000, help="limit on all message contents of a request")
    sp.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    sp.add_argument("--default-max-tokens", type=int, default=256)
    sp.add_argument("--max-batch", type=int, default=32, help="requests generated together in one batch (1 = one at a time)")
    sp.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="an idle server waits this long for more requests to share its first batch (default 10)")
    sp.add_argument("--feedback-threshold", type=int, default=50,
                    help="new feedback events for a mode that start a pipeline run for it (0 = never)")
    sp.add_argument("--on-feedback", default=None, metavar="COMMAND",
                    help="command run instead of the pipeline when the threshold passes ({mode} is substituted)")
    sp.add_argument("--deployment", default="loraflow/on-demand",
                    help="Prefect deployment run when PREFECT_API_URL is set")
    sp.add_argument("--feedback-warm-start", choices=("champion", "off"), default="champion",
                    help="train.warm_start of the runs feedback starts (default champion: continue the served adapter "
                         "on the new records plus a replay sample; -S train.warm_start=... overrides it)")
    pp = sub.add_parser("promote", help="a person's decision: make VERSION the champion of loraflow-MODE")
    pp.add_argument("mode")
    pp.add_argument("version")
    rp = sub.add_parser("rollback", help="point champion back at the previous champion of loraflow-MODE")
    rp.add_argument("mode")
    for sp in (pp, rp):
        sp.add_argument("--params", default="params.yaml")
        sp.add_argument("-S", "--set", action="append", default=[], metavar="section.key=value",
                        help="override a param, e.g. base.tracking_uri=http://127.0.0.1:5000")
    xp = sub.add_parser("export", help="export a registered version for another engine, replayed on that engine "
                                       "(docs/export.md)")
    xp.add_argument("mode")
    xp.add_argument("--to", required=True, choices=("merged", "gguf", "ollama"),
                    help="merged: safetensors for any HF engine; gguf: LoRA GGUF + base GGUF (llama.cpp); "
                         "ollama: gguf + Modelfile")
    which = xp.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version number to export")
    which.add_argument("--alias", default="champion", help="or the alias pointing at it (default champion)")
    xp.add_argument("--out", help="export folder (default exports/<mode>/v<N>-<target>/ under --root)")
    xp.add_argument("--eval-set", help="the eval set the version was judged on (default data/curated/<mode>/eval.jsonl)")
    xp.add_argument("--root", default=".", help="project folder holding data/ (and exports/)")
    xp.add_argument("--params", default="params.yaml")
    xp.add_argument("-S", "--set", action="append", default=[], metavar="section.key=value",
                    help="override a param, e.g. export.rougeL_tolerance=0.1")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            return _export(args)
        if args.cmd == "serve":
            return _serve(args, trigger)
        if args.cmd in ("promote", "rollback"):
            return _registry_cmd(args)
        if args.cmd == "run":
            params = load_params(args.params, args.set)  # fail on bad params before starting Prefect
            if run_pipeline is None:
                raise LoraflowError("`run` needs the Prefect flow: use the `loraflow` command or "
                                    "`python -m flows.cli run`")
            run_pipeline(args.mode or params.base.modes[0], args.params, args.set, args.root)
            return _report(args.params, args.set, args.mode, args.root)
        return _report(args.params, args.set, args.mode, args.root)
    except LoraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
