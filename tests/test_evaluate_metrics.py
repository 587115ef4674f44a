"""Metric pieces of evaluate that need no model: Portuguese-aware ROUGE and the bootstrap."""

from __future__ import annotations

from loraflow.metrics import UnicodeWordTokenizer, bootstrap_diff, rouge_scores


def test_accented_words_are_whole_tokens():
    assert UnicodeWordTokenizer().tokenize("Ação, não é? Impressão!") == ["ação", "não", "é", "impressão"]


def test_accented_words_count_in_rouge():
    from rouge_score import rouge_scorer

    ours = rouge_scores(["a ação está ótima"], ["ação ótima"])["rouge1"][0]
    default = rouge_scorer.RougeScorer(["rouge1"]).score("ação ótima", "a ação está ótima")["rouge1"].fmeasure
    assert ours > 0.6  # "ação" and "ótima" both match
    # rouge_score's default tokenizer turns "ação" into "a o" and "ótima" into "tima": not the same words
    assert UnicodeWordTokenizer().tokenize("ação") == ["ação"] and ours != default
    assert rouge_scores(["ação"], ["acao"])["rouge1"][0] == 0.0


def test_bootstrap_interval_contains_mean_and_detects_clear_gain():
    a = [0.6 + 0.01 * (i % 5) for i in range(40)]
    b = [0.3 + 0.01 * (i % 7) for i in range(40)]
    d = bootstrap_diff(a, b, samples=500, confidence=0.95, seed=0)
    assert d["ci_low"] <= d["mean"] <= d["ci_high"] and d["ci_low"] > 0.2
    same = bootstrap_diff(a, a, samples=500, confidence=0.95, seed=0)
    assert same == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_one_word_tokenizer_for_rouge_and_degeneration():
    import unicodedata

    from loraflow import degeneration, metrics

    text = "A impressão não é ação; a impressão não é ação; a impressão não é ação."
    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text and metrics.words(decomposed) == metrics.words(text)
    assert UnicodeWordTokenizer().tokenize(decomposed) == metrics.words(text)
    assert degeneration.words is metrics.words and degeneration.answer_health(decomposed, True)["loop"]
