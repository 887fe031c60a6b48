"""Horovod's own PyTorch examples, as released and with the one-line swap, side by side.

    python bench/horovod_examples.py [--cases NAME,...] [--json docs/horovod_examples.json]
    python bench/horovod_examples.py --list

The examples are Horovod 0.28.1's (tag v0.28.1), all its PyTorch ones: examples/pytorch/
pytorch_mnist.py, pytorch_synthetic_benchmark.py, pytorch_imagenet_resnet50.py and
pytorch_lightning_mnist.py, examples/elastic/pytorch/pytorch_mnist_elastic.py,
pytorch_synthetic_benchmark_elastic.py and pytorch_imagenet_resnet50_elastic.py. They are not part
of this project: they are fetched at run time (Horovod's sdist on PyPI does not ship examples/),
in this order, from
  1. $HOROVOD_SRC: a Horovod git clone (the tag is read with ``git show``) or an unpacked v0.28.1
     source tree, for offline machines;
  2. the cache ${HVD_QADAM_CACHE:-~/.cache/hvd_qadam}/horovod-0.28.1-examples/;
  3. GitHub (raw.githubusercontent.com/horovod/horovod/v0.28.1/...),
and every file must match the SHA-256 of the tag pinned below.

Each example then exists twice: as released, and with the one-line swap (``swap()``: the single
``hvd.DistributedOptimizer(`` becomes ``hvd_qadam.DistributedOptimizer(`` and ``import hvd_qadam``
follows ``import horovod.torch as hvd``; nothing else changes, so hvd_qadam runs with its defaults
and Horovod's arguments). Both run under the same launcher, with the same arguments:
``mpirun -np 2``, ``horovodrun --gloo -np 2``, ``horovodrun`` elastic (2 -> 3 -> 2 slots on this
host), and the example's own ``--num-proc`` mode (``horovod.run``). pytorch_lightning_mnist.py
has no line to swap (NOT_SWAPPABLE: pytorch_lightning wraps its optimizer) and runs as released
only, where pytorch-lightning is installed (NOT_INSTALLED says why the project does not install it).

The MNIST examples read MNIST's files with torchvision (``download=True`` downloads only what is
missing). No download happens here: ``write_mnist()`` writes MNIST's idx files into
<data>/MNIST/raw/ from scikit-learn's 1,797 real handwritten digits (8x8, 17 grey levels; each
upscaled to 20x20 and centred in 28x28 as MNIST's digits are), 1,500 for training and 297 for
testing, so the test accuracies mean what MNIST's do (chance: 10 %). The ImageNet examples read
ImageFolder trees: ``write_imagefolder()`` writes 16 training and 8 validation JPEGs in 4 classes,
crops of the two photographs scikit-learn ships; one epoch of ResNet-50 then takes about a minute
on 2 cores.

Where torchvision's C++ ops cannot load (PyPI's wheel under torch's CPU build), every process of
a run gets a sitecustomize that lets torchvision import (see TORCHVISION_SITECUSTOMIZE); the
examples themselves run unchanged, as ``python EXAMPLE``.

Results (test accuracy and loss of the MNIST examples, img/sec of the benchmarks, the ImageNet
examples' losses per epoch and the checkpoints they wrote) are printed as a table and written as
JSON; each run's full output is kept in <work>/logs/ with --work.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # harness/

from harness import launch  # noqa: E402

HOROVOD_TAG = "v0.28.1"
# name -> (path in Horovod's repository, SHA-256 at the tag)
EXAMPLES = {
    "pytorch_mnist.py": ("examples/pytorch/pytorch_mnist.py",
                         "60092fbb844fcdb83cf894f6be6d91caa61a596797b19f143e4b1625bf0f07f8"),
    "pytorch_synthetic_benchmark.py": ("examples/pytorch/pytorch_synthetic_benchmark.py",
                                       "020759fa7293888607afa14c39be08aecac5ee9bd07ac63c4fc497b975d6ae88"),
    "pytorch_mnist_elastic.py": ("examples/elastic/pytorch/pytorch_mnist_elastic.py",
                                 "d4b6247f71bf612cd54d5d2b4d351477b9fc97074c98fbba436dc0cb51d2c92f"),
    "pytorch_synthetic_benchmark_elastic.py": (
        "examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py",
        "cc7f45b58f226e4ff25e9a835e9b900bfe549d0a4e74a67c1e3df847b04d8c4c"),
    "pytorch_imagenet_resnet50.py": ("examples/pytorch/pytorch_imagenet_resnet50.py",
                                     "8bc7443ca79ca0e887c08b95aafb02fa7d44d4fdc37c055cac6d66b694bede82"),
    "pytorch_imagenet_resnet50_elastic.py": (
        "examples/elastic/pytorch/pytorch_imagenet_resnet50_elastic.py",
        "c04ab269f4dd0d687027426adda8372815e36920ace043ebcd11ad4fcff94b57"),
    "pytorch_lightning_mnist.py": ("examples/pytorch/pytorch_lightning_mnist.py",
                                   "671d73eed5095775ee73734fbdb44fdf9822ea690a85554c1599e6a53e364ece"),
}
# Examples the one-line swap does not apply to, and why (tests/test_horovod_examples.py checks the
# evidence): they run as released only.
NOT_SWAPPABLE = {
    "pytorch_lightning_mnist.py":
        "not applicable: the example does not construct hvd.DistributedOptimizer (it passes "
        "Trainer(accelerator='horovod'); pytorch_lightning's Horovod strategy wraps the optimizer "
        "that configure_optimizers returns in hvd.DistributedOptimizer inside pytorch_lightning)",
}
RAW_URL = "https://raw.githubusercontent.com/horovod/horovod/{tag}/{path}"
IMPLS = ("horovod", "hvd_qadam")


def cache_dir() -> str:
    root = os.environ.get("HVD_QADAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hvd_qadam")
    return os.path.join(root, "horovod-0.28.1-examples")


# ----------------------------------------------------------------------------- the examples' files

class ExamplesUnavailable(RuntimeError):
    """Horovod's examples could not be had with the pinned SHA-256 (offline and not cached)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_horovod_src(src: str, path: str) -> bytes | None:
    """The file at the tag from a git clone (bare or not), or from an unpacked source tree."""
    for git in (["git", "--git-dir", src], ["git", "-C", src]):
        try:
            proc = subprocess.run([*git, "show", f"{HOROVOD_TAG}:{path}"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            break
        if proc.returncode == 0:
            return proc.stdout
    tree = os.path.join(src, path)
    if os.path.isfile(tree):
        with open(tree, "rb") as f:
            return f.read()
    return None


def _from_github(path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(RAW_URL.format(tag=HOROVOD_TAG, path=path), timeout=30) as r:
            return r.read()
    except OSError:
        return None


def fetch_examples(names=tuple(EXAMPLES), horovod_src: str | None = None) -> dict:
    """{name: path of the verified file in the cache}; raises ExamplesUnavailable saying what was
    tried when a file cannot be had with its pinned SHA-256."""
    horovod_src = horovod_src if horovod_src is not None else os.environ.get("HOROVOD_SRC")
    cache = cache_dir()
    found = {}
    for name in names:
        path, want = EXAMPLES[name]
        cached = os.path.join(cache, path)
        tried = []
        if os.path.isfile(cached):
            with open(cached, "rb") as f:
                if _sha256(f.read()) == want:
                    found[name] = cached
                    continue
            tried.append(f"cache {cached}: wrong SHA-256")
        sources = ([("HOROVOD_SRC", lambda: _from_horovod_src(horovod_src, path))] if horovod_src else []) + \
                  [("GitHub", lambda: _from_github(path))]
        for label, get in sources:
            data = get()
            if data is None:
                tried.append(f"{label}: not found or unreachable")
                continue
            if _sha256(data) != want:
                tried.append(f"{label}: SHA-256 {_sha256(data)} is not the tag's {want}")
                continue
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(cached + ".part", "wb") as f:
                f.write(data)
            os.replace(cached + ".part", cached)
            found[name] = cached
            break
        else:
            raise ExamplesUnavailable(
                f"Horovod {HOROVOD_TAG}'s {path} (SHA-256 {want}) is not available: " + "; ".join(tried) +
                ". Offline: set HOROVOD_SRC to a Horovod git clone (git clone https://github.com/horovod/horovod)")
    return found


# Packages an example imports that the project does not install, and why not.
NOT_INSTALLED = {
    "pytorch_lightning":
        "pytorch_lightning_mnist.py needs pytorch-lightning 1.6 or older (from 1.7 on, "
        "Trainer(accelerator='horovod') raises 'You selected an invalid accelerator name'); 1.5.9, the "
        "version Horovod 0.28.1 tests with, pins setuptools==59.5.0 while torch 2.13.0 needs "
        "setuptools>=77.0.3 (pip: ResolutionImpossible with torch kept; unconstrained, pip replaces torch "
        "2.13.0+cpu by 2.12.1 and CUDA libraries), and 1.6.5 pins protobuf<=3.20.1 (it would downgrade "
        "protobuf 7.36.2 and tensorboard 2.21.0)",
}


# ----------------------------------------------------------------------------- the one-line swap

class SwapError(ValueError):
    """The example does not have the one line the swap replaces (exactly once)."""


HOROVOD_IMPORT = re.compile(r"^import horovod\.torch as hvd$", re.M)
HOROVOD_OPTIMIZER = re.compile(r"(?<![\w.])hvd\.DistributedOptimizer\(")


def swap(source: str, name: str = "the example") -> str:
    """Horovod's example with ``hvd_qadam.DistributedOptimizer(`` for its one
    ``hvd.DistributedOptimizer(``, and ``import hvd_qadam`` after ``import horovod.torch as hvd``."""
    for pattern, what in ((HOROVOD_IMPORT, "import horovod.torch as hvd"),
                          (HOROVOD_OPTIMIZER, "hvd.DistributedOptimizer(")):
        n = len(pattern.findall(source))
        if n != 1:
            raise SwapError(f"{name}: expected exactly one {what!r}, found {n}")
    source = HOROVOD_IMPORT.sub("import horovod.torch as hvd\nimport hvd_qadam", source)
    return HOROVOD_OPTIMIZER.sub("hvd_qadam.DistributedOptimizer(", source)


def prepare(work: str, files: dict) -> dict:
    """Write each example as released (work/horovod/NAME) and swapped (work/hvd_qadam/NAME).
    Returns {(impl, name): path}."""
    out = {}
    for name, path in files.items():
        with open(path) as f:
            source = f.read()
        versions = [("horovod", source)] + ([] if name in NOT_SWAPPABLE else [("hvd_qadam", swap(source, name))])
        for impl, text in versions:
            dst = os.path.join(work, impl, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "w") as f:
                f.write(text)
            out[impl, name] = dst
    return out


# ----------------------------------------------------------------------------- MNIST's files from real digits

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TEST_DIGITS = 297              # of scikit-learn's 1,797: MNIST's 6:1 split of train and test


def digits_as_mnist(seed: int = 0):
    """{"train": (images uint8 [N, 28, 28], labels uint8 [N]), "test": ...}: scikit-learn's
    handwritten digits (8x8, grey levels 0..16) upscaled bilinearly to 20x20 and centred in a
    28x28 frame with 4 blank pixels around, white on black, as MNIST's digits are."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, 0]
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:TEST_DIGITS], order[TEST_DIGITS:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _idx(array) -> bytes:
    """The idx format MNIST ships: magic (0, 0, type 0x08 = unsigned byte, number of dimensions),
    each dimension as a big-endian int32, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_mnist(root: str) -> dict:
    """Write MNIST's four raw files into root/MNIST/raw/ (where torchvision.datasets.MNIST(root)
    looks before downloading). Returns {"train": n, "test": n}."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    sizes = {}
    for split, (images, labels) in digits_as_mnist().items():
        for name, array in zip(MNIST_FILES[split], (images, labels)):
            tmp = os.path.join(raw, name + ".part")
            with open(tmp, "wb") as f:
                f.write(_idx(array))
            os.replace(tmp, os.path.join(raw, name))
        sizes[split] = len(labels)
    return sizes


# ----------------------------------------------------------------------------- a tiny ImageNet-style ImageFolder

# The ImageNet examples read ImageFolder trees (root/CLASS/IMAGE.jpg). Four classes, one per half of
# each of the two photographs scikit-learn ships (china.jpg, flower.jpg; 427x640 colour JPEGs): the
# fewest images for which one epoch of pytorch_imagenet_resnet50.py on 2 ranks with --batch-size 2
# --batches-per-allreduce 2 takes 2 optimizer steps (16 training images: 2 ranks x 2 x 2 x 2) and
# validates 2 batches of 2 per rank (8 images). ResNet-50 at 224x224 costs about 12 GFLOP per
# training image: this keeps an epoch to tens of seconds on 2 CPU cores.
IMAGENET_CLASSES = {"china_left": ("china.jpg", 0), "china_right": ("china.jpg", 1),
                    "flower_left": ("flower.jpg", 0), "flower_right": ("flower.jpg", 1)}
IMAGENET_SPLITS = {"train": 4, "val": 2}       # images per class
IMAGENET_SIDE = 256                            # the examples crop 224 (train: RandomResizedCrop; val: 256 -> 224)


def write_imagefolder(root: str, seed: int = 0) -> dict:
    """Write root/train/CLASS/*.jpg and root/val/CLASS/*.jpg: square crops (200 to 320 pixels, at
    random places in the class's half of the photograph) resized to 256x256, JPEG quality 90.
    Returns {"train": n, "val": n}."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    by_name = {os.path.basename(f): img for f, img in zip(photos.filenames, photos.images)}
    rng = np.random.default_rng(seed)
    sizes = {}
    for split, per_class in IMAGENET_SPLITS.items():
        for cls, (photo, half) in IMAGENET_CLASSES.items():
            image = by_name[photo]
            h, w = image.shape[:2]
            x0, x1 = (0, w // 2) if half == 0 else (w // 2, w)
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(200, min(h, x1 - x0) + 1))
                top = int(rng.integers(0, h - side + 1))
                left = int(rng.integers(x0, max(x0, x1 - side) + 1))
                crop = Image.fromarray(image[top:top + side, left:left + side])
                crop.resize((IMAGENET_SIDE, IMAGENET_SIDE), Image.BILINEAR).save(
                    os.path.join(folder, f"{cls}_{i}.jpg"), quality=90)
        sizes[split] = per_class * len(IMAGENET_CLASSES)
    return sizes


# ----------------------------------------------------------------------------- torchvision without its C++ ops

def torchvision_importable() -> str | None:
    """None when ``import torchvision`` works in a fresh interpreter, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                          timeout=120, env=launch.job_env())
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["import torchvision failed"])[-1]


# torchvision's wheels on PyPI are linked against torch's CUDA build: under torch's CPU build their
# C++ ops library (nms, roi_align, ...: detection models only) does not load, and ``import
# torchvision`` then stops at registering a fake kernel for ``torchvision::nms``, an operator that
# does not exist. Where that happens, every process of a run gets this sitecustomize (on
# PYTHONPATH): just before torchvision is first imported it declares the two operators torchvision
# registers that way (without kernels: calling them still fails). Datasets, transforms and the
# classification models, all the examples use, are plain PyTorch. A sitecustomize rather than a
# wrapper, because horovod.run (the examples' --num-proc mode) starts its own Python workers.
TORCHVISION_SITECUSTOMIZE = '''"""Declares torchvision's nms/qnms operators before torchvision is imported (its C++ ops
library cannot load under this torch build); written by bench/horovod_examples.py."""
import sys


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            global _LIBRARY
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _LIBRARY.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
'''


def torchvision_site(folder: str) -> str | None:
    """A folder to put first on PYTHONPATH so that torchvision imports (see above), or None where
    it imports as it is."""
    error = torchvision_importable()
    if error is None:
        return None
    if "torchvision::nms" not in error:
        raise RuntimeError(f"import torchvision fails: {error}")
    site = os.path.join(folder, "torchvision_site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(TORCHVISION_SITECUSTOMIZE)
    return site


# ----------------------------------------------------------------------------- the runs

@dataclasses.dataclass(frozen=True)
class Case:
    """One example under one launcher with one set of arguments, run as released and swapped."""
    name: str
    example: str
    launcher: str                  # mpirun | gloo | elastic | horovod.run
    args: tuple = ()
    refused_by_hvd_qadam: str | None = None    # the message hvd_qadam must refuse it with
    resize: tuple = ()             # elastic: hosts to switch to, one per step of the job's progress
    timeout: float = 300
    resumes: str | None = None     # ImageNet: starts in the checkpoint folder that this case wrote
    needs_module: str | None = None  # a package the example imports that the project does not install

    @property
    def mnist(self) -> bool:
        return "mnist" in self.example

    @property
    def imagenet(self) -> bool:
        return "imagenet" in self.example


MNIST_ARGS = ("--epochs", "5", "--batch-size", "16", "--lr", "0.025", "--log-interval", "10")
ELASTIC_MNIST_ARGS = ("--epochs", "8", "--batch-size", "16", "--lr", "0.02", "--log-interval", "5")
BENCH_ARGS = ("--model", "mobilenet_v3_small", "--batch-size", "8", "--num-warmup-batches", "2",
              "--num-batches-per-iter", "3", "--num-iters", "4")
ADASUM_REFUSAL = "op=hvd.Adasum is not supported"

CASES = [
    Case("mnist", "pytorch_mnist.py", "mpirun", MNIST_ARGS),
    Case("mnist-fp16", "pytorch_mnist.py", "mpirun", MNIST_ARGS + ("--fp16-allreduce",)),
    Case("mnist-predivide2", "pytorch_mnist.py", "mpirun", MNIST_ARGS + ("--gradient-predivide-factor", "2")),
    Case("mnist-adasum", "pytorch_mnist.py", "mpirun", MNIST_ARGS + ("--use-adasum",),
         refused_by_hvd_qadam=ADASUM_REFUSAL),
    Case("mnist-num-proc-gloo", "pytorch_mnist.py", "horovod.run",
         MNIST_ARGS + ("--num-proc", "2", "--communication", "gloo")),
    Case("benchmark-gloo", "pytorch_synthetic_benchmark.py", "gloo", BENCH_ARGS),
    Case("benchmark-gloo-fp16", "pytorch_synthetic_benchmark.py", "gloo", BENCH_ARGS + ("--fp16-allreduce",)),
    Case("benchmark-adasum", "pytorch_synthetic_benchmark.py", "mpirun", BENCH_ARGS + ("--use-adasum",),
         refused_by_hvd_qadam=ADASUM_REFUSAL),
    Case("mnist-elastic-2-3-2", "pytorch_mnist_elastic.py", "elastic", ELASTIC_MNIST_ARGS,
         resize=("localhost:3", "localhost:2"), timeout=420),
    Case("benchmark-elastic-2-3", "pytorch_synthetic_benchmark_elastic.py", "elastic",
         BENCH_ARGS + ("--num-iters", "6"), resize=("localhost:3",), timeout=420),
]
# pytorch_imagenet_resnet50.py: 1 epoch of 2 optimizer steps per rank (16 images, --batch-size 2,
# --batches-per-allreduce 2: Horovod's backward_passes_per_step), 2 validation batches of 2 per rank,
# a checkpoint; "-resume" then runs with --epochs 2 in the same checkpoint folder: the example finds
# checkpoint-1, rank 0 loads model and optimizer state, broadcast_parameters and
# broadcast_optimizer_state send them to the other rank, and only epoch 2 runs.
IMAGENET_ARGS = ("--batch-size", "2", "--val-batch-size", "2", "--batches-per-allreduce", "2")
CASES += [
    Case("imagenet-resnet50", "pytorch_imagenet_resnet50.py", "mpirun", IMAGENET_ARGS + ("--epochs", "1"),
         timeout=900),
    Case("imagenet-resnet50-resume", "pytorch_imagenet_resnet50.py", "mpirun", IMAGENET_ARGS + ("--epochs", "2"),
         resumes="imagenet-resnet50", timeout=900),
    Case("imagenet-resnet50-fp16", "pytorch_imagenet_resnet50.py", "mpirun",
         IMAGENET_ARGS + ("--epochs", "1", "--fp16-allreduce"), timeout=900),
    Case("imagenet-resnet50-adasum", "pytorch_imagenet_resnet50.py", "mpirun",
         IMAGENET_ARGS + ("--epochs", "1", "--use-adasum"), refused_by_hvd_qadam=ADASUM_REFUSAL, timeout=900),
    # elastic: commits and host checks every batch; grown to 3 slots once epoch 1's training bar closes
    Case("imagenet-resnet50-elastic-2-3", "pytorch_imagenet_resnet50_elastic.py", "elastic",
         IMAGENET_ARGS + ("--epochs", "2", "--batches-per-commit", "1", "--batches-per-host-check", "1"),
         resize=("localhost:3",), timeout=900),
    Case("lightning-mnist", "pytorch_lightning_mnist.py", "mpirun", ("--epochs", "1", "--batch-size", "16"),
         needs_module="pytorch_lightning"),
]
CASE_BY_NAME = {c.name: c for c in CASES}

TEST_LINE = re.compile(r"Test set: Average loss: ([-+\d.einf]+), Accuracy: ([\d.]+)%")
TRAIN_LINE = re.compile(r"Train Epoch: (\d+) .*Loss: ([-+\d.einfa]+)")
IMG_SEC_LINE = re.compile(r"Img/sec per CPU: ([\d.]+) \+-([\d.]+)")
TOTAL_LINE = re.compile(r"Total img/sec on (\d+) CPU\(s\): ([\d.]+) \+-([\d.]+)")
# the ImageNet examples' tqdm bars (rank 0, stderr) as they close: "Train Epoch     #1: 100%|...| 2/2
# [00:40<00:00, 20.1s/it, loss=7.08, accuracy=0]" (accuracy in %)
EPOCH_BAR = re.compile(r"(Train|Validate) Epoch\s+#(\d+): 100%.*?loss=([-+\d.einfa]+), accuracy=([-+\d.einfa]+)")
# horovodrun prefixes each line with the rank that started the process: [R]<stdout>: (Gloo) or [1,R]<stdout>: (MPI)
RANK_PREFIX = re.compile(r"^\[(?:\d+,)?(\d+)\]<std(?:out|err)>:")


class Runner:
    """Runs cases in a work folder holding the examples (as released and swapped) and MNIST's files."""

    def __init__(self, work: str, files: dict):
        self.work = work
        self.paths = prepare(work, files)
        self.data = os.path.join(work, "data")
        self.mnist_sizes = write_mnist(self.data)
        self.imagenet_sizes = write_imagefolder(os.path.join(self.data, "imagenet"))
        self.site = torchvision_site(work)

    def env(self, extra: dict | None = None) -> dict:
        """The environment of every run (launch.job_env, with the torchvision site where needed)."""
        env = launch.job_env(extra)
        if self.site:
            env["PYTHONPATH"] = os.pathsep.join([self.site, env["PYTHONPATH"]])
        return env

    def checkpoints(self, case: Case, impl: str, root: str | None = None) -> str:
        """The folder of a case's checkpoints (a resuming case: its first run's)."""
        return os.path.join(self.work if root is None else root, "checkpoints", impl, case.resumes or case.name)

    def tensorboard(self, case: Case, impl: str, root: str | None = None) -> str:
        return os.path.join(self.work if root is None else root, "tensorboard", impl, case.name)

    def data_args(self, case: Case, impl: str, root: str | None = None) -> list:
        """The data (and, ImageNet, checkpoint and TensorBoard) arguments, under root (the work folder)."""
        root = self.work if root is None else root
        data = os.path.join(root, "data")
        if case.mnist:
            return ["--data-dir", data]
        if case.imagenet:
            return ["--train-dir", os.path.join(data, "imagenet", "train"),
                    "--val-dir", os.path.join(data, "imagenet", "val"),
                    "--log-dir", self.tensorboard(case, impl, root),
                    "--checkpoint-format", os.path.join(self.checkpoints(case, impl, root), "checkpoint-{epoch}.pth.tar")]
        return []

    def command(self, case: Case, impl: str, hosts: launch.ElasticHosts | None = None) -> list:
        args = list(case.args) + self.data_args(case, impl)
        prog = [sys.executable, self.paths[impl, case.example]] + args
        if case.launcher == "mpirun":
            return launch.mpirun_command(2, *prog)
        if case.launcher == "gloo":
            return launch.horovodrun_gloo_command(2, *prog)
        if case.launcher == "elastic":
            # a rank that joins imports torch, torchvision and Horovod before the rendezvous: on a
            # loaded machine that can take longer than the 10 s a failure test waits for a dead peer
            return hosts.command(2, 2, 3, *prog, gloo_timeout=60)
        if case.launcher == "horovod.run":
            return prog
        raise ValueError(f"unknown launcher {case.launcher!r}")

    def display(self, case: Case, impl: str) -> str:
        """The command as a user types it (no paths of this machine)."""
        lead = {"mpirun": "mpirun -np 2", "gloo": "horovodrun -np 2 --gloo",
                "elastic": "horovodrun -np 2 --min-np 2 --max-np 3 --host-discovery-script ./discover.sh",
                "horovod.run": ""}[case.launcher]
        args = list(case.args) + self.data_args(case, impl, root=".")
        return " ".join(filter(None, [lead, "python", f"{impl}/{case.example}", *args]))

    def missing(self, case: Case) -> str | None:
        """Why the case cannot run here, or None."""
        if case.needs_module and importlib.util.find_spec(case.needs_module) is None:
            return f"{case.example} imports {case.needs_module}, which is not installed: {NOT_INSTALLED[case.needs_module]}"
        if case.launcher == "mpirun":
            return launch.mpirun_missing()
        return launch.horovodrun_gloo_missing()

    def run(self, case: Case, impl: str) -> dict:
        """Run one case with one implementation; returns what it printed, parsed."""
        result = {"case": case.name, "impl": impl, "example": case.example, "launcher": case.launcher,
                  "command": self.display(case, impl)}
        if impl != "horovod" and case.example in NOT_SWAPPABLE:
            return dict(result, outcome="not applicable", reason=NOT_SWAPPABLE[case.example])
        why = self.missing(case)
        if not why and case.resumes:
            first = os.path.join(self.checkpoints(case, impl), "checkpoint-1.pth.tar")
            if not os.path.isfile(first):
                why = f"resumes from the checkpoint that case {case.resumes} writes: run {case.resumes} first"
        if why:
            return dict(result, outcome="skipped", reason=why)
        hosts, on_line, progress = None, None, {"resized": [], "ranks": set()}
        if case.launcher == "elastic":
            hosts = launch.ElasticHosts(self.work, f"{case.name}-{impl}")
            on_line = self._resizer(case, hosts, progress)
        if case.imagenet:       # the example writes its checkpoints into a folder that must exist
            os.makedirs(self.checkpoints(case, impl), exist_ok=True)
        env = self.env({"HVD_QADAM_TIMEOUT": "60", "HVD_QADAM_TIMEOUT_EXIT_GRACE": "2"})
        counter = RankCounter(self.paths[impl, case.example]) if case.launcher == "elastic" else None
        t0 = time.monotonic()
        try:
            proc = launch.run_job(self.command(case, impl, hosts), case.timeout, env=env, cwd=self.work,
                                  on_line=on_line)
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except launch.JobTimeout as e:
            out, rc = str(e), None
        finally:
            if counter:
                result["most_ranks"] = counter.stop()
        result.update(seconds=round(time.monotonic() - t0, 1), rc=rc)
        result.update(parse_output(out))
        if case.launcher == "elastic":
            result.update(resized=progress["resized"], ranks_seen=sorted(progress["ranks"]))
        if case.imagenet:
            folder, logs = self.checkpoints(case, impl), self.tensorboard(case, impl)
            result["checkpoints"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            result["tensorboard_files"] = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
            result["scalars"] = read_scalars(logs)
        if rc == 0:
            result["outcome"] = "ok"
        elif rc is None:
            result["outcome"] = "timeout"
        else:
            refusal = next((line for line in out.splitlines() if "Error: " in line), None)
            result["outcome"] = "error"
            result["error"] = _strip_prefix(refusal) if refusal else f"exit {rc}"
        result["log_tail"] = out[-3000:]
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        with open(os.path.join(self.work, "logs", f"{case.name}-{impl}.log"), "w") as f:
            f.write(out)
        return result

    def run_both(self, case: Case, impls=IMPLS) -> dict:
        """{impl: result}. Cases whose results do not depend on timing (not the benchmarks, not
        the elastic resizes) run their implementations side by side: 2 jobs of 2 ranks."""
        if case.launcher == "elastic" or "benchmark" in case.example or len(impls) == 1:
            return {impl: self.run(case, impl) for impl in impls}
        with concurrent.futures.ThreadPoolExecutor(len(impls)) as pool:
            futures = {impl: pool.submit(self.run, case, impl) for impl in impls}
            return {impl: f.result() for impl, f in futures.items()}

    def _resizer(self, case: Case, hosts: launch.ElasticHosts, progress: dict):
        """Elastic jobs: switch the discovery script to the next hosts of ``case.resize`` once the
        job has trained (a progress line), then once a rank started by the resize has printed."""
        def on_line(line: str) -> None:
            m = RANK_PREFIX.match(line)
            if m:
                progress["ranks"].add(int(m.group(1)))
            step = len(progress["resized"])
            if step >= len(case.resize):
                return
            trained = TRAIN_LINE.search(line) or "Running benchmark" in line or \
                any(m.group(1) == "Train" for m in EPOCH_BAR.finditer(line))
            if (step == 0 and trained) or (step > 0 and m and int(m.group(1)) >= 2 and TRAIN_LINE.search(line)):
                hosts.set(case.resize[step])
                progress["resized"].append(case.resize[step])
        return on_line


class RankCounter:
    """The most processes that ran one example file at once, sampled every half second from /proc
    (Linux): an elastic job's ranks (Python running the file; neither horovodrun, whose arguments
    also name it, nor the shells that start the ranks). The ImageNet examples print from rank 0 only,
    so a rank that joins shows only here."""

    def __init__(self, script: str, interval: float = 0.5):
        self.script, self.most = os.path.abspath(script), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def count(self) -> int:
        n = 0
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and os.path.basename(argv[0]).startswith(b"python") and \
                    argv[1].decode(errors="replace") == self.script:
                n += 1
        return n

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.most = max(self.most, self.count())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.most


def _strip_prefix(line: str) -> str:
    return RANK_PREFIX.sub("", line).strip()


def read_scalars(folder: str) -> dict | None:
    """{tag: [[step, value], ...]} of the TensorBoard events in folder (the ImageNet examples log
    train/loss, train/accuracy, val/loss, val/accuracy once per epoch, step = epoch - 1, from rank 0:
    full precision, where the tqdm bars print 3 digits); None where tensorboard is not installed."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not os.path.isdir(folder):
        return {}
    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def parse_output(out: str) -> dict:
    """The numbers an example printed: MNIST's last test accuracy and loss and its first and last
    training loss; the benchmark's img/sec per CPU and in total (and on how many CPUs)."""
    r = {}
    tests = TEST_LINE.findall(out)
    if tests:
        r["test_loss"], r["accuracy"] = float(tests[-1][0]), float(tests[-1][1])
        r["accuracy_by_epoch"] = [float(a) for _, a in tests]
    train = TRAIN_LINE.findall(out)
    if train:
        r["train_loss_first"], r["train_loss_last"] = float(train[0][1]), float(train[-1][1])
    m = IMG_SEC_LINE.search(out)
    if m:
        r["img_sec_per_cpu"], r["img_sec_conf"] = float(m.group(1)), float(m.group(2))
    m = TOTAL_LINE.search(out)
    if m:
        r["cpus"], r["img_sec_total"] = int(m.group(1)), float(m.group(2))
    epochs = {}
    for line in re.split(r"[\r\n]", out):
        for kind, epoch, loss, acc in EPOCH_BAR.findall(line):
            e = epochs.setdefault(int(epoch), {"epoch": int(epoch)})
            key = {"Train": "train", "Validate": "val"}[kind]
            e[f"{key}_loss"], e[f"{key}_accuracy"] = float(loss), float(acc)
    if epochs:
        r["epochs"] = [epochs[e] for e in sorted(epochs)]
    return r


def run_cases(cases, files: dict, work: str | None = None, impls=IMPLS, log=print) -> list:
    own = work is None
    work = work or tempfile.mkdtemp(prefix="horovod_examples.")
    try:
        runner = Runner(work, files)
        results = []
        for case in cases:
            for impl, r in runner.run_both(case, impls).items():
                log(f"[examples] {case.name:24s} {impl:10s} {r['outcome']:8s} {r.get('seconds', 0):6.1f}s "
                    f"{_summary(r)}", flush=True)
                results.append(r)
        return results
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _summary(r: dict, width: int = 110) -> str:
    if r["outcome"] == "error":
        return r["error"][:width]
    if "accuracy" in r:
        return f"accuracy {r['accuracy']:.2f}%  test loss {r['test_loss']:.4f}"
    if "img_sec_total" in r:
        return f"{r['img_sec_per_cpu']:.1f} img/sec per CPU, {r['img_sec_total']:.1f} on {r['cpus']}"
    if "epochs" in r:
        exact = {(tag, step + 1): value for tag, points in (r.get("scalars") or {}).items() for step, value in points}
        parts = []
        for e in r["epochs"]:
            train, val = (exact.get((f"{k}/loss", e["epoch"]), e.get(f"{k}_loss", float("nan"))) for k in ("train", "val"))
            parts.append(f"epoch {e['epoch']}: train loss {train:.4g}, val loss {val:.4g}")
        if r.get("checkpoints") is not None:
            parts.append("checkpoints " + (", ".join(c.split(".")[0] for c in r["checkpoints"]) or "none"))
        return "; ".join(parts)
    return r.get("reason", "")


def table(results: list) -> str:
    """Markdown: one row per case, Horovod's result and hvd_qadam's side by side."""
    by = {(r["case"], r["impl"]): r for r in results}
    rows = ["| case | launcher | Horovod | hvd_qadam (one-line swap) |", "| --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["case"] for r in results):
        cells = []
        for impl in IMPLS:
            r = by.get((name, impl))
            if r is None:
                cells.append("not run")
                continue
            cell = _summary(r, width=400) if r["outcome"] in ("ok", "error", "skipped", "not applicable") \
                else r["outcome"]
            if r["outcome"] == "skipped":
                cell = f"skipped: {cell}"
            if r["outcome"] == "error":
                cell = f"refused: {cell}" if "not supported" in cell else f"failed: {cell}"
            if r.get("resized"):
                cell += f" (resized to {' then '.join(h.split(':')[1] for h in r['resized'])} slots"
                cell += f"; at most {r['most_ranks']} ranks ran)" if r.get("most_ranks") else ")"
            cells.append(cell)
        first = next(r for r in results if r["case"] == name)
        rows.append(f"| {name} | {first['launcher']} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="all", help="comma-separated case names (--list), or all")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--json", default=None, help="write the results here (e.g. docs/horovod_examples.json)")
    p.add_argument("--work", default=None, help="keep the examples, data and logs in this folder")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:24s} {c.launcher:12s} {c.example} {' '.join(c.args)}")
        return 0
    cases = CASES if args.cases == "all" else [CASE_BY_NAME[n] for n in args.cases.split(",")]
    try:
        files = fetch_examples(sorted({c.example for c in cases}))
    except ExamplesUnavailable as e:
        print(f"[examples] {e}", file=sys.stderr)
        return 2
    if args.work:
        os.makedirs(args.work, exist_ok=True)
    results = run_cases(cases, files, work=args.work, impls=tuple(args.impls.split(",")))
    print()
    print(table(results))
    if args.json:
        import platform
        import torch
        import horovod
        doc = {"horovod_examples": HOROVOD_TAG, "horovod": horovod.__version__, "torch": torch.__version__,
               "machine": f"{os.cpu_count()}-core {platform.machine()}, no GPU",
               "data": "MNIST's files written from scikit-learn's handwritten digits: 1,500 train, 297 test",
               "results": [{k: (sorted(v) if isinstance(v, set) else v) for k, v in r.items() if k != "log_tail"}
                           for r in results]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    bad = [r for r in results if r["outcome"] not in ("ok", "skipped", "not applicable")
           and not (r["impl"] == "hvd_qadam" and CASE_BY_NAME[r["case"]].refused_by_hvd_qadam
                    and CASE_BY_NAME[r["case"]].refused_by_hvd_qadam in r.get("error", ""))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
