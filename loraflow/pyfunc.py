"""The MLflow pyfunc flavour of a registered adapter: `mlflow.pyfunc.load_model("models:/loraflow-<mode>@champion")`
loads the base model named in the model config plus the adapter stored with the version, and generates text.

predict() takes a DataFrame whose rows carry either a `prompt` string (one user turn) or `messages`, a list of
chat turns ({role, content}: system, user and assistant turns, as evaluation's prompts are) — the signature's
input (loraflow.registry.signature); over REST: `{"dataframe_records": [{"messages": [...]}, {"prompt": "..."}]}`
to `mlflow models serve`'s /invocations. It returns the answers as a list of strings; `params={"max_new_tokens": N}`
is honoured. Answers are greedy, render the adapter's own chat template and stop at its end of turn, with its
anti-repetition settings and max_new_tokens from its generation_config.json (loraflow.generation): the settings
evaluate judged it with. Without MLflow's schema enforcement (`unwrap_python_model()`) it also takes a plain
list of prompt strings or of message lists.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from peft import PeftModel

        from loraflow import generation
        from loraflow.models import load_causal_lm, load_tokenizer, resolve

        cfg = context.model_config or {}
        adapter = context.artifacts["adapter"]
        self.gen = generation.load(adapter)
        self.max_new_tokens = int(cfg.get("max_new_tokens", self.gen.max_new_tokens))
        self.batch_size = int(cfg.get("batch_size", 8))  # evaluation's, recorded at registration
        self.tok = load_tokenizer(adapter)
        base = load_causal_lm(resolve(cfg["base_model"], cfg.get("model_cache", "~/.cache/loraflow")))
        self.model = PeftModel.from_pretrained(base, adapter).eval()

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:  # no hint: the signature validates
        from loraflow.generation import generate_detailed

        if hasattr(model_input, "columns"):  # a DataFrame: per row `messages` where given, else `prompt`
            cols = list(model_input.columns)
            if "messages" not in cols and "prompt" not in cols:
                items = list(model_input[cols[0]])
            else:
                items = [_row(r, i) for i, r in enumerate(model_input.to_dict("records"))]
        else:
            items = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
        prompts = [[{"role": "user", "content": x}] if isinstance(x, str) else list(x) for x in items]
        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        gp = self.gen.model_copy(update={"max_new_tokens": n})
        return generate_detailed(self.model, self.tok, prompts, gp, batch_size=self.batch_size).answers


def _row(r: dict, i: int) -> Any:
    m = r.get("messages")
    if m is not None and not (isinstance(m, float) and m != m):  # a missing cell is NaN
        return [dict(t) for t in m]
    p = r.get("prompt")
    if isinstance(p, str):
        return p
    raise ValueError(f"row {i}: needs a `prompt` string or `messages` (a list of {{role, content}} turns)")
