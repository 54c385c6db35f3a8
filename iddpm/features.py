"""Digit features for **digit-FID** and precision / recall: a small CNN digit classifier shipped with iddpm.

Inception FID needs a 100 MB network, a download and a GPU to be useful; the digits this project trains on
need none of that. Two small classifiers, trained by ``python -m iddpm features train`` on the *training*
splits of the bundled sets and committed under ``iddpm/checkpoints/`` (with their held-out accuracy in a
JSON file beside each), provide the feature space instead:

* ``"digits8"``: input 1x8x8, trained on ``load_dataset("digits8", split="train")``;
* ``"mnist"``: input 1x28x28, trained on ``load_dataset("mnist5k", split="train")``. Other sizes (16x16
  generated digits, say) are area-resized to 28x28; training down-samples half of each batch to 16x16 and
  back, so 16x16 inputs are in distribution.

:func:`digit_features` returns the penultimate layer (``FEATURE_DIM`` values per image), :func:`digit_fid` the
Fréchet distance of those features (:func:`iddpm.metrics.frechet_distance`). It is called digit-FID
everywhere because its values are **not comparable with Inception FID** (nor across the two networks, nor
across sample counts: compare models at equal N). :func:`inception_fid` is the optional Inception FID through
torch-fidelity (GPU + internet; never needed by the tests).

Chapter: results of the experiments (sample quality)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .data import load_dataset, to_model_range
from .metrics import frechet_distance, precision_recall

__all__ = [
    "CHECKPOINT_DIR",
    "DEFAULT_EPOCHS",
    "FEATURE_DIM",
    "KINDS",
    "ClassifierConfig",
    "DigitClassifier",
    "classifier_accuracy",
    "digit_features",
    "digit_fid",
    "digit_precision_recall",
    "inception_fid",
    "infer_kind",
    "load_digit_classifier",
    "prepare_digits",
    "save_digit_classifier",
    "train_digit_classifier",
]

Kind = Literal["digits8", "mnist"]
KINDS: tuple[str, ...] = ("digits8", "mnist")
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
FEATURE_DIM = 128
DEFAULT_EPOCHS = {"digits8": 60, "mnist": 20}
FORMAT = "iddpm-digit-classifier"
_DATASET = {"digits8": "digits8", "mnist": "mnist5k"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown digit classifier kind {kind!r}; choose one of {KINDS}")


def checkpoint_path(kind: Kind, out_dir: str | Path | None = None) -> Path:
    """Where the weights of ``kind`` live: ``<out_dir or CHECKPOINT_DIR>/digit_classifier_<kind>.pt``."""
    _check_kind(kind)
    return Path(CHECKPOINT_DIR if out_dir is None else out_dir) / f"digit_classifier_{kind}.pt"


# --------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of a :class:`DigitClassifier`.

    Attributes:
        kind: ``"digits8"`` or ``"mnist"``.
        image_size: side of the (square, 1-channel) input.
        widths: output channels of the 3x3 conv layers (each followed by GroupNorm and ReLU); a 2x2 max-pool
            follows every layer but the last.
        pool_size: side of the adaptive average pool before the feature layer.
        feature_dim: size of the penultimate (feature) layer.
        num_classes: 10 digits.
    """

    kind: str
    image_size: int
    widths: tuple[int, ...] = (32, 64, 64)
    pool_size: int = 2
    feature_dim: int = FEATURE_DIM
    num_classes: int = 10

    @classmethod
    def for_kind(cls, kind: Kind) -> ClassifierConfig:
        """The shipped architecture: 8 -> 4 -> 2 (digits8) or 28 -> 14 -> 7 -> pooled to 3x3 (mnist)."""
        _check_kind(kind)
        return cls(kind, 8, pool_size=2) if kind == "digits8" else cls(kind, 28, pool_size=3)


class DigitClassifier(nn.Module):
    """conv-GN-ReLU(-maxpool) layers -> adaptive avg-pool -> linear ``feature_dim`` + ReLU -> linear logits.

    Input ``(N, 1, S, S)`` in ``[-1, 1]`` with ``S = cfg.image_size``; :meth:`features` gives the ``(N,
    feature_dim)`` penultimate activations, :meth:`forward` the ``(N, num_classes)`` logits.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        channels = 1
        for i, width in enumerate(cfg.widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
            if i < len(cfg.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool_size))
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(channels * cfg.pool_size**2, cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``(N, 1, S, S)`` in [-1, 1] -> ``(N, feature_dim)`` penultimate features (after the ReLU)."""
        h = rearrange(self.body(x), "n c h w -> n (c h w)")
        return self.feature(h)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 1, S, S)`` in [-1, 1] -> ``(N, num_classes)`` logits."""
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------------- inputs


def infer_kind(image_size: int) -> Kind:
    """The classifier for images of side ``image_size``: 8 -> ``"digits8"``, anything else -> ``"mnist"``."""
    return "digits8" if image_size == 8 else "mnist"


def _resize(x: Tensor, size: int) -> Tensor:
    """Area resize of ``(N, 1, h, h)`` float images to ``(N, 1, size, size)`` (identity when equal)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="area")


