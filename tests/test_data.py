"""Tokenizers, token files and their command line: round trips, document boundaries (blank
lines or a separator line), encodings, the files a folder gives, skipped files, the
validation split, memory maps, an output folder's other files, and bad input (the
library's errors name its arguments, the command line's its flags)."""

import json
import os

import numpy as np
import pytest

from cli_runs import one_line_error
from lmkern.cli import main
from lmkern.models import data, tasks
from lmkern.models.tokenizer import END_OF_TEXT, load_tokenizer, save_tokenizer, train_tokenizer

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.\nA second line of the first document.",
    "Ünïcödé survives: naïve café, 東京, emoji 🙂.",
    "Short.",
] + [f"Document number {i} talks about tokens, batches and kernels." for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    """Two text files (one in a sub-folder), documents separated by blank lines."""
    (tmp_path / "text" / "more").mkdir(parents=True)
    (tmp_path / "text" / "a.txt").write_text("\n\n".join(DOCUMENTS[:20]) + "\n", encoding="utf-8")
    (tmp_path / "text" / "more" / "b.md").write_text("\n\n\n".join(DOCUMENTS[20:]), encoding="utf-8")
    (tmp_path / "text" / "ignored.bin").write_bytes(b"\xff\xfe not text")
    return tmp_path


def test_documents_are_split_on_blank_lines(corpus):
    files = data.text_files([str(corpus / "text")])
    assert [os.path.basename(f) for f in files] == ["a.txt", "b.md"]
    assert [doc.strip() for doc in data.documents(files)] == DOCUMENTS


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_round_trip(tmp_path, kind):
    tokenizer = train_tokenizer(DOCUMENTS * 5, kind, 400)
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = DOCUMENTS[1] if kind == "bpe" else DOCUMENTS[0]
    ids = loaded.encode(text, add_special_tokens=False).ids
    if kind == "bpe":  # byte-level: every string comes back exactly
        assert loaded.decode(ids) == text
    else:  # lower-cased, and pairs get [CLS] A [SEP] B [SEP] with token types
        assert loaded.decode(ids) == text.lower().replace("\n", " ")
        pair = loaded.encode("a fox", "the dog")
        assert pair.tokens[0] == "[CLS]" and pair.tokens.count("[SEP]") == 2
        assert pair.type_ids == [0] * (pair.tokens.index("[SEP]") + 1) + [1] * (len(pair.tokens) - pair.tokens.index("[SEP]") - 1)


def test_prepare_writes_documents_back_to_back(corpus, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    save_tokenizer(train_tokenizer(DOCUMENTS * 5, "bpe", 400), tokenizer_dir)
    out = tmp_path / "prepared"
    meta = data.prepare([str(corpus / "text")], str(tokenizer_dir), str(out), val_fraction=0.2, seed=1, progress=False)
    tokenizer = load_tokenizer(tokenizer_dir)
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    decoded = []
    for split in data.SPLITS:
        tokens = data.TokenData(str(out), split)
        assert tokens.tokens.dtype == np.uint16 and not tokens.tokens.flags.writeable
        assert len(tokens) == meta["splits"][split]["tokens"] and len(tokens.starts) - 1 == meta["splits"][split]["documents"]
        for start, end in zip(tokens.starts[:-1], tokens.starts[1:]):
            ids = tokens.tokens[start:end].tolist()
            assert ids[-1] == end_of_text
            decoded.append(tokenizer.decode(ids[:-1]).strip())
    assert sorted(decoded) == sorted(DOCUMENTS)
    assert 0 < meta["splits"]["val"]["documents"] < len(DOCUMENTS)
    again = data.prepare([str(corpus / "text")], str(tokenizer_dir), str(tmp_path / "again"), 0.2, 1, progress=False)
    assert again["splits"] == meta["splits"]  # the split is fixed by the seed
    assert sorted(os.listdir(tmp_path)) == ["again", "prepared", "text", "tokenizer"]  # nothing left over
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train.bin", "train.docs.npy", "val.bin",
                                       "val.docs.npy"]


def test_token_data_checks_its_tokenizer_and_dtype(corpus, tmp_path):
    save_tokenizer(train_tokenizer(DOCUMENTS * 5, "bpe", 400), tmp_path / "tok")
    data.prepare([str(corpus / "text")], str(tmp_path / "tok"), str(tmp_path / "out"), 0.2, progress=False)
    tokens = data.TokenData(str(tmp_path / "out"), "train")
    tokens.check_tokenizer(str(tmp_path / "out"))  # the copy beside the tokens
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "other")
    with pytest.raises(ValueError, match="is not the one"):
        tokens.check_tokenizer(str(tmp_path / "other"))
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, vocab_size=70000)))
    with pytest.raises(ValueError, match="does not fit the token files' uint16"):
        data.TokenData(str(tmp_path / "out"), "train")
    assert data.token_dtype(2**16) == np.uint16 and data.token_dtype(2**16 + 1) == np.uint32


