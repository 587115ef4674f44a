"""The MLflow pyfunc flavour of a registered adapter: `mlflow.pyfunc.load_model("models:/loraflow-<mode>@champion")`
loads the base model named in the model config plus the adapter stored with the version, and generates text.

predict() takes a list of prompt strings (the signature's input) and returns the answers as a list of strings;
`params={"max_new_tokens": N}` is honoured (the signature's params schema). Answers are greedy, with the
adapter's own anti-repetition settings and max_new_tokens from its generation_config.json (see
loraflow.generation): the settings evaluate judged it with. Called without MLflow's schema
enforcement (`unwrap_python_model()`), it also takes chat message lists or a DataFrame with a `messages` column.
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
        self.tok = load_tokenizer(adapter)
        base = load_causal_lm(resolve(cfg["base_model"], cfg.get("model_cache", "~/.cache/loraflow")))
        self.model = PeftModel.from_pretrained(base, adapter).eval()

    def predict(self, context, model_input: Any, params: dict | None = None) -> list[str]:
        from loraflow.generation import generate_detailed

        if hasattr(model_input, "columns"):  # a DataFrame
            # The signature's unnamed string column arrives as column 0.
            cols = list(model_input.columns)
            col = next((c for c in ("messages", "prompt") if c in cols), cols[0])
            items = list(model_input[col])
        else:
            items = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
        prompts = [[{"role": "user", "content": x}] if isinstance(x, str) else list(x) for x in items]
        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        gp = self.gen.model_copy(update={"max_new_tokens": n})
        return generate_detailed(self.model, self.tok, prompts, gp, batch_size=8).answers
