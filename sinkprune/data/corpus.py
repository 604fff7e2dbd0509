"""An English prose corpus built offline from freely licensed Debian documentation.

The corpus is what the embedded model is trained, calibrated and evaluated on,
so it must be rebuildable anywhere Debian's archive is reachable and
byte-identical for the same input packages. Each HTML file of a package is one
document; documents are assigned to a split by hashing their id, and no
paragraph appears in two splits.

File format of every split: documents separated by a line holding only
`DOC_SEPARATOR` (with a blank line either side); paragraphs inside a document
separated by one blank line. Code blocks are single paragraphs whose lines are
kept as they are (blank lines removed), so a blank line always ends a paragraph.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import importlib.resources
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

DOC_SEPARATOR = "<|doc|>"
SPLITS = ("train", "calibration", "evaluation")
HELDOUT_SPLITS = ("calibration", "evaluation")
# Candidate pools by hash; the byte cap then sets each held-out split's size.
HELDOUT_FRACTION = {"calibration": 0.03, "evaluation": 0.03}
HELDOUT_CAP_BYTES = 500_000
HELDOUT_MAX_DOC_BYTES = 100_000
# Permissively licensed English documentation (see CORPUS.md for the licences).
DEFAULT_PACKAGES = (
    "cython-doc",
    "postgresql-doc-15",
    "python-django-doc",
    "python-flask-doc",
    "python-sqlalchemy-doc",
    "python3.11-doc",
    "rust-doc",
    "sphinx-doc",
    "sqlite3-doc",
)
DEFAULT_OUT_DIR = Path("runs/corpus")
DEFAULT_CACHE_DIR = Path("runs/cache/debian-docs")
PACKAGE_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUILD_COMMAND = "sinkprune build-corpus"

MIN_PARAGRAPH_CHARS = 25
MIN_DOCUMENT_CHARS = 300
MAX_CODE_LINES = 12
MIN_LETTER_FRACTION = 0.5
MAX_LINK_FRACTION = 0.7

# Pages that are indices, search pages, API references generated from source,
# rendered source code or aggregates of other pages (mdBook's print.html).
EXCLUDED_PATHS = (
    "*/genindex*.html",
    "*/py-modindex.html",
    "*/search.html",
    "*/bookindex.html",
    "*/_modules/*",
    "*/_static/*",
    "*/_sources/*",
    "*/sqlite3/requirements.html",
    "*/sqlite3/doc_*_crossref.html",
    "*/sqlite3/capi3ref.html",
    "*/rust-doc/html/alloc/*",
    "*/rust-doc/html/core/*",
    "*/rust-doc/html/proc_macro/*",
    "*/rust-doc/html/src/*",
    "*/rust-doc/html/std/*",
    "*/rust-doc/html/test/*",
    "*/print.html",
)

_SKIP_TAGS = frozenset({
    "script", "style", "head", "nav", "header", "footer", "aside", "form", "button",
    "svg", "noscript", "select", "iframe", "object", "math", "map",
})
_SKIP_CLASSES = frozenset({
    "sphinxsidebar", "related", "navheader", "navfooter", "footer", "headerlink",
    "mobile-nav", "menu-wrapper", "nosearch", "toc", "breadcrumbs", "searchmenu",
    "inline-search", "nav", "linenos",
})
_SKIP_IDS = frozenset({"hd", "ft", "sidebar", "global-nav"})
_SKIP_ROLES = frozenset({"navigation", "search"})
_VOID_TAGS = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
    "param", "source", "track", "wbr",
})
_BLOCK_TAGS = frozenset({
    "p", "div", "section", "article", "main", "body", "h1", "h2", "h3", "h4", "h5",
    "h6", "li", "ul", "ol", "dl", "dt", "dd", "pre", "blockquote", "table", "tbody",
    "thead", "tr", "td", "th", "caption", "figure", "figcaption", "title", "center",
})


@dataclass
class Block:
    """One block of extracted text, before filtering."""

    text: str
    is_code: bool
    link_chars: int


class _Extractor(HTMLParser):
    """Collects text blocks of an HTML page, skipping navigation and boilerplate."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._parts: list[str] = []
        self._link_chars = 0
        self._in_link = 0
        self._in_pre = 0
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            self._skip_depth += tag == self._skip_tag
        elif tag in _VOID_TAGS:
            if tag == "br":
                self._parts.append("\n")
        elif _is_boilerplate(tag, dict(attrs)):
            self._skip_tag, self._skip_depth = tag, 1
        else:
            if tag in _BLOCK_TAGS:
                self._flush()
            self._in_pre += tag == "pre"
            self._in_link += tag == "a"

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self._in_pre = max(0, self._in_pre - 1)
        if tag == "a":
            self._in_link = max(0, self._in_link - 1)

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._parts.append(data)
            if self._in_link:
                self._link_chars += _visible_chars(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text = "".join(self._parts)
        if text.strip():
            self.blocks.append(Block(text, self._in_pre > 0, self._link_chars))
        self._parts.clear()
        self._link_chars = 0


def _is_boilerplate(tag: str, attrs: dict[str, str | None]) -> bool:
    """Whether an element is navigation, search, sidebar or footer material."""
    classes = set((attrs.get("class") or "").split())
    return (
        tag in _SKIP_TAGS
        or bool(classes & _SKIP_CLASSES)
        or attrs.get("id") in _SKIP_IDS
        or attrs.get("role") in _SKIP_ROLES
    )


def _visible_chars(text: str) -> int:
    return sum(not c.isspace() for c in text)


def html_to_blocks(html: str) -> list[Block]:
    """Raw text blocks of a page, in document order."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    return parser.blocks


def clean_block(block: Block) -> str | None:
    """The paragraph a block becomes, or None when it is too short or not prose."""
    if block.is_code:
        return _clean_code(block.text)
    text = " ".join(block.text.split())
    visible = _visible_chars(text)
    if len(text) < MIN_PARAGRAPH_CHARS or block.link_chars > MAX_LINK_FRACTION * visible:
        return None
    letters = sum(c.isalpha() for c in text)
    return text if letters >= MIN_LETTER_FRACTION * visible else None


def _clean_code(text: str) -> str | None:
    """Short code blocks are kept as they are; long ones would dominate the prose."""
    lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    return "\n".join(lines) if 0 < len(lines) <= MAX_CODE_LINES else None


def html_to_paragraphs(html: str) -> list[str]:
    """Clean paragraphs of a page: boilerplate, short and repeated blocks dropped."""
    cleaned = (clean_block(block) for block in html_to_blocks(html))
    return list(dict.fromkeys(p for p in cleaned if p is not None))


# --- Debian packages -------------------------------------------------------------


@dataclass(frozen=True)
class PackageSource:
    """A downloaded and extracted documentation package."""

    name: str
    version: str
    deb_sha256: str
    root: Path


def fetch_package(name: str, cache_dir: Path) -> PackageSource:
    """Download (once) and extract a package into the cache, never installing it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    deb = _cached_deb(name, cache_dir) or _download_deb(name, cache_dir)
    root = cache_dir / "extracted" / deb.stem
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".complete").touch()
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    return PackageSource(name, version, _sha256_file(deb), root)


