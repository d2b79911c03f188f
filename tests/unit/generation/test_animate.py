"""The denoising picture: `Recorder` + `animation_html` (well-formed, every frame, escaping), `--animate` and
the readable `--show_steps`."""

from __future__ import annotations

import json
import re
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.data.dataset import MASK_GLYPH, Vocab
from unmask.generation.animate import NEWLINE_GLYPH, Recorder, animation_html, readable, script_json
from unmask.generation.canvas import prompt_canvas
from unmask.generation.diffusion import SamplingConfig, generate
from unmask.model import ModelConfig, Transformer

VOID = {"meta", "input", "br", "img", "link"}


class Checker(HTMLParser):
    """Balanced tags (void elements aside), and the text of the data script and of <noscript>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.data_json = ""
        self.noscript = ""
        self.ids: list[str] = []
        self.in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.stack.append(tag)
        self.ids.extend(v for k, v in attrs if k == "id" and v)
        if tag == "script":
            self.in_data = ("id", "unmask-data") in attrs

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "script" and self.in_data:
            self.data_json += data
        if "noscript" in self.stack:
            self.noscript += data


def parse(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.problems == [] and checker.stack == [], (checker.problems, checker.stack)
    return checker


def replay(data: dict[str, Any]) -> list[list[int]]:
    rows = [list(data["initial"]) for _ in range(data["samples"])]
    for frame in data["frames"]:
        for s, changes in enumerate(frame["changes"]):
            for position, token in changes:
                rows[s][position] = token
    return rows


@pytest.fixture
def awkward() -> tuple[Vocab, Transformer]:
    """A random model over characters that HTML must escape, plus a newline."""
    vocab = Vocab(tuple("<>&\n ab/"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    return vocab, model


def test_page_is_well_formed_escapes_and_holds_every_frame(awkward: tuple[Vocab, Transformer]) -> None:
    vocab, model = awkward
    canvas, fixed = prompt_canvas(vocab.encode("</a&\n"), 16, vocab.mask_id)
    recorder = Recorder(canvas, fixed, vocab.mask_id, num_samples=3)
    config = SamplingConfig(steps=5, remasking="low_confidence")
    out = generate(
        model, canvas.expand(3, -1).clone(), fixed.expand(3, -1), vocab.mask_id, 16, config,
        torch.Generator().manual_seed(1), partial(recorder, 0),
    )  # fmt: skip
    assert recorder.final_ids() == out.tokens.tolist()
    page = animation_html(recorder, vocab, "a <b> & c")
    checker = parse(page)
    assert {"unmask-data", "play", "slider", "samples"} <= set(checker.ids)
    assert "<title>unmask: a &lt;b&gt; &amp; c</title>" in page
    # The data cannot close its <script>: no raw <, > or & in it, however the samples read.
    assert not re.search(r"[<>&]", checker.data_json)
    data = json.loads(checker.data_json)
    assert data["title"] == "a <b> & c" and data["itos"] == [*vocab.itos, MASK_GLYPH]
    assert [f["step"] for f in data["frames"]] == list(range(5)) == sorted(recorder.frames)
    assert all(len(f["changes"]) == 3 for f in data["frames"])
    assert replay(data) == out.tokens.tolist()  # every frame is there: replaying them gives the samples
    texts = [vocab.decode(row) for row in out.tokens]
    assert all(t.startswith("</a&\n") for t in texts)
    assert checker.noscript.count("</a&\n") == 3  # the fallback holds the (escaped, then parsed) final texts
    assert "&lt;/a&amp;" in page
    assert "<script>" in page and page.count("</script>") == 2  # the data script and the player


def test_script_json_round_trips() -> None:
    value = {"text": "</script><b>&amp;", "n": [1, 2]}
    encoded = script_json(value)
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded) == value


def test_readable_shows_newlines_and_tabs() -> None:
    assert readable(f"a\nb\tc{MASK_GLYPH}") == f"a{NEWLINE_GLYPH}b\u21e5c{MASK_GLYPH}"


# --- through `unmask sample` ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("animate_run")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8)]) == 0
    return out


def test_sample_animate_writes_the_page_across_batches(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page_path = tmp_path / "steps.html"
    flags = ["--num_samples=3", "--batch_size=2", "--steps=4", "--prompt=The ", "--metrics=False", "--json"]
    assert main(["sample", f"--out_dir={run_dir}", f"--animate={page_path}", *flags]) == 0
    captured = capsys.readouterr()
    texts = [s["text"] for s in json.loads(captured.out)["samples"]]
    assert f"wrote {page_path} (4 steps)" in captured.err
    checker = parse(page_path.read_text(encoding="utf-8"))
    data = json.loads(checker.data_json)
    assert data["samples"] == 3 and len(data["frames"]) == 4
    assert ["".join(data["itos"][i] for i in row) for row in replay(data)] == texts
    assert data["fixed"][:4] == [True] * 4 and not any(data["fixed"][4:])


def test_sample_animate_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_dir" / "a.html"
    assert main(["sample", f"--out_dir={run_dir}", f"--animate={missing}", "--metrics=False"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"unmask sample: error: --animate={missing}: directory") and len(err.splitlines()) == 1
    assert main(["sample", f"--out_dir={run_dir}", "--animate=a.html", "--sweep_steps=2,4"]) == 2
    assert "--animate: not available with --sweep_steps" in capsys.readouterr().err


def test_show_steps_prints_one_line_per_canvas(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The king.\nThe ")
    flags = ["--num_samples=2", "--steps=3", "--length=24", "--metrics=False", "--show_steps"]
    assert main(["sample", f"--out_dir={run_dir}", f"--prompt_file={prompt}", *flags]) == 0
    out = capsys.readouterr().out
    canvases = [line for line in out.splitlines() if re.match(r"\[\d\] ", line)][:6]  # the 3 steps x 2 samples
    assert len(canvases) == 6
    for line in canvases:
        assert len(line) == len("[1] ") + 24  # the whole canvas on one line
        assert line[4:].startswith(f"The king.{NEWLINE_GLYPH}The ")
    assert MASK_GLYPH in canvases[0]
