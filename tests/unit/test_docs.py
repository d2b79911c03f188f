"""Docs that cannot drift: every shell command in README.md and docs/*.md runs here, shrunk, or is illustrative.

The commands are the lines of the fenced `sh`/`bash`/`shell`/`console` blocks (`$ `-prefixed lines in `console`
blocks), with `\\` continuations joined and trailing `# comments` cut. Each one either

- *runs* (in document order, one scratch directory per document, so prepare -> train -> sample chains work),
  with its sizes shrunk by `shrink` below to a tiny model on a tiny corpus, and must exit 0; or
- is *illustrative*: its trailing comment contains the word `illustrative`, or the block is preceded by an HTML
  comment `<!-- illustrative ... -->`. Then it only has to parse: the command exists, every `--flag` is a field
  of that command's dataclass and its value converts (placeholders such as `POLICY`, `N`, `$S` excepted), and a
  preset, dataset or script it names exists. A renamed flag fails either way.

What a scratch directory starts with (`world`): the state of a fresh clone after `bash scripts/quickstart.sh`
(its `unmask` lines run shrunk, so `out/quickstart` and `data/shakespeare_char` exist, the latter prepared from the
tiny corpus of conftest.py instead of the download) plus the reader-supplied files named in USER_FILES. Any other
path a command uses must be made by an earlier command of the same document. Every document must also be free of
machine-specific absolute paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_corpus
from unmask import cli
from unmask.config.flags import _fields, convert
from unmask.config.literal import available_presets
from unmask.errors import UserError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
MARKER = re.compile(r"\billustrative\b")
PLACEHOLDER = re.compile(r"^(\$\{?\w+\}?|[A-Z][A-Z0-9_]*|<[^>]+>)$")  # $S, POLICY, N, <command>
RUNNABLE_TOOLS = {"head"}  # plain tools a documented command may run besides unmask (with `> FILE`)


# ---------------------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    stdout: str | None = None
    illustrative: bool = False

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: `#` starts a comment at the start or after a blank, outside quotes."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def expand(code: str, variables: dict[str, str]) -> str:
    """`"$NAME"` becomes one quoted word, bare `$NAME` / `${NAME}` its words; unknown names stay (placeholders)."""

    def quoted(m: re.Match[str]) -> str:
        name = m.group(1)
        return shlex.quote(variables[name]) if name in variables else m.group(0)

    def bare(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)  # ${NAME:-default}
        return variables.get(name, m.group(0) if default is None else default)

    code = re.sub(r'"\$\{?(\w+)\}?"', quoted, code)
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", bare, code)


def shell_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, shell line with continuations joined, block marked illustrative) of every shell block."""
    out: list[tuple[int, str, bool]] = []
    lines = text.splitlines()
    i, previous = 0, ""
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            if stripped:
                previous = stripped
            i += 1
            continue
        lang = stripped[3:].strip().lower()
        marked = previous.startswith("<!--") and MARKER.search(previous) is not None
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            start, line = i + 1, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if lang not in SHELL_LANGS:
                continue
            if lang == "console":
                if not line.lstrip().startswith("$ "):
                    continue  # output
                line = line.lstrip()[2:]
            if line.strip():
                out.append((start, line, marked))
        i += 1
        previous = ""
    return out


def commands_of(text: str, doc: str) -> list[DocCommand]:
    """Every command of a document's shell blocks, `&&` / `;` chains split, `VAR=value` lines applied."""
    found: list[DocCommand] = []
    variables: dict[str, str] = {}
    for number, line, marked in shell_lines(text):
        code, comment = split_comment(line)
        if not code:
            continue
        illustrative = marked or MARKER.search(comment) is not None
        try:
            words = shlex.split(expand(code, variables))
        except ValueError as exc:
            raise AssertionError(f"{doc}:{number}: not a shell command ({exc}): {code}") from None
        chains: list[list[str]] = [[]]
        for word in words:
            if word in ("&&", ";"):
                chains.append([])
            else:
                chains[-1].append(word)
        for argv in filter(None, chains):
            if argv[0] == "export":
                argv = argv[1:]
            env = []
            while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                env.append(tuple(argv.pop(0).split("=", 1)))
            if not argv:  # assignments only: shell variables for the following lines
                variables.update(dict(env))
                continue
            stdout = None
            if ">" in argv:
                k = argv.index(">")
                stdout, argv = argv[k + 1], argv[:k] + argv[k + 2 :]
            found.append(DocCommand(doc, number, tuple(argv), tuple(env), stdout, illustrative))  # type: ignore[arg-type]
    return found


