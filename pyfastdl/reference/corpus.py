"""An offline text corpus for the notes' character language model, and the notes' text helpers
(d2l style, section 53 "语言模型" and the book's 8.2 "文本预处理"), runnable without the d2l package
and without a download.

The notes train on H. G. Wells' "The Time Machine", downloaded by ``d2l.read_time_machine``. In its
place this module reads the docstrings of a fixed list of Python standard-library modules (the
module docstring, then its public classes and functions in name order, then each class's public
methods in name order) and preprocesses them as the notes preprocess the book: every run of
non-letters becomes one space, lines are stripped and lower-cased, empty lines dropped. The
character vocabulary is then ``<unk>``, the space and the 26 letters (28 tokens).

The text depends only on the Python version (the same on every machine with the same Python); it
is empty under ``python -OO`` (docstrings stripped), where ``read_corpus`` raises.
"""
import collections
import functools
import importlib
import inspect
import re
import warnings

__all__ = ["CORPUS_MODULES", "read_corpus", "tokenize", "count_corpus", "Vocab", "load_corpus"]

# Pure-Python standard-library modules with long, stable, English docstrings.
CORPUS_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "enum", "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib",
    "pickle", "pprint", "random", "shutil", "statistics", "string", "tempfile", "textwrap",
    "threading", "typing", "zipfile",
)


def _docstrings(module):
    """The docstrings of a module, its public members defined there, and their public methods."""
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if not mname.startswith("_") and inspect.isfunction(member):
                    docs.append(inspect.getdoc(member))
    return [d for d in docs if d]


@functools.lru_cache(maxsize=None)
def _raw_lines():
    lines = []
    with warnings.catch_warnings():   # typing's deprecated aliases warn when their docs are read
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            for doc in _docstrings(importlib.import_module(name)):
                lines.extend(doc.splitlines())
    return tuple(lines)


def read_corpus():
    """The corpus as a list of text lines, preprocessed as the notes' read_time_machine: letters
    only, lower case (``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``), empty lines dropped."""
    lines = [re.sub('[^A-Za-z]+', ' ', line).strip().lower() for line in _raw_lines()]
    lines = [line for line in lines if line]
    if not lines:
        raise RuntimeError("read_corpus: the standard library has no docstrings here (python -OO?); "
                           "the offline corpus is built from them")
    return lines


def tokenize(lines, token='word'):
    """Split text lines into word or character tokens: a list (one per line) of token lists."""
    if token == 'word':
        return [line.split() for line in lines]
    elif token == 'char':
        return [list(line) for line in lines]
    raise ValueError(f"tokenize: unknown token type {token!r} (expected 'word' or 'char')")


def count_corpus(tokens):
    """Token frequencies; tokens: a 1-D or 2-D (list of lists) token list."""
    if len(tokens) == 0 or isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """The notes' vocabulary: index 0 is ``<unk>``, then the reserved tokens, then the tokens of
    frequency >= min_freq, most frequent first (ties in first-seen order)."""

    def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
        if tokens is None:
            tokens = []
        if reserved_tokens is None:
            reserved_tokens = []
        counter = count_corpus(tokens)
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ['<unk>'] + reserved_tokens
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(token) for token in tokens]

    def to_tokens(self, indices):
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[index] for index in indices]

    @property
    def unk(self):
        return 0

    @property
    def token_freqs(self):
        return self._token_freqs


def load_corpus(max_tokens=-1):
    """The notes' load_corpus_time_machine on the offline corpus: (corpus, vocab), corpus the list
    of character indices of all lines concatenated (no separator, as the notes), truncated to
    max_tokens when max_tokens > 0."""
    lines = read_corpus()
    tokens = tokenize(lines, 'char')
    vocab = Vocab(tokens)
    corpus = [vocab[token] for line in tokens for token in line]
    if max_tokens > 0:
        corpus = corpus[:max_tokens]
    return corpus, vocab
