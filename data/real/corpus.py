"""A corpus of real English prose from texts that Debian packages ship, split into train / validation / test by
document, for the real-model tasks (pass key, named keys, facts, language-modelling chunks).

    tokensieve data corpus --out data/text            # reads the installed packages
    tokensieve data corpus --out DIR --root UNPACKED  # or .deb files unpacked with `dpkg-deb -x PKG.deb UNPACKED`

The corpus that ships with tokensieve (data/text/corpus.jsonl) was written by the first command; every document
carries its source, package and licence. Text is reduced to plain paragraphs: headings, code, tables, lists and
markup are dropped, so what remains reads as prose.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokensieve.errors import DataError
from tokensieve.files import replace_atomically

CORPUS_FILE = "corpus.jsonl"
SHIPPED_CORPUS = Path(__file__).resolve().parent.parent / "text" / CORPUS_FILE
SPLIT_SHARES = {"test": 0.12, "validation": 0.08}  # of the characters; the rest is train
MIN_PARAGRAPH_CHARS = 60


@dataclass(frozen=True)
class Source:
    """One package's texts: where they lie under the root, under which licence, and how to read them."""

    name: str
    package: str
    licence: str
    folder: str
    patterns: tuple[str, ...]
    read: Callable[[str], list[str]]  # file text -> paragraphs
    exclude: tuple[str, ...] = ()
    # file path (relative to `folder`) -> the group it splits with: texts that share paragraphs (versions of one
    # licence family) must land in one split, or a test document's text would be in training too.
    group: Callable[[str], str] = staticmethod(lambda relative: relative)


# --- reading -------------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":[a-zA-Z:+-]+:`(?:~?)([^`<]*?)(?:\s*<[^`>]*>)?`")  # :func:`name` / :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")  # `text <url>`_
_REF = re.compile(r"`([^`]+)`_{1,2}")  # `text`_
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def _unwrap(block: str) -> str:
    return " ".join(line.strip() for line in block.splitlines()).strip()


def _prose(paragraph: str) -> bool:
    """Plain prose: long enough, mostly letters, a sentence that ends."""
    if len(paragraph) < MIN_PARAGRAPH_CHARS or not paragraph[0].isalpha() and paragraph[0] not in "\"'(":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    # A paragraph ending in ":" introduces code or a list that was dropped: it would dangle.
    return letters >= 0.85 * len(paragraph) and paragraph.rstrip()[-1] in ".!?\")"


