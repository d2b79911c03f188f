"""How good samples are: text metrics of samples next to the same metrics of real validation text, and the NLL of
both under a judge model (by the judge's own likelihood, `unmask.likelihood.score`: the number `unmask eval` and
`Model.score` give). A low judge NLL bought with a collapsed character entropy is not quality: both are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unmask.data.dataset import Dataset, Vocab, load_dataset, sample_windows
from unmask.errors import UserError
from unmask.generation import metrics as sm
from unmask.generation.engine import Generated
from unmask.likelihood.score import scorer_for
from unmask.storage.loading import Trained

REFERENCE_SEED = 0  # real validation windows for the reference column: the same ones in every run


@dataclass
class Judge:
    trained: Trained
    draws: int  # Monte-Carlo draws of a bound (diffusion judges)

    def nll(self, texts: list[str], scored: torch.Tensor) -> list[float]:
        """NLL per character (nats) of each text under the judge, by its kind's scorer: exact for causal judges, a
        bound otherwise.

        `scored` (N, L) marks the generated positions; a causal judge scores only those (given everything before
        them, in the windows `unmask eval` takes), a diffusion judge's bound covers whole texts. Diffusion judges
        draw their masks from a generator seeded the same way at every call, so samples and real text are scored
        with the same draws.
        """
        vocab, model, mc = self.trained.vocab, self.trained.model, self.trained.model_config
        device = next(model.parameters()).device
        x = torch.tensor([vocab.encode(t, source=f"--judge_ckpt={self.trained.path}") for t in texts], device=device)
        scorer = scorer_for(mc.causal, mc.diffusion_block, vocab.mask_id, mc.block_size, self.draws)
        generator = torch.Generator(device=device).manual_seed(REFERENCE_SEED)
        return scorer.text_nats(model, x, generator, scored.to(device)).tolist()


@dataclass
class Reference:
    """What samples are compared with: the training corpus's statistics and real validation windows."""

    corpus: sm.CorpusStats | None = None
    ids: torch.Tensor | None = None  # (N, L) real validation windows


def load_reference(trained: Trained, data_dir: str | None, length: int, count: int, notes: list[str]) -> Reference:
    """Training-corpus statistics and `count` real validation windows of `length`; missing data is a note in
    `notes`, not an error."""
    config = trained.config
    data_dir = data_dir or config.get("data_dir")
    dataset_name = config.get("dataset")
    if data_dir is None or dataset_name is None:
        notes.append("the checkpoint names no dataset: corpus metrics and the real-text reference skipped")
        return Reference()
    try:
        dataset: Dataset = load_dataset(Path(data_dir) / dataset_name)
    except UserError as exc:
        notes.append(f"corpus metrics and the real-text reference skipped ({exc}; see --data_dir)")
        return Reference()
    if dataset.vocab != trained.vocab:
        notes.append(f"{dataset.dir} has another vocabulary than the checkpoint: corpus metrics skipped")
        return Reference()
    corpus = sm.corpus_stats(dataset.train, dataset.vocab.itos)
    if len(dataset.val) < length:
        notes.append(f"validation split shorter than {length} characters: no real-text reference")
        return Reference(corpus)
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    return Reference(corpus, sample_windows(dataset.val, length, count, generator))


def evaluate_samples(
    run: Generated, vocab: Vocab, fixed: torch.Tensor, prompt_length: int, reference: Reference, judge: Judge | None
) -> dict[str, Any]:
    """Sample metrics and, when real text is available, the same metrics of real validation windows."""
    cut = prompt_length
    result: dict[str, Any] = {
        "samples": sm.text_metrics([t[cut:] for t in run.texts], reference.corpus),
        "reference": None,
        "speed": {
            "chars_per_second": run.chars_per_second,
            "forward_passes": run.forward_passes,
            "mean_nfe": run.mean_nfe,
            "seconds": run.seconds,
            "generated_chars": run.generated_chars,
        },
    }
    result["samples"]["mean_self_logprob"] = sm.mean(run.logprobs)
    if reference.corpus is not None:
        result["train_char_entropy_bits"] = reference.corpus.char_entropy
    reference_texts = None
    if reference.ids is not None:
        reference_texts = [vocab.decode(row) for row in reference.ids]
        result["reference"] = sm.text_metrics([t[cut:] for t in reference_texts], reference.corpus)
    if judge is not None:
        scored = (~fixed).expand(len(run.texts), -1)
        result["samples"]["judge_nll"] = sm.mean(judge.nll(run.texts, scored))
        if reference_texts is not None:
            result["reference"]["judge_nll"] = sm.mean(judge.nll(reference_texts, scored))
    return result
