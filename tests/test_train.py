"""The train step: only LoRA weights move, a killed run resumes, one seed gives one adapter, DPO runs.

The slow tests train the real embedded SmolLM2 for a few steps on the sample data (curated and validated
by the real steps first). Pure pieces (run keys, checkpoint choice, loss masks) are tested without training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraflow import training
from loraflow.config import apply_overrides, load_params
from loraflow.io import read_json, sha256_file, write_json
from loraflow.train_plan import (
    choose_precision,
    choose_quantization,
    choose_stages,
    cpu_has_bf16,
    micro_batches,
)
from tests.conftest import FORMATS, MODE, ROOT, mlflow_client

BIN = Path(sys.executable).parent
FAST = ["train.max_steps=3", "train.batch_size=2", "train.max_length=128", "train.logging_steps=1",
        "curate.too_long=truncate"]


def test_quantization_choice_says_why():
    assert choose_quantization("auto", cuda=True, has_bnb=True)[0] is True
    use, why = choose_quantization("auto", cuda=False, has_bnb=True)
    assert use is False and "no CUDA" in why
    assert choose_quantization("auto", cuda=True, has_bnb=False) == (False, "auto: CUDA present but bitsandbytes missing -> plain LoRA in bf16")
    use, why = choose_quantization("4bit", cuda=False, has_bnb=True)  # bitsandbytes' CPU backend, with a warning
    assert use is True and "on CPU" in why
    with pytest.raises(ValueError, match="needs the bitsandbytes package"):
        choose_quantization("4bit", cuda=False, has_bnb=False)


def test_precision_choice_uses_bf16_only_where_the_hardware_has_it():
    assert choose_precision("auto", cuda=True, cuda_bf16=True, cpu_bf16=False, use_4bit=True)[0] is True
    assert choose_precision("auto", cuda=True, cuda_bf16=False, cpu_bf16=False, use_4bit=False)[0] is False
    bf16, why = choose_precision("auto", cuda=False, cuda_bf16=False, cpu_bf16=True, use_4bit=False)
    assert bf16 is True and "AVX512-BF16" in why
    assert choose_precision("auto", cuda=False, cuda_bf16=False, cpu_bf16=False, use_4bit=False)[0] is False
    assert choose_precision("auto", cuda=False, cuda_bf16=False, cpu_bf16=True, use_4bit=True)[0] is False
    assert choose_precision("fp32", cuda=True, cuda_bf16=True, cpu_bf16=True, use_4bit=False) == (False, "train.precision=fp32")
    bf16, why = choose_precision("bf16", cuda=False, cuda_bf16=False, cpu_bf16=False, use_4bit=False)
    assert bf16 is True and "emulates bf16" in why  # asked for: done, with a warning
    with pytest.raises(ValueError, match="no bf16 support"):
        choose_precision("bf16", cuda=True, cuda_bf16=False, cpu_bf16=False, use_4bit=False)


def test_packed_blocks_go_one_per_forward_without_a_varlen_kernel():
    assert micro_batches(8, 2, False, "sdpa") == (8, 2, "one flattened sequence per batch")
    per, acc, why = micro_batches(8, 2, True, "sdpa")
    assert (per, acc) == (1, 16) and "one per forward pass" in why  # the same 16 blocks per optimizer step
    assert micro_batches(8, 2, True, "flash_attention_2")[:2] == (8, 2)


def test_run_key_follows_weights_not_bookkeeping():
    p = load_params(ROOT / "params.yaml")
    k = training.run_key(p, "sft", "data1")
    assert k == training.run_key(load_params(ROOT / "params.yaml", ["train.save_steps=7", "train.logging_steps=2",
                                                                    "train.keep_checkpoints=true"]), "sft", "data1")
    assert k != training.run_key(p, "sft", "data2")
    assert k != training.run_key(p, "dpo", "data1")
    assert k != training.run_key(load_params(ROOT / "params.yaml", ["train.lora_r=8"]), "sft", "data1")
    assert k != training.run_key(load_params(ROOT / "params.yaml", ["base.seed=1"]), "sft", "data1")


def test_last_checkpoint_skips_one_cut_off_mid_save(tmp_path):
    assert training.last_checkpoint(tmp_path) is None
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert training.last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_loss_mask_covers_every_assistant_turn_and_its_end_of_turn_only():
    from loraflow.checks import assistant_masks
    from loraflow.generation import end_of_turn_ids
    from loraflow.models import load_tokenizer, resolve

    params = load_params(ROOT / "params.yaml")
    path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(path)
    msgs = [{"role": "system", "content": "Você é um consultor."},
            {"role": "user", "content": "O que é ACOS?"},
            {"role": "assistant", "content": "ACOS é o custo de publicidade sobre as vendas."},
            {"role": "user", "content": "E ROAS?"},
            {"role": "assistant", "content": "ROAS é a receita por real investido."}]
    [(ids, mask)] = assistant_masks(tok, [msgs], end_of_turn_ids(tok, path))
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == ("ACOS é o custo de publicidade sobre as vendas.<|im_end|>"
                       "ROAS é a receita por real investido.<|im_end|>")
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "O que é ACOS?" in masked and "E ROAS?" in masked and "Você é um consultor." in masked


def test_the_base_guard_raises_when_a_base_weight_moves_and_not_for_lora_weights():
    """The guard the train step runs after every stage (a LoRA weight may move, a base weight may not)."""
    import torch

    from loraflow.trainer import check_base_unchanged

    class Layer(torch.nn.Module):  # the names peft gives: base_layer.weight beside lora_A / lora_B
        def __init__(self) -> None:
            super().__init__()
            self.base_layer, self.lora_A = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2, bias=False)

    model = torch.nn.Sequential(Layer())
    before = training.base_fingerprint(model)
    with torch.no_grad():
        model[0].lora_A.weight.add_(1.0)
    assert check_base_unchanged(model, before, "sft") is True
    with torch.no_grad():
        model[0].base_layer.weight[1, 2] += 1e-3  # one element, a little: the fingerprint still sees it
    with pytest.raises(RuntimeError, match="train sft: the base model's weights changed"):
        check_base_unchanged(model, before, "sft")


# --- slow: real training ------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    # MLflow samples system metrics every 10 s by default: a 3-step run can end before the first sample.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}


def _prepared(project: Path, overrides: list[str]) -> Path:
    """Write the overrides into params.yaml, then curate and validate with the real steps."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    overrides = [*overrides, f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}"]
    (project / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides), sort_keys=False))
    for cmd in (["steps.curate", f"data/raw/{MODE}", f"data/curated/{MODE}"],
                ["steps.validate", f"data/curated/{MODE}", f"data/validation/{MODE}", f"data/profiles/{MODE}.json"]):
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=project, env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    return project


