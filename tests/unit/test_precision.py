"""Mixed precision on the CPU and torch.compile: `--dtype=bfloat16` runs autocast on the CPU, so the suite exercises
the path GPU runs take; bf16 and float32 training agree for every objective; `--compile=True` trains.

Compile tests are slow on a CPU (inductor generates and builds C++ for every graph: about 30-90 s per objective with
a cold cache on a 2-core machine). The default run therefore compiles one representative objective, block
diffusion (its forward pass has the most structure: an explicit attention mask, RoPE positions and the logits of the
masked positions only); UNMASK_TEST_COMPILE_ALL=1 compiles the other four as well.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA
from unmask.cli import main
from unmask.config.train_config import TrainConfig
from unmask.errors import UserError
from unmask.runtime import init_runtime, resolve_dtype
from unmask.training.trainer import Trainer

OBJECTIVES = [("autoregressive", 0), ("mdlm", 0), ("unmasking", 0), ("block_diffusion", 4), ("block_diffusion", 16)]
# Relative difference allowed between the bf16 and float32 loss of the same step, over the first few steps. bf16
# keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation); a loss averages many such errors, and
# measured differences at this size stay below 0.1% for 4 steps.
PARITY_TOL = 0.01
COMPILE_ALL = os.environ.get("UNMASK_TEST_COMPILE_ALL") == "1"
# The sizes of `benchmarks/gpu_check.py --tiny`: its compile test and this one build the same graphs, so the second
# finds them in inductor's on-disk cache.
CHECK_SIZE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=4, dropout=0.0)


def test_bfloat16_is_allowed_on_the_cpu_and_float16_is_refused_naming_the_flag() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) == torch.float32  # never the default on a CPU
    with pytest.raises(UserError, match=r"^--dtype=float16 is for GPUs; on the CPU use --dtype=bfloat16"):
        resolve_dtype("float16", cpu)


def test_cpu_autocast_computes_in_bfloat16() -> None:
    layer = torch.nn.Linear(4, 4)
    with init_runtime("cpu", "bfloat16", "auto").autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with init_runtime("cpu", "float32", "auto").autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def _losses(data: Path, out: Path, objective: str, K: int, dtype: str, steps: int = 4) -> list[float]:
    cfg = TrainConfig(
        data_dir=str(data),
        dataset="tiny",
        out_dir=str(out / f"{objective}{K}_{dtype}"),
        device="cpu",
        dtype=dtype,
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=32,
        batch_size=4,
        dropout=0.0,
        eval_iters=1,
        max_iters=100,
        warmup_iters=2,
        learning_rate=1e-2,
        objective=objective,
        diffusion_block=K,
    )
    trainer = Trainer(cfg, init_runtime("cpu", dtype, "auto"))
    return [trainer.train_step() for _ in range(steps)]


@pytest.mark.parametrize(("objective", "K"), OBJECTIVES)
def test_bfloat16_and_float32_losses_agree(tiny_data: Path, tmp_path: Path, objective: str, K: int) -> None:
    bf16 = _losses(tiny_data, tmp_path, objective, K, "bfloat16")
    fp32 = _losses(tiny_data, tmp_path, objective, K, "float32")
    assert all(math.isfinite(x) for x in bf16 + fp32)
    for step, (a, b) in enumerate(zip(bf16, fp32, strict=True)):
        assert abs(a - b) <= PARITY_TOL * abs(b), f"step {step + 1}: bf16 {a} vs float32 {b}"
    # The same seed, data and masks: only autocast can make them differ, so equal losses would mean it never ran.
    assert bf16 != fp32


def test_train_with_bfloat16_on_the_cpu(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in {**CHECK_SIZE, "block_size": 32}.items()]
    common = [f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--dtype=bfloat16"]
    assert main(["train", *common, *flags, "--max_iters=4", "--eval_interval=4", "--eval_iters=1"]) == 0
    assert "cpu bfloat16" in capsys.readouterr().out
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in evals if r["kind"] == "eval"] == [0, 4]
    assert all(math.isfinite(r["val_loss"]) for r in evals if r["kind"] == "eval")


def test_float16_on_the_cpu_is_one_line_and_exit_2(tiny_data: Path, tmp_path: Path) -> None:
    args = ["train", f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'r'}", "--device=cpu"]
    assert main([*args, "--dtype=float16"]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)  # a cold compile on a loaded 2-core machine: up to two minutes measured
@pytest.mark.parametrize(
    ("objective", "K"),
    [
        pytest.param(
            objective,
            K,
            marks=[]
            if (objective, K) == ("block_diffusion", 4) or COMPILE_ALL
            else [pytest.mark.skip(reason="compiles in ~60 s on a CPU; UNMASK_TEST_COMPILE_ALL=1 runs it")],
        )
        for objective, K in OBJECTIVES
    ],
)
def test_compile_trains_every_objective_on_the_cpu(tiny_data: Path, tmp_path: Path, objective: str, K: int) -> None:
    flags = {**CHECK_SIZE, "objective": objective, "diffusion_block": K, "max_iters": 6, "eval_interval": 6}
    flags |= {"eval_iters": 1, "log_interval": 1, "warmup_iters": 2, "learning_rate": 1e-2, "threads": 1}
    args = [f"--{k}={v}" for k, v in flags.items()]
    out = tmp_path / "run"
    env = {**os.environ, "UNMASK_DATA_MIRROR": str(SHARED_DATA), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "unmask", "train", f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={out}"]
        + ["--device=cpu", "--dtype=bfloat16", "--compile=True", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss_step"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # it trains: 6 steps at this learning rate lower the loss
    assert (out / "ckpt_unmasking_6.pt").exists()


def test_block_diffusion_training_layout_compiles_without_graph_breaks() -> None:
    # The check that `pos` lies in the RoPE table reads two numbers back from the device; under torch.compile it
    # split the forward pass into four graphs (a break in front of the layers), now skipped while compiling.
    from unmask.likelihood.block import training_attn_mask
    from unmask.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=30, block_size=32, n_layer=1, n_head=2, n_embd=16, diffusion_block=4))
    idx = torch.randint(0, 29, (2, 60))
    pos = torch.cat((torch.arange(32), torch.arange(28)))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, attn_mask=training_attn_mask(32, 4, torch.device("cpu")), pos=pos)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with pytest.raises(ValueError, match="pos must lie in"):  # eager calls still check
        model(idx, pos=pos + 10)
