"""How answers are scored against references: the word tokenizer, ROUGE, BERTScore, answer lengths and the
paired bootstrap.

`words` is the one word tokenizer: ROUGE counts its words and loraflow.degeneration measures repetition in them,
so "ação" is one word to both (rouge_score's default tokenizer keeps ASCII only and would make it "a o").
Confidence intervals are percentile bootstrap intervals of per-example values, or of paired per-example
differences when two models answered the same prompts.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraflow.config import EvaluateParams
    from loraflow.generation import Generated

ROUGE = ("rouge1", "rouge2", "rougeL")
_word = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased Unicode words after NFC (composed and decomposed accents read alike). No stemming:
    rouge_score's Porter stemmer is English-only and would mangle Portuguese."""
    return _word.findall(unicodedata.normalize("NFC", text).lower())


class UnicodeWordTokenizer:
    """`words` in the tokenizer interface rouge_score takes."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), tokenizer=UnicodeWordTokenizer())
    out: dict[str, list[float]] = {k: [] for k in ROUGE}
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)
        for k in out:
            out[k].append(s[k].fmeasure)
    return out


_scorers: dict[tuple[str, int], Any] = {}


def bertscore_f1(predictions: list[str], references: list[str], encoder: str, num_layers: int) -> list[float]:
    """BERTScore F1 with one cached scorer per encoder (loading it dominates the cost)."""
    from bert_score import BERTScorer

    key = (encoder, num_layers)
    if key not in _scorers:
        _scorers[key] = BERTScorer(model_type=encoder, num_layers=num_layers, batch_size=64)
    _, _, f1 = _scorers[key].score(predictions, references)
    return [float(x) for x in f1]


def score(answers: list[str], refs: list[str], ep: EvaluateParams) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F1 and BERTScore F1 (the encoder `evaluate.bertscore_model`)."""
    from loraflow.models import resolve

    s = rouge_scores(answers, refs)
    s["bertscore"] = bertscore_f1(answers, refs, resolve(ep.bertscore_model), ep.bertscore_num_layers)
    return s


def bootstrap_diff(a: list[float], b: list[float], samples: int, confidence: float, seed: int) -> dict[str, float]:
    """Mean of a-b over paired examples and its percentile bootstrap interval."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def bootstrap_mean(a: list[float], samples: int, confidence: float, seed: int) -> dict[str, float]:
    return bootstrap_diff(a, [0.0] * len(a), samples, confidence, seed)


def length_stats(g: Generated) -> dict[str, float]:
    """Answer lengths (whitespace-separated words, as a reader counts them) and how answers ended."""
    import numpy as np

    n_words = np.array([len(a.split()) for a in g.answers])
    return {"words_mean": float(n_words.mean()), "words_median": float(np.median(n_words)),
            "words_p90": float(np.percentile(n_words, 90)), "new_tokens_mean": float(np.mean(g.new_tokens)),
            "stopped_at_end_of_turn": float(np.mean(g.stopped)), "empty": int((n_words == 0).sum())}
