"""English sentences that ship with Python: the docstrings of the standard library.

Calibration and evaluation text for the text encoders of fxq's examples (``fxq.examples.minilm``),
with nothing to download. ``stdlib_sentences(split)`` reads the docstrings of a fixed list of
standard-library modules (the module's own and those of the public functions, classes and methods
it defines), cuts them into sentences and keeps the ones that read as prose:

- 6 to 40 words, starting with a capital letter and ending with ``.``, ``?`` or ``!``;
- mostly letters (no doctest prompts, tables, code or reST markup lines);
- each sentence once (the first occurrence, in module order).

The modules are split in two disjoint halves by their position in ``MODULES`` (every fourth
module is ``"eval"``, the others ``"calib"``), so calibration and evaluation never share a
sentence nor a module. The order is deterministic for a given Python version (the docstrings are
that version's); ``seed`` shuffles it reproducibly.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings

__all__ = ["MODULES", "SPLITS", "stdlib_sentences"]

SPLITS = ("calib", "eval")

# Well-documented, import-safe standard-library modules (no GUI, no side effects on import).
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib",
    "importlib.metadata", "inspect", "io", "ipaddress", "itertools", "json", "linecache", "locale",
    "logging", "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_MARKUP = re.compile(r">>>|\.\.\.|::|``|\|\||=>|->|\*\*|__|\[\d|\{|\}|\\|\$|@|#|~|==|!=|<[a-z]|:[a-z]+:")


def _docstrings(module_name: str) -> list[str]:
    with warnings.catch_warnings():  # deprecated aliases (typing.io ...) warn when their docs are read
        warnings.simplefilter("ignore")
        return _module_docstrings(module_name)


def _module_docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module this Python build lacks (no sqlite3, no ssl ...): skip it
        return []
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    docs.append(inspect.getdoc(member) or "")
    return docs


def _prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _MARKUP.search(sentence):
        return False
    letters = sum(len(w) for w in _WORD.findall(sentence))
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def _sentences(doc: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "-", "*", "+", "|", "=")) for line in lines):
            continue  # indented code, lists, tables, headings: not running prose
        text = " ".join(line.strip() for line in lines)
        out.extend(s.strip() for s in _SENTENCE_END.split(text))
    return [s for s in out if _prose(s)]


@functools.lru_cache(maxsize=4)
def _split_sentences(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    seen: set[str] = set()
    out = []
    for i, name in enumerate(MODULES):
        if (i % 4 == 3) != (split == "eval"):
            continue
        for doc in _docstrings(name):
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def stdlib_sentences(split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` sentences (all when None) of the ``split`` ("calib" or "eval") half of ``MODULES``,
    shuffled with ``seed``. A sentence that also occurs in the other half's modules is dropped
    from ``"eval"``, so the two never share a sentence."""
    sentences = list(_split_sentences(split))
    if split == "eval":
        calib = set(_split_sentences("calib"))
        sentences = [s for s in sentences if s not in calib]
    random.Random(seed).shuffle(sentences)
    if n is not None:
        if n > len(sentences):
            raise ValueError(f"only {len(sentences)} {split} sentences, {n} requested")
        sentences = sentences[:n]
    return sentences
