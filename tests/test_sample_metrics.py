"""Sample metrics on hand-made strings, and NLL under a judge (causal exact, diffusion via unmask.likelihood.elbo)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

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


class Bigram(nn.Module):
    """A causal 'model' whose prediction at position i depends on x_i only: windows cannot change its NLL."""

    def __init__(self, V: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx: Tensor) -> Tensor:
        return self.table[idx]  # (B, T, V)


def test_causal_nll_is_exact_and_windowing_does_not_change_it() -> None:
    V, L = 6, 37
    model = Bigram(V)
    x = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(model.table.double(), dim=-1)
    per_position = -logp[x[:, :-1], x[:, 1:]]  # (B, L - 1): NLL of positions 1..L-1
    scored = torch.ones(3, L, dtype=torch.bool)
    expected = per_position.mean(dim=1)
    for block_size in (L, 8, 5, 2):
        assert torch.allclose(sm.causal_nll(model, x, scored, block_size), expected), block_size
    scored[:, :10] = False  # a prompt: only the generated positions count
    assert torch.allclose(sm.causal_nll(model, x, scored, 8), per_position[:, 9:].mean(dim=1))


def test_causal_nll_of_a_uniform_model_is_log_v() -> None:
    class Uniform(nn.Module):
        def forward(self, idx: Tensor) -> Tensor:
            return torch.zeros(*idx.shape, 5)

    x = torch.randint(0, 5, (2, 20), generator=torch.Generator().manual_seed(0))
    nll = sm.causal_nll(Uniform(), x, torch.ones(2, 20, dtype=torch.bool), 8)
    assert torch.allclose(nll, torch.full((2,), math.log(5), dtype=torch.float64))


def test_diffusion_nll_weights_chunks_by_length(monkeypatch: pytest.MonkeyPatch) -> None:
    elbo = pytest.importorskip("unmask.likelihood.elbo")
    calls: list[int] = []

    def fake_score(model: nn.Module, x: Tensor, mask_id: int, draws: int, generator: torch.Generator) -> Tensor:
        calls.append(x.shape[1])
        return x.double().mean(dim=1)  # "nats per character" = mean id of the chunk

    monkeypatch.setattr(elbo, "score_windows", fake_score)
    x = torch.tensor([[1] * 8 + [4] * 2, [2] * 10])
    nll = sm.diffusion_nll(nn.Identity(), x, 9, 8, 1, torch.Generator())
    assert calls == [8, 2]
    assert torch.allclose(nll, torch.tensor([(8 * 1 + 2 * 4) / 10, 2.0], dtype=torch.float64))
