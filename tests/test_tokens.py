"""The shortcuts in loraflow/tokens.py give exactly what apply_chat_template and the encoder give."""

from __future__ import annotations

import os
import random

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from loraflow.config import load_params
from loraflow.curation.lengths import tokenizer
from loraflow.models import load_tokenizer, resolve
from loraflow.tokens import CHATML_TEMPLATE, ChatTokens, _chunkable
from tests.conftest import ROOT

BASE = load_params(ROOT / "params.yaml").base
# Pieces that stress the template and the chunk boundaries: runs and kinds of whitespace, added tokens whole
# and in halves, contractions, digits, scripts, emoji, Jinja syntax, control and zero-width characters.
PIECES = ["a", "Campanha", " ", "  ", "\t", "\n", "\n\n\n", " \n", "\n ", "'s", "'ll", "don't", "123", "4567", "é",
          "ção", "日本語", "😀", "<|im_end|>", "<|im_start|>", "<file_sep>", "<|im", "_end|>", "\u00a0", "\u2003",
          "\u3000", "\u0085", "\u2028", "\x1c", "x\u200by", "  code()", "!!", "?", ".", "—", "\r\n", "R$ 1.234,56",
          "{{ x }}", "{% if %}", "'", "ﬁ", "١٢٣", "\x0c", "\\frac", "Você", " é", " um"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer(BASE.model, BASE.model_cache, BASE.trust_remote_code)


def _text(rng: random.Random, n: int = 60) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))


def _conversations(rng: random.Random, n: int) -> list[list[dict]]:
    convs = []
    for i in range(n):
        msgs = [{"role": "system", "content": _text(rng)}] if i % 3 else []
        for _ in range(1 + i % 3):
            msgs += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
        convs.append(msgs)
    return convs + [[{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
                    [{"role": "assistant", "content": "só resposta"}], [{"role": "tool", "content": "x"}]]


def _encode_lengths(tok, texts):
    return [len(e) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_fast_render_equals_apply_chat_template(tok):
    chat = ChatTokens(tok)
    assert chat.default_system is not None  # the default base model's template takes the fast path
    for msgs in _conversations(random.Random(1), 300):
        assert chat.render(msgs) == tok.apply_chat_template(msgs, tokenize=False), msgs
    # A message with more than role and content goes through Jinja, with the same result.
    odd = [{"role": "user", "content": "q", "name": "ana"}, {"role": "assistant", "content": "a"}]
    assert chat.render(odd) == tok.apply_chat_template(odd, tokenize=False)


def test_fast_render_of_plain_chatml_equals_apply_chat_template():
    tok = load_tokenizer(resolve(BASE.model, BASE.model_cache))  # a fresh one: the template is changed
    tok.chat_template = CHATML_TEMPLATE
    chat = ChatTokens(tok)
    assert chat.default_system == ""
    for msgs in _conversations(random.Random(2), 100):
        assert chat.render(msgs) == tok.apply_chat_template(msgs, tokenize=False), msgs


def test_chunked_counts_equal_the_encoder(tok):
    chat = ChatTokens(tok)
    assert chat.chunkable
    rng = random.Random(3)
    texts = [_text(rng, 200) for _ in range(1500)] + ["", " ", "  ", " a", "a ", "a  b", "\n a", "<|im_end|> x"]
    texts += [chat.render(m) for m in _conversations(rng, 300)]
    want = _encode_lengths(tok, texts)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    assert chat.count_texts(texts) == want
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before  # on only during the encoder's calls
    assert chat.count_texts(texts[::-1]) == want[::-1]  # from the cache this time
    # Both ways of cutting were exercised: at every space, and only where a space follows a non-space.
    assert chat._spaced and any("  " in t for t in texts)


def test_counts_of_conversations_equal_chat_token_lengths(tok):
    from loraflow.models import chat_token_lengths

    convs = _conversations(random.Random(4), 200)
    assert ChatTokens(tok).count(convs) == chat_token_lengths(tok, convs)


def test_counts_by_turn_content_equal_chat_token_lengths(tok):
    """Curated turns start with non-whitespace, so count() sums per-content counts: exact on the awkward pieces."""
    from loraflow.models import chat_token_lengths

    convs = [[{"role": m["role"], "content": m["content"].lstrip() or "x"} for m in c]
             for c in _conversations(random.Random(5), 300)]
    convs += [[{"role": "system", "content": "Você é um assistente."}, {"role": "user", "content": q},
               {"role": "assistant", "content": "'s ok\n\n  indentado"}] for q in ("Oi?", "<|im_end|>x", "123 ção")]
    chat = ChatTokens(tok)
    assert chat.count(convs) == chat_token_lengths(tok, convs)
    assert len(chat._overheads) >= 3 and len(chat._contents) > 500  # the shortcut did the counting
    assert chat.count(convs[::-1]) == chat_token_lengths(tok, convs)[::-1]  # again, from the memo


def test_other_tokenizers_are_counted_whole(tok):
    """No shortcut where the proof's conditions fail: a normalizer, a prefix space, another pre-tokenizer."""
    assert _chunkable(tok.backend_tokenizer)
    changes = [lambda b: setattr(b, "normalizer", normalizers.NFKC()),
               lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
               lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Sequence(
                   [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))]
    for change in changes:
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        change(backend)
        assert not _chunkable(backend)