def test_cli_trains_a_tokenizer_and_prepares(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--data", str(corpus / "text"), "--kind", "wordpiece",
                 "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert main(["prepare", "--data", str(corpus / "text"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained a wordpiece tokenizer" in printed and "prepared" in printed
    assert data.TokenData(str(tmp_path / "out"), "train").meta["end_of_text_id"] is None


@pytest.mark.parametrize(
    "setup, arguments, message",
    [
        (None, ["--data", "{tmp}/missing"], "--data {tmp}/missing: no such file or folder"),
        ("empty_folder", ["--data", "{tmp}/empty"], "has no"),
        ("blank_file", ["--data", "{tmp}/blank.txt"], "no tokens for the train split"),
        ("latin1", ["--data", "{tmp}/latin1.txt"], "latin1.txt is not utf-8 text"),
        ("bad_tokenizer", ["--data", "{corpus}", "--tokenizer", "{tmp}/broken"], "tokenizer.json is not a readable"),
        (None, ["--data", "{corpus}", "--encoding", "klingon"], "--encoding klingon: no such text encoding"),
        (None, ["--data", "{corpus}", "--tokenizer", "{tmp}/nowhere"], "no tokenizer in --tokenizer {tmp}/nowhere"),
        (None, ["--data", "{corpus}", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    ],
)
def test_prepare_bad_input_is_a_clear_error_and_leaves_nothing(corpus, tmp_path, capsys, setup, arguments, message):
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "tok")
    if setup == "empty_folder":
        (tmp_path / "empty").mkdir()
    elif setup == "blank_file":
        (tmp_path / "blank.txt").write_text("\n\n  \n")
    elif setup == "latin1":
        (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    elif setup == "bad_tokenizer":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "tokenizer.json").write_text((tmp_path / "tok" / "tokenizer.json").read_text()[:100])
    argv = ["prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--quiet"]
    argv += [a.format(tmp=tmp_path, corpus=corpus / "text") for a in arguments]
    assert message.format(tmp=tmp_path) in one_line_error(capsys, main(argv))
    assert not (tmp_path / "out").exists()


def test_tokenizer_train_bad_input_names_the_flag_and_leaves_nothing(corpus, tmp_path, capsys):
    argv = ["tokenizer", "train", "--data", str(corpus / "text"), "--kind", "bpe", "--vocab-size", "100", "--out",
            str(tmp_path / "tok")]
    assert "--vocab-size must be at least 257 for --kind bpe, got 100" in one_line_error(capsys, main(argv))
    assert not (tmp_path / "tok").exists()


def test_folders_give_extensionless_text_files_and_no_hidden_ones(tmp_path):
    for name in ("README", "notes.txt", "image.png", ".hidden", ".git/HEAD", "sub/LICENSE", ".lmkern.partial/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    files = data.text_files([str(tmp_path)])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["README", "notes.txt", "sub/LICENSE"]


def test_a_separator_line_ends_documents_and_blank_lines_stay_inside(tmp_path):
    (tmp_path / "fortunes").write_text("\nFirst line.\n\nSame document.\n\n%\nSecond.\n%\n%\n  %  \nThird.\n")
    found = list(data.documents([str(tmp_path / "fortunes")], data.TextFormat(separator="%")))
    assert found == ["First line.\n\nSame document.\n", "Second.\n", "Third.\n"]
    blank_lines = list(data.documents([str(tmp_path / "fortunes")]))
    assert blank_lines == ["First line.\n", "Same document.\n", "%\nSecond.\n%\n%\n  %  \nThird.\n"]


def test_an_encoding_reads_other_text_and_bad_files_can_be_skipped(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (tmp_path / "utf8.txt").write_text("naïve\n", encoding="utf-8")
    files = [str(tmp_path / "latin1.txt"), str(tmp_path / "utf8.txt")]
    assert list(data.documents(files[:1], data.TextFormat(encoding="latin-1"))) == ["café crème\n"]
    with pytest.raises(ValueError, match="latin1.txt is not utf-8 text"):
        list(data.documents(files))
    skipped = []
    assert list(data.documents(files, data.TextFormat(skip_bad_files=True), skipped=skipped)) == ["naïve\n"]
    assert skipped == [(files[0], "not utf-8 text (invalid continuation byte at byte 3)")]


def test_prepare_skips_bad_files_when_asked_and_says_which(corpus, tmp_path, capsys):
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "tok")
    (corpus / "text" / "legacy.txt").write_bytes("café\n".encode("latin-1"))
    argv = ["prepare", "--data", str(corpus / "text"), "--tokenizer", str(tmp_path / "tok"), "--out",
            str(tmp_path / "out"), "--quiet"]
    assert "legacy.txt is not utf-8 text" in one_line_error(capsys, main(argv))
    assert main(argv + ["--skip-bad-files"]) == 0
    assert f"skipped {corpus / 'text' / 'legacy.txt'}: not utf-8 text" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [skip["path"] for skip in meta["skipped"]] == [str(corpus / "text" / "legacy.txt")]
    assert meta["sources"] == [str(corpus / "text" / "a.txt"), str(corpus / "text" / "more" / "b.md")]
    assert sum(split["documents"] for split in meta["splits"].values()) == len(DOCUMENTS)


def test_cli_takes_a_separator_and_an_encoding(tmp_path, capsys):
    fortunes = "%\n".join(f"Fortune {i}:\n\nit is café time.\n" for i in range(30))
    (tmp_path / "fortunes").write_bytes(fortunes.encode("latin-1"))
    text = ["--data", str(tmp_path / "fortunes"), "--doc-separator", "%", "--encoding", "latin-1"]
    assert main(["tokenizer", "train", *text, "--kind", "bpe", "--vocab-size", "300", "--out",
                 str(tmp_path / "tok")]) == 0
    assert "on 30 documents" in capsys.readouterr().out
    assert main(["prepare", *text, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--quiet",
                 "--val-fraction", "0.3"]) == 0
    tokens = data.TokenData(str(tmp_path / "out"), "train")
    tokenizer = load_tokenizer(tmp_path / "tok")
    first = tokens.tokens[tokens.starts[0] : tokens.starts[1] - 1].tolist()  # less its end-of-text
    assert tokenizer.decode(first).startswith("Fortune ")
    assert tokenizer.decode(first).endswith(":\n\nit is café time.\n")  # the blank line stays inside


def test_prepare_again_replaces_its_files_only_and_a_failure_keeps_the_old_ones(corpus, tmp_path, capsys):
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "tok")
    argv = ["prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--quiet",
            "--val-fraction", "0.5", "--data"]
    assert main(argv + [str(corpus / "text")]) == 0
    (tmp_path / "out" / "my-notes.txt").write_text("mine")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    (tmp_path / "blank.txt").write_text("\n\n")
    error = one_line_error(capsys, main(argv + [str(tmp_path / "blank.txt")]))
    assert "no tokens for the train split" in error  # and the folder stays as it was:
    assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")} == before
    (corpus / "text" / "a.txt").unlink()
    assert main(argv + [str(corpus / "text")]) == 0  # its own folder: no --overwrite needed
    assert (tmp_path / "out" / "my-notes.txt").read_text() == "mine"
    assert sum(s["documents"] for s in data.TokenData(str(tmp_path / "out"), "val").meta["splits"].values()) == 23


def test_token_data_names_a_damaged_meta_file(corpus, tmp_path):
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "tok")
    data.prepare([str(corpus / "text")], str(tmp_path / "tok"), str(tmp_path / "out"), 0.2, progress=False)
    meta = tmp_path / "out" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=f"{meta} is corrupted"):
        data.TokenData(str(tmp_path / "out"), "train")


