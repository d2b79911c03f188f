"""The seams of the code base: no import cycle, one device check for every command, objectives as plug-ins."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, run_records, tiny_flags
from unmask.cli import COMMANDS, main
from unmask.commands.compare import parse_objectives
from unmask.objectives import registry
from unmask.objectives.base import DiffusionModel, Objective, RunInputs, TrainingHooks, objective_class

PACKAGE = REPO / "unmask"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the unmask modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "presets" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unmask"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("unmask")]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "unmask"}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "unmask.training.trainer" in graph and "unmask.transfer.tasks" in graph
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_core_does_not_import_the_transfer_subpackage_at_module_level() -> None:
    """Transfer learning is optional: a language-model run imports it only when asked for."""
    code = (
        "import sys, unmask.training.trainer, unmask.commands.train, unmask.commands.sample, unmask.commands.eval;"
        "import unmask.objectives.base, unmask.objectives.registry, unmask.config.train_config;"
        "print(sorted(m for m in sys.modules if m.startswith('unmask.transfer')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_command_module_has_a_main() -> None:
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "main", None)), name


@pytest.mark.parametrize("command", ["train", "sample", "eval", "classify"])
def test_an_unknown_device_is_one_line_and_exit_2(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"train": [], "sample": ["--out_dir=nowhere"], "eval": ["--out_dir=nowhere"]}
    argv = [command, "--device=gpu", *extra.get(command, ["--out_dir=nowhere", "--input=x.txt"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device=gpu: expected auto, cpu, cuda, cuda:N or mps" in err[0]


@pytest.mark.slow
def test_sample_device_gpu_in_a_subprocess_is_one_line() -> None:
    cmd = [sys.executable, "-m", "unmask", "sample", "--out_dir=nowhere", "--device=gpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--device=gpu" in done.stderr


def test_the_trainer_has_no_objective_branches() -> None:
    """The loop never asks which objective it runs: no objective names and no `causal` tests in trainer.py."""
    source = (PACKAGE / "training" / "trainer.py").read_text()
    tree = ast.parse(source)
    names = {*registry.ENTRIES, "binary_task", "replaced_token", "sequence", "switch_to_binary"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & strings, names & strings
    assert "cfg.objective" not in source
    assert not {"causal", "binary_task", "switch_to_binary", "curriculum", "pool"} & attributes
    # Only the interface: the base module and the registry, no objective's own module.
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("unmask.objectives")} == {"unmask.objectives.base"}
    # The loop steers through `objective.hooks`, never through the objective itself.
    hook_names = {name for name in vars(TrainingHooks) if not name.startswith("_")}
    on_objective = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "objective"
    }
    assert hook_names <= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not hook_names & on_objective, hook_names & on_objective


TOY = "toy_half_masked"


class ToyHooks(TrainingHooks):
    def log_fields(self) -> dict[str, Any]:
        return {"toy": 1}


class HalfMasked(DiffusionModel[tuple[torch.Tensor, torch.Tensor]]):
    """A toy objective: masked CE at a fixed mask rate of one half, with a hook that adds a log field."""

    calls: ClassVar[list[bool]] = []

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.hooks = ToyHooks()

    def batch(
        self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(training)
        x = self.clean_windows(data_gen)
        return x, torch.rand(x.shape, generator=mask_gen, device=mask_gen.device) < 0.5

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, selected = batch
        return F.cross_entropy(model(x.masked_fill(selected, self.vocab.mask_id), positions=selected), x[selected])


def test_a_new_objective_is_one_class_and_a_registration(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A toy objective trains through the unchanged trainer and CLI: --objective, --help and `unmask compare` know
    it from its registration alone."""
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "before", objective=TOY)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unmask train: error: --objective={TOY}: expected one of {', '.join(registry.names())}"
    )
    registry.register(TOY, HalfMasked)
    try:
        HalfMasked.calls.clear()
        assert main(["train", *tiny_flags(tiny_data, tmp_path / "run", objective=TOY, max_iters=4)]) == 0
        assert main(["train", "--help"]) == 0
        assert f"--objective={{unmasking,mdlm,autoregressive,block_diffusion,{TOY}}}" in capsys.readouterr().out
        assert [s.objective for s in parse_objectives(f"mdlm,{TOY}")] == ["mdlm", TOY]
    finally:
        del registry.ENTRIES[TOY]
    assert True in HalfMasked.calls and False in HalfMasked.calls  # training steps and an evaluation's batches
    assert all(r["toy"] == 1 for r in run_records(tmp_path / "run", "train"))
    assert TOY not in registry.names()


