"""Sample metrics on hand-made strings, and NLL under a judge (causal exact, diffusion via unmask.likelihood.elbo)."""

from __future__ import annotations

import numpy as np
import pytest

from unmask.generation import metrics as sm


def test_words_are_lowercased_word_runs() -> None:
    assert sm.words("The king's HALL, 2 x\nend") == ["the", "king", "s", "hall", "2", "x", "end"]


def test_repeated_ngram_rate() -> None:
    # 4-grams: abcd bcda cdab dabc abcd -> 5, of which 4 distinct
    assert sm.repeated_ngram_rate("a b c d a b c d") == pytest.approx(0.2)
    assert sm.repeated_ngram_rate("the the the the the the") == pytest.approx(2 / 3)
    assert sm.repeated_ngram_rate("one two three four five") == 0.0
    assert sm.repeated_ngram_rate("too short") == 0.0


def test_distinct_n_pools_all_texts() -> None:
    texts = ["a a b", "b c"]
    assert sm.distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert sm.distinct_n(texts, 2) == pytest.approx(1.0)  # (a a) (a b) | (b c): n-grams never cross texts
    assert sm.distinct_n(["x x x x"], 2) == pytest.approx(1 / 3)
    assert sm.distinct_n([""], 3) == 0.0


def test_distinct_starts() -> None:
    assert sm.distinct_starts(["hello world", "hello there", "bye"], chars=5) == pytest.approx(1 / 3)
    assert sm.distinct_starts(["ab", "cd", "ef"]) == 1.0
    assert sm.distinct_starts(["same start"] * 4) == 0.0


def test_char_entropy_in_bits() -> None:
    assert sm.char_entropy(["abab"]) == pytest.approx(1.0)
    assert sm.char_entropy(["ab", "cd"]) == pytest.approx(2.0)
    assert sm.char_entropy(["aaaa"]) == 0.0
    assert sm.entropy_bits([1, 1, 2, 0]) == pytest.approx(1.5)


def test_word_hit_rate_and_corpus_stats() -> None:
    assert sm.word_hit_rate(["the cat sat"], {"the", "sat"}) == pytest.approx(2 / 3)
    stats = sm.corpus_stats(np.array([0, 1, 2, 0, 1, 2, 3], dtype=np.uint8), ("a", "b", " ", "c"))
    assert stats.words == frozenset({"ab", "c"})
    assert stats.char_entropy == pytest.approx(sm.entropy_bits([2, 2, 2, 1]))
    metrics = sm.text_metrics(["ab ab c", "c zz"], stats)
    assert metrics["word_hit_rate"] == pytest.approx(4 / 5)
    assert set(metrics) == {
        "repeated_4gram_rate", "distinct_1", "distinct_2", "distinct_3", "distinct_starts",
        "char_entropy_bits", "word_hit_rate",
    }  # fmt: skip
    assert "word_hit_rate" not in sm.text_metrics(["ab"])
