"""The MLflow pyfunc flavour of a registered adapter: `mlflow.pyfunc.load_model("models:/loraflow-<mode>@champion")`
loads the base model named in the model config plus the adapter stored with the version, and generates text.

predict() takes a list of prompts (strings or chat message lists), or a DataFrame with a `prompt`
or `messages` column, and returns the answers as a list of strings.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from peft import PeftModel

        from loraflow.models import load_causal_lm, load_tokenizer, resolve

        cfg = context.model_config or {}
        adapter = context.artifacts["adapter"]
        self.max_new_tokens = int(cfg.get("max_new_tokens", 128))
        self.tok = load_tokenizer(adapter)
        base = load_causal_lm(resolve(cfg["base_model"], cfg.get("model_cache", "~/.cache/loraflow")))
        self.model = PeftModel.from_pretrained(base, adapter).eval()

    def predict(self, context, model_input: Any, params: dict | None = None) -> list[str]:
        from steps.evaluate import generate

        if hasattr(model_input, "columns"):  # a DataFrame
            col = "messages" if "messages" in model_input.columns else "prompt"
            items = list(model_input[col])
        else:
            items = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
        prompts = [[{"role": "user", "content": x}] if isinstance(x, str) else list(x) for x in items]
        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate(self.model, self.tok, prompts, n, batch_size=8)
