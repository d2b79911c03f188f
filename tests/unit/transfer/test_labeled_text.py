"""JSONL/CSV readers (line-numbered errors), the fixed stratified split, encoding and padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.transfer.labeled_text import LabeledText, encode_texts, read_labeled, stratified_split


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_records_skip_blank_lines_and_keep_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "ab", "label": 0}\n\n{"text": "b a", "label": 1, "id": 7}\n')
    assert read_labeled(path) == [LabeledText("ab", 0, 1), LabeledText("b a", 1, 3)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": 1\n',
            "d.jsonl:3: not valid JSON",
        ),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n', "d.jsonl:2: label 2 is not 0 or 1"),
        ('{"text": "a", "label": true}\n', "d.jsonl:1: label True is not 0 or 1"),
        ('{"text": "a", "label": 0}\n{"label": 1}\n', 'd.jsonl:2: expected an object with "text" and "label"'),
        ('{"text": "a"}\n', "d.jsonl:1: missing label"),
        ('{"text": "", "label": 0}\n', "d.jsonl:1: empty text"),
        ('{"text": 5, "label": 0}\n', "d.jsonl:1: 'text' must be a string"),
        ("\n\n", "no texts in the file"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        read_labeled(write(tmp_path, "d.jsonl", body))


def test_csv_with_header_quotes_and_multiline_fields(tmp_path: Path) -> None:
    body = 'id,text,label\n1,"two\nlines",1\n\n2,"a, b",0\n'
    assert read_labeled(write(tmp_path, "d.csv", body)) == [
        LabeledText("two\nlines", 1, 2),
        LabeledText("a, b", 0, 5),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sentence,label\nab,0\n", "d.csv:1: expected a header row with the columns text,label"),
        ('text,label\nab,0\n"x\ny",1\nc,d,1\n', "d.csv:5: 3 field\\(s\\), the header has 2"),
        ("text,label\nab,0\ncd,yes\n", "d.csv:3: label 'yes' is not 0 or 1"),
        ("text,label\nab,\n", "d.csv:2: missing label"),
    ],
)
def test_malformed_csv_names_the_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        read_labeled(write(tmp_path, "d.csv", body))


def test_other_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="expected a .jsonl or .csv file"):
        read_labeled(write(tmp_path, "d.txt", "a\n"))
    plain = read_labeled(write(tmp_path, "d.txt", "first\n\nthird\n"), "--input", labels_required=False)
    assert plain == [LabeledText("first", None, 1), LabeledText("third", None, 3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not UTF-8"):
        read_labeled(bad)
    with pytest.raises(UserError, match="--classification_data=.*missing.jsonl: cannot read"):
        read_labeled(tmp_path / "missing.jsonl")


def test_stratified_split_is_fixed_and_keeps_both_classes(tmp_path: Path) -> None:
    records = [LabeledText(f"t{i}", int(i % 4 == 0), i + 1) for i in range(40)]  # 10 of class 1, 30 of class 0
    train, val = stratified_split(records, 0.2, tmp_path / "f")
    assert len(val) == 2 + 6 and len(train) == 32
    assert sorted(r.label for r in val) == [0] * 6 + [1] * 2
    assert {r.line for r in train}.isdisjoint(r.line for r in val)
    assert (train, val) == stratified_split(records, 0.2, tmp_path / "f")
    assert [r.line for r in val] == sorted(r.line for r in val)  # the file's order
    with pytest.raises(UserError, match="1 text\\(s\\) with label 1; each class needs at least 2"):
        stratified_split(records[1:4] + records[:1], 0.2, tmp_path / "f")


def test_encode_pad_truncate_and_unknown_characters(tmp_path: Path) -> None:
    vocab = Vocab(tuple("abc "))
    records = [LabeledText("ab", 0, 1), LabeledText("abcabc a", 1, 2), LabeledText("c", None, 3)]
    enc = encode_texts(records, vocab, 4, tmp_path / "f")
    assert enc.lengths.tolist() == [2, 4, 1] and enc.truncated == 1 and enc.labels.tolist() == [0, 1, -1]
    x, pad = enc.batch(torch.tensor([0, 2]))
    assert x.tolist() == [[0, 1], [2, vocab.mask_id]] and pad.tolist() == [[False, False], [False, True]]
    bad = [LabeledText("ab", 0, 1), LabeledText("aZ", 1, 5), LabeledText("é", 0, 9)]
    with pytest.raises(UserError, match=r"f:5: 2 character\(s\) not in the model's vocabulary of 4 .*'Z' 'é'"):
        encode_texts(bad, vocab, 4, tmp_path / "f")