def doc_commands(path: Path) -> list[DocCommand]:
    return commands_of(path.read_text(), str(path.relative_to(REPO)))


# ---------------------------------------------------------------------------------------------------------
# Parsing: every flag of every command exists


def command_fields(name: str) -> dict[str, object]:
    """The flags a command takes (`compare` takes its own and every `unmask train` flag)."""
    fields = dict(_fields(command_class(name)))
    if name == "compare":
        from unmask.commands.compare import CompareArgs

        fields.update(_fields(CompareArgs))
    return fields


def command_class(name: str) -> type:
    from unmask.commands.eval import EvalArgs
    from unmask.commands.export import ExportArgs
    from unmask.commands.plot import PlotArgs
    from unmask.commands.prepare import PrepareArgs
    from unmask.commands.sample import SampleArgs
    from unmask.config.train_config import TrainConfig
    from unmask.transfer.classify import ClassifyArgs

    classes: dict[str, type] = {
        "prepare": PrepareArgs,
        "train": TrainConfig,
        "compare": TrainConfig,
        "sample": SampleArgs,
        "eval": EvalArgs,
        "classify": ClassifyArgs,
        "export": ExportArgs,
        "plot": PlotArgs,
    }
    assert set(classes) == set(cli.COMMANDS), "a new command: add its arguments class here"
    return classes[name]


def unmask_args(argv: tuple[str, ...]) -> list[str] | None:
    """The arguments after `unmask` (also `python -m unmask`, `torchrun ... -m unmask`), None for other programs."""
    if argv[0] == "unmask":
        return list(argv[1:])
    for k in range(len(argv) - 1):
        if argv[0] in ("python", "python3", "torchrun") and argv[k : k + 2] == ("-m", "unmask"):
            return list(argv[k + 2 :])
    return None


def synopsis_word(word: str) -> str:
    """`[--data_dir=data]` -> `--data_dir=data` (a synopsis' optional part); a literal's own brackets stay."""
    if word.startswith("["):  # a flag's literal value follows `--flag=`, so a leading `[` opens an optional part
        word = word[1:]
    while word.endswith("]") and word.count("]") > word.count("["):
        word = word[:-1]
    return word


def check_parses(cmd: DocCommand) -> None:
    """The command exists and names only existing flags, values, presets, datasets and files."""
    args = unmask_args(cmd.argv)
    if args is None:
        check_other_program(cmd)
        return
    words = [synopsis_word(w) for w in args if w not in ("...", "[", "]", "...]")]
    if not words or PLACEHOLDER.match(words[0]):
        return  # `unmask <command> --help`, `python -m unmask ...`
    name = words[0]
    assert name in cli.COMMANDS, f"{cmd.where}: no command {name!r}"
    hints = command_fields(name)
    positional: list[str] = []
    k = 1
    while k < len(words):
        word = words[k]
        k += 1
        if not word.startswith("--"):
            positional.append(word)
            continue
        key, eq, value = word[2:].partition("=")
        key = key.replace("-", "_")
        if key in ("help", "h") or PLACEHOLDER.match(key):
            continue
        if name == "compare" and key == "diffusion_objective":
            continue
        assert key in hints, f"{cmd.where}: --{key} is not a flag of `unmask {name}`"
        if not eq:
            if hints[key] is bool:
                continue
            assert k < len(words), f"{cmd.where}: --{key} has no value"
            value, k = words[k], k + 1
        if not PLACEHOLDER.match(value):
            try:
                convert(value, hints[key], key)
            except UserError as exc:
                raise AssertionError(f"{cmd.where}: {exc}") from None
    for word in positional:
        if PLACEHOLDER.match(word):
            continue
        if name in ("train", "compare"):
            assert word in available_presets() or word.endswith(".py"), f"{cmd.where}: no preset {word!r}"
        elif name == "prepare":
            from unmask.data.prepare import KNOWN_DATASETS

            assert word in KNOWN_DATASETS, f"{cmd.where}: no dataset {word!r}"


