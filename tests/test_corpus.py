"""The corpus splits, the HTML cleaning, the shipped data and the tokenizer."""
from __future__ import annotations

import argparse
import gzip
import sys

import pytest

from sinkprune.data import corpus, tokenizer

HTML = """<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style>
<script>var x = "<p>not text</p>";</script></head><body>
<nav><a href="/">Home</a> <a href="/next">Next page of the documentation</a></nav>
<div class="sphinxsidebar"><p>Sidebar text that must not appear anywhere.</p></div>
<div class="body" role="main">
<h1>Control flow in the language<a class="headerlink" href="#x">¶</a></h1>
<p>The <code>if</code> statement &amp; its friends are
   explained   here, with <a href="#e">an example</a>.</p>
<div class="highlight"><pre>if x &lt; 0:
    print("negative")

else:
    print("fine")</pre></div>
<pre>""" + "\n".join(f"line{i} = {i}" for i in range(40)) + """</pre>
<ul><li><a href="a.html">A table of contents entry linking away</a></li></ul>
<p>Too short.</p>
<p>A paragraph that is written twice on the same page.</p>
<p>A paragraph that is written twice on the same page.</p>
<p>An unclosed paragraph that still ends at the next block
<p>Another line<br>broken by a br element inside it.
<div role="navigation"><div><p>Nested navigation text to drop.</p></div></div>
</div>
<footer><p>Copyright notice of the footer, dropped.</p></footer>
</body></html>"""


def synthetic_documents(n: int = 3000) -> dict[str, list[str]]:
    """Documents sharing some paragraphs, as documentation pages do."""
    shared = [f"Shared boilerplate paragraph number {k} repeated across pages." for k in range(40)]
    return {
        f"pkg/html/page{i:05d}.html": [
            f"Unique paragraph {j} of document {i}, long enough to be kept." for j in range(8)
        ] + [shared[i % 40], shared[(i * 7) % 40]]
        for i in range(n)
    }


def paragraphs_of(docs: list[tuple[str, list[str]]]) -> set[str]:
    return {p for _, ps in docs for p in ps}


def test_split_is_deterministic_and_disjoint() -> None:
    docs = synthetic_documents()
    first = corpus.split_documents(docs, cap_bytes=20_000)
    assert first == corpus.split_documents(dict(reversed(list(docs.items()))), cap_bytes=20_000)
    ids = {name: {i for i, _ in split} for name, split in first.items()}
    assert ids["calibration"] and ids["evaluation"] and ids["train"]
    assert not ids["train"] & ids["calibration"] and not ids["train"] & ids["evaluation"]
    assert not ids["calibration"] & ids["evaluation"]
    paras = {name: paragraphs_of(split) for name, split in first.items()}
    assert not paras["train"] & paras["calibration"]
    assert not paras["train"] & paras["evaluation"]
    assert not paras["calibration"] & paras["evaluation"]
    for name in corpus.HELDOUT_SPLITS:
        size = sum(len("\n\n".join(ps).encode()) for _, ps in first[name])
        assert 0 < size <= 20_000
        assert all(corpus.assign_split(i) == name for i in ids[name])


def test_split_assignment_is_stable() -> None:
    assert corpus.split_score("pkg/a.html") == corpus.split_score("pkg/a.html")
    names = [corpus.assign_split(f"pkg/{i}.html") for i in range(20_000)]
    share = {name: names.count(name) / len(names) for name in corpus.SPLITS}
    for name in corpus.HELDOUT_SPLITS:
        assert share[name] == pytest.approx(corpus.HELDOUT_FRACTION[name], abs=0.005)


def test_html_to_paragraphs() -> None:
    paragraphs = corpus.html_to_paragraphs(HTML)
    assert paragraphs == [
        "Control flow in the language",
        "The if statement & its friends are explained here, with an example.",
        'if x < 0:\n    print("negative")\nelse:\n    print("fine")',
        "A paragraph that is written twice on the same page.",
        "An unclosed paragraph that still ends at the next block",
        "Another line broken by a br element inside it.",
    ]


def test_documents_round_trip_through_files(tmp_path) -> None:
    docs = ["First document.\n\nSecond paragraph.", "code:\n    indented", "Third."]
    assert corpus.parse_documents(corpus.format_documents(docs)) == docs
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_text(corpus.format_documents(docs))
    packed.write_bytes(gzip.compress(b"A file without separators.\n\nIs one document.\n"))
    assert corpus.load_text_files([plain, packed]) == docs + [
        "A file without separators.\n\nIs one document."
    ]