def _train_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "steps.train", "--mode", MODE, *extra, f"data/validation/{MODE}/report.json",
            f"data/curated/{MODE}", f"data/adapters/{MODE}"]


def _train(project: Path, *sets: str) -> dict:
    extra = [a for s in sets for a in ("-S", s)]
    r = subprocess.run(_train_cmd(*extra), cwd=project, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return read_json(project / "data" / "adapters" / MODE / "train_info.json")


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_lora_weights_move_base_stays_and_one_seed_gives_one_adapter(project):

    _prepared(project, FAST)
    adapter = project / "data" / "adapters" / MODE
    info = _train(project)
    first = (adapter / "adapter_model.safetensors").read_bytes()
    w = _tensors(adapter / "adapter_model.safetensors")

    # Only LoRA tensors are saved, every one of them trained (B starts at zero), and nothing else moved.
    assert w and all("lora_A" in k or "lora_B" in k for k in w)
    assert all(float(t.abs().sum()) > 0 for k, t in w.items() if "lora_B" in k)
    assert sum(t.numel() for t in w.values()) == info["trainable_parameters"] < info["total_parameters"] / 10
    assert info["steps"] == 3 and info["tokens_seen"] > 0 and info["loss_mask"].startswith("assistant turns")
    assert info["quantization"] == "none" and "no CUDA" in info["quantization_reason"]
    assert info["precision"] == ("bf16" if cpu_has_bf16() else "fp32")  # params.yaml's auto, on this CPU
    assert (adapter / "loss.png").read_bytes()[:4] == b"\x89PNG" and (adapter / "tokenizer_config.json").exists()
    assert not (project / ".checkpoints" / MODE).exists()  # removed once the run finished

    client = mlflow_client(project / "mlflow.db")
    run = client.get_run(info["mlflow_run_id"])
    assert run.data.tags["loraflow.stage"] == "sft" and run.data.tags["data_sha256"] == info["train_data_sha256"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics were sampled
    assert info["stages"][0]["mlflow_batches"] == 1  # three log events, one call
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"adapter", "loss.png"}

    # Same seed, same data: the same adapter, bit for bit (CPU).
    again = _train(project)
    assert (adapter / "adapter_model.safetensors").read_bytes() == first
    assert again["adapter_sha256"] == info["adapter_sha256"] and again["mlflow_run_id"] != info["mlflow_run_id"]
    other = _train(project, "base.seed=7")
    assert other["adapter_sha256"] != info["adapter_sha256"]


@pytest.mark.slow
def test_a_stage_whose_base_weights_move_during_training_fails(tmp_path):
    """The guard is wired into the real stage: a callback nudging one base weight mid-training stops it."""
    from transformers import TrainerCallback

    from loraflow.models import load_tokenizer, resolve
    from loraflow.train_plan import choose_hardware
    from loraflow.trainer import StageSetup, train_stage

    class NudgeBase(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            base = next(t for n, t in model.named_parameters() if "lora_" not in n and t.dim() == 2)
            with torch.no_grad():
                base[0, 0] += 1e-2

    params = load_params(ROOT / "params.yaml", [*FAST, "train.max_steps=1", "train.save_steps=0",
                                                f"train.checkpoint_dir={tmp_path / 'ckpt'}"])
    path = resolve(params.base.model, params.base.model_cache)
    setup = StageSetup(params, MODE, load_tokenizer(path), path, choose_hardware(params.train))
    records = [{"messages": [{"role": "user", "content": "O que é ACOS?"},
                             {"role": "assistant", "content": "Custo de publicidade sobre as vendas."}]}] * 2
    with pytest.raises(RuntimeError, match="train sft: the base model's weights changed during LoRA training"):
        train_stage(setup, "sft", "guard", records, None, tracking=None, callbacks=[NudgeBase()])


@pytest.mark.slow
def test_a_checkpoint_at_the_last_step_is_the_result_not_one_step_more(tmp_path):
    """A run killed after its last checkpoint, while it wrote its adapter (found by the SIGKILL campaign): the re-run
    takes that checkpoint's weights as they are, no batch more, the same adapter as the uninterrupted run."""
    from loraflow.models import load_tokenizer, resolve
    from loraflow.train_plan import choose_hardware
    from loraflow.trainer import StageSetup, train_stage

    params = load_params(ROOT / "params.yaml", [*FAST, "train.max_steps=2", "train.save_steps=2",
                                                f"train.checkpoint_dir={tmp_path / 'ckpt'}"])
    path = resolve(params.base.model, params.base.model_cache)
    setup = StageSetup(params, MODE, load_tokenizer(path), path, choose_hardware(params.train))
    records = [{"messages": [{"role": "user", "content": f"O que é ACOS? ({i})"},
                             {"role": "assistant", "content": "Custo de publicidade sobre as vendas."}]} for i in range(8)]
    first = train_stage(setup, "sft", "last", records, None)
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    assert (first["checkpoints"] / "checkpoint-2" / "trainer_state.json").exists()
    import shutil

    shutil.rmtree(first["checkpoints"] / "final")  # killed while it wrote the adapter
    again = train_stage(setup, "sft", "last", records, None)
    assert again["resumed_from_step"] == 2 and again["steps"] == 2 and again["tokens_this_run"] == 0
    assert again["adapter_sha256"] == first["adapter_sha256"]
    assert again["train_loss"] == pytest.approx(first["train_loss"], abs=1e-3)  # from the logged losses (4 digits)


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(project):

    _prepared(project, [*FAST, "train.max_steps=6", "train.save_steps=2"])
    ckpts = project / ".checkpoints" / MODE
    proc = subprocess.Popen(_train_cmd(), cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            done = [c for c in ckpts.glob("*/checkpoint-*") if (c / "trainer_state.json").exists()]
            if any(int(c.name.split("-")[1]) >= 2 for c in done):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (project / "data" / "adapters" / MODE).exists()  # nothing half-written
    cut = max(int(c.name.split("-")[1]) for c in ckpts.glob("*/checkpoint-*") if (c / "trainer_state.json").exists())
    assert 2 <= cut < 6

    info = _train(project)
    assert info["steps"] == 6 and info["resumed_from_step"]["sft"] == cut
    client = mlflow_client(project / "mlflow.db")
    steps = [m.step for m in client.get_metric_history(info["mlflow_run_id"], "loss")]
    assert steps == list(range(cut + 1, 7))  # the resumed run trained only what was left
    assert client.get_run(info["mlflow_run_id"]).data.tags["resumed_from_step"] == str(cut)


@pytest.mark.slow
def test_sft_then_dpo_on_preference_pairs_gives_an_adapter_and_its_own_run(project):

    # Real preference data (LLaMA-Factory's DPO demo), beside the sample conversations.
    pairs = json.loads((FORMATS / "llamafactory_dpo_en_demo.json").read_text())[:40]
    (project / "data" / "raw" / MODE / "dpo_demo.json").write_text(json.dumps(pairs))
    _prepared(project, [*FAST, "train.method=sft+dpo", "train.max_steps=2", "train.dpo_max_steps=2"])
    assert (project / "data" / "curated" / MODE / "prefs.jsonl").read_text().count("\n") >= 10
    info = _train(project)
    assert info["method"] == "sft+dpo" and [s["stage"] for s in info["stages"]] == ["sft", "dpo"]
    assert info["pref_records"] >= 10 and info["steps"] == 2
    sft_sha = info["stages"][0]["adapter_sha256"]
    assert info["adapter_sha256"] == info["stages"][1]["adapter_sha256"] != sft_sha  # DPO moved the SFT adapter

    client = mlflow_client(project / "mlflow.db")
    sft, dpo = (client.get_run(info["mlflow_run_ids"][s]) for s in ("sft", "dpo"))
    assert sft.info.run_id != dpo.info.run_id and dpo.info.run_id == info["mlflow_run_id"]
    assert dpo.data.tags["loraflow.stage"] == "dpo" and "rewards_accuracies" in dpo.data.metrics
    assert "adapter" in {a.path for a in client.list_artifacts(dpo.info.run_id)}

    # DPO alone, from the base model.
    only = _train(project, "train.method=dpo")
    assert [s["stage"] for s in only["stages"]] == ["dpo"] and only["adapter_sha256"] not in (sft_sha, info["adapter_sha256"])


@pytest.mark.slow
def test_qlora_trains_on_4bit_weights_on_cpu_and_the_adapter_serves_the_unquantized_base(project):
    """The QLoRA path (NF4 load, k-bit preparation, LoRA on 4-bit layers, save) through bitsandbytes' CPU
    backend; the adapter then runs on the float32 base, as evaluate and serve load it."""
    import math

    import torch
    from peft import PeftModel

    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    _prepared(project, [*FAST, "train.max_length=96"])
    r = subprocess.run(_train_cmd("-S", "train.quantization=4bit"), cwd=project, env=_env(), capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    # allowed on CPU, not silently
    assert re.search(r"^WARNING \S+: train: train.quantization=4bit on CPU", r.stderr, re.M), r.stderr[-3000:]
    adapter = project / "data" / "adapters" / MODE
    info = read_json(adapter / "train_info.json")
    stage = info["stages"][0]
    assert info["quantization"] == "4bit-nf4" and info["hardware"].startswith("cpu")
    # every LoRA layer wrapped a bitsandbytes 4-bit layer (210 = 30 layers x 7 linear projections)
    assert stage["lora_base_layers"] == {"Linear4bit": 210}
    assert info["steps"] == 3 and info["final_loss"] is not None and math.isfinite(info["final_loss"])

    w = _tensors(adapter / "adapter_model.safetensors")
    assert w and all("lora_A" in k or "lora_B" in k for k in w)
    assert all(float(t.abs().sum()) > 0 for k, t in w.items() if "lora_B" in k)  # B starts at zero: all trained

    # The adapter on the unquantized float32 base: it loads, changes the logits, and generates.
    params = load_params(project / "params.yaml")
    path = resolve(params.base.model, params.base.model_cache)
    tok, base = load_tokenizer(path), load_causal_lm(path).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "O que é ROAS?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**ids).logits
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
        after = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert float((after - before).abs().max()) > 1e-3
    assert out.shape[1] > ids["input_ids"].shape[1] and tok.decode(out[0, ids["input_ids"].shape[1]:]).strip()


@pytest.mark.gpu
def test_qlora_on_cuda_trains_in_4bit(project):
    _prepared(project, FAST)
    info = _train(project, "train.quantization=4bit")  # fails, not falls back, without bitsandbytes
    assert info["quantization"] == "4bit-nf4" and not info["hardware"].startswith("cpu")
    assert info["peak_memory_mb"] > 0


def test_dpo_without_pairs_is_refused_with_the_file_named(project, tmp_path):
    """No preference pairs (the sample data has none): train.method=dpo stops before loading a model."""
    from loraflow.errors import ValidationFailed
    from steps import train

    cur = project / "data" / "curated" / MODE
    cur.mkdir(parents=True)
    for name in ("train.jsonl", "prefs.jsonl"):
        (cur / name).write_text("")

    report = project / "report.json"
    write_json(report, {"success": True, "files": {n: sha256_file(cur / n) for n in ("train.jsonl", "prefs.jsonl")}})
    params = load_params(ROOT / "params.yaml", ["train.method=dpo", f"base.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    with pytest.raises(ValidationFailed, match="prefs.jsonl: no records to train dpo on"):
        train.run(params, MODE, report, cur, project / "adapter")
    assert not (project / "adapter").exists()


def test_padding_free_batch_gives_the_padded_batchs_loss():
    """Padding-free concatenates a batch into one row; attention must stay within each example (transformers
    builds a block-diagonal mask from position_ids on CPU too). Same loss as the padded batch, or it leaks."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from loraflow.models import load_causal_lm, load_tokenizer, resolve
    from loraflow.trainer import sft_dataset

    params = load_params(ROOT / "params.yaml")
    path = resolve(params.base.model, params.base.model_cache)
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in (("O que é ACOS?", "Custo de publicidade dividido pela receita das vendas."),
                            ("E ROAS, como se calcula? Explique com um exemplo de campanha.", "Receita sobre investimento."),
                            ("Oi", "Olá! Em que posso ajudar com suas campanhas de retail media hoje?"))]
    data, _ = sft_dataset(tok, records, 256, True, path)
    rows = [dict(r) for r in data]
    for r in rows:  # what trl's preparation does with the mask column
        r["labels"] = [t if m else -100 for t, m in zip(r["input_ids"], r.pop("assistant_masks"), strict=True)]
    losses = {}
    for free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=free)(rows)
        assert ("attention_mask" in batch) != free
        with torch.no_grad():  # use_cache=False as in training (trl sets it): a KV cache disables the packed mask
            losses[free] = float(model(**{k: v for k, v in batch.items() if k != "cu_seq_lens"}, use_cache=False).loss)
    assert abs(losses[True] - losses[False]) < 1e-4, losses


def test_auto_method_adds_dpo_only_with_enough_pairs():
    assert choose_stages("auto", 0, 16)[0] == ["sft"]
    assert choose_stages("auto", 15, 16) == (["sft"], "auto: 15 preference pairs < train.dpo_min_pairs 16 -> SFT only")
    assert choose_stages("auto", 16, 16)[0] == ["sft", "dpo"]
    assert choose_stages("sft", 100, 16)[0] == ["sft"] and choose_stages("dpo", 0, 16)[0] == ["dpo"]
