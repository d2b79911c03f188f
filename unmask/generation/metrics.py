"""Quality metrics of generated text, and the likelihood of text under a judge model.

Text metrics work on plain strings, so they apply equally to samples and to real text of the same shape (the
reference every number is printed next to):

- `repeated_ngram_rate`: share of a sample's word n-grams (n = 4) that repeat an earlier one in the same
  sample, 1 - unique / total ("rep-n", Welleck et al. 2019, "Neural text generation with unlikelihood
  training"); loops and stutters push it up.
- `distinct_n`: unique word n-grams / all word n-grams over all samples (Li et al. 2016, "A diversity-promoting
  objective function for neural conversation models").
- `distinct_starts`: share of samples whose first characters differ from every other sample's; mode collapse
  shows here first.
- `char_entropy`: unigram character entropy in bits of the pooled samples; float32 sampling and low
  temperatures lower it (plug-in estimate: short texts read low, so compare with real text of the same size).
- `word_hit_rate`: share of the samples' words that occur in the training corpus (spelling, for a character
  model).

Words are maximal runs of letters, digits and underscore (`\\w+`), lowercased. The first and last word of a
sample may be cut by its edges; real reference windows are cut the same way.

`causal_nll` is the exact negative log-likelihood per character under an autoregressive model (nats),
`diffusion_nll` the negative ELBO under a masked-diffusion model (`unmask.likelihood.elbo.score_windows`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
START_CHARS = 10  # characters compared by distinct_starts


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """1 - unique / total word n-grams of one text; 0.0 when it has no n-gram."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over `texts`; 0.0 when there is none."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_starts(texts: Sequence[str], chars: int = START_CHARS) -> float:
    """Share of texts whose first `chars` characters no other text starts with."""
    if not texts:
        return 0.0
    counts = Counter(text[:chars] for text in texts)
    return sum(counts[text[:chars]] == 1 for text in texts) / len(texts)


def entropy_bits(counts: np.ndarray | Sequence[int]) -> float:
    """Shannon entropy in bits of a histogram."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def char_entropy(texts: Iterable[str]) -> float:
    """Unigram character entropy in bits of the pooled texts."""
    return entropy_bits(list(Counter("".join(texts)).values()))


def word_hit_rate(texts: Iterable[str], vocabulary: set[str] | frozenset[str]) -> float:
    """Share of the words of `texts` found in `vocabulary`; 0.0 when there is no word."""
    found = [w in vocabulary for text in texts for w in words(text)]
    return sum(found) / len(found) if found else 0.0


@dataclass(frozen=True)
class CorpusStats:
    """What the metrics need from a training corpus."""

    char_entropy: float  # unigram entropy of the corpus in bits
    words: frozenset[str]


def corpus_stats(ids: np.ndarray, itos: Sequence[str]) -> CorpusStats:
    """Statistics of an encoded corpus (ids into `itos`); one bincount and one decode."""
    ids = np.asarray(ids)
    counts = np.bincount(ids, minlength=len(itos))
    text = np.array([ord(ch) for ch in itos], dtype="<u4")[ids].tobytes().decode("utf-32-le")
    return CorpusStats(entropy_bits(counts), frozenset(words(text)))


def text_metrics(texts: Sequence[str], corpus: CorpusStats | None = None) -> dict[str, float]:
    """Every text metric of `texts` (corpus-dependent ones only with `corpus`)."""
    metrics = {
        "repeated_4gram_rate": float(np.mean([repeated_ngram_rate(t, 4) for t in texts])) if texts else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "distinct_starts": distinct_starts(texts),
        "char_entropy_bits": char_entropy(texts),
    }
    if corpus is not None:
        metrics["word_hit_rate"] = word_hit_rate(texts, corpus.words)
    return metrics


def mean(values: Iterable[float]) -> float:
    items = [v for v in values if not math.isnan(v)]
    return sum(items) / len(items) if items else math.nan
