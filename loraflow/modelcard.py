"""A Hugging Face model card written from a run's evidence, and put where people look in the registry.

YAML front matter (base_model, library_name: peft, license, language, tags, model-index with the
evaluation results) that huggingface_hub parses back, then sections built from stats.json,
train_info.json, metrics.json and decision.json (`render`). `attach` puts the card on a registered version:
whole as the artifact model_card/README.md of the version's run, its body as the version's description
(what the MLflow UI shows on the version page).
"""

from __future__ import annotations

from loraflow import degeneration, tracking
from loraflow.config import Params, registered_model_name
from loraflow.models import hub_id

METRIC_NAMES = {"rouge1": "ROUGE-1 F1", "rouge2": "ROUGE-2 F1", "rougeL": "ROUGE-L F1", "bertscore": "BERTScore F1"}


def _fmt(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _fmt_delta(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def _degeneration_table(metrics: dict) -> str:
    """Degenerate answers per model (stop, loop, empty, seq-rep-4), as evaluate measured them."""
    head, rows = degeneration.rate_table(metrics, ("base", "champion", "candidate"))
    if not rows:
        return ""
    g = metrics["generation"].get("generation_config") or {}
    decoding = ", ".join(f"{k} {g[k]}" for k in ("repetition_penalty", "no_repeat_ngram_size") if k in g)
    return ("\nDegenerate answers (a loop: some word 4-gram said 3+ times; stop: the answer ended its turn "
            f"before the token limit){'; decoding ' + decoding if decoding else ''}:\n\n"
            + "\n".join(f"| {' | '.join(r)} |" for r in [head, ["---"] * len(head), *rows]) + "\n")


def render(params: Params, mode: str, stats: dict, info: dict, metrics: dict, decision: dict) -> str:
    """The card's Markdown (front matter + body) from the evidence files' contents."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    name = registered_model_name(mode)
    eval_results = [
        EvalResult(task_type="text-generation", dataset_type="loraflow-curated", dataset_name=f"{mode} eval split",
                   dataset_revision=metrics["eval_set"]["sha256"][:12], metric_type=m, metric_name=label,
                   metric_value=round(metrics["candidate"][m]["mean"], 4))
        for m, label in METRIC_NAMES.items()
    ]
    data = ModelCardData(
        model_name=name, base_model=hub_id(info.get("base_model", params.base.model)), library_name="peft",
        license=params.model_card.license, language=params.model_card.language,
        tags=[*params.model_card.tags, mode], pipeline_tag="text-generation", eval_results=eval_results,
    )
    rows = []
    for m, label in METRIC_NAMES.items():
        rows.append(f"| {label} | {_fmt(metrics['base'][m])} | {_fmt(metrics.get('champion') and metrics['champion'][m])} "
                    f"| {_fmt(metrics['candidate'][m])} | {_fmt_delta(metrics['deltas']['candidate_vs_base'][m])} "
                    f"| {_fmt_delta((metrics['deltas'].get('candidate_vs_champion') or {}).get(m))} |")
    sources = "\n".join(f"| `{src}` | {s['read']} | {s['curated']} | {s['duplicates']} | {s['quarantined']} | "
                        f"{'; '.join(f'{k} ({n})' for k, n in s.get('reasons', {}).items()) or '—'} |"
                        for src, s in stats["sources"].items())
    tl = stats.get("token_lengths", {})
    tp = info.get("params", {})
    champion = (f"v{metrics['champion_version']}" if metrics.get("champion_version")
                else "none (first candidate for this mode: compared with the base model only)")
    body = f"""
# {name}

A LoRA adapter for **{info.get('base_model', params.base.model)}**, mode `{mode}`, trained and gated by loraflow.
Registry: `{decision.get('registered_model')}` version {decision.get('version') or '— (not registered)'}; aliases after this run: {decision.get('aliases_after') or '—'}.

## Intended use
Answers questions in the domain of the `{mode}` training data, in the language(s) {', '.join(params.model_card.language)}.
Load it through MLflow (`mlflow.pyfunc.load_model("models:/{name}@champion")`) or with peft on top of the base model.
It is not a general assistant: outside its domain it is no better than the base model, which is small.

## Training data
{stats['totals']['read']} raw records read; {stats['totals']['curated']} curated, {stats['totals']['duplicates']} exact duplicates merged,
{stats['totals']['quarantined']} quarantined with a reason. Split: {stats['splits']['train']} train / {stats['splits']['eval']} eval
(by a stable hash of each record's id). Token lengths under the chat template: median {tl.get('p50', '—')}, p95 {tl.get('p95', '—')}, max {tl.get('max', '—')}.

| source | read | curated | duplicates | quarantined | reasons |
|---|---:|---:|---:|---:|---|
{sources}

Content hashes: train `{stats['files']['train.jsonl'][:16]}`, eval `{stats['files']['eval.jsonl'][:16]}`.

## Training procedure
Method {info.get('method')} with LoRA r={tp.get('lora_r')}, alpha={tp.get('lora_alpha')}, dropout={tp.get('lora_dropout')},
target modules {tp.get('target_modules')}; learning rate {tp.get('learning_rate')}, batch {tp.get('batch_size')} x {tp.get('grad_accum')},
max length {tp.get('max_length')}, seed {info.get('seed')}. Quantization: {info.get('quantization')} ({info.get('quantization_reason')}).
Hardware: {info.get('hardware')}. {info.get('steps')} steps, {info.get('tokens_seen')} tokens in {info.get('wall_seconds')} s
({info.get('tokens_per_second')} tokens/s), peak memory {info.get('peak_memory_mb')} MB. Final training loss {info.get('final_loss')}.
Trainable parameters: {info.get('trainable_parameters')} of {info.get('total_parameters')}. MLflow run `{info.get('mlflow_run_id')}`.

## Evaluation
{metrics['eval_set']['size']} held-out conversations (eval set sha256 `{metrics['eval_set']['sha256'][:16]}`), greedy decoding,
max {metrics['generation']['max_new_tokens']} new tokens. Means with {int(metrics['scoring']['confidence'] * 100)}% bootstrap intervals; deltas are paired.
Champion compared against: {champion}.

| metric | base | champion | candidate | candidate − base | candidate − champion |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{_degeneration_table(metrics)}
ROUGE tokenizer: {metrics['scoring']['rouge_tokenizer']}. BERTScore encoder: `{metrics['scoring']['bertscore_model']}`.

## Promotion decision
**{decision['decision']}** — {decision['reason']}

## Limitations
- The eval set is small ({metrics['eval_set']['size']} examples): look at the intervals, not only the means.
- ROUGE and BERTScore measure overlap with reference answers, not correctness; read `predictions.jsonl`.
- The default BERTScore encoder (all-MiniLM-L6-v2) is English-trained; on other languages its scores are rough.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


CARD_ARTIFACT = "model_card/README.md"
MAX_DESCRIPTION = 5000  # the registry's column size for a version's description


def attach(params: Params, mode: str, version: str, text: str) -> None:
    """Put the card where people look: the version's description (body, Markdown) and its run's artifacts (whole)."""
    import mlflow
    from huggingface_hub import ModelCard

    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    name = registered_model_name(mode)
    mv = client.get_model_version(name, version)
    if mv.run_id:
        client.log_text(mv.run_id, text, CARD_ARTIFACT)
    body = ModelCard(text).text.strip()
    if len(body) > MAX_DESCRIPTION:
        tail = f"\n\n... (cut; the whole card is the run artifact `{CARD_ARTIFACT}`)"
        body = body[: MAX_DESCRIPTION - len(tail)] + tail
    client.update_model_version(name, version, description=body)
