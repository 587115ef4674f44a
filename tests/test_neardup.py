"""MinHash signatures computed for many texts at once equal those computed one text at a time."""

from __future__ import annotations

import random

import numpy as np

from loraflow.neardup import near_duplicates, shingle_hashes, signatures

WORDS = "campanha anúncio clique receita ROAS 2024 é o a de".split()


def _texts(n: int) -> list[str]:
    rng = random.Random(7)
    # 0-2 words (hashed as a whole) mixed with longer texts, and punctuation-only texts (no words).
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) + rng.choice(["", "!", " ?"])
            for _ in range(n)] + ["", "!!", "uma", "duas palavras"]


def test_batched_shingles_and_signatures_equal_one_text_at_a_time():
    texts = _texts(400)
    flat, counts = shingle_hashes(texts)
    assert len(counts) == len(texts) and counts.min() >= 1 and counts.sum() == len(flat)
    one_by_one = [shingle_hashes([t]) for t in texts]
    starts = np.concatenate(([0], np.cumsum(counts)))
    for i, (f, c) in enumerate(one_by_one):
        assert c.tolist() == [counts[i]] and np.array_equal(f, flat[starts[i]:starts[i + 1]]), texts[i]
    whole = signatures(flat, counts)
    assert np.array_equal(signatures(flat, counts, budget=7), whole)  # blocks of a few documents
    assert np.array_equal(np.vstack([signatures(*shingle_hashes([t])) for t in texts]), whole)


def test_only_texts_sharing_a_band_are_compared_and_the_first_is_kept():
    texts = _texts(300)
    texts += [texts[5], texts[5] + " ok", "algo bem diferente de tudo aqui"]
    hits = near_duplicates(texts, 0.85)
    assert hits[-3] is not None and hits[-3][0] <= 5 and hits[-1] is None
    assert all(hit is None or hit[0] < i for i, hit in enumerate(hits))  # always an earlier, kept text
    assert all(hits[hit[0]] is None for hit in hits if hit is not None)
