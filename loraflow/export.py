"""`loraflow export`: a registered version, in the form an engine people deploy with loads, proven on that engine.

    loraflow export retail_media --to ollama              # champion -> exports/retail_media/v<N>-ollama/
    loraflow export retail_media --to gguf --version 3
    loraflow export retail_media --to merged --out /srv/models/retail

Targets (docs/export.md):
- `merged`: the adapter folded into the base weights (peft merge_and_unload), saved as safetensors with the
  adapter's tokenizer and chat template, and a transformers generation_config.json holding the end-of-turn ids
  (loraflow.generation.end_of_turn_ids) as `eos_token_id` and the adapter's decoding settings: any Hugging Face
  engine stops and decodes as evaluation did.
- `gguf`: the adapter as a GGUF LoRA, written by llama.cpp's own converter (convert_lora_to_gguf.py, from
  llama-cpp-python's source; scripts/setup.sh --with-llama puts it in .venv/share/llama.cpp), beside the base
  as a GGUF (the embedded base ships as one; any other base is converted with convert_hf_to_gguf.py).
- `ollama`: the gguf export plus a Modelfile (loraflow.modelfile).

Every export is replayed before it is kept: the version's pinned eval prompts (the eval set whose sha256 the
version carries, in the order its evaluation logged them) are answered greedily by the engine the export targets
— transformers loading the merged folder alone; llama.cpp (llama-cpp-python, CPU) with the base GGUF and the LoRA
GGUF — and compared with the answers evaluation scored (the per-example table on the version's MLflow run) by
loraflow.parity.compare_answers: identical share, token agreement, ROUGE-L with a paired interval, stop and loop
rates. An export outside `export` params' bounds is refused: the command exits non-zero with the numbers and the
folder is renamed `<folder>.refused`. The numbers go to export.json in the folder and to `export.<target>.*` tags
on the version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraflow import generation, models, parity, tracking
from loraflow.config import GenerateParams, Params, Paths, registered_model_name
from loraflow.errors import EvalSetError, LoraflowError
from loraflow.io import read_jsonl, sha256_file, write_json, write_text

log = logging.getLogger(__name__)

TARGETS = ("merged", "gguf", "ollama")
LLAMA_CPP_ENV = "LORAFLOW_LLAMA_CPP"  # a llama.cpp source folder holding convert_lora_to_gguf.py, gguf-py/, conversion/
SETUP_HINT = "make setup-llama (scripts/setup.sh --with-llama)"


class ExportError(LoraflowError):
    """An export that cannot be made or was refused."""


# ---------------------------------------------------------------------------------------------- the version

@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def find_version(client, name: str, version: str | None, alias: str | None) -> Version:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version)) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException:
        which = f"version {version}" if version else f"alias @{alias}"
        raise ExportError(f"registered model {name} has no {which} (see `loraflow report`, or the MLflow UI)") from None
    return Version(name, str(mv.version), mv.run_id, dict(mv.tags))


def download_adapter(v: Version, dest: Path) -> Path:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{v.name}/{v.version}", dst_path=str(dest)))
    found = next(iter(sorted(local.rglob("adapter_config.json"))), None)
    if found is None:
        raise ExportError(f"{v.name} v{v.version} holds no adapter_config.json under {local}")
    return found.parent


@dataclass(frozen=True)
class Evaluated(parity.Evaluated):
    """parity's evaluated answers, as logged on this version's evaluation run, with that eval set and run."""

    eval_set: dict[str, Any]
    run_id: str


def evaluated_answers(v: Version, eval_file: Path, dest: Path) -> Evaluated:
    """The per-example table evaluation logged on the version's run (eval/predictions.json) and the prompts it
    answered, read from `eval_file` by record id; the file must be the eval set the version was judged on."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        table = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=v.run_id, artifact_path="eval/predictions.json", dst_path=str(dest))).read_text(encoding="utf-8"))
        logged = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=v.run_id, artifact_path="eval/metrics.json", dst_path=str(dest))).read_text(encoding="utf-8"))
    except (MlflowException, OSError) as e:
        raise ExportError(f"{v.name} v{v.version}: its run {v.run_id} has no evaluation (eval/predictions.json, "
                          f"eval/metrics.json): nothing to compare an export with ({e})") from None
    want = v.tags.get("eval_set_sha256")
    if logged["eval_set"]["sha256"] != want:
        raise ExportError(f"{v.name} v{v.version}: the last evaluation on run {v.run_id} used eval set "
                          f"{logged['eval_set']['sha256'][:12]}, the version was registered on {str(want)[:12]}")
    eval_file = Path(eval_file)
    if not eval_file.is_file():
        raise EvalSetError(f"{eval_file}: eval set not found (the version was judged on sha256 {want}; "
                           f"`dvc checkout` or pass --eval-set)")
    have = sha256_file(eval_file)
    if have != want:
        raise EvalSetError(f"{eval_file}: sha256 {have[:12]} is not the eval set {v.name} v{v.version} was judged on "
                           f"({str(want)[:12]}, tag eval_set_sha256): check out the data it was trained with "
                           f"(git checkout <its git_commit tag> && dvc checkout) or pass --eval-set")
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    by_id = {r.get("id"): r for r in read_jsonl(eval_file)}
    missing = [r["id"] for r in rows if r.get("id") not in by_id]
    if missing:
        raise EvalSetError(f"{eval_file}: no record with id {missing[0]!r} (logged by the evaluation of "
                           f"{v.name} v{v.version})")
    recs = [by_id[r["id"]] for r in rows]
    return Evaluated([r["id"] for r in rows], [rec["messages"][:-1] for rec in recs],
                     [rec["messages"][-1]["content"] for rec in recs], [r["candidate_answer"] for r in rows],
                     [bool(r.get("candidate_stopped")) for r in rows], logged["eval_set"], v.run_id)


