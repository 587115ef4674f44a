"""MinHash signatures computed for many texts at once equal those computed one text at a time; near twins within
one list (curation) and between two (the validation gate's train/eval overlap) are found by the same signatures."""

from __future__ import annotations

import random

import numpy as np

from loraflow.neardup import NUM_PERM, _rows_for, near_duplicates, near_matches, shingle_hashes, signatures

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


def test_near_matches_finds_the_most_similar_train_text_above_the_threshold():
    texts = _texts(300)
    long = "a campanha de receita cresceu com o anúncio certo e o clique veio depois de cada lance bem pensado"
    train = [*texts, long + " hoje", long]
    query = [long, long + " ontem", "algo bem diferente de tudo aqui", texts[9]]
    hits = near_matches(train, query, 0.8)
    assert hits[0] == (len(train) - 1, 1.0)  # the identical text, not the near one before it
    assert hits[1] is not None and hits[1][0] in (len(train) - 2, len(train) - 1) and hits[1][1] >= 0.8
    assert hits[2] is None
    assert hits[3] is not None and hits[3][1] == 1.0 and train[hits[3][0]] == texts[9]
    assert near_matches([], query, 0.8) == [None] * 4 and near_matches(train, [], 0.8) == []
    # The estimate is the one near_duplicates compares: the share of equal signature rows.
    sig = signatures(*shingle_hashes([train[hits[1][0]], query[1]]))
    assert hits[1][1] == float(np.mean(sig[0] == sig[1]))


def test_overlap_bands_make_a_pair_at_the_threshold_a_candidate_almost_surely():
    for threshold in (0.95, 0.9, 0.8, 0.6, 0.4, 0.1):
        rows = _rows_for(threshold)
        assert 1 - (1 - threshold ** rows) ** (NUM_PERM // rows) >= 0.99
    assert _rows_for(0.8) == 5 and _rows_for(0.4) == 2