def prepare_digits(images: Tensor | np.ndarray, image_size: int | None = None) -> Tensor:
    """Check digit images and convert them to the classifiers' input: float32 ``(N, 1, S, S)`` in ``[-1, 1]``.

    Args:
        images: ``(N, 1, H, W)`` square grayscale images, either ``uint8`` pixels 0..255 or floats in the
            model range ``[-1, 1]`` (what :func:`iddpm.sample` returns; values up to 1e-3 outside are
            clipped). Torch tensors or numpy arrays.
        image_size: side to area-resize to (None: keep the size).

    Returns:
        ``(N, 1, S, S)`` float32 in ``[-1, 1]`` on the input's device.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise ValueError(f"digit images must have shape (N, 1, H, W), got {shape}")
    if shape[1] != 1:
        hint = (
            f"; shape {shape} looks like (N, H, W, C): rearrange it to (N, C, H, W) first"
            if shape[-1] in (1, 3) and shape[1] == shape[2]
            else ""
        )
        raise ValueError(
            f"digit features need 1-channel (grayscale) images (N, 1, H, W), got {shape[1]} channels{hint}"
        )
    if shape[2] != shape[3]:
        raise ValueError(f"digit images must be square, got {shape[2]}x{shape[3]}")
    if shape[0] == 0:
        raise ValueError("no images given (N = 0)")
    if images.dtype == torch.uint8:
        x = to_model_range(images)
    elif images.is_floating_point():
        x = images.to(torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"float images must be in the model range [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "pass 0..255 pixels as uint8 (or convert them with iddpm.data.to_model_range)"
            )
        x = x.clamp(-1, 1)
    else:
        raise TypeError(
            f"images must be uint8 (0..255) or floating point in [-1, 1], got dtype {images.dtype}"
        )
    return x if image_size is None else _resize(x, image_size)


# --------------------------------------------------------------------------------------------------- loading


def _checkpoint_dict(model: DigitClassifier) -> dict[str, Any]:
    """Plain types only, so that ``torch.load(weights_only=True)`` reads it back."""
    cfg = dataclasses.asdict(model.cfg)
    cfg["widths"] = list(cfg["widths"])
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": 1, "config": cfg, "model": state}


def read_digit_classifier(path: str | Path, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load a classifier file written by :func:`save_digit_classifier` (no caching), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no digit classifier at {path}; train one with `python -m iddpm features train --kind all`"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an iddpm digit classifier (format {FORMAT!r})")
    cfg = dict(ckpt["config"])
    cfg["widths"] = tuple(cfg["widths"])
    model = DigitClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False)
    return model.to(device)


@functools.lru_cache(maxsize=8)
def _cached(kind: str, device: str) -> DigitClassifier:
    return read_digit_classifier(checkpoint_path(kind), device)  # type: ignore[arg-type]


def load_digit_classifier(kind: Kind, device: torch.device | str = "cpu") -> DigitClassifier:
    """The committed classifier of ``kind`` (``iddpm/checkpoints/digit_classifier_<kind>.pt``), cached.

    No network access. The returned module is shared between calls (eval mode, no gradients): don't train it.
    Its held-out accuracy and the command that trained it are in the ``.json`` file next to the weights.
    """
    _check_kind(kind)
    return _cached(kind, str(torch.device(device)))


def save_digit_classifier(
    model: DigitClassifier, info: dict[str, Any], out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``digit_classifier_<kind>.pt`` (config + state dict) and ``.json`` (``info``) to ``out_dir``.

    Returns:
        The ``(.pt, .json)`` paths.
    """
    pt = checkpoint_path(model.cfg.kind, out_dir)  # type: ignore[arg-type]
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_checkpoint_dict(model), pt)
    meta = dict(info)
    meta["weights"] = pt.name
    meta["weights_bytes"] = pt.stat().st_size
    js = pt.with_suffix(".json")
    js.write_text(json.dumps(meta, indent=1) + "\n")
    return pt, js


# --------------------------------------------------------------------------------------------------- training