# ---------------------------------------------------------------------------------------------- merged

def generation_config(model, tok, gp: GenerateParams):
    """A transformers GenerationConfig: the model's, with the end-of-turn ids as eos and the adapter's decoding."""
    from transformers import GenerationConfig

    gc = GenerationConfig.from_dict(model.generation_config.to_dict()) if model.generation_config else GenerationConfig()
    gc.eos_token_id = generation.end_of_turn_ids(tok, model)
    gc.pad_token_id = tok.pad_token_id
    gc.max_new_tokens, gc.repetition_penalty, gc.do_sample = gp.max_new_tokens, gp.repetition_penalty, gp.do_sample
    gc.no_repeat_ngram_size = gp.no_repeat_ngram_size
    if gp.do_sample:  # transformers refuses to save sampling values on a greedy config
        gc.temperature, gc.top_p = gp.temperature, gp.top_p
    else:
        gc.temperature = gc.top_p = gc.top_k = None
    return gc


def merge(model, tok, adapter_dir: Path, gp: GenerateParams, out: Path) -> None:
    """Fold the adapter into `model` (the loaded base) and save the merged model, the adapter's tokenizer `tok`
    (its chat template with it), and its generation contract (`gp`, the end-of-turn ids) as a transformers
    generation_config.json."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.generation_config = generation_config(merged, tok, gp)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------- gguf

def llama_cpp_dir() -> Path:
    """llama.cpp's conversion scripts: $LORAFLOW_LLAMA_CPP, else .venv/share/llama.cpp (scripts/setup.sh --with-llama)."""
    d = Path(os.environ.get(LLAMA_CPP_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    need = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "gguf-py", "conversion")
    if not all((d / n).exists() for n in need):
        raise ExportError(f"llama.cpp's converters are not in {d} (need {', '.join(need)}): run {SETUP_HINT}, "
                          f"or point {LLAMA_CPP_ENV} at a llama.cpp source folder")
    return d


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--to gguf/ollama replays the export on llama.cpp, and llama-cpp-python is not "
                          f"installed: run {SETUP_HINT}") from None
    return llama_cpp.__version__


