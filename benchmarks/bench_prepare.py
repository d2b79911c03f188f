"""`unmask prepare` on a large synthetic corpus: wall seconds, MB/s and peak resident memory.

Writes a synthetic corpus of `--size_mb` MB (default 2048) into a fresh directory under `--tmp_dir`, runs
`python -m unmask prepare --input=...` on it in a subprocess, then `load_dataset` (which range-checks every
id) in a second one, and deletes everything it wrote. Peak RSS is the child's
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, read right after the prepare child exits.

The corpus is word-salad English in paragraphs (blank line every few lines). `--alphabet=mixed` puts a few
non-ASCII characters (é, —, ’, €) in every line, so no chunk takes prepare's ASCII fast path. `--repo` runs
another checkout's unmask (e.g. an older commit exported with `git archive`) for comparison.

    python benchmarks/bench_prepare.py --tmp_dir=TMP_DIR [--size_mb=2048] [--alphabet=ascii|mixed]
        [--repo=DIR] [--json=FILE]

Needs about 2.1 x size_mb of free disk in TMP_DIR. Not run in CI; record results with machine, date and
commit in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "rome",
    "speak",
    "to",
    "their",
    "people",
    "in",
    "hall",
    "while",
    "a",
    "fool",
    "sings",
    "love",
    "war",
    "bread",
    "night",
    "what",
    "say",
    "you",
    "my",
    "lord",
    "I",
    "will",
    "not",
    "be",
    "so",
    "hath",
    "thou",
    "art",
    "good",
    "sir",
    "come",
    "hither",
    "away",
    "here",
    "there",
    "now",
]


def write_corpus(path: Path, size_mb: int, alphabet: str, seed: int = 0) -> int:
    """Write about size_mb MB of text; returns the exact byte count.

    Sixteen 1 MiB blocks are generated and cycled, so writing 2 GB takes seconds rather than minutes; the
    prepare code does not care whether blocks repeat.
    """
    rng = random.Random(seed)
    extras = ["é", "—", "’", "€"] if alphabet == "mixed" else []
    blocks = []
    for _ in range(16):
        lines: list[str] = []
        size = 0
        while size < 1 << 20:
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            if extras:
                words.insert(rng.randrange(len(words)), rng.choice(extras))
            line = " ".join(words).capitalize() + ("." if rng.random() < 0.8 else ":")
            lines.append(line)
            if rng.random() < 0.15:
                lines.append("")  # paragraph break
            size += len(line.encode("utf-8")) + 1
        blocks.append(("\n".join(lines) + "\n").encode("utf-8"))
    target = size_mb * 1_000_000
    written = 0
    with open(path, "wb") as f:
        i = 0
        while written < target:
            block = blocks[i % len(blocks)]
            f.write(block)
            written += len(block)
            i += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tmp_dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--size_mb", type=int, default=2048)
    parser.add_argument("--alphabet", choices=("ascii", "mixed"), default="ascii")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose unmask package is run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unmask-bench-prepare-", dir=args.tmp_dir))
    try:
        corpus = work / "corpus.txt"
        t0 = time.perf_counter()
        n_bytes = write_corpus(corpus, args.size_mb, args.alphabet)
        print(f"corpus: {n_bytes / 1e6:,.0f} MB ({args.alphabet}) written in {time.perf_counter() - t0:.1f}s")
        env = {**os.environ, "PYTHONPATH": str(args.repo.resolve()), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "unmask", "prepare", f"--input={corpus}", "--name=bench", f"--data_dir={work}"]
        t0 = time.perf_counter()
        # cwd = the repo: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
        proc = subprocess.run(cmd, env=env, cwd=args.repo, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        if proc.returncode != 0:
            sys.exit(f"prepare failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        print(proc.stdout.strip().splitlines()[-1])

        probe = (
            "import sys, time\n"
            "from unmask.data.dataset import load_dataset\n"
            "t = time.perf_counter(); ds = load_dataset(sys.argv[1]); dt = time.perf_counter() - t\n"
            "print(f'{dt:.3f} {len(ds.train) + len(ds.val)}')\n"
        )
        load = subprocess.run(
            [sys.executable, "-c", probe, str(work / "bench")],
            env=env,
            cwd=args.repo,
            capture_output=True,
            text=True,
            check=False,
        )
        load_s = float(load.stdout.split()[0]) if load.returncode == 0 else float("nan")
        result = {
            "size_mb": n_bytes / 1e6,
            "alphabet": args.alphabet,
            "wall_s": round(wall, 2),
            "mb_per_s": round(n_bytes / 1e6 / wall, 1),
            "peak_rss_mb": round(peak_mb, 1),
            "peak_rss_over_input": round(peak_mb * 1024 * 1024 / n_bytes, 3),
            "load_dataset_s": round(load_s, 3),
            "repo": str(args.repo),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
            "commit": subprocess.run(
                ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
        }
        print(
            f"prepare {result['size_mb']:,.0f} MB: {wall:.1f} s, {result['mb_per_s']} MB/s, peak RSS "
            f"{peak_mb:,.0f} MB ({result['peak_rss_over_input']}x input); load_dataset (range check) {load_s:.2f} s"
        )
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