def check_other_program(cmd: DocCommand) -> None:
    """`bash scripts/x.sh` and `python benchmarks/x.py` name files of the repository; pip extras exist."""
    program, *rest = cmd.argv
    if program in ("bash", "sh", "python", "python3") and rest and not rest[0].startswith("-"):
        assert (REPO / rest[0]).is_file(), f"{cmd.where}: {rest[0]} is not a file of the repository"
    if program == "pip" and "install" in rest:
        pyproject = (REPO / "pyproject.toml").read_text()
        extras = pyproject.partition("[project.optional-dependencies]")[2].partition("\n[")[0]
        for word in rest:
            m = re.fullmatch(r"unmask\[([\w,]+)\]", word)
            for extra in m.group(1).split(",") if m else []:
                assert re.search(rf"^{extra}\s*=", extras, re.M), f"{cmd.where}: pyproject.toml has no extra {extra!r}"


# ---------------------------------------------------------------------------------------------------------
# Running: sizes shrunk, paths kept relative to a scratch directory

TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4, dropout=0.0)
TINY_TRAIN = dict(eval_interval=4, eval_iters=2, log_interval=2, warmup_iters=2, keep_last=0, device="cpu")
TINY_DTYPE = dict(dtype="float32", compile="False")
CKPT_FLAGS = ("ckpt", "pretrained_checkpoint_path", "judge_ckpt", "critic_ckpt")
CKPT_FILE = re.compile(r"^(.*)/ckpt_unmasking_\d+\.pt$")


def tiny_iters(n: int) -> int:
    """A documented iteration count -> a tiny one, monotone so `resume to more iterations` still resumes."""
    return max(4, min(16, 2 + round(3 * math.log10(max(n, 1)))))


def shrink(name: str, args: list[str], workdir: Path) -> list[str]:
    """A documented command's arguments, sized for a test: the documented flags first, tiny overrides after.

    - train / compare: a model of a few thousand parameters (TINY_MODEL), `tiny_iters(--max_iters)` iterations
      (8 without one; presets' stage durations then end early), lr decay over them, frequent evaluations.
    - sample: at most 2 samples, 40 characters (still longer than block_size 32), 6 steps, sweeps of 2 and 4
      steps, 1 judge draw; eval: 4 windows, 2 draws; classify: as given.
    - every flag naming a checkpoint file `DIR/ckpt_unmasking_N.pt` that a shrunk run did not write names DIR
      (its newest checkpoint), which every such flag accepts.
    - `prepare shakespeare_char` reads the tiny corpus given as the reader's `tinyshakespeare.txt` (no download).
    """
    fields = command_fields(name)
    given: dict[str, str] = {}
    for word in args:
        if word.startswith("--") and "=" in word:
            key, _, value = word[2:].partition("=")
            given[key] = value
    extra: dict[str, object] = {}
    if name in ("train", "compare"):
        iters = tiny_iters(int(float(given["max_iters"]))) if "max_iters" in given else 8
        extra.update(TINY_MODEL, **TINY_TRAIN, **TINY_DTYPE, max_iters=iters, lr_decay_iters=iters)
    elif name == "sample":
        extra.update(device="cpu", num_samples=min(int(given.get("num_samples", 4)), 2), batch_size=2)
        extra.update(steps=min(int(given.get("steps", 64)), 6), judge_draws=1)
        if "length" in given:
            extra["length"] = min(int(given["length"]), 40)
        if "sweep_steps" in given:
            extra["sweep_steps"] = "2,4"
    elif name == "eval":
        extra.update(device="cpu", max_windows=4, draws=min(int(given.get("draws", 4)), 2))
    elif name == "prepare" and args[:1] == ["shakespeare_char"]:
        extra.update(input="tinyshakespeare.txt", name="shakespeare_char")
    for key in CKPT_FLAGS:
        m = CKPT_FILE.match(given.get(key, ""))
        if key in fields and m and not (workdir / given[key]).exists():
            extra[key] = m.group(1)
    unknown = [k for k in extra if k not in fields]
    assert not unknown, f"shrink: `unmask {name}` has no flag {unknown} any more"
    return [*args, *(f"--{k}={v}" for k, v in extra.items())]