def _cached_deb(name: str, cache_dir: Path) -> Path | None:
    """A .deb downloaded before; delete it from the cache to take a newer one."""
    debs = sorted(cache_dir.glob(f"{name}_*.deb"))
    return debs[-1] if debs else None


def _download_deb(name: str, cache_dir: Path) -> Path:
    """`apt-get download`: the archive's current version, fetched without installing."""
    try:
        _run(["apt-get", "download", name], cwd=cache_dir)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise RuntimeError(
            f"could not download Debian package {name!r} (needs apt-get on a Debian "
            f"system; run `apt-get update` first): {detail.strip()}"
        ) from err
    deb = _cached_deb(name, cache_dir)
    if deb is None:
        raise RuntimeError(f"apt-get download {name} left no .deb in {cache_dir}")
    return deb


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_html_files(source: PackageSource) -> list[Path]:
    """The package's documentation pages, sorted, indices and sources excluded."""
    files = []
    for path in sorted((source.root / "usr/share/doc").rglob("*.html")):
        rel = "/" + path.relative_to(source.root).as_posix()
        if not any(fnmatch.fnmatchcase(rel, pattern) for pattern in EXCLUDED_PATHS):
            files.append(path)
    return files


def package_documents(
    source: PackageSource, progress: bool = True
) -> Iterator[tuple[str, list[str]]]:
    """(document id, paragraphs) for every page; the id is package + relative path."""
    files = package_html_files(source)
    for path in tqdm(files, desc=source.name, unit="page", disable=not progress):
        html = path.read_bytes().decode("utf-8", errors="replace")
        yield f"{source.name}/{path.relative_to(source.root).as_posix()}", html_to_paragraphs(html)


