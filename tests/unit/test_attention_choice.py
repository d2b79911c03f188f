"""Block diffusion's attention path: FlexAttention or SDPA, chosen automatically (`--attention=auto`) or forced.

FlexAttention's fused kernel runs on CUDA only, so the choice logic is tested here on the CPU: the pure rule
(`choose_attention`), the model's use of it (with the device's capability patched in), and the flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unmask.model.transformer as model_module
from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.config.train_config import TrainConfig
from unmask.errors import UserError
from unmask.likelihood.block import clean_context_length, training_attn_mask
from unmask.model import (
    FLEX_MIN_LENGTH,
    HAVE_FLEX,
    ModelConfig,
    Transformer,
    choose_attention,
)
from unmask.runtime import check_attention_backend

LONG, SHORT = FLEX_MIN_LENGTH, FLEX_MIN_LENGTH - 1


def choice(backend: str = "auto", **overrides: object) -> str:
    values: dict[str, object] = dict(flex_capable=True, seq_len=LONG, head_dim=64, shared_mask=True, dropout=False)
    values.update(overrides)
    return choose_attention(backend, **values)  # type: ignore[arg-type]


def test_auto_takes_flex_only_on_a_capable_device_for_long_sequences_and_fused_head_sizes() -> None:
    assert choice() == "flex"
    assert choice(seq_len=4 * LONG) == "flex"
    assert choice(seq_len=SHORT) == "sdpa"  # too short for skipped tiles to pay for the BlockMask
    assert choice(flex_capable=False) == "sdpa"  # the CPU, older GPUs, PyTorch without FlexAttention
    assert choice(head_dim=24) == "sdpa"  # not a power of two
    assert choice(head_dim=8) == "sdpa"  # below the fused kernel's smallest


def test_forcing_a_path_and_what_no_flag_can_force() -> None:
    assert choice("flex", flex_capable=False, seq_len=16, head_dim=24) == "flex"
    assert choice("sdpa") == "sdpa"
    for backend in ("auto", "flex"):
        assert choice(backend, shared_mask=False) == "sdpa"  # a per-row (padding) mask has no BlockMask
        assert choice(backend, dropout=True) == "sdpa"  # flex has no attention dropout
    with pytest.raises(ValueError, match="attention_backend='dense'"):
        choice("dense")


def test_the_gpu_check_default_takes_flex_on_a_capable_gpu() -> None:
    # 12 heads of 64 over block diffusion's training layout at block 1024: 2L - K positions.
    for K in (4, 16):
        assert choice(seq_len=1024 + clean_context_length(1024, K), head_dim=64) == "flex"
    # The CPU sizes of the test suite and the CPU presets stay on SDPA even on a capable device.
    assert choice(seq_len=64 + clean_context_length(64, 4), head_dim=32) == "sdpa"


def _block_model(block_size: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=12, block_size=block_size, n_layer=1, n_head=2, n_embd=32, diffusion_block=16)
    return Transformer(config).eval()


def test_the_model_asks_the_device_and_the_length(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _block_model(512)
    cpu = torch.device("cpu")
    assert model.attention_path(1008, cpu) == "sdpa"  # auto on the CPU: never flex
    monkeypatch.setattr(model_module, "flex_supported", lambda device: True)
    assert model.attention_path(1008, cpu) == "flex"
    assert model.attention_path(112, cpu) == "sdpa"
    model.attention_backend = "sdpa"
    assert model.attention_path(1008, cpu) == "sdpa"


@pytest.mark.skipif(not HAVE_FLEX, reason="FlexAttention needs PyTorch >= 2.5")
def test_a_forward_pass_takes_the_chosen_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the device reported capable, a long training layout goes through FlexAttention (unfused and forward-only
    # on the CPU, which is enough to see the path taken and its logits) and a short one through SDPA.
    monkeypatch.setattr(model_module, "flex_supported", lambda device: True)
    cpu = torch.device("cpu")
    for L, expect_flex in ((512, True), (64, False)):
        model = _block_model(L)
        n = L + clean_context_length(L, 16)
        mask = training_attn_mask(L, 16, cpu)
        idx = torch.randint(0, 11, (1, n))
        pos = torch.cat((torch.arange(L), torch.arange(n - L)))
        with torch.no_grad():
            auto = model(idx, attn_mask=mask, pos=pos)
            assert (model._flex_key is mask) == expect_flex, (L, n)
            model.attention_backend = "sdpa"
            torch.testing.assert_close(auto, model(idx, attn_mask=mask, pos=pos), atol=1e-5, rtol=1e-5)


def test_the_attention_flag_reaches_the_model(tiny_data: Path, tmp_path: Path) -> None:
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    cfg = TrainConfig(
        data_dir=str(tiny_data),
        dataset="tiny",
        out_dir=str(tmp_path / "r"),
        device="cpu",
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=32,
        batch_size=2,
        eval_iters=1,
        objective="block_diffusion",
        diffusion_block=4,
        attention="sdpa",
    )
    assert Trainer(cfg, init_runtime("cpu", "float32", "auto")).raw_model.attention_backend == "sdpa"


def test_forced_flex_is_refused_where_it_cannot_train() -> None:
    with pytest.raises(UserError, match=r"^--attention=flex: FlexAttention trains only on CUDA GPUs .* device cpu"):
        check_attention_backend("flex", torch.device("cpu"))
    check_attention_backend("auto", torch.device("cpu"))
    check_attention_backend("sdpa", torch.device("cpu"))
    with pytest.raises(UserError, match=r"^--attention=flex: only --objective=block_diffusion"):
        TrainConfig(objective="mdlm", attention="flex", dropout=0.0)
    with pytest.raises(UserError, match=r"^--attention=flex: FlexAttention has no dropout; give --dropout=0"):
        TrainConfig(objective="block_diffusion", diffusion_block=4, block_size=64, attention="flex", dropout=0.1)


def test_forced_flex_on_the_cpu_is_one_line_and_exit_2(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    flags = tiny_flags(tiny_data, out, objective="block_diffusion", diffusion_block=4, dropout=0.0, attention="flex")
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention=flex" in err[0]
    assert not (out / "config.json").exists()