def read_rst(text: str) -> list[str]:
    """Paragraphs of a reStructuredText file with markup removed; indented blocks (code, directive bodies),
    headings, lists, tables and comments dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0][:1].isspace() or lines[0].startswith((".. ", "..\n", ">>>", "|", "+", "*", "-", "#.")):
            continue
        if any(_UNDERLINE.match(line) for line in lines) or re.match(r"^(\d+\.|:\w+:)", lines[0]):
            continue
        paragraph = _unwrap(block)
        for pattern in (_ROLE, _LINK, _REF, _LITERAL, _EMPHASIS):
            paragraph = pattern.sub(lambda m: m.group(1).split(".")[-1] if pattern is _ROLE and "~" in m.group(0)
                                    else m.group(1), paragraph)
        paragraph = re.sub(r"\\ ?", "", paragraph).replace("::", ":")
        paragraph = re.sub(r"\s+", " ", paragraph).strip()
        if _prose(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def read_plain(text: str) -> list[str]:
    """Paragraphs of a plain-text file (blank-line separated, lines joined)."""
    paragraphs = [re.sub(r"\s+", " ", _unwrap(block)) for block in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if _prose(p)]


SOURCES = (
    Source("python-docs", "python3.11-doc", "PSF-2.0", "usr/share/doc/python3.11/html/_sources",
           ("tutorial/*.rst.txt", "howto/*.rst.txt", "faq/*.rst.txt", "whatsnew/*.rst.txt"), read_rst,
           exclude=("whatsnew/changelog.rst.txt", "whatsnew/index.rst.txt", "tutorial/index.rst.txt",
                    "howto/index.rst.txt", "faq/index.rst.txt")),
    Source("licence-texts", "base-files", "verbatim copying permitted (each licence's own terms)",
           "usr/share/common-licenses", ("*",), read_plain,
           group=lambda name: "GNU" if re.match(r"(L?GPL|GFDL)", name) else re.sub(r"-[\d.]+$", "", name)),
)


# --- building ------------------------------------------------------------------------------------------------------

def _package_version(package: str, root: Path) -> str:
    if root != Path("/"):
        return "unpacked"
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                                check=False)
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def read_documents(root: str | Path = "/", sources=SOURCES) -> list[dict]:
    """Every document of every source under `root`, as {id, source, package, licence, title, text}."""
    root = Path(root)
    documents = []
    for source in sources:
        folder = root / source.folder
        files = sorted({path for pattern in source.patterns for path in folder.glob(pattern)
                        if path.is_file() and not path.is_symlink()
                        and path.relative_to(folder).as_posix() not in source.exclude})
        if not files:
            raise DataError(
                f"source {source.name!r}: no files under {folder}; install the package ({'apt-get install ' + source.package}) "
                f"or unpack it (apt-get download {source.package} && dpkg-deb -x {source.package}_*.deb DIR) and "
                "pass --root DIR")
        version = _package_version(source.package, root)
        for path in files:
            raw = path.read_bytes()
            text = gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8", "replace")
            paragraphs = source.read(text)
            if not paragraphs:
                continue
            relative = path.relative_to(folder).as_posix()
            documents.append({"id": f"{source.name}/{relative}", "group": f"{source.name}/{source.group(relative)}",
                              "source": source.name, "package": source.package,
                              "package_version": version, "licence": source.licence, "title": relative,
                              "text": "\n\n".join(paragraphs)})
    return documents


def assign_splits(documents: list[dict], shares: dict[str, float] = SPLIT_SHARES) -> list[dict]:
    """Set each document's `split`: groups of documents (`group`, default the id) in the order of a hash of their name
    fill test, then validation, each up to its share of all characters; the rest is train. Whole groups only, so no
    text is in two splits."""
    total = sum(len(d["text"]) for d in documents)
    groups: dict[str, list[dict]] = {}
    for document in documents:
        groups.setdefault(document.get("group", document["id"]), []).append(document)
    filled = dict.fromkeys(shares, 0)
    for name in sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest()):
        split = next((s for s, share in shares.items() if filled[s] < share * total), "train")
        if split != "train":
            filled[split] += sum(len(d["text"]) for d in groups[name])
        for document in groups[name]:
            document["split"] = split
    # Paragraphs repeated across groups (release notes' boilerplate, a licence quoted in another) stay in train only.
    seen = {p for d in documents if d["split"] == "train" for p in d["text"].split("\n\n")}
    for split in shares:
        for document in (d for d in documents if d["split"] == split):
            document["text"] = "\n\n".join(p for p in document["text"].split("\n\n") if p not in seen)
        seen |= {p for d in documents if d["split"] == split for p in d["text"].split("\n\n")}
    return sorted((d for d in documents if d["text"]), key=lambda d: d["id"])


def build_corpus(out_dir: str | Path, root: str | Path = "/", sources=SOURCES) -> dict:
    """Write `<out_dir>/corpus.jsonl` (one document a line) and `<out_dir>/meta.json` (sources, licences, counts)."""
    documents = assign_splits(read_documents(root, sources))
    out_dir = Path(out_dir)
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
    replace_atomically(out_dir / CORPUS_FILE, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    counts = {}
    for d in documents:
        entry = counts.setdefault(d["split"], {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(d["text"])
    meta = {
        "command": f"tokensieve data corpus --out {out_dir.as_posix()}" + ("" if str(root) == "/" else f" --root {root}"),
        "sources": [{"name": s.name, "package": s.package, "licence": s.licence,
                     "version": next((d["package_version"] for d in documents if d["source"] == s.name), None),
                     "documents": sum(d["source"] == s.name for d in documents)} for s in sources],
        "splits": counts,
    }
    replace_atomically(out_dir / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def load_corpus(path: str | Path | None = None, split: str | None = None) -> list[dict]:
    """The documents of a corpus file (default: the shipped one), optionally of one split."""
    path = Path(path) if path else SHIPPED_CORPUS
    if path.is_dir():
        path = path / CORPUS_FILE
    if not path.is_file():
        raise DataError(f"corpus file not found: {path} (write one with `tokensieve data corpus --out DIR`)")
    documents = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split is not None:
        documents = [d for d in documents if d["split"] == split]
        if not documents:
            raise DataError(f"corpus {path}: no documents in split {split!r}")
    return documents