# --- Splitting -------------------------------------------------------------------


def split_score(doc_id: str) -> float:
    """A stable number in [0, 1) drawn from the document id."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(doc_id: str) -> str:
    """The split a document belongs to before the held-out size cap applies."""
    score, edge = split_score(doc_id), 0.0
    for name in HELDOUT_SPLITS:
        edge += HELDOUT_FRACTION[name]
        if score < edge:
            return name
    return "train"


def split_documents(
    documents: dict[str, list[str]],
    cap_bytes: int = HELDOUT_CAP_BYTES,
    max_doc_bytes: int = HELDOUT_MAX_DOC_BYTES,
) -> dict[str, list[tuple[str, list[str]]]]:
    """Documents by split, held-out first, with no paragraph in two splits.

    Held-out candidates are taken in order of their hash until a split reaches
    `cap_bytes`; the rest, and pages over `max_doc_bytes` (one page must not
    dominate a held-out split), go to train. Calibration keeps its paragraphs,
    evaluation drops those seen in calibration, train drops those seen in
    either held-out split; every split drops repeats and near-empty documents.
    """
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in SPLITS}
    demoted = []
    for name in HELDOUT_SPLITS:
        candidates = sorted((i for i in documents if assign_split(i) == name), key=split_score)
        size = 0
        for doc_id in candidates:
            paragraphs = _unseen(documents[doc_id], seen)
            text = _document_text(paragraphs)
            nbytes = len(text.encode("utf-8"))
            if size + nbytes > cap_bytes or nbytes > max_doc_bytes:
                demoted.append(doc_id)
            elif len(text) >= MIN_DOCUMENT_CHARS:
                seen.update(paragraphs)
                splits[name].append((doc_id, paragraphs))
                size += nbytes
    train_ids = [i for i in documents if assign_split(i) == "train"] + demoted
    for doc_id in sorted(train_ids):
        paragraphs = _unseen(documents[doc_id], seen)
        if len(_document_text(paragraphs)) >= MIN_DOCUMENT_CHARS:
            seen.update(paragraphs)
            splits["train"].append((doc_id, paragraphs))
    return {name: sorted(docs) for name, docs in splits.items()}


def _unseen(paragraphs: Iterable[str], seen: set[str]) -> list[str]:
    """Paragraphs not in `seen`, each once, in their order."""
    return list(dict.fromkeys(p for p in paragraphs if p not in seen))


def _document_text(paragraphs: Sequence[str]) -> str:
    return "\n\n".join(paragraphs)


# --- Reading and writing splits --------------------------------------------------


def format_documents(documents: Iterable[str]) -> str:
    """The on-disk text of a split (see the module docstring)."""
    return f"\n\n{DOC_SEPARATOR}\n\n".join(documents) + "\n"


def parse_documents(text: str) -> list[str]:
    """Documents of a split file; text without separators is one document."""
    docs = re.split(rf"^{re.escape(DOC_SEPARATOR)}$", text, flags=re.MULTILINE)
    return [doc.strip("\n") for doc in docs if doc.strip()]


def _encode_split(path: Path, documents: Sequence[str]) -> bytes:
    """Plain or gzip text (by `path`'s suffix); gzip without name or time so bytes are reproducible."""
    data = format_documents(documents).encode("utf-8")
    if path.suffix != ".gz":
        return data
    buffer = io.BytesIO()
    with gzip.GzipFile("", "wb", 9, buffer, mtime=0) as out:
        out.write(data)
    return buffer.getvalue()


def _replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, then rename it over `path` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def load_text_files(paths: Iterable[str | Path]) -> list[str]:
    """Documents of local text files (.txt or .txt.gz); separators are honoured."""
    documents: list[str] = []
    for path in paths:
        documents.extend(parse_documents(_read_text(Path(path))))
    return documents


def load_split(name: str, path: str | Path | None = None) -> list[str]:
    """Documents of a split: held-out ones ship with the package, train is built."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
    if path is not None:
        return load_text_files([path])
    if name == "train":
        train = DEFAULT_OUT_DIR / "train.txt"
        if not train.exists():
            raise FileNotFoundError(
                f"{train} not found: build the training corpus with `{BUILD_COMMAND}` "
                "(or pass the path of a train.txt)"
            )
        return load_text_files([train])
    resource = importlib.resources.files("sinkprune.data").joinpath(f"corpus/{name}.txt.gz")
    with importlib.resources.as_file(resource) as file:
        return load_text_files([file])


def load_hf_dataset(name: str, split: str = "test") -> list[str]:
    """Documents of a standard benchmark text set, through `datasets` when available."""
    specs = {
        "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text"),
        "ptb": (("ptb_text_only", "penn_treebank"), "sentence"),
        "c4": (("allenai/c4", "en"), "text"),
    }
    if name not in specs:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(specs)}")
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(
            f"loading {name!r} needs the `datasets` package (pip install datasets) "
            "and network access; the shipped splits need neither (load_split)"
        ) from err
    (path, config), column = specs[name]
    try:
        if name == "c4":
            # C4 is huge: only the first validation shard, as GPTQ/Wanda evaluate it.
            shard = "en/c4-validation.00000-of-00008.json.gz"
            rows = datasets.load_dataset(path, data_files={"validation": shard}, split="validation")
        else:
            rows = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network, hub or cache failures all mean "not available"
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub: {err}") from err
    return [text for text in rows[column] if text.strip()]


# --- Building --------------------------------------------------------------------


def build_corpus(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    progress: bool = True,
    heldout_dir: str | Path | None = PACKAGE_CORPUS_DIR,
    overwrite: bool = False,
) -> dict:
    """Download, extract, clean and split the corpus; returns (and writes) its stats.

    `train.txt` and `stats.json` go to `out_dir`, which appears whole when done and
    must be new or empty unless `overwrite` (`staged_output`); the held-out splits go
    to `heldout_dir` (by default the package data, where they are committed) or to
    `out_dir` when it is None. Held-out files that exist with other bytes are only
    replaced with `overwrite` (checked before any is written; identical ones stay).
    """
    from sinkprune.safe_output import staged_output

    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    heldout_here = [f"{name}.txt.gz" for name in HELDOUT_SPLITS] if heldout_dir is None else []
    writes = ["train.txt", "stats.json", *heldout_here]  # what --overwrite may replace
    with staged_output(out_dir, overwrite, ours=writes) as staging:
        return _build(staging, out_dir, cache_dir, packages, progress,
                      Path(heldout_dir) if heldout_dir is not None else None, overwrite)


def _build(staging: Path, out_dir: Path, cache_dir: Path, packages: Sequence[str], progress: bool,
           heldout_dir: Path | None, overwrite: bool) -> dict:
    documents: dict[str, list[str]] = {}
    package_stats = {}
    for name in sorted(set(packages)):
        source = fetch_package(name, cache_dir)
        found = dict(package_documents(source, progress))
        documents.update(found)
        package_stats[name] = {
            "version": source.version,
            "deb_sha256": source.deb_sha256,
            "pages": len(found),
            "bytes": sum(len(_document_text(p).encode("utf-8")) for p in found.values()),
        }
    splits = split_documents(documents)
    final = {"train": out_dir / "train.txt"} | {
        name: (heldout_dir or out_dir) / f"{name}.txt.gz" for name in HELDOUT_SPLITS
    }
    written = {name: staging / path.name if heldout_dir is None or name == "train" else path
               for name, path in final.items()}
    texts = {name: [_document_text(paragraphs) for _, paragraphs in docs] for name, docs in splits.items()}
    payload = {name: _encode_split(final[name], texts[name]) for name in splits}
    changed = [str(written[name]) for name in splits if written[name].is_file()
               and written[name].read_bytes() != payload[name]]
    if changed and not overwrite:
        from sinkprune.safe_output import OutputError

        raise OutputError(f"{', '.join(changed)} exist with other content; pass --overwrite to replace them")
    stats = {"packages": package_stats, "separator": DOC_SEPARATOR, "splits": {}}
    for name, docs in splits.items():
        _replace_file(written[name], payload[name])
        stats["splits"][name] = _split_stats(docs, texts[name], written[name]) | {"path": str(final[name])}
    (staging / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _split_stats(docs: list[tuple[str, list[str]]], texts: list[str], path: Path) -> dict:
    """Sizes of a split; code blocks are counted when they span several lines."""
    paragraphs = [p for _, ps in docs for p in ps]
    multiline = [p for p in paragraphs if "\n" in p]
    return {
        "path": str(path),
        "documents": len(docs),
        "paragraphs": len(paragraphs),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "file_bytes": path.stat().st_size,
        "multiline_code_bytes": sum(len(p.encode("utf-8")) for p in multiline),
        "document_ids": [doc_id for doc_id, _ in docs],
    }