def test_registry_is_importable_without_the_objectives() -> None:
    """The config validates --objective against the registry, and objective modules import the config: the
    registry itself imports no other unmask module (nor torch)."""
    code = (
        "import sys, unmask.objectives.registry as r; names = r.names();"
        "print(sorted(m for m in sys.modules if m.startswith(('unmask.', 'torch'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['unmask.objectives', 'unmask.objectives.registry']"


def test_every_registered_objective_loads_as_an_objective() -> None:
    for name in registry.ENTRIES:
        assert issubclass(objective_class(name), Objective), name
    registry.register("toy_bad_target", "unmask.objectives.mdlm:mdlm_loss")
    try:
        with pytest.raises(TypeError, match="not a subclass of Objective"):
            objective_class("toy_bad_target")
    finally:
        del registry.ENTRIES["toy_bad_target"]
    with pytest.raises(ValueError, match="lowercase"):
        registry.register("Bad-Name", HalfMasked)
    with pytest.raises(ValueError, match="module:Class"):
        registry.register("toy", "unmask.objectives.mdlm.MDLM")


def _class_node(path: Path, name: str) -> ast.ClassDef:
    (node,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name]
    return node


def test_the_objective_base_class_knows_no_objective_and_no_transfer() -> None:
    """`Objective` names none of its subclasses or objective names, and does not import or name the transfer
    package (whose tasks plug in through the registry)."""
    node = _class_node(PACKAGE / "objectives" / "base.py", "Objective")
    subclasses = {"LanguageModel", "DiffusionModel", "Unmasking", "MDLM", "Autoregressive", "BlockDiffusion"}
    subclasses |= {"BinaryTask", "ReplacedToken", "SequenceTask", "CurriculumHooks"}
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    imports = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
    assert not subclasses & names, subclasses & names
    assert not set(registry.ENTRIES) & (names | strings)
    assert not any("transfer" in text for text in names | strings | {m or "" for m in imports})


@pytest.mark.parametrize(
    "module",
    [
        "config/train_config.py",
        "commands/compare.py",
        "commands/export.py",
        "storage/export_format.py",
        "objectives/base.py",
    ],
)
def test_no_list_of_objectives_outside_the_registry(module: str) -> None:
    """--objective's validation and --help, `unmask compare` and `unmask export` read the registry: no tuple, list,
    set, Literal or table of objective names of their own."""
    tree = ast.parse((PACKAGE / module).read_text())
    for n in ast.walk(tree):
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            values = {e.value for e in n.elts if isinstance(e, ast.Constant)}
            assert len(values & set(registry.names())) < 2, f"{module}:{n.lineno}: a list of objective names"
        if isinstance(n, ast.Dict):
            keys = {k.value for k in n.keys if isinstance(k, ast.Constant)}
            assert len(keys & set(registry.names())) < 2, f"{module}:{n.lineno}: a table keyed by objective name"


# --- the layers of the tree ------------------------------------------------------------------------------------------

SUBPACKAGES = ("model", "config", "data", "curriculum", "objectives", "likelihood", "generation", "training",
               "storage", "commands", "transfer")  # fmt: skip


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_the_tree_shows_the_pipeline() -> None:
    """Subpackages by role; at the top only the entry points, the runtime, the API and the errors."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "api", "cli", "errors", "launch", "runtime"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(
        SUBPACKAGES
    )


def test_the_layer_rules() -> None:
    """commands import the rest and nothing imports commands (cli reaches them by name); the API sits on generation
    and likelihood (and storage to load), never on a command or the trainer; model imports nothing of the package."""
    graph = import_graph()
    for module, targets in graph.items():
        into_commands = {t for t in targets if t.startswith("unmask.commands")}
        if not module.startswith("unmask.commands"):
            assert not into_commands, f"{module} imports {sorted(into_commands)}"
    for module, targets in graph.items():
        if module == "unmask.model" or module.startswith("unmask.model."):
            outside = {t for t in targets if not (t == "unmask.model" or t.startswith("unmask.model."))}
            assert not outside, f"{module} imports {sorted(outside)}"
    api = {_package(t) for t in graph["unmask.api"]}
    assert {"unmask.generation", "unmask.likelihood"} <= {f"unmask.{p}" if "." not in p else p for p in api} | api
    assert not {t for t in graph["unmask.api"] if t.startswith(("unmask.commands", "unmask.training"))}


def test_no_module_is_over_500_lines() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 500}
