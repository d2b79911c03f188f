"""The denoising picture: a self-contained HTML page showing a canvas fill step by step (`unmask sample --animate`).

`Recorder` is an `on_step` hook of `unmask.commands.sample.run_samples` (called with the batch's first sample index and
the sampler's `StepEvent`); it keeps only what each step changed, per sample. `animation_html` turns that into one page
with inline CSS and JavaScript (no network access): play/pause, a step slider, masked positions as grey blocks,
the prompt / template, earlier commits and the characters committed (or re-masked) at the current step in
different colours, newlines as a visible glyph followed by a line break. The data travel as JSON inside a
`<script type="application/json">` element with `<`, `>` and `&` written as JSON escapes, so no text of a
sample can close the element; the page puts characters into the document with `textContent` only.

`readable` is the same idea for a terminal (`--show_steps`): newlines become a glyph so that every canvas is one
line and the steps line up.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.data.dataset import MASK_GLYPH, Vocab
from unmask.errors import UserError
from unmask.generation.diffusion import StepEvent
from unmask.storage.atomic import atomic_write_bytes

NEWLINE_GLYPH = "\u23ce"  # ⏎
TAB_GLYPH = "\u21e5"  # ⇥


def readable(text: str) -> str:
    """One terminal line per canvas: newlines and tabs shown as glyphs (masks are already MASK_GLYPH)."""
    return text.replace("\n", NEWLINE_GLYPH).replace("\t", TAB_GLYPH)


@dataclass
class StepFrame:
    step: int  # the sampler's step index (0-based, over all blocks)
    steps: int
    block: int
    changes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # sample -> [(position, new id)]


class Recorder:
    """`on_step` hook: records, for every sample, the positions each step changed and their new ids."""

    def __init__(self, canvas: torch.Tensor, fixed: torch.Tensor, mask_id: int, num_samples: int) -> None:
        self.fixed = fixed.bool().cpu().tolist()  # (L,)
        self.initial = torch.where(fixed.cpu(), canvas.cpu(), torch.full_like(canvas.cpu(), mask_id)).tolist()  # (L,)
        self.mask_id = mask_id
        self.num_samples = num_samples
        self.frames: dict[int, StepFrame] = {}

    def __call__(self, first: int, event: StepEvent) -> None:
        frame = self.frames.setdefault(event.step, StepFrame(event.step, event.steps, event.block))
        changed = event.changed.cpu()  # (B, L) bool
        canvas = event.canvas.cpu()  # (B, L)
        for row in range(changed.shape[0]):
            positions = changed[row].nonzero().flatten()
            frame.changes[first + row] = list(zip(positions.tolist(), canvas[row, positions].tolist(), strict=True))

    def ordered_frames(self) -> list[StepFrame]:
        return [self.frames[s] for s in sorted(self.frames)]

    def final_ids(self) -> list[list[int]]:
        """Every sample's canvas after the last step (what the sampler returned)."""
        rows = [list(self.initial) for _ in range(self.num_samples)]
        for frame in self.ordered_frames():
            for sample, changes in frame.changes.items():
                for position, token in changes:
                    rows[sample][position] = token
        return rows


def page_data(recorder: Recorder, vocab: Vocab, title: str) -> dict[str, Any]:
    """The JSON the page plays: the vocabulary (ids -> characters), the starting canvas and every step's changes."""
    return {
        "title": title,
        "itos": [*vocab.itos, MASK_GLYPH],
        "mask_id": vocab.mask_id,
        "fixed": recorder.fixed,
        "initial": recorder.initial,
        "samples": recorder.num_samples,
        "frames": [
            {
                "step": f.step,
                "steps": f.steps,
                "block": f.block,
                "changes": [[list(c) for c in f.changes.get(s, [])] for s in range(recorder.num_samples)],
            }
            for f in recorder.ordered_frames()
        ],
    }


def script_json(data: Any) -> str:
    """JSON safe inside a <script> element: <, > and & (only ever inside strings) become \\u escapes."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; background: #fafafa; color: #222; }
h1 { font-size: 1.05em; font-weight: 600; margin: 0 0 0.6em; }
#controls { display: flex; gap: 0.6em; align-items: center; margin-bottom: 0.5em; }
#controls button { font-size: 0.95em; min-width: 5.5em; }
#slider { flex: 1; max-width: 40em; }
#label { font-variant-numeric: tabular-nums; min-width: 14em; }
.legend { font-size: 0.85em; margin-bottom: 0.8em; }
.legend span.ch { display: inline-block; width: 1.1em; text-align: center; margin: 0 0.2em 0 0.8em; }
.sample { margin-bottom: 1em; }
.sample h2 { font-size: 0.85em; font-weight: 500; color: #666; margin: 0 0 0.2em; }
.canvas { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 15px; line-height: 1.45;
          white-space: pre-wrap; word-break: break-all; background: #fff; border: 1px solid #ddd;
          padding: 0.5em 0.7em; }
.ch { border-radius: 2px; }
.m { color: #b8b8b8; }
.p { color: #1f4e9c; background: #e3ecfa; }
.c { color: #222; }
.n { color: #000; background: #ffd54a; outline: 1px solid #e0a800; }
.r { color: #d9534f; background: #fde2e1; }
.nl { color: #999; }
"""

