"""`loraflow serve`: one base model, the registry's champion adapters as "modes", users' feedback to disk.

    loraflow serve --port 8000                     # http://127.0.0.1:8000/docs
    curl -s 127.0.0.1:8000/chat -d '{"mode": "retail_media", "messages": [{"role": "user", "content": "Oi"}]}'

A mode is the registered model `loraflow-<mode>` at alias `champion`. The base model loads once; a mode's
adapter is downloaded and loaded (peft multi-adapter) on first use, and the `--lru-size` most recently used
stay loaded. Each loaded adapter gets a name that is never reused (`a<n>_<mode>_v<version>`), so when the
registry's champion moves, the new version loads beside the old one: requests already holding the old one
finish on it, and it is unloaded once the last of them is done. The registry is polled every
`--poll-interval` seconds and on POST /adapters/reload.

The package: settings.py (the command line's settings), adapters.py (the registry's modes and the adapter
cache), engine.py (the model and generation), feedback.py (events to disk, the retraining trigger), metrics.py
(Prometheus, GET /metrics) and routes.py (the HTTP API).

Decoding: a request's temperature / top_p win; left out, a mode answers with its adapter's generation_config.json
(params.yaml `generate` at training time: sampling defaults, repetition_penalty, no_repeat_ngram_size), the
settings evaluate judged it with. max_tokens left out is the server's --default-max-tokens.
"""

from loraflow.serve.adapters import Adapter, AdapterCache
from loraflow.serve.engine import Engine, TokenStream
from loraflow.serve.feedback import FeedbackSink
from loraflow.serve.routes import create_app
from loraflow.serve.settings import ServeSettings

__all__ = ["Adapter", "AdapterCache", "Engine", "FeedbackSink", "ServeSettings", "TokenStream", "create_app"]