def _convert(script: str, args: list[str], what: str) -> None:
    d = llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(d / "gguf-py"), str(d),
                                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(d / script), *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise ExportError(f"{script} failed converting {what} (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def convert_lora(adapter_dir: Path, base_hf: str, out_file: Path, outtype: str) -> None:
    _convert("convert_lora_to_gguf.py", ["--base", base_hf, "--outfile", str(out_file), "--outtype", outtype,
                                         str(adapter_dir)], f"the adapter {adapter_dir}")


def base_gguf(params: Params, base_hf: str, folder: Path, outtype: str) -> Path:
    """The base model as a GGUF in `folder`: the file an embedded base ships as (hard-linked, else copied), or
    the base folder converted by llama.cpp's convert_hf_to_gguf.py (any other base, or export.gguf_base: convert)."""
    shipped = models.embedded_gguf(params.base.model)
    if shipped is not None and params.export.gguf_base == "shipped":
        out = folder / shipped.name
        try:
            os.link(shipped, out)
        except OSError:
            shutil.copy2(shipped, out)
        return out
    out = folder / f"{Path(base_hf).name}.{outtype}.gguf"
    _convert("convert_hf_to_gguf.py", [base_hf, "--outfile", str(out), "--outtype", outtype], f"the base {base_hf}")
    return out


# ---------------------------------------------------------------------------------------------- replay

@dataclass(frozen=True)
class Replayed:
    answers: list[str]
    stopped: list[bool]
    seconds: float
    engine: str
    settings: dict[str, Any]


def replay_transformers(folder: Path, prompts: list[list[dict]], batch_size: int) -> Replayed:
    """The merged folder alone, as a Hugging Face engine loads it: its tokenizer and chat template, its
    generation_config.json (eos list, repetition penalty, max_new_tokens), greedy."""
    import transformers

    t = time.perf_counter()
    tok = models.load_tokenizer(str(folder))
    model = models.load_causal_lm(str(folder)).eval()
    eos = model.generation_config.eos_token_id
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    gp = generation.load(folder)  # the transformers-format file: its decoding keys are GenerateParams' names
    g = generation.generate_detailed(model, tok, prompts, gp, batch_size, stop_ids)
    return Replayed(g.answers, g.stopped, time.perf_counter() - t, f"transformers {transformers.__version__} "
                    f"({models.device()}, {str(next(model.parameters()).dtype).removeprefix('torch.')})", g.settings)


def replay_llama_cpp(base: Path, lora: Path, tok, prompts: list[list[dict]], gp: GenerateParams,
                     stop_ids: list[int], threads: int | None) -> Replayed:
    """llama.cpp (llama-cpp-python, CPU): the base GGUF with the LoRA GGUF; each prompt is the adapter's chat
    template rendered and tokenized by its tokenizer (token ids go in, as evaluation tokenizes), greedy, the
    adapter's repetition penalty (llama.cpp penalises the last 64 tokens it generated; transformers every token
    of the sequence, prompt included), stopping at the end-of-turn ids or max_new_tokens."""
    from llama_cpp import Llama

    t = time.perf_counter()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
    n_ctx = max((len(i) for i in ids), default=0) + gp.max_new_tokens + 8
    llm = Llama(model_path=str(base), lora_path=str(lora), n_ctx=n_ctx, n_threads=threads, n_gpu_layers=0,
                seed=0, verbose=False)
    stops = set(stop_ids)
    answers, stopped = [], []
    for prompt in ids:
        llm.reset()  # no KV-cache reuse across prompts: each answer computed as if alone
        out, ended = [], False
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=gp.repetition_penalty):
            if token in stops:
                ended = True
                break
            out.append(token)
            if len(out) >= gp.max_new_tokens:
                break
        answers.append(tok.decode(out, skip_special_tokens=True).strip())
        stopped.append(ended)
    import llama_cpp

    settings = {"temperature": 0.0, "repeat_penalty": gp.repetition_penalty,
                "repeat_last_n": llm.last_n_tokens_size, "max_new_tokens": gp.max_new_tokens,
                "stop_token_ids": sorted(stops), "n_ctx": n_ctx, "threads": llm.n_threads,
                "not_applied": ["no_repeat_ngram_size"] if gp.no_repeat_ngram_size else []}
    return Replayed(answers, stopped, time.perf_counter() - t, f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, "
                    "CPU)", settings)


# ---------------------------------------------------------------------------------------------- the gate

def refusals(result: dict[str, Any], params: Params) -> list[str]:
    """Why an export's replay puts it outside `export` params' bounds, in words with the numbers; [] = kept."""
    xp, failed = params.export, []
    d = result["rougeL"]["diff"]
    if d and d["ci_high"] < -xp.rougeL_tolerance:
        failed.append(f"ROUGE-L {result['rougeL']['served']:.4f} vs evaluated {result['rougeL']['evaluated']:.4f}: "
                      f"paired diff {d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] lies wholly below "
                      f"-{xp.rougeL_tolerance} (export.rougeL_tolerance)")
    stop = result.get("stop_rate", {}).get("served")
    if xp.min_stop_rate is not None and stop is not None and stop < xp.min_stop_rate:
        failed.append(f"{stop:.0%} of its answers end their turn (export.min_stop_rate {xp.min_stop_rate:.0%})")
    loop = result.get("loop_rate", {}).get("served")
    if xp.max_loop_rate is not None and loop is not None and loop > xp.max_loop_rate:
        failed.append(f"{loop:.0%} of its answers loop (export.max_loop_rate {xp.max_loop_rate:.0%})")
    return failed