_JS = """
const data = JSON.parse(document.getElementById("unmask-data").textContent);
const F = data.frames.length, N = data.samples, L = data.initial.length;
// states[f][s]: sample s after f steps (f = 0: the starting canvas).
const states = [Array.from({length: N}, () => data.initial.slice())];
for (const frame of data.frames) {
  const next = states[states.length - 1].map(row => row.slice());
  frame.changes.forEach((changes, s) => { for (const [pos, id] of changes) next[s][pos] = id; });
  states.push(next);
}
const canvases = [];
const root = document.getElementById("samples");
for (let s = 0; s < N; s++) {
  const box = document.createElement("div"); box.className = "sample";
  const h = document.createElement("h2"); h.textContent = "sample " + (s + 1); box.appendChild(h);
  const c = document.createElement("div"); c.className = "canvas"; box.appendChild(c);
  root.appendChild(box); canvases.push(c);
}
const slider = document.getElementById("slider"), label = document.getElementById("label");
const play = document.getElementById("play");
slider.max = F;
function render(f) {
  const frame = f > 0 ? data.frames[f - 1] : null;
  label.textContent = frame ? "step " + (frame.step + 1) + " / " + frame.steps + " (block " + (frame.block + 1) + ")"
                            : "start (0 / " + (F ? data.frames[0].steps : 0) + ")";
  for (let s = 0; s < N; s++) {
    const now = new Set(frame ? frame.changes[s].map(c => c[0]) : []);
    const row = states[f][s], out = document.createDocumentFragment();
    for (let i = 0; i < L; i++) {
      const id = row[i], span = document.createElement("span");
      let cls = data.fixed[i] ? "p" : id === data.mask_id ? "m" : "c";
      if (now.has(i)) cls = id === data.mask_id ? "r" : "n";
      span.className = "ch " + cls;
      const ch = data.itos[id];
      if (ch === "\\n") {
        span.textContent = "\\u23ce"; span.classList.add("nl"); out.appendChild(span);
        out.appendChild(document.createTextNode("\\n"));
      } else { span.textContent = ch; out.appendChild(span); }
    }
    canvases[s].replaceChildren(out);
  }
  slider.value = f;
}
let frameNow = 0, timer = null;
function show(f) { frameNow = Math.max(0, Math.min(F, f)); render(frameNow); }
function stop() { if (timer) { clearInterval(timer); timer = null; } play.textContent = "play"; }
function start() {
  if (frameNow >= F) show(0);
  play.textContent = "pause";
  timer = setInterval(() => { if (frameNow >= F) stop(); else show(frameNow + 1); }, 250);
}
play.onclick = () => (timer ? stop() : start());
slider.oninput = () => { stop(); show(Number(slider.value)); };
document.getElementById("prev").onclick = () => { stop(); show(frameNow - 1); };
document.getElementById("next").onclick = () => { stop(); show(frameNow + 1); };
document.addEventListener("keydown", e => {
  if (e.key === " ") { e.preventDefault(); timer ? stop() : start(); }
  if (e.key === "ArrowLeft") { stop(); show(frameNow - 1); }
  if (e.key === "ArrowRight") { stop(); show(frameNow + 1); }
});
const m = /frame=(\\d+)/.exec(location.hash);  // #frame=N opens at step N (for screenshots and links)
show(m ? Number(m[1]) : 0);
"""


def animation_html(recorder: Recorder, vocab: Vocab, title: str) -> str:
    """One self-contained page (inline CSS and JS, no network) replaying the recorded steps."""
    finals = [vocab.decode(row) for row in recorder.final_ids()]
    fallback = "\n".join(f"<pre>{html.escape(text)}</pre>" for text in finals)
    legend = (
        f'<span class="ch m">{MASK_GLYPH}</span>masked'
        '<span class="ch p">a</span>prompt / template'
        '<span class="ch c">a</span>committed'
        '<span class="ch n">a</span>committed at this step'
        f'<span class="ch r">{MASK_GLYPH}</span>re-masked at this step'
        f'<span class="ch nl">{NEWLINE_GLYPH}</span>newline'
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>unmask: {html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div id="controls">
<button id="play" type="button">play</button>
<button id="prev" type="button">&larr; step</button>
<button id="next" type="button">step &rarr;</button>
<input id="slider" type="range" min="0" max="0" value="0" aria-label="step">
<span id="label"></span>
</div>
<div class="legend">{legend}</div>
<div id="samples"></div>
<noscript><p>The animation needs JavaScript; the final samples:</p>
{fallback}
</noscript>
<script type="application/json" id="unmask-data">{script_json(page_data(recorder, vocab, title))}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_animation(path: Path, page: str, flag: str = "--animate") -> None:
    """Write the page atomically (`unmask.storage.atomic`); an OS error is one line naming the flag."""
    if not path.parent.is_dir():
        raise UserError(f"{flag}={path}: directory {path.parent} does not exist")
    try:
        atomic_write_bytes(path, page.encode("utf-8"))
    except UserError as exc:
        raise UserError(f"{flag}={exc}") from None
