"""Collects the `stdlib_docs` examples: docstrings of the standard library by area.

Standard library only, and meant to run in a fresh interpreter (`python -I -S THIS_FILE`
prints the examples as JSON): what a module's objects say about themselves can change once
other packages are imported (some patch standard functions), and the dataset must not
depend on what the calling process happened to import. See `train.data.text`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pkgutil
import sys
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

# Area -> top-level modules and packages it is made of (label = position in this table).
AREAS: dict[str, tuple[str, ...]] = {
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib", "mimetypes", "quopri"),
    "web": ("http", "urllib", "html", "xml", "wsgiref", "xmlrpc", "webbrowser"),
    "concurrency": (
        "asyncio",
        "concurrent",
        "multiprocessing",
        "threading",
        "queue",
        "sched",
        "subprocess",
    ),
    "files": (
        "os",
        "posixpath",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "fnmatch",
        "filecmp",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "zlib",
    ),
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "csv", "json"),
    "testing": (
        "unittest",
        "doctest",
        "pdb",
        "bdb",
        "trace",
        "cProfile",
        "profile",
        "pstats",
        "timeit",
    ),
    "numbers": ("math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"),
    "datatypes": (
        "collections",
        "dataclasses",
        "enum",
        "typing",
        "array",
        "heapq",
        "bisect",
        "copy",
        "weakref",
        "types",
    ),
    "language": (
        "ast",
        "dis",
        "inspect",
        "importlib",
        "tokenize",
        "symtable",
        "compileall",
        "pydoc",
    ),
    "networking": ("socket", "ssl", "select", "selectors", "socketserver", "ftplib", "ipaddress"),
}
CLASS_NAMES: tuple[str, ...] = tuple(AREAS)

MIN_WORDS = 8
MAX_WORDS = 120
_SPLIT_SEED = 20_26
_TEST_PERCENT = 20
_SHINGLE = 4  # words per n-gram when comparing texts
_NEAR = 0.5  # Jaccard overlap of n-gram sets from which two texts are near-duplicates
_COMMON = 100  # n-grams in more chunks than this are not used to find candidates
# ---------------------------------------------------------------------------------------
# Collecting the docstrings.


def _skipped(part: str) -> bool:
    return part in ("__main__", "test", "tests") or part.startswith("test_")


def _modules(top: str) -> Iterator[Any]:
    """`top` and all of its importable submodules, depth first in sorted order."""
    try:
        module = importlib.import_module(top)
    except Exception:  # noqa: BLE001 - a module that cannot be imported here is skipped
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in sorted(pkgutil.iter_modules(path), key=lambda info: info.name):
        if not _skipped(info.name):
            yield from _modules(f"{top}.{info.name}")


def _defined_in(obj: Any, module_name: str) -> bool:
    """Whether `obj` belongs to `module_name` (or its C accelerator, e.g. `_heapq`)."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    if owner == module_name or owner.lstrip("_") == module_name:
        return True
    return module_name == "os" and owner in ("posix", "nt")


def _own_doc(obj: Any) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return " ".join(doc.split()) if isinstance(doc, str) else None


def _docstrings(module: Any) -> Iterator[tuple[str, str | None]]:
    """(qualified name, docstring) of a module and what it defines, in sorted order."""
    name = module.__name__
    yield name, _own_doc(module)
    for key, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_in(obj, name):
            continue
        yield f"{name}.{key}", _own_doc(obj)
        if not inspect.isclass(obj):
            continue
        for member_key, member in sorted(vars(obj).items()):
            if member_key.startswith("__") and member_key not in ("__init__", "__call__"):
                continue
            if isinstance(member, classmethod | staticmethod):
                member = member.__func__
            if inspect.isroutine(member) or isinstance(member, property):
                yield f"{name}.{key}.{member_key}", _own_doc(member)


def _chunks(text: str) -> list[str]:
    words = text.split()
    n = math.ceil(len(words) / MAX_WORDS)
    bounds = [round(i * len(words) / n) for i in range(n + 1)]
    return [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _is_test(qualname: str) -> bool:
    return zlib.crc32(f"{_SPLIT_SEED}:{qualname}".encode()) % 100 < _TEST_PERCENT


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = text.lower().split()
    n = min(_SHINGLE, len(words))
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _near_duplicate_groups(docs: list[list[str]]) -> list[int]:
    """For docs given as their chunks: a group id per doc, where docs with a pair of chunks
    whose word 4-gram sets overlap by at least `_NEAR` (Jaccard) share a group (and so do
    their near-duplicates, transitively): e.g. `json.dump` and `json.dumps`, or a method
    and its override that says the same. A group goes to one split."""
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunks = [(d, _shingles(c)) for d, doc in enumerate(docs) for c in doc]
    postings: dict[tuple[str, ...], list[int]] = {}
    for c, (_, grams) in enumerate(chunks):
        for g in grams:
            postings.setdefault(g, []).append(c)
    for c, (d, grams) in enumerate(chunks):
        candidates = {
            other
            for g in grams
            if len(postings[g]) <= _COMMON  # a stock phrase finds no one's copy
            for other in postings[g]
            if other > c
        }
        for other in candidates:
            theirs = chunks[other][1]
            if len(grams & theirs) >= _NEAR * len(grams | theirs):
                parent[root(chunks[other][0])] = root(d)
    return [root(d) for d in range(len(docs))]


def stdlib_examples() -> dict[str, list[tuple[str, str, int]]]:
    """All examples as {"train"|"test": [(key, text, label), ...]}, deterministically."""
    found: dict[str, tuple[str, set[int]]] = {}  # docstring -> (first qualname, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules (e.g. typing.re) warn on access
        for label, tops in enumerate(AREAS.values()):
            for top in sorted(tops):
                for module in _modules(top):
                    for qualname, doc in _docstrings(module):
                        if doc and len(doc.split()) >= MIN_WORDS:
                            found.setdefault(doc, (qualname, set()))[1].add(label)
    splits: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    kept = [
        (doc, qualname, labels)
        for doc, (qualname, labels) in sorted(found.items(), key=lambda item: item[1][0])
        if len(labels) == 1  # else the same text documents several areas
    ]
    groups = _near_duplicate_groups([_chunks(doc) for doc, _, _ in kept])
    first: dict[int, str] = {}  # group -> the first qualname in it, which decides its split
    for group, (_, qualname, _) in zip(groups, kept, strict=True):
        first.setdefault(group, qualname)
    seen: set[str] = set()
    for group, (doc, qualname, labels) in zip(groups, kept, strict=True):
        split = splits["test" if _is_test(first[group]) else "train"]
        for i, chunk in enumerate(_chunks(doc)):
            if chunk not in seen:
                seen.add(chunk)
                split.append((f"{qualname}#{i}", chunk, next(iter(labels))))
    return splits


if __name__ == "__main__":
    json.dump(stdlib_examples(), sys.stdout)
