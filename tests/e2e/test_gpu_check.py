"""`benchmarks/gpu_check.py`: the device check runs on a CPU (`--tiny`), prints one JSON document of the documented
schema, reports bf16/float32 parity per objective, and survives a failing objective and a spent time budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from unmask.errors import UserError

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NAMES = ["autoregressive", "mdlm", "unmasking", "block_diffusion_k4", "block_diffusion_k16"]
TINY_BLOCK = 64


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def check_objective_entry(entry: dict[str, Any], compiled: bool) -> None:
    assert "error" not in entry, entry.get("error")
    assert entry["batch_size"] >= 1 and entry["tokens_per_iter"] == entry["batch_size"] * TINY_BLOCK
    for run, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        numbers = entry[run]
        assert numbers["dtype"] == dtype and numbers["compile"] == (compiled and run == "bf16")
        assert numbers["ms_per_iter"] > 0 and numbers["tokens_per_s"] > 0
        assert numbers["mfu"] is None  # no peak FLOP/s for a CPU
        assert numbers["memory_kind"] == "cpu_process_peak_rss" and numbers["peak_memory_bytes"] > 0
        assert len(numbers["losses"]) == entry["loss_step"]
        assert all(math.isfinite(x) for x in numbers["losses"])
    assert (entry["bf16"]["compile_s"] is not None) == compiled and entry["fp32"]["compile_s"] is None
    assert entry["ms_per_iter"] == entry["bf16"]["ms_per_iter"] and entry["mfu"] is None
    assert entry["loss_bf16"] == entry["bf16"]["losses"][-1] and entry["loss_fp32"] == entry["fp32"]["losses"][-1]
    parity = entry["parity"]
    assert parity["tolerance"] == 0.03
    assert parity["rel_diff"] == pytest.approx(abs(entry["loss_bf16"] - entry["loss_fp32"]) / entry["loss_fp32"])
    assert parity["pass"] is True and parity["rel_diff"] <= parity["tolerance"]
    assert entry["bf16"]["losses"] != entry["fp32"]["losses"]  # autocast ran: bf16 rounding moved the losses


@pytest.mark.slow
def test_tiny_check_on_the_cpu_prints_the_json_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_script("--tiny", "--json", f"--out={out}", "--threads=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert "[gpu_check" in done.stderr and "done" in done.stderr  # progress on stderr, nothing else on stdout
    assert report["schema"] == "unmask.gpu_check/1"
    assert (report["device"], report["tiny"], report["compile"]) == ("cpu", True, False)
    assert report["peak_flops_bf16"] is None and report["skipped"] == []
    assert report["size"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": TINY_BLOCK}
    assert set(report["environment"]) >= {"device_name", "torch", "unmask", "git_commit", "threads"}
    assert [e["name"] for e in report["objectives"]] == NAMES
    for entry in report["objectives"]:
        check_objective_entry(entry, compiled=False)
    sampling = {s["name"]: s for s in report["sampling"]}
    assert set(sampling) == {"autoregressive", "block_diffusion_k16"}
    assert sampling["autoregressive"]["method"] == "kv_cache"
    for s in sampling.values():
        assert s["chars_per_s"] > 0 and s["forward_passes"] > 0 and s["length"] == 128
    attention = {a["name"]: a for a in report["attention"]}
    for name, K in (("block_diffusion_k4", 4), ("block_diffusion_k16", 16)):
        a = attention[name]
        assert a["seq_len"] == 2 * TINY_BLOCK - K  # the training layout without its last clean block
        assert (a["auto_choice"], a["flex_trains_here"]) == ("sdpa", False)
        assert a["sdpa_forward_ms"] > 0 and a["sdpa_train_step_ms"] > 0
        if a["flex_available"]:
            assert a["block_mask_ms"] > 0 and a["flex_forward_ms"] > 0 and a["flex_train_step_ms"] is None
            assert 0 < a["mask_density"] < 1
            assert a["flex_vs_sdpa_max_abs_logit_diff"] < 0.1  # the same logits, up to bf16 rounding


@pytest.mark.slow
@pytest.mark.timeout(600)  # a cold compile on a loaded 2-core machine: up to two minutes measured
def test_tiny_check_with_compile(tiny_data: Path, tmp_path: Path) -> None:
    # The shapes of tests/unit/test_precision.py's compile test (same data, sizes and dtype): one of the two pays for
    # inductor's compilation, the other finds the graphs in its cache.
    args = ["--tiny", "--json", "--threads=1", "--compile=True", "--only=block_diffusion_k4"]
    done = run_script(*args, f"--data_dir={tiny_data}", "--dataset=tiny", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["compile"] is True and [e["name"] for e in report["objectives"]] == ["block_diffusion_k4"]
    check_objective_entry(report["objectives"][0], compiled=True)
    assert report["objectives"][0]["bf16"]["compile_s"] >= 0


def test_a_failing_objective_is_recorded_and_the_check_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()
    real = script.check_objective

    def failing(entry: dict[str, Any], *args: Any) -> Any:
        if entry["name"] == "mdlm":
            raise RuntimeError("out of memory\nsecond line")
        return real(entry, *args)

    monkeypatch.setattr(script, "check_objective", failing)
    assert script.main(["--tiny", "--json", "--threads=1", "--only=mdlm,autoregressive"]) == 0
    report = json.loads(capsys.readouterr().out)
    entries = {e["name"]: e for e in report["objectives"]}
    assert entries["mdlm"]["error"] == "RuntimeError: out of memory"
    check_objective_entry(entries["autoregressive"], compiled=False)
    assert [s["name"] for s in report["sampling"]] == ["autoregressive"]
    assert "mdlm" in script.table(report) and "error: RuntimeError: out of memory" in script.table(report)


def test_a_spent_budget_skips_the_remaining_phases(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = load_script()
    out = tmp_path / "r.json"
    assert script.main(["--tiny", "--threads=1", "--budget_s=0", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["objectives"] == [] and [s.split(":")[0] for s in report["skipped"]] == NAMES
    assert all(f"skipped: {name}: the 0 s budget was spent" in text for name in NAMES)  # the table says so


def test_bad_arguments() -> None:
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--only=gpt"])
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--data_dir=somewhere"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device=cuda: CUDA is not available"):
            script.main(["--tiny", "--device=cuda"])


def test_batch_fills_the_share_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    size = {"n_layer": 12, "n_embd": 768, "block_size": 1024}
    per_sequence = 2 * 34 * 12 * 1024 * 768  # float32 activations of one sequence, bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(80 * per_sequence / 0.4), 0))
    assert script.fill_batch(torch.device("cuda"), size, 0) == 64  # 80 fit: the power of two below
    per_bd = 2 * 34 * 12 * (2 * 1024 - 16) * 768  # block diffusion's 2L - K positions
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(10**6 * per_bd), 0))
    assert script.fill_batch(torch.device("cuda"), size, 16) == script.MAX_BATCH
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_sequence, 0))
    assert script.fill_batch(torch.device("cuda"), size, 0) == 1
