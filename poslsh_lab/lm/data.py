"""Corpus and tokenizer for the small ALiBi language model.

The default corpus is real text nobody here wrote: the ``.py`` files of the running interpreter's
standard library and installed packages. Files are split into train and held-out sets by a
deterministic hash of their path relative to the root they were found under (the same file lands on
the same side on every machine), after dropping exact duplicates (vendored copies) by content hash,
so no text is ever on both sides.

Tokenizer: bytes 0..255 plus three specials (``BOS``, ``EOS`` between documents, ``PAD``).
"""

from __future__ import annotations

import hashlib
import math
import os
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "Corpus", "build_corpus", "default_roots", "is_heldout", "unigram_baseline",
           "read_text_tokens"]


class ByteTokenizer:
    """Byte-level tokenizer: token = byte value (0..255); 256 = BOS, 257 = EOS, 258 = PAD."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str | bytes, eos: bool = False) -> np.ndarray:
        """Text (UTF-8) -> uint16 tokens [n] (with a trailing EOS if asked)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        out = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        return np.append(out, np.uint16(self.EOS)) if eos else out

    def decode(self, tokens: Iterable[int]) -> str:
        """Tokens -> text; specials become newlines (EOS) or vanish, invalid UTF-8 is replaced."""
        data = bytearray()
        for t in tokens:
            t = int(t)
            if t < 256:
                data.append(t)
            elif t == self.EOS:
                data.extend(b"\n")
        return data.decode("utf-8", errors="replace")


def default_roots() -> list[Path]:
    """The interpreter's standard library and site-packages directories (existing, deduplicated)."""
    paths = sysconfig.get_paths()
    candidates = [paths.get("stdlib"), paths.get("purelib"), paths.get("platlib")]
    try:
        candidates += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    roots: list[Path] = []
    for c in candidates:
        if c and Path(c).is_dir():
            p = Path(c).resolve()
            if p not in roots:
                roots.append(p)
    return roots  # site-packages usually sits inside the stdlib: ``_files`` walks each file once


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little")


def is_heldout(rel_path: str, fraction: float) -> bool:
    """Whether the file at ``rel_path`` (relative to its root, '/'-separated) is held out."""
    return _path_hash(rel_path) / 2**64 < fraction


def _files(roots: Sequence[Path], suffix: str) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every file ending in ``suffix`` under the roots, once each."""
    roots = [Path(r).resolve() for r in roots]
    seen: set[Path] = set()
    found: list[tuple[str, Path]] = []
    for root in roots:
        nested = [r for r in roots if r != root and root in r.parents]
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            dirnames[:] = sorted(x for x in dirnames if (d / x) not in nested and x != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(suffix):
                    continue
                p = d / name
                if p in seen or not p.is_file():
                    continue
                seen.add(p)
                found.append((p.relative_to(root).as_posix(), p))
    return found


@dataclass
class Corpus:
    """Train and held-out token streams (uint16; documents end with EOS) and where they came from."""

    train: np.ndarray
    heldout: np.ndarray
    train_files: list[str] = field(default_factory=list)
    heldout_files: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0

    def stats(self) -> dict:
        return {"train_tokens": int(self.train.size), "heldout_tokens": int(self.heldout.size),
                "train_files": len(self.train_files), "heldout_files": len(self.heldout_files),
                "duplicates_dropped": self.duplicates_dropped}


def build_corpus(roots: Sequence[str | Path] | None = None, max_bytes: int = 64 * 2**20,
                 heldout_fraction: float = 0.05, suffix: str = ".py", max_file_bytes: int = 2**20) -> Corpus:
    """Read text files into train and held-out token streams.

    Args:
        roots: directories to walk (default ``default_roots()``).
        max_bytes: stop once this many bytes were read (train + held-out). Files are visited in the
            order of their path hash, so a cap samples evenly across packages.
        heldout_fraction: expected fraction of files held out (by path hash).
        suffix: file name ending to include.
        max_file_bytes: skip larger files (generated tables, minified data).

    Returns:
        ``Corpus``; with a fixed file set and arguments the result is the same on every run.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    roots = [Path(r) for r in (roots if roots else default_roots())]
    # Visit order: a second hash, independent of the split hash (else a cap would read held-out first).
    files = sorted(_files(roots, suffix), key=lambda f: (_path_hash("order:" + f[0]), f[0]))
    tok = ByteTokenizer()
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    seen: set[bytes] = set()
    total = dup = 0
    for rel, path in files:
        if total >= max_bytes:
            break
        try:
            if path.stat().st_size > max_file_bytes:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if not data or digest in seen:
            dup += bool(data)
            continue
        seen.add(digest)
        side = is_heldout(rel, heldout_fraction)
        parts[side].append(tok.encode(data, eos=True))
        names[side].append(rel)
        total += len(data)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.uint16)  # noqa: E731
    return Corpus(cat(parts[False]), cat(parts[True]), names[False], names[True], dup)


def read_text_tokens(path: str | Path) -> np.ndarray:
    """A text file as byte tokens (uint16 [n])."""
    return ByteTokenizer().encode(Path(path).read_bytes())


def unigram_baseline(train: np.ndarray, heldout: np.ndarray, vocab_size: int = ByteTokenizer.vocab_size) -> dict:
    """Cross-entropy of the held-out tokens under the train token frequencies (add-one smoothed).

    Returns:
        {"nats_per_token", "bits_per_token"}; tokens are bytes (plus one EOS per file), so bits per
        token is the bits-per-byte of the text to within the EOS share.
    """
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    held = np.bincount(heldout.astype(np.int64), minlength=vocab_size).astype(np.float64)
    nats = float(-(held * logp).sum() / max(held.sum(), 1.0))
    return {"nats_per_token": nats, "bits_per_token": nats / math.log(2)}
