import json
import os

import pytest

from moekit.train.corpus import default_corpus_root, load_corpus


def test_default_corpus_is_the_stdlib_and_split_is_deterministic():
    a = load_corpus(max_train_chars=50_000, max_val_chars=10_000)
    b = load_corpus(max_train_chars=50_000, max_val_chars=10_000)
    assert a.source == f"stdlib:{default_corpus_root()}"
    assert [d.name for d in a.train] == [d.name for d in b.train]
    assert [d.name for d in a.validation] == [d.name for d in b.validation]
    assert {d.name for d in a.train}.isdisjoint(d.name for d in a.validation)
    assert a.train_chars == 50_000 and a.validation_chars == 10_000
    assert all(d.name.endswith(".py") for d in a.train)
    assert a.num_documents > 500


def test_split_is_by_file_and_independent_of_budget():
    small = load_corpus(max_train_chars=10_000, max_val_chars=5_000)
    large = load_corpus(max_train_chars=100_000, max_val_chars=50_000)
    # A document is in the same split whatever the budget: the sample grows, the split does not move.
    large_val = {d.name for d in large.validation}
    large_train = {d.name for d in large.train}
    assert {d.name for d in small.validation} <= large_val
    assert {d.name for d in small.train} <= large_train


def test_directory_of_text_files_with_jsonl_and_binary(tmp_path):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"a{i}.txt").write_text(f"text number {i}\n", encoding="utf-8")
    (root / "sub" / "r.jsonl").write_text("\n".join(json.dumps({"text": f"rec {i}"}) for i in range(4)))
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    (root / ".hidden").write_text("never")
    c = load_corpus(root, val_fraction=0.2)
    names = {d.name for d in c.train + c.validation}
    assert {f"a{i}.txt" for i in range(6)} <= names
    assert {f"sub/r.jsonl#{i}" for i in range(1, 5)} <= names
    assert "blob.bin" not in names and ".hidden" not in names
    assert c.num_documents == 11  # the binary file is a candidate but is skipped when read
    assert "".join(d.text for d in c.train + c.validation).count("rec ") == 4


def test_txt_file_is_chunked_and_jsonl_file(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("".join(f"line {i} " + "x" * 90 + "\n" for i in range(200)), encoding="utf-8")
    c = load_corpus(txt)
    assert c.num_documents >= 9
    assert c.train_chars + c.validation_chars == len(txt.read_text())
    (tmp_path / "books").mkdir()  # the same file alone in a directory: the same documents
    txt.rename(tmp_path / "books" / "book.txt")
    assert load_corpus(tmp_path / "books") == c.__class__(str((tmp_path / "books").resolve()),
                                                         c.train, c.validation, c.num_documents)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(10)) + "\n\n")
    c = load_corpus(jl, val_fraction=0.3)
    assert len(c.validation) == 3 and len(c.train) == 7


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "no such file or directory"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "contains no files"),
        (lambda p: (p / "e.txt").write_text("") and p / "e.txt" or p / "e.txt", "has no text"),
        (lambda p: (p / "blank.txt").write_text("   \n\n") and p / "blank.txt", "has no text"),
        (lambda p: (p / "one.txt").write_text("short") and p / "one.txt", "at least 2"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "a"}\n') and p / "x.jsonl", '"text"'),
        (lambda p: (p / "y.jsonl").write_text("not json\n") and p / "y.jsonl", "not valid JSON"),
        (lambda p: (p / "l.jsonl").write_bytes(b"\xe9\n") and p / "l.jsonl", r"l.jsonl: not UTF-8 text"),
    ],
)
def test_bad_data_gives_clear_errors(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(setup(tmp_path))


def test_a_binary_file_first_in_hash_order_does_not_empty_the_validation_split(tmp_path):
    from moekit.train.corpus import _doc_hash

    texts = [f"t{i}.py" for i in range(19)]
    for name in texts:
        (tmp_path / name).write_text(f"x = {name!r}\n", encoding="utf-8")
    binary = next(f"b{i}.png" for i in range(10_000) if _doc_hash(f"b{i}.png") < min(map(_doc_hash, texts)))
    (tmp_path / binary).write_bytes(b"\x89PNG\x00\xff")
    c = load_corpus(tmp_path)  # 20 candidates: one validation document, the binary passed over
    assert len(c.validation) == 1 and len(c.train) == 18
    assert {d.name for d in c.train + c.validation} == set(texts)


def test_directory_of_only_binary_files_is_empty(tmp_path):
    for i in range(3):
        (tmp_path / f"b{i}").write_bytes(b"\x00\xff")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0}, {"val_fraction": 0.9}, {"max_train_chars": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_corpus(**kwargs)


def test_one_long_line_is_cut_into_documents(tmp_path):
    one = tmp_path / "oneline.txt"
    one.write_text("word " * 20_000, encoding="utf-8")  # 100k characters, no line break
    c = load_corpus(one)
    assert c.num_documents == 50 and c.train_chars + c.validation_chars == 100_000


def test_user_directories_keep_package_folders_and_skip_undecodable_jsonl(tmp_path):
    """site-packages / dist-packages are skipped only in the stdlib corpus, not in --data."""
    for folder in ("site-packages", "dist-packages", "__pycache__", ".git"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(f"text in {folder}\n")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')  # not UTF-8: skipped like a binary
    c = load_corpus(tmp_path, val_fraction=0.5)
    names = {d.name for d in c.train + c.validation}
    assert names == {"site-packages/a.txt", "dist-packages/a.txt"}


def test_source_is_absolute(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_text(f"text {i}\n")
    monkeypatch.chdir(tmp_path)
    assert load_corpus("d/").source == str(tmp_path / "d")


@pytest.mark.parametrize("other", [b"\x00\x01\x02", b"", b"  \n", b"caf\xe9 au lait\n"])
def test_one_text_file_beside_files_that_are_skipped_is_cut_like_a_lone_file(tmp_path, other):
    text = "".join(f"line {i} of the only text file\n" for i in range(600))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "big.txt").write_text(text)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "big.txt").write_text(text)
    (mixed / "other").write_bytes(other)  # binary, empty, blank or not UTF-8: skipped
    a, b = load_corpus(lone), load_corpus(mixed)
    assert [d.text for d in a.train] == [d.text for d in b.train] and len(b.train) > 1
    assert [d.text for d in a.validation] == [d.text for d in b.validation]


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(f"text number {i}\n")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "wb") as f:
        f.write(b"a file whose name is latin-1\n")
    c = load_corpus(tmp_path, val_fraction=0.25)
    assert c.num_documents == 4 and len(c.train) + len(c.validation) == 4
