"""loraflow: curate -> validate -> train -> evaluate -> promote -> model card, for LoRA adapters."""

import os

# The Rust tokenizer's thread pool stays off unless the user says otherwise: a process that forks after it
# ran warns in every child. loraflow.tokens turns it on around its own batch calls when this is False.
TOKENIZERS_PARALLELISM_CHOSEN = "TOKENIZERS_PARALLELISM" in os.environ

# Set before transformers / huggingface_hub / prefect / mlflow are imported (they read these at import).
# Offline by default: the embedded models need no hub, and a hub lookup offline costs ~46 s of retries.
# Set HF_HUB_OFFLINE=0 to pull a hub id as base.model or evaluate.bertscore_model.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The steps log through the standard logging module; let Prefect show those lines in its UI too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "steps,loraflow",
    # ...and stay quiet when a step runs outside a flow (dvc repro, tests): no "without a flow run id" warnings.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