def lines(result: dict[str, Any]) -> list[str]:
    """One line per figure: export vs evaluated."""
    r, d = result["rougeL"], result["rougeL"]["diff"] or {}
    out = [f"  identical answers  {result['identical']}/{result['n']} ({result['identical_share']:.0%})",
           f"  token agreement    {result['token_agreement']:.4f}",
           f"  ROUGE-L            export {r['served']:.4f}   evaluated {r['evaluated']:.4f}   "
           f"paired diff {d.get('mean', 0):+.4f} [{d.get('ci_low', 0):+.4f}, {d.get('ci_high', 0):+.4f}]"]
    for key, what in (("stop_rate", "ended their turn"), ("loop_rate", "looped")):
        s = result.get(key) or {}
        if "served" in s:
            out.append(f"  {what:<18} export {s['served']:.0%}   evaluated "
                       + (f"{s['evaluated']:.0%}" if "evaluated" in s else "—"))
    return out


def version_tags(target: str, record: dict[str, Any]) -> dict[str, str]:
    r = record["replay"]["parity"]
    p = f"export.{target}"
    tags = {f"{p}.verdict": "accepted" if record["accepted"] else "refused: " + "; ".join(record["refused_because"]),
            f"{p}.engine": record["replay"]["engine"], f"{p}.at": record["at"], f"{p}.folder": record["folder"],
            f"{p}.identical": f"{r['identical']}/{r['n']}", f"{p}.token_agreement": f"{r['token_agreement']:.4f}",
            f"{p}.rougeL": f"{r['rougeL']['served']:.4f}", f"{p}.rougeL_evaluated": f"{r['rougeL']['evaluated']:.4f}"}
    d = r["rougeL"]["diff"]
    if d:
        tags[f"{p}.rougeL_diff"] = f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
    for key in ("stop_rate", "loop_rate"):
        for side in ("served", "evaluated"):
            if side in r.get(key, {}):
                tags[f"{p}.{key}" + ("" if side == "served" else "_evaluated")] = f"{r[key][side]:.4f}"
    tags[f"{p}.seconds"] = json.dumps(record["seconds"], sort_keys=True)
    return {k: v[:5000] for k, v in tags.items()}


# ---------------------------------------------------------------------------------------------- the command

def default_folder(root: Path, mode: str, version: str, target: str) -> Path:
    return Path(root) / "exports" / mode / f"v{version}-{target}"


