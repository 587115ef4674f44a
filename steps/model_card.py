"""model_card: a Hugging Face model card written from the run's evidence, not from boilerplate.

    python -m steps.model_card --mode retail_media data/curated/retail_media/stats.json \
        data/adapters/retail_media/train_info.json data/eval/retail_media/metrics.json \
        data/promotion/retail_media/decision.json model_cards/retail_media.md

`loraflow.modelcard` renders the card (Hugging Face format, YAML front matter that huggingface_hub parses
back) from stats.json, train_info.json, metrics.json and decision.json. When the decision registered a
version, the card is also attached to it (the run's artifact model_card/README.md and the version's
description).
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraflow import modelcard
from loraflow.config import Params
from loraflow.io import read_json, write_text
from loraflow.stepcli import run_step

log = logging.getLogger(__name__)


def run(params: Params, mode: str, stats_file: Path, train_info_file: Path, metrics_file: Path,
        decision_file: Path, card_file: Path) -> str:
    """Write the model card for one run.

    Args:
        params: reads `base` and `model_card`.
        mode: the mode the adapter serves.
        stats_file, train_info_file, metrics_file, decision_file: the evidence the earlier steps wrote.
        card_file: the Markdown file to write (whole).

    Returns:
        The card's text.
    """
    decision = read_json(decision_file)
    text = modelcard.render(params, mode, read_json(stats_file), read_json(train_info_file), read_json(metrics_file),
                            decision)
    write_text(Path(card_file), text)
    log.info("model_card: wrote %s", card_file)
    if decision.get("version"):
        modelcard.attach(params, mode, str(decision["version"]), text)
    return text


def main(argv: list[str] | None = None) -> None:
    run_step(__doc__, run, ("stats_file", "train_info_file", "metrics_file", "decision_file", "card_file"), argv)


if __name__ == "__main__":
    main()
