"""The MLflow pyfunc flavour of a registered adapter: `mlflow.pyfunc.load_model("models:/loraflow-<mode>@champion")`
loads the base model named in the model config plus the adapter stored with the version, and generates text.

predict() takes a batch of prompts and returns one answer string each. A prompt is a plain string (one user turn)
or a whole conversation, a list of {role, content} turns (system turns and earlier exchanges included, as the
eval set's prompts are). The registered signature (`signature`) has two optional columns, `prompt` (a string)
and `messages` (the turns), one of them per request (MLflow cannot convert a messages column with gaps); over
REST, `mlflow models serve`'s /invocations takes `{"dataframe_records": [{"messages": [...]}, ...], "params":
{"max_new_tokens": N}}` or `{"dataframe_records": [{"prompt": "..."}]}`.
`params={"max_new_tokens": N}` is honoured. Answers are greedy, rendered with the adapter's chat template and
stopped at its end of turn, with its anti-repetition settings and max_new_tokens from its generation_config.json:
generation.generate_detailed, the very call evaluate judged it with, at evaluation's batch size.
"""

from __future__ import annotations

import mlflow.pyfunc

from loraflow.errors import LoraflowError


class PyfuncInputError(LoraflowError, ValueError):
    """A predict() input that is neither a prompt string nor a list of {role, content} turns."""


def signature(max_new_tokens: int):
    """The registered input: per row a `prompt` string or `messages`, a list of {role, content} turns (two optional
    columns: MLflow's schemas have no union type); the output: the answers; the param: max_new_tokens."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    turn = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt", required=False),
                                         ColSpec(Array(turn), "messages", required=False)]),
                          outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]))


def conversations(model_input) -> list[list[dict]]:
    """predict()'s input as chat prompts: a string is one user turn, a list of turns is the conversation.
    Takes a DataFrame (MLflow's schema enforcement hands one over), a list, or one prompt."""
    if hasattr(model_input, "columns"):  # a DataFrame: per row `messages` where given, else `prompt`
        cols = list(model_input.columns)
        if "messages" in cols or "prompt" in cols:
            items = [m if (m := _cell(r.get("messages"))) is not None else _cell(r.get("prompt"))
                     for r in model_input.to_dict("records")]
        else:  # an older version's signature: one unnamed string column, arriving as column 0
            items = list(model_input[cols[0]])
    elif isinstance(model_input, dict) and "messages" in model_input:  # one conversation, OpenAI style
        items = [model_input["messages"]]
    else:
        items = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
    out = []
    for n, x in enumerate(items):
        if isinstance(x, dict) and "messages" in x:  # a record {"messages": [...]}
            x = x["messages"]
        if isinstance(x, str):
            out.append([{"role": "user", "content": x}])
            continue
        turns = [dict(t) for t in x] if hasattr(x, "__iter__") and all(isinstance(t, dict) for t in x) else None
        if not turns or not all(isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns):
            raise PyfuncInputError(f"predict input record {n}: field 'messages' must be a prompt string or a "
                                   f"non-empty list of {{role, content}} string turns, got {str(x)[:200]!r}")
        out.append([{"role": t["role"], "content": t["content"]} for t in turns])
    return out


def _cell(v):
    """A DataFrame cell, None where missing (NaN)."""
    return None if v is None or (isinstance(v, float) and v != v) else v


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

    # model_input carries no type hint: MLflow would read one as a schema and warn that it cannot.
    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from loraflow.generation import generate_detailed

        prompts = conversations(model_input)
        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        gp = self.gen.model_copy(update={"max_new_tokens": n})
        return generate_detailed(self.model, self.tok, prompts, gp, batch_size=self.batch_size).answers