def _augment(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """Random small affine jitter (shift, rotation, scale) and, for ``"mnist"``, a 16x16 round trip.

    ``x``: ``(N, 1, S, S)`` in [-1, 1]; borders are filled with the edge value (the background, -1).
    """
    n, size = x.shape[0], x.shape[-1]
    shift_px, degrees, zoom = (1.0, 8.0, 0.08) if kind == "digits8" else (2.0, 10.0, 0.1)
    u = torch.rand(n, 4, generator=gen) * 2 - 1  # (N, 4) in [-1, 1]
    angle = u[:, 0] * math.radians(degrees)
    scale = 1 + u[:, 1] * zoom
    shift = u[:, 2:] * shift_px * 2 / size  # one pixel is 2/S in affine_grid's [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]  # 2 x (N, 3)
    theta = torch.stack(rows, 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, S, S, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if kind == "mnist":
        small = torch.rand(n, generator=gen) < 0.5
        if small.any():
            x = x.clone()
            x[small] = _resize(_resize(x[small], 16), size)
    return x


@torch.no_grad()
def _logits(model: DigitClassifier, x: Tensor, batch_size: int = 500) -> Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    model.train(was_training)
    return out


def classifier_accuracy(
    model: DigitClassifier, images: Tensor | np.ndarray, labels: Tensor, batch_size: int = 500
) -> float:
    """Share of ``images`` (any size: resized like :func:`digit_features`) whose argmax is ``labels``."""
    x = prepare_digits(images, model.cfg.image_size)
    pred = _logits(model, x.to(next(model.parameters()).device), batch_size).argmax(1).cpu()
    return float((pred == labels.cpu()).double().mean())


def train_digit_classifier(
    kind: Kind,
    *,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    limit: int | None = None,
    log: bool = False,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train the ``kind`` digit classifier on its set's ``"train"`` split and measure the held-out accuracy.

    AdamW with a one-cycle learning rate, cross-entropy with label smoothing 0.05, light augmentation
    (:func:`_augment`). Data order and augmentation draw from a generator seeded with ``seed``; the weight
    initialisation uses torch's global generator seeded with ``seed`` inside ``fork_rng`` (restored after).

    Args:
        kind: ``"digits8"`` or ``"mnist"``.
        epochs: passes over the training split (default :data:`DEFAULT_EPOCHS`).
        seed: seed of the initialisation, data order and augmentation.
        batch_size, lr, weight_decay: optimiser settings.
        limit: train on only this many training images (a seeded random subset; for smoke tests).
        log: print one line per epoch.

    Returns:
        ``(model, info)``: the trained model in eval mode and a dict with ``test_accuracy`` (held-out split,
        native size), for ``"mnist"`` also ``test_accuracy_16`` (the held-out digits area-resized to 16x16 as
        ``load_dataset(..., image_size=16)`` does, then back to 28x28), ``train_accuracy``, the sizes, seed,
        epochs, settings and wall time.
    """
    _check_kind(kind)
    epochs = DEFAULT_EPOCHS[kind] if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < batch_size):
        raise ValueError(f"limit must be None or an int >= batch_size ({batch_size}), got {limit!r}")
    start = time.perf_counter()
    cfg = ClassifierConfig.for_kind(kind)
    train = load_dataset(_DATASET[kind], split="train")  # type: ignore[arg-type]
    test = load_dataset(_DATASET[kind], split="test")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    x, y = to_model_range(train.images), train.labels
    if limit is not None and limit < len(x):
        keep = torch.randperm(len(x), generator=gen)[:limit]
        x, y = x[keep], y[keep]
    n = len(x)
    steps_per_epoch = n // batch_size  # drop the ragged last batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                xb = _augment(x[idx], kind, gen)
                loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            if log:
                acc = classifier_accuracy(model, test.images, test.labels)
                mean = total / steps_per_epoch
                print(f"{kind} epoch {epoch + 1}/{epochs}: loss {mean:.4f}, held-out accuracy {acc:.4f}")
    model.eval().requires_grad_(False)
    info: dict[str, Any] = {
        "kind": kind,
        "dataset": _DATASET[kind],
        "image_size": cfg.image_size,
        "feature_dim": cfg.feature_dim,
        "test_accuracy": classifier_accuracy(model, test.images, test.labels),
    }
    if kind == "mnist":
        small = load_dataset("mnist5k", split="test", image_size=16)
        info["test_accuracy_16"] = classifier_accuracy(model, small.images, small.labels)
    info.update(
        train_accuracy=classifier_accuracy(model, x, y),
        train_size=n,
        test_size=len(test),
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        limit=limit,
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(time.perf_counter() - start, 1),
        torch_version=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return model, info


# --------------------------------------------------------------------------------------------------- metrics


def _model_for(kind: Kind | None, image_size: int, device: torch.device) -> DigitClassifier:
    return load_digit_classifier(infer_kind(image_size) if kind is None else kind, device)


@torch.no_grad()
def digit_features(
    images: Tensor | np.ndarray,
    kind: Kind | None = None,
    batch_size: int = 500,
    model: DigitClassifier | None = None,
) -> Tensor:
    """Penultimate-layer features of the shipped digit classifier (the feature space of digit-FID).

    Args:
        images: ``(N, 1, H, W)`` square grayscale digits, uint8 0..255 or float in ``[-1, 1]`` (tensor or
            numpy array).
        kind: ``"digits8"`` or ``"mnist"``; None picks by size (8 -> digits8, else mnist). Images of another
            size than the network's (8 or 28) are area-resized to it.
        batch_size: images per forward pass.
        model: a classifier to use instead of the committed one (e.g. a freshly trained one).

    Returns:
        ``(N, FEATURE_DIM)`` float32 features on the images' device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if kind is not None:
        _check_kind(kind)
    x = prepare_digits(images)
    if model is None:
        model = _model_for(kind, x.shape[-1], x.device)
    x = _resize(x, model.cfg.image_size)
    was_training = model.training
    model.eval()
    feats = torch.cat([model.features(chunk) for chunk in x.split(batch_size)])
    model.train(was_training)
    return feats


def _pair_kind(real: Any, fake: Any, kind: Kind | None) -> Kind:
    if kind is not None:
        _check_kind(kind)
        return kind
    kinds = {infer_kind(int(np.shape(im)[-1])) for im in (real, fake) if np.ndim(im) == 4}
    if len(kinds) > 1:
        raise ValueError(
            f"real and fake images would use different digit classifiers ({sorted(kinds)}) because one set "
            "is 8x8; give kind='digits8' or kind='mnist' (images are resized to that network's input)"
        )
    return kinds.pop() if kinds else "mnist"


def digit_fid(
    real_images: Tensor | np.ndarray, fake_images: Tensor | np.ndarray, kind: Kind | None = None
) -> float:
    """**digit-FID**: Fréchet distance between Gaussians fitted to :func:`digit_features` of two image sets.

    Not comparable with Inception FID, nor between the two classifiers, nor across sample counts (the
    estimate is biased upwards at small N): compare models at the same N against the same real set.

    Args:
        real_images, fake_images: ``(N, 1, H, W)`` digits (uint8 or float in [-1, 1]); ``N >= 2`` each.
        kind: the classifier; None infers it from the size (both sets must agree).

    Returns:
        digit-FID, a float >= 0.
    """
    kind = _pair_kind(real_images, fake_images, kind)
    return frechet_distance(digit_features(real_images, kind), digit_features(fake_images, kind))


def digit_precision_recall(
    real_images: Tensor | np.ndarray,
    fake_images: Tensor | np.ndarray,
    k: int = 3,
    kind: Kind | None = None,
) -> tuple[float, float]:
    """Improved precision / recall (:func:`iddpm.metrics.precision_recall`) in the digit feature space."""
    kind = _pair_kind(real_images, fake_images, kind)
    return precision_recall(digit_features(real_images, kind), digit_features(fake_images, kind), k=k)


class _Uint8RGB(torch.utils.data.Dataset):
    """What torch-fidelity reads: one ``(3, H, W)`` uint8 tensor per item."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def _to_uint8_rgb(images: Tensor | np.ndarray) -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1).contiguous().cpu()


def inception_fid(
    real_images: Tensor | np.ndarray, fake_images: Tensor | np.ndarray, *, cuda: bool | None = None
) -> float:
    """Inception FID (the literature's metric) through torch-fidelity: optional, needs ``pip install
    torch-fidelity``, internet (the Inception weights are downloaded once) and, in practice, a GPU.

    Args:
        real_images, fake_images: ``(N, 1 or 3, H, W)`` uint8 or float in [-1, 1]; grayscale is repeated to
            RGB, and torch-fidelity resizes to 299x299 itself. Use >= 10k images for numbers comparable with
            papers.
        cuda: run on the GPU (default: when one is available).

    Returns:
        The Fréchet Inception Distance.
    """
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError(
            "inception_fid needs torch-fidelity: `pip install torch-fidelity` (it downloads the Inception "
            "weights on first use, so it also needs internet; a GPU is strongly advised). "
            "digit_fid works offline with the classifier shipped in iddpm."
        ) from e
    cuda = torch.cuda.is_available() if cuda is None else cuda
    result = torch_fidelity.calculate_metrics(
        input1=_Uint8RGB(_to_uint8_rgb(real_images)),
        input2=_Uint8RGB(_to_uint8_rgb(fake_images)),
        cuda=cuda,
        fid=True,
        verbose=False,
    )
    return float(result["frechet_inception_distance"])
