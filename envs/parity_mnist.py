"""ParityMNIST (new task) and FashionMNIST (prior task): data and verifier (PROTOCOL.md, "ParityMNIST").

Task: a flattened 28x28 image plus one task indicator (+1 ParityMNIST, -1 FashionMNIST) -> one of 10 labels.
ParityMNIST success: the predicted digit has the parity of the true digit (any even digit for an even image), so
many outputs are correct -- the property that lets RL and SFT reach the same accuracy at different KL.

Files are the original idx files in torchvision's folder layout (``<root>/MNIST/raw/train-images-idx3-ubyte.gz``);
torchvision itself is not needed. They are read, never written: the data root may be read-only.
"""
from __future__ import annotations

import gzip
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

NUM_CLASSES = 10
INPUT_DIM = 28 * 28 + 1
PARITY_INDICATOR, FASHION_INDICATOR = 1.0, -1.0
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MIRRORS = {"MNIST": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "FashionMNIST": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
_IDX_MAGIC = {3: 2051, 1: 2049}  # images, labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable idx file ({error}); delete it and fetch it again") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path} has idx magic {magic}, expected {_IDX_MAGIC[ndim]}: corrupt or not an MNIST file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim                       # 16 for images, 8 for labels
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes of data, header says {dims}: file is truncated")
    return data.reshape(dims)


def _find(root: Path, dataset: str, name: str) -> Path:
    for candidate in (root / dataset / "raw" / f"{name}.gz", root / dataset / "raw" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{dataset} file {name}(.gz) not found under {root / dataset / 'raw'}; point data_root at a folder in "
        f"torchvision's layout, or run with download=true to fetch the files there")


def load_split(root: str | Path, dataset: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``uint8 [N]`` of ``dataset`` ("MNIST" or "FashionMNIST")."""
    if dataset not in _MIRRORS:
        raise ValueError(f"dataset must be one of {sorted(_MIRRORS)}, got {dataset!r}")
    image_name, label_name = _FILES[train]
    images = _read_idx(_find(Path(root), dataset, image_name), 3)
    labels = _read_idx(_find(Path(root), dataset, label_name), 1)
    if len(images) != len(labels):
        raise ValueError(f"{dataset} {'train' if train else 'test'}: {len(images)} images but {len(labels)} labels")
    return images, labels


def download(root: str | Path) -> None:
    """Fetch the eight idx files into ``root`` (only when the user asks: ``download=true``)."""
    for dataset, base_url in _MIRRORS.items():
        folder = Path(root) / dataset / "raw"
        folder.mkdir(parents=True, exist_ok=True)
        for names in _FILES.values():
            for name in names:
                target = folder / f"{name}.gz"
                if not target.exists():
                    log.info("downloading %s", base_url + target.name)
                    partial = target.with_suffix(".part")
                    urllib.request.urlretrieve(base_url + target.name, partial)
                    partial.rename(target)


def task_inputs(images: np.ndarray, indicator: float) -> torch.Tensor:
    """``uint8 [N, 28, 28]`` -> ``float32 [N, 785]``: pixels in [0, 1] then the task indicator."""
    pixels = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return torch.cat([pixels, torch.full((len(images), 1), indicator)], dim=1)


def parity_correct_mask(digits: torch.Tensor) -> torch.Tensor:
    """``[N]`` true digits -> ``[N, 10]`` bool: which labels ParityMNIST counts as correct."""
    labels = torch.arange(NUM_CLASSES, device=digits.device)
    return (labels % 2) == (digits.long() % 2).unsqueeze(-1)


def parity_reward(digits: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """Binary reward: 1 where ``predictions [..., N]`` has the parity of ``digits [N]``."""
    return ((predictions.long() % 2) == (digits.long() % 2)).float()


def random_same_parity_labels(digits: torch.Tensor, choices_by_parity: tuple[tuple[int, ...], tuple[int, ...]],
                              generator: torch.Generator) -> torch.Tensor:
    """For each digit, a label drawn uniformly from ``choices_by_parity[digit % 2]`` -> ``[N]`` long."""
    out = torch.empty(len(digits), dtype=torch.long)
    for parity, choices in enumerate(choices_by_parity):
        rows = (digits.long() % 2) == parity
        options = torch.tensor(choices, dtype=torch.long)
        out[rows] = options[torch.randint(len(options), (int(rows.sum()),), generator=generator)]
    return out


EVEN_DIGITS, ODD_DIGITS = (0, 2, 4, 6, 8), (1, 3, 5, 7, 9)


@dataclass
class ParityMNISTData:
    """Every split the study uses, as tensors. Inputs ``[N, 785]``; ``*_digits`` the true MNIST digits."""
    pretrain_inputs: torch.Tensor
    pretrain_labels: torch.Tensor        # ParityMNIST rows: a random same-parity digit; Fashion rows: true class
    finetune_inputs: torch.Tensor
    finetune_digits: torch.Tensor
    new_eval_inputs: torch.Tensor
    new_eval_digits: torch.Tensor
    prior_eval_inputs: torch.Tensor
    prior_eval_labels: torch.Tensor


def build_parity_mnist(root: str | Path, *, pretrain_per_task: int = 500, finetune_size: int = 3000,
                       eval_size: int = 1000, seed: int = 0) -> ParityMNISTData:
    """Disjoint seeded splits: pretraining (both tasks), fine-tuning (ParityMNIST train) and test-set evaluation."""
    generator = torch.Generator().manual_seed(seed)
    mnist_x, mnist_y = load_split(root, "MNIST", train=True)
    fashion_x, fashion_y = load_split(root, "FashionMNIST", train=True)
    mnist_test_x, mnist_test_y = load_split(root, "MNIST", train=False)
    fashion_test_x, fashion_test_y = load_split(root, "FashionMNIST", train=False)
    if pretrain_per_task + finetune_size > len(mnist_x) or eval_size > len(mnist_test_x):
        raise ValueError(f"pretrain_per_task + finetune_size = {pretrain_per_task + finetune_size} exceeds "
                         f"{len(mnist_x)} MNIST train images, or eval_size {eval_size} > {len(mnist_test_x)}")
    mnist_order = torch.randperm(len(mnist_x), generator=generator).numpy()
    pre_rows, ft_rows = mnist_order[:pretrain_per_task], mnist_order[pretrain_per_task:pretrain_per_task + finetune_size]
    fashion_rows = torch.randperm(len(fashion_x), generator=generator)[:pretrain_per_task].numpy()
    new_eval_rows = torch.randperm(len(mnist_test_x), generator=generator)[:eval_size].numpy()
    prior_eval_rows = torch.randperm(len(fashion_test_x), generator=generator)[:eval_size].numpy()

    pre_digits = torch.from_numpy(mnist_y[pre_rows].astype(np.int64))
    parity_labels = random_same_parity_labels(pre_digits, (EVEN_DIGITS, ODD_DIGITS), generator)
    return ParityMNISTData(
        pretrain_inputs=torch.cat([task_inputs(mnist_x[pre_rows], PARITY_INDICATOR),
                                   task_inputs(fashion_x[fashion_rows], FASHION_INDICATOR)]),
        pretrain_labels=torch.cat([parity_labels, torch.from_numpy(fashion_y[fashion_rows].astype(np.int64))]),
        finetune_inputs=task_inputs(mnist_x[ft_rows], PARITY_INDICATOR),
        finetune_digits=torch.from_numpy(mnist_y[ft_rows].astype(np.int64)),
        new_eval_inputs=task_inputs(mnist_test_x[new_eval_rows], PARITY_INDICATOR),
        new_eval_digits=torch.from_numpy(mnist_test_y[new_eval_rows].astype(np.int64)),
        prior_eval_inputs=task_inputs(fashion_test_x[prior_eval_rows], FASHION_INDICATOR),
        prior_eval_labels=torch.from_numpy(fashion_test_y[prior_eval_rows].astype(np.int64)),
    )