@pytest.mark.parametrize("call, error, message", [
    (lambda tmp: data.text_files([f"{tmp}/missing"]), FileNotFoundError, "paths {tmp}/missing: no such file or folder"),
    (lambda tmp: data.text_files([]), ValueError, "paths: no input given"),
    (lambda tmp: data.prepare([str(tmp)], str(tmp), f"{tmp}/out", val_fraction=1.5), ValueError,
     "val_fraction must be in [0, 1), got 1.5"),
    (lambda tmp: data.TokenData(str(tmp), "train"), FileNotFoundError,
     "data_dir {tmp}: no meta.json, so not a folder of prepared token files"),
    (lambda tmp: data.TokenData(str(tmp), "test"), ValueError, "split must be one of train, val, got 'test'"),
    (lambda tmp: load_tokenizer(f"{tmp}/nowhere"), FileNotFoundError,
     "no tokenizer in tokenizer_dir {tmp}/nowhere: expected {tmp}/nowhere/tokenizer.json"),
    (lambda tmp: train_tokenizer([], "bpe", 100), ValueError, "vocab_size must be at least 257 for kind bpe, got 100"),
    (lambda tmp: train_tokenizer([], "unigram", 100), ValueError,
     "kind must be one of bpe, wordpiece, t5, got 'unigram'"),
], ids=["no such path", "no paths", "val_fraction", "no meta.json", "split", "no tokenizer", "vocab_size", "kind"])
def test_errors_name_the_arguments_as_the_library_calls_them(tmp_path, call, error, message):
    """Not the command line's flags, which it says instead (the tests above)."""
    with pytest.raises(error) as raised:
        call(tmp_path)
    assert str(raised.value) == message.format(tmp=tmp_path)


def test_tasks_name_their_arguments(corpus, tmp_path):
    save_tokenizer(train_tokenizer(DOCUMENTS, "bpe", 300), tmp_path / "tok")
    out = str(tmp_path / "out")
    data.prepare([str(corpus / "text")], str(tmp_path / "tok"), out, 0.2, progress=False)
    tokens = len(data.TokenData(out, "train"))
    for call, message in [
        (lambda: tasks.CausalLMTask(out, context_length=10**5, batch_size=8),
         f"data_dir {out}: the train split has {tokens} tokens, fewer than context_length 100000 + 1"),
        (lambda: tasks.MaskedLMTask(out, seq_length=32, batch_size=8),
         f"data_dir {out} was prepared with a bpe tokenizer; BERT needs a wordpiece one"),
        (lambda: tasks.perplexity(None, np.zeros(16, np.uint16), context_length=8, stride=9),
         "stride must be in [1, context_length 8], got 9"),
    ]:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