def test_shipped_heldout_splits_are_disjoint() -> None:
    calibration = corpus.load_split("calibration")
    evaluation = corpus.load_split("evaluation")
    assert len(calibration) > 10 and len(evaluation) > 10
    for docs in (calibration, evaluation):
        assert 200_000 < sum(len(d) for d in docs) < 700_000
    split = lambda docs: {p for d in docs for p in d.split("\n\n")}  # noqa: E731
    assert not split(calibration) & split(evaluation)


def test_load_split_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        corpus.load_split("validation")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="sinkprune build-corpus"):
        corpus.load_split("train")


def test_hf_dataset_without_datasets(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="datasets"):
        corpus.load_hf_dataset("wikitext2")
    with pytest.raises(ValueError):
        corpus.load_hf_dataset("imagenet")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return tokenizer.train_tokenizer(corpus.load_split("calibration"), out, vocab_size=300,
                                     progress=False)


TEXTS = [
    "Hello  world , it's   spaced\toddly .\n\n  And indented:\n    x = {'a': 1}",
    "Ünïcödé text: naïve café, 日本語, emoji 😀, and a NUL-free byte mix ¶.",
    " leading space and trailing newline\n",
]


@pytest.mark.parametrize("path", ["small", "shipped"])
def test_tokenizer_round_trip_and_special_ids(path, small_tokenizer) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = small_tokenizer if path == "small" else tokenizer.PACKAGE_TOKENIZER_DIR
    tok = AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert [tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.pad_token_id] == [
        tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.MASK_ID, tokenizer.PAD_ID
    ]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(tokenizer.SPECIAL_TOKENS.values())
    for text in TEXTS + corpus.load_split("evaluation")[:3]:
        ids = tok(text)["input_ids"]
        assert tokenizer.BOS_ID not in ids and tokenizer.EOS_ID not in ids
        assert tok.decode(ids) == text
    if path == "shipped":
        assert len(tok) == tokenizer.DEFAULT_VOCAB_SIZE


def test_cli_rejects_bad_input(tmp_path) -> None:
    from sinkprune.cli import UsageError
    from sinkprune.commands import corpus as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-tokenizer", "--train", str(tmp_path / "none.txt")])
    with pytest.raises(UsageError, match="build-corpus"):
        args.func(args)
    args = parser.parse_args(["build-corpus", "--packages", "../etc", "--out-dir", str(tmp_path)])
    with pytest.raises(UsageError, match="--packages"):
        args.func(args)


def test_build_corpus_appears_whole_and_replaces_changed_heldout_files_only_with_overwrite(tmp_path, monkeypatch):
    """The Debian download is replaced by fixed documents; everything after it is the real build."""
    import json
    from types import SimpleNamespace

    from sinkprune.safe_output import OutputError

    def documents(flavour: str):
        return {f"pkg/doc{i}.html": [f"Paragraph {j} of page {i} ({flavour}): " + "the function returns a value. " * 12
                                     for j in range(3)] for i in range(400)}

    pages = {"now": documents("first")}
    monkeypatch.setattr(corpus, "fetch_package", lambda name, cache: SimpleNamespace(version="1", deb_sha256="0"))
    monkeypatch.setattr(corpus, "package_documents", lambda source, progress=True: iter(pages["now"].items()))
    heldout = tmp_path / "heldout"
    stats = corpus.build_corpus(tmp_path / "a", tmp_path / "cache", ["pkg"], progress=False, heldout_dir=heldout)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["stats.json", "train.txt"]
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["splits"]["train"]["path"] == str(tmp_path / "a" / "train.txt")
    assert stats["splits"]["calibration"]["documents"] > 0
    first = {name: (heldout / f"{name}.txt.gz").read_bytes() for name in corpus.HELDOUT_SPLITS}

    corpus.build_corpus(tmp_path / "b", tmp_path / "cache", ["pkg"], progress=False, heldout_dir=heldout)  # same bytes
    pages["now"] = documents("second")
    with pytest.raises(OutputError, match=r"calibration\.txt\.gz.*exist with other content; pass --overwrite"):
        corpus.build_corpus(tmp_path / "c", tmp_path / "cache", ["pkg"], progress=False, heldout_dir=heldout)
    assert not (tmp_path / "c").exists()
    assert {name: (heldout / f"{name}.txt.gz").read_bytes() for name in corpus.HELDOUT_SPLITS} == first
    with pytest.raises(OutputError, match="not empty"):
        corpus.build_corpus(tmp_path / "a", tmp_path / "cache", ["pkg"], progress=False, heldout_dir=heldout)
    corpus.build_corpus(tmp_path / "a", tmp_path / "cache", ["pkg"], progress=False, heldout_dir=heldout,
                        overwrite=True)
    assert (heldout / "calibration.txt.gz").read_bytes() != first["calibration"]
    assert "(second)" in (tmp_path / "a" / "train.txt").read_text()