def run(params: Params, mode: str, target: str, *, version: str | None = None, alias: str | None = "champion",
        out: Path | None = None, root: Path = Path("."), eval_file: Path | None = None,
        echo=print) -> dict[str, Any]:
    """Export one registered version of `mode` to `target`, replay it, keep or refuse it.

    Args:
        params: reads `base`, `evaluate` (batch size and the scorer's bootstrap) and `export`.
        version / alias: which version (a number wins over the alias; default the champion).
        out: the export folder (default exports/<mode>/v<N>-<target>/ under `root`).
        eval_file: the eval set the version was judged on (default data/curated/<mode>/eval.jsonl under `root`).
        echo: where the summary lines go.

    Returns:
        The export.json content. Raises ExportError when the export is refused (after writing it to
        `<out>.refused`, with the numbers).
    """
    import mlflow

    from loraflow.parity import compare_answers

    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    gguf = target in ("gguf", "ollama")
    if gguf:  # before anything is downloaded: a missing install is a one-line answer
        llama_cpp_version()
        llama_cpp_dir()
    timing: dict[str, float] = {}
    t0 = t = time.perf_counter()
    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    v = find_version(client, registered_model_name(mode), version, alias)
    if v.tags.get("base_model") and v.tags["base_model"] != params.base.model:
        raise ExportError(f"{v.name} v{v.version} was trained on base {v.tags['base_model']!r}, params name "
                          f"{params.base.model!r} (base.model): export with the params it was trained with")
    out = Path(out) if out else default_folder(root, mode, v.version, target)
    eval_file = Path(eval_file) if eval_file else Paths(Path(root), mode).curated / "eval.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(work, 0o755)
    try:
        with tempfile.TemporaryDirectory(prefix="loraflow-export-") as tmp:
            adapter = download_adapter(v, Path(tmp) / "model")
            ev = evaluated_answers(v, eval_file, Path(tmp) / "eval")
            timing["download"] = time.perf_counter() - t
            t = time.perf_counter()
            tok = models.load_tokenizer(str(adapter), params.base.trust_remote_code)
            gp = generation.load(adapter, params.generate)
            base_hf = models.resolve(params.base.model, params.base.model_cache)
            files = _build(params, target, v, adapter, base_hf, tok, gp, work)
            timing["build"] = time.perf_counter() - t
            t = time.perf_counter()
            if gguf:
                stop_ids = generation.end_of_turn_ids(tok, base_hf)
                rep = replay_llama_cpp(work / files["base"], work / files["adapter"], tok, ev.prompts, gp, stop_ids,
                                       params.export.threads)
            else:
                rep = replay_transformers(work, ev.prompts, params.evaluate.batch_size)
            timing["replay"] = time.perf_counter() - t
            result = compare_answers(ev.answers, rep.answers, ev.references, rep.stopped, params,
                                     evaluated_stopped=ev.stopped, ids=ev.ids,
                                     tokenize=lambda s: tok(s, add_special_tokens=False)["input_ids"])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    failed = refusals(result, params)
    final = out if not failed else out.with_name(out.name + ".refused")
    timing["total"] = time.perf_counter() - t0
    record = {
        "registered_model": v.name, "version": v.version, "target": target, "accepted": not failed,
        "refused_because": failed, "folder": str(final.resolve()),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter_sha256": v.tags.get("adapter_sha256"), "chat_template_sha256": v.tags.get("chat_template_sha256"),
        "base_model": params.base.model, "files": files,
        "eval_set": {**ev.eval_set, "read_from": str(eval_file)}, "evaluated_run": ev.run_id,
        "replay": {"engine": rep.engine, "prompts": len(ev.prompts), "settings": rep.settings,
                   "parity": result, "answers": [{"id": i, "export": a, "evaluated": e, "stopped": s}
                                                  for i, a, e, s in zip(ev.ids, rep.answers, ev.answers, rep.stopped,
                                                                        strict=True)]},
        "tolerances": params.export.model_dump(),
        "seconds": {k: round(x, 1) for k, x in timing.items()},
    }
    write_json(work / "export.json", record)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
    for k, val in version_tags(target, record).items():
        client.set_model_version_tag(v.name, v.version, k, val)
    echo(f"{v.name} v{v.version} -> {target}: {final}")
    echo(f"replayed {len(ev.prompts)} eval prompts greedily on {rep.engine} in {timing['replay']:.0f} s "
         f"(export built in {timing['build']:.0f} s); export vs evaluated:")
    for line in lines(result):
        echo(line)
    if failed:
        raise ExportError(f"export refused, kept for inspection in {final}: " + "; ".join(failed))
    echo(f"accepted; numbers in {final / 'export.json'} and on {v.name} v{v.version} as tags export.{target}.*")
    return record


def _build(params: Params, target: str, v: Version, adapter: Path, base_hf: str, tok, gp: GenerateParams,
           work: Path) -> dict[str, str]:
    """Write the target's files into `work`; returns their roles -> file names."""
    if target == "merged":
        model = models.load_causal_lm(base_hf, trust_remote_code=params.base.trust_remote_code)
        merge(model, tok, adapter, gp, work)
        return {"model": "model.safetensors", "generation_config": generation.FILE}
    from loraflow import modelfile

    fmt = modelfile.detect(tok) if target == "ollama" else None  # an unsupported template fails before converting
    outtype = params.export.gguf_outtype
    adapter_file = f"{v.name}-v{v.version}.lora-{outtype}.gguf"
    convert_lora(adapter, base_hf, work / adapter_file, outtype)
    base = base_gguf(params, base_hf, work, outtype)
    files = {"base": base.name, "adapter": adapter_file}
    if fmt is not None:
        stop_ids = generation.end_of_turn_ids(tok, base_hf)
        header = (f"{v.name} v{v.version}, exported by `loraflow export {v.tags.get('mode', '')} --to ollama`\n"
                  f"adapter sha256 {v.tags.get('adapter_sha256', '?')}, chat template sha256 "
                  f"{models.template_sha256(tok)} ({fmt.style.name})\n"
                  f"ollama create {v.name}-v{v.version} -f Modelfile")
        write_text(work / "Modelfile", modelfile.modelfile(fmt, base.name, adapter_file,
                                                           tok.convert_ids_to_tokens(stop_ids), gp, header))
        files["modelfile"] = "Modelfile"
    return files