def run_command(cmd: DocCommand, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one documented command in `workdir`, shrunk; fail naming the document line unless it exits 0."""
    args = unmask_args(cmd.argv)
    if args is None:
        if cmd.argv[:2] == ("bash", "scripts/quickstart.sh"):
            for step in quickstart_commands():
                run_command(step, workdir, monkeypatch)
            return
        program = cmd.argv[0]
        assert program in RUNNABLE_TOOLS, f"{cmd.where}: cannot run {program!r} here: mark it illustrative"
        with open(workdir / cmd.stdout, "wb") if cmd.stdout else open(os.devnull, "wb") as out:
            done = subprocess.run(cmd.argv, cwd=workdir, stdout=out, stderr=subprocess.PIPE, check=False)
        assert done.returncode == 0, f"{cmd.where}: exit {done.returncode}: {done.stderr.decode()[-500:]}"
        return
    if args and args[0] == "plot":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(workdir)
    for key, value in cmd.env:
        monkeypatch.setenv(key, value)
    argv = args[:1] + shrink(args[0], args[1:], workdir) if args and args[0] in cli.COMMANDS else args
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    assert code == 0, f"{cmd.where}: exit {code}: {err.getvalue()[-400:]} (ran: unmask {shlex.join(argv)})"


def quickstart_commands() -> list[DocCommand]:
    """The `unmask` lines of scripts/quickstart.sh (what `bash scripts/quickstart.sh` runs after installing)."""
    text = (REPO / "scripts" / "quickstart.sh").read_text()
    found = commands_of("```sh\n" + text + "\n```\n", "scripts/quickstart.sh")
    steps = [c for c in found if unmask_args(c.argv) is not None]
    assert [unmask_args(c.argv)[0] for c in steps] == ["prepare", "train", "sample"], steps  # type: ignore[index]
    return steps


USER_FILES: dict[str, str] = {
    # Files a reader brings: stand-ins with the documented formats.
    # (the prompts and templates of the docs use upper case, ':' and ',': the stand-in has them)
    "tinyshakespeare.txt": tiny_corpus(1500, seed=1) + "ROMEO: To be, or not to be: that is the question!\n" * 40,
    "my_corpus.txt": tiny_corpus(600, seed=2),
    "prompt.txt": "The king and",
    "lines.txt": "the king speaks\na fool sings of love\n",
    **{
        name: "".join(
            json.dumps({"text": " ".join(tiny_corpus(2, seed=i).split()[:8]), "label": i % 2}) + "\n" for i in range(40)
        )
        for name in ("texts.jsonl", "new.jsonl", "reviews.jsonl")
    },
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone's state after the quickstart (shrunk), with the reader's files."""
    root = tmp_path_factory.mktemp("world")
    for name, text in USER_FILES.items():
        (root / name).write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        for step in quickstart_commands():
            run_command(step, root, mp)
    return root


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_extraction_joins_continuations_cuts_comments_and_reads_markers() -> None:
    text = (
        "intro\n```sh\nunmask train --max_iters=5 \\\n  --n_layer=2   # a comment\n"
        "X=1 unmask sample --prompt='a # b'\nunmask eval --json  # illustrative\n```\n"
        "<!-- illustrative -->\n\n```console\n$ unmask prepare --input=a.txt\noutput line\n```\n"
        "```python\nunmask = 1\n```\n"
    )
    got = commands_of(text, "x.md")
    assert [(c.line, c.argv, c.env, c.illustrative) for c in got] == [
        (3, ("unmask", "train", "--max_iters=5", "--n_layer=2"), (), False),
        (5, ("unmask", "sample", "--prompt=a # b"), (("X", "1"),), False),
        (6, ("unmask", "eval", "--json"), (), True),
        (11, ("unmask", "prepare", "--input=a.txt"), (), True),
    ]


def test_extraction_applies_variables_chains_and_redirects() -> None:
    text = '```sh\nC="--n_layer=1 --n_head=2"\nV=\'--x=[1, 2]\'\nhead -c 5 a > b && unmask train $C "$V"\n```\n'
    got = commands_of(text, "x.md")
    assert [(c.argv, c.stdout) for c in got] == [
        (("head", "-c", "5", "a"), "b"),
        (("unmask", "train", "--n_layer=1", "--n_head=2", "--x=[1, 2]"), None),
    ]


def test_a_renamed_flag_or_value_fails_the_parse_check() -> None:
    ok = DocCommand("x.md", 1, ("unmask", "sample", "--remasking=random", "--policy=POLICY", "--steps", "8"))
    check_parses(ok)
    for argv in (
        ("unmask", "sample", "--remasking_strategy=random"),
        ("unmask", "sample", "--steps=many"),
        ("unmask", "train", "no_such_preset"),
        ("unmask", "sampel"),
        ("bash", "scripts/no_such_script.sh"),
    ):
        with pytest.raises(AssertionError):
            check_parses(DocCommand("x.md", 1, argv))


def test_shrink_keeps_documented_flags_and_maps_checkpoint_files(tmp_path: Path) -> None:
    (tmp_path / "out" / "lm").mkdir(parents=True)
    args = shrink(
        "train", ["cpu", "--max_iters=10000", "--pretrained_checkpoint_path=out/lm/ckpt_unmasking_9.pt"], tmp_path
    )
    assert args[:3] == ["cpu", "--max_iters=10000", "--pretrained_checkpoint_path=out/lm/ckpt_unmasking_9.pt"]
    assert "--max_iters=14" in args and "--n_embd=16" in args and "--pretrained_checkpoint_path=out/lm" in args
    assert tiny_iters(5000) < tiny_iters(8000)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_parses_and_is_run_or_illustrative(doc: Path) -> None:
    commands = doc_commands(doc)
    for cmd in commands:
        check_parses(cmd)
        if not cmd.illustrative and unmask_args(cmd.argv) is None:
            runnable = cmd.argv[0] in RUNNABLE_TOOLS or cmd.argv[:2] == ("bash", "scripts/quickstart.sh")
            assert runnable, f"{cmd.where}: a command the test cannot run must be marked illustrative"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_run(doc: Path, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = [c for c in doc_commands(doc) if not c.illustrative]
    if not commands:
        pytest.skip(f"{doc.name}: no runnable commands")
    workdir = tmp_path / "work"
    shutil.copytree(world, workdir)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for cmd in commands:
        run_command(cmd, workdir, monkeypatch)


MACHINE_PATH = re.compile(
    r"(?<![\w.:/~$-])(/(?:tmp|work|home|Users|root|mnt|scratch|data|srv|opt|var)(?:/|\b)[^\s`'\")]*)"
)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_machine_specific_paths(doc: Path) -> None:
    hits = [
        f"{doc.name}:{n}: {m.group(1)}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        for m in MACHINE_PATH.finditer(line)
    ]
    assert not hits, "machine-specific paths (write DATA_DIR, OUT_DIR, WORK or $TMPDIR): " + "; ".join(hits)


def test_machine_path_check_catches_paths_and_spares_placeholders() -> None:
    bad = ["see /tmp/run1/out", "--data_dir=/work/shared/data", "(/home/me/x)"]
    good = ["--data_dir=DATA_DIR", "$TMPDIR/x", "https://example.org/tmp/a", "out/quickstart", "a/tmp/b"]
    assert all(MACHINE_PATH.search(s) for s in bad)
    assert not any(MACHINE_PATH.search(s) for s in good)


def test_doc_list_is_every_markdown_file() -> None:
    assert {p.name for p in DOCS} == {"README.md", *(p.name for p in (REPO / "docs").glob("*.md"))}
