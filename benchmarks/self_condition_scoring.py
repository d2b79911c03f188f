"""How to score a self-conditioned mdlm checkpoint: the negative ELBO with a zero self-condition input (one pass per
draw, what `Scorer` does) against a two-pass estimate (a first pass without the input, its prediction at the masked
positions fed to the scored pass). Both inputs are functions of x_t only, so both are valid upper bounds on the NLL;
the lower one is the tighter bound. The two are paired: the same windows and the same exact-k masks.

Also times training steps (loss + backward) with the self-conditioning coin forced on against off, in interleaved
rounds, for the cost of the first pass.

    python benchmarks/self_condition_scoring.py --ckpt=RUN_DIR/ckpt_unmasking_600.pt --data_dir=DATA_DIR
        [--windows=256] [--draws=4] [--seed=0]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from unmask.data.dataset import gather_windows, load_dataset
from unmask.likelihood.elbo import exact_k_masks, real_char_log_probs
from unmask.likelihood.score import split_window_offsets
from unmask.likelihood.self_condition import first_pass_input
from unmask.objectives.mdlm import draw_mdlm_batch, mdlm_batch_loss
from unmask.storage.loading import read_trained


@torch.no_grad()
def nelbo(
    model: torch.nn.Module, x: torch.Tensor, mask_id: int, draws: int, gen: torch.Generator
) -> tuple[float, float]:
    """(zero-input, two-pass) negative ELBO in nats per character over windows x (B, L), the same masks for both."""
    B, L = x.shape
    xs = x.repeat_interleave(draws, 0)  # (B * D, L)
    sel, k = exact_k_masks(B, L, draws, gen)  # (B * D, L), (B * D,)
    noisy = xs.masked_fill(sel, mask_id)
    row = torch.arange(B * draws)[:, None].expand_as(sel)[sel]  # (N,)
    weight = (L / k.double())[row]  # (N,)
    totals = []
    for two_pass in (False, True):
        extra = {"self_cond": first_pass_input(model, noisy, sel, mask_id)} if two_pass else {}
        logp = real_char_log_probs(model(noisy, positions=sel, **extra), mask_id)  # (N, V)
        nll = -logp.gather(1, xs[sel][:, None]).squeeze(1).double()  # (N,)
        totals.append(float((nll * weight).sum()) / (B * draws * L))
    return totals[0], totals[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = read_trained(args.ckpt, None)
    model, vocab = trained.model.eval(), trained.vocab
    assert trained.model_config.self_conditioning, "a self-conditioned checkpoint"
    dataset = load_dataset(Path(args.data_dir) / str(trained.config.get("dataset", "shakespeare_char")))
    L, mask_id = trained.model_config.block_size, vocab.mask_id
    tokens = np.asarray(dataset.val)
    starts = split_window_offsets(len(tokens), L, False)[: args.windows]
    gen = torch.Generator().manual_seed(args.seed)
    sums = np.zeros(2)
    for i in range(0, len(starts), 16):
        x = gather_windows(tokens, torch.from_numpy(starts[i : i + 16]), L)
        zero, two = nelbo(model, x, mask_id, args.draws, gen)
        sums += np.array([zero, two]) * len(x)
    zero, two = sums / len(starts) / math.log(2)
    print(f"{len(starts)} val windows of {L}, {args.draws} exact-k draws each (paired masks)")
    print(f"val bpc, zero self-condition input (one pass): {zero:.4f}")
    print(f"val bpc, two-pass (first pass's prediction fed back): {two:.4f}  (difference {two - zero:+.4f})")

    # Training cost: loss + backward with the coin forced on / off, interleaved rounds.
    model.train()
    train_gen = torch.Generator().manual_seed(1)
    x = gather_windows(tokens, torch.from_numpy(starts[:12]), L)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for sc in (False, True):
            batch = draw_mdlm_batch(x, mask_id, train_gen)
            batch.self_condition = sc
            t0 = time.perf_counter()
            mdlm_batch_loss(model, batch, mask_id, mask_id).backward()
            times[sc].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    off, on = (float(np.median(times[s])) * 1e3 for s in (False, True))
    print(
        f"loss + backward, batch 12: {off:.2f} ms without the first pass, {on:.2f} ms with it ({on / off:.2f}x); "
        f"with the coin at 0.5 a step costs {(0.5 * on + 0.5 * off) / off:.2f}x"
    )


if __name__ == "__main__":
    main()
