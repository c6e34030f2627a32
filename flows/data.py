"""Image datasets: a synthetic generator with object masks, and an ImageFolder reader.

The synthetic set exists so that the default pipeline runs offline in minutes and so that the
explanations can be checked against ground truth: each image holds one class shape on a cluttered,
textured background with small distractors, and its binary mask says where the evidence is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from flows.io import write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SPLITS = ("train", "val", "test")
_SUPERSAMPLE = 3


class DatasetError(ValueError):
    """A dataset folder or file is missing, empty, not an image or corrupt (the path is named)."""


# --------------------------------------------------------------------------- synthetic data


def make_synthetic_dataset(
    out_dir: Path,
    *,
    classes: list[str] | None = None,
    per_class: int = 60,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``images/<class>/*.png``, ``masks/<class>/*.png`` and ``manifest.json`` under out_dir.

    Deterministic given the arguments. If a complete dataset with the same arguments already exists,
    nothing is rewritten (the manifest is written last, so a half-written set is regenerated).
    """
    out_dir = Path(out_dir)
    classes = list(SHAPES if classes is None else classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {list(SHAPES)}, got {classes}")
    if per_class < 1 or size < 8:
        raise ValueError(f"need per_class >= 1 and size >= 8, got {per_class}, {size}")
    config = {"classes": classes, "per_class": per_class, "size": size, "seed": seed, "version": 2}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("config") == config and all(
            (out_dir / item["image"]).is_file() for item in old.get("items", [])
        ):
            return out_dir
        manifest_path.unlink()
    _remove_generated(out_dir)  # stale images of other settings would join the class folders

    items = []
    for label, name in enumerate(classes):
        (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
        (out_dir / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, SHAPES.index(name), i])
            image, mask = _render(name, size, rng)
            rel = f"{name}/{name}_{i:04d}.png"
            image.save(out_dir / "images" / rel)
            mask.save(out_dir / "masks" / rel)
            items.append({"image": f"images/{rel}", "mask": f"masks/{rel}", "label": label})
    manifest = {"config": config, "classes": classes, "items": items}
    write_text(manifest_path, json.dumps(manifest, indent=1))
    return out_dir


def _remove_generated(out_dir: Path) -> None:
    """Delete files this generator names (``<shape>/<shape>_NNNN.png``); leave anything else."""
    for sub in ("images", "masks"):
        for shape in SHAPES:
            for path in (out_dir / sub / shape).glob(f"{shape}_[0-9][0-9][0-9][0-9].png"):
                path.unlink()


def _render(shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One image and its object mask; drawn supersampled then reduced for smooth edges."""
    big = size * _SUPERSAMPLE
    image = _background(big, rng)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # distractors: small lines, dots and arcs
        _draw_distractor(draw, big, rng)
    radius = big * rng.uniform(0.2, 0.3)
    cx, cy = (rng.uniform(radius + 2, big - radius - 2) for _ in range(2))
    mask_big = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask_big), shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    colour = rng.integers(0, 256, 3)
    outline = (0, 0, 0) if colour.mean() > 110 else (255, 255, 255)  # contrasting rim
    image.paste(outline, (0, 0), mask_big)
    inner = mask_big.filter(ImageFilter.MinFilter(2 * (big // 40) + 1))
    image.paste(tuple(int(v) for v in colour), (0, 0), inner)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    mask = mask_big.resize((size, size), Image.Resampling.BILINEAR).point(
        lambda v: 255 * (v >= 128)
    )
    return image, mask


def _background(big: int, rng: np.random.Generator) -> Image.Image:
    """Random stripes plus blobs plus noise: texture a model must learn to ignore."""
    yy, xx = np.mgrid[0:big, 0:big] / big
    base = rng.uniform(0.2, 0.8, 3)
    arr = np.broadcast_to(base, (big, big, 3)).copy()
    for _ in range(2):
        freq = rng.uniform(1.5, 6.0, 2) * 2 * np.pi
        wave = np.sin(freq[0] * xx + freq[1] * yy + rng.uniform(0, 2 * np.pi))
        arr += wave[..., None] * rng.uniform(-0.25, 0.25, 3)
    arr += (
        rng.normal(0, 0.06, (big // _SUPERSAMPLE, big // _SUPERSAMPLE, 3))
        .repeat(_SUPERSAMPLE, 0)
        .repeat(_SUPERSAMPLE, 1)
    )
    image = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    blobs = image.copy()
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(4, 9))):  # soft, half-transparent clutter blobs
        w, h = rng.uniform(0.1, 0.35, 2) * big
        x, y = rng.uniform(-0.1, 1.0, 2) * big
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + w, y + h], fill=fill)
    image = Image.blend(image, blobs, 0.5)
    return image.filter(ImageFilter.GaussianBlur(radius=big * 0.02))


def _draw_distractor(draw: ImageDraw.ImageDraw, big: int, rng: np.random.Generator) -> None:
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    x, y = rng.uniform(0, big, 2)
    kind = rng.integers(0, 3)
    if kind == 0:
        length, angle = rng.uniform(0.1, 0.3) * big, rng.uniform(0, 2 * math.pi)
        end = (x + length * math.cos(angle), y + length * math.sin(angle))
        draw.line([(x, y), end], fill=fill, width=max(1, int(big * 0.02)))
    elif kind == 1:
        r = rng.uniform(0.02, 0.05) * big
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        r = rng.uniform(0.05, 0.12) * big
        start = float(rng.uniform(0, 360))
        draw.arc(
            [x - r, y - r, x + r, y + r],
            start,
            start + 120,
            fill=fill,
            width=max(1, int(big * 0.015)),
        )


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float
) -> None:
    def polygon(radii: Sequence[float], offset: float = 0.0) -> list[tuple[float, float]]:
        n = len(radii)
        return [
            (
                cx + rad * math.cos(angle + offset + 2 * math.pi * k / n),
                cy + rad * math.sin(angle + offset + 2 * math.pi * k / n),
            )
            for k, rad in enumerate(radii)
        ]

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        draw.polygon(polygon([r] * 4, math.pi / 4), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([r] * 3), fill=255)
    elif shape == "star":
        draw.polygon(polygon([r, r * 0.42] * 5), fill=255)
    elif shape == "cross":
        a, w = r, r * 0.33  # arm half-length and half-width, rotated plus sign
        pts = [
            (w, a),
            (w, w),
            (a, w),
            (a, -w),
            (w, -w),
            (w, -a),
            (-w, -a),
            (-w, -w),
            (-a, -w),
            (-a, w),
            (-w, w),
            (-w, a),
        ]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + c * px - s * py, cy + s * px + c * py) for px, py in pts], fill=255)
    else:  # pragma: no cover - guarded by make_synthetic_dataset
        raise ValueError(shape)


# --------------------------------------------------------------------------- reading


def split_of(relative_path: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> str:
    """Split by a hash of the path relative to the image root: stable when files are added."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


class ImageDataset(Dataset):
    """Class-per-folder images (optionally with masks); validated when constructed.

    Layouts: ``root/images/<class>/*`` with optional ``root/masks/<class>/<stem>.png`` (the
    synthetic layout), or a plain ImageFolder ``root/<class>/*`` (CUB-200, ImageNet val sorted by
    class). Items are dicts: image (3,size,size) normalised, label, mask (size,size) in {0,1} or an
    empty tensor, index (position in this dataset), path.
    """

    def __init__(
        self,
        root: Path,
        *,
        size: int,
        split: str | None = None,
        subset: int | None = None,
        classes: list[str] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
        verify: bool = True,
    ) -> None:
        self.root = Path(root)
        self.size = int(size)
        self.split = split
        if split not in (None, "all", *SPLITS):
            raise DatasetError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
        if subset is not None and subset < 1:
            raise DatasetError(f"subset must be >= 1, got {subset}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found")
        if (self.root / "images").is_dir():
            self.image_root = self.root / "images"
            masks = self.root / "masks"
            self.mask_root: Path | None = masks if masks.is_dir() else None
        else:
            self.image_root, self.mask_root = self.root, None
        self.classes = self._find_classes(classes)
        mean, std = normalization
        self.normalization = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self._mean = torch.tensor(self.normalization[0]).view(3, 1, 1)
        self._std = torch.tensor(self.normalization[1]).view(3, 1, 1)

        samples = self._scan(verify)
        if split not in (None, "all"):
            samples = [
                s
                for s in samples
                if split_of(s[2], val_fraction=val_fraction, test_fraction=test_fraction) == split
            ]
        if subset is not None:
            samples = _interleave_by_class(samples)[:subset]
        if not samples:
            raise DatasetError(f"{self.root}: no images in split {split!r}")
        self.samples = samples  # (image path, label, relative path, mask path or None)

    def _find_classes(self, classes: list[str] | None) -> list[str]:
        if classes is None:
            manifest = self.root / "manifest.json"
            if manifest.is_file():
                try:
                    classes = list(json.loads(manifest.read_text())["classes"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise DatasetError(f"{manifest}: unreadable manifest ({exc})") from exc
            else:
                classes = sorted(
                    p.name
                    for p in self.image_root.iterdir()
                    if p.is_dir() and not p.name.startswith(".")
                )
        if not classes:
            raise DatasetError(f"{self.image_root}: no class folders")
        for name in classes:
            if not (self.image_root / name).is_dir():
                raise DatasetError(f"{self.image_root / name}: class folder missing")
        return list(classes)

    def _scan(self, verify: bool) -> list[tuple[Path, int, str, Path | None]]:
        samples = []
        for label, name in enumerate(self.classes):
            folder = self.image_root / name
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            )
            if not files:
                raise DatasetError(f"{folder}: class folder is empty")
            for path in files:
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DatasetError(f"{path}: not an image file (extension {path.suffix!r})")
                if verify:
                    _verify_image(path)
                rel = path.relative_to(self.image_root).as_posix()
                mask = None
                if self.mask_root is not None:
                    candidate = (self.mask_root / rel).with_suffix(".png")
                    mask = candidate if candidate.is_file() else None
                    if mask is not None and verify:
                        _verify_image(mask)
                samples.append((path, label, rel, mask))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label, _, mask_path = self.samples[index]
        image = _load(path, "RGB", self.size, Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - self._mean) / self._std
        if mask_path is not None:
            m = _load(mask_path, "L", self.size, Image.Resampling.NEAREST)
            mask = torch.from_numpy((np.asarray(m) >= 128).astype(np.float32))
        else:
            mask = torch.empty(0)
        return {"image": x, "label": label, "mask": mask, "index": index, "path": str(path)}

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised black and white pixel values per channel, shape (3,): z^B bounds (ZBox)."""
        low, high = (0.0 - self._mean) / self._std, (1.0 - self._mean) / self._std
        return low.flatten(), high.flatten()

    @property
    def labels(self) -> list[int]:
        return [s[1] for s in self.samples]

    @property
    def has_masks(self) -> bool:
        return all(s[3] is not None for s in self.samples)

    def fingerprint(self) -> str:
        """Hash of what this dataset yields (files, labels, size, normalisation): resume guard."""
        h = hashlib.sha256()
        h.update(json.dumps([self.size, self.normalization, self.classes]).encode())
        for path, label, rel, mask in self.samples:
            stat = path.stat()
            h.update(
                f"{rel}|{label}|{stat.st_size}|{stat.st_mtime_ns}|{mask is not None}\n".encode()
            )
        return h.hexdigest()


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; masks are stacked only when every item has one (else a list)."""
    masks = [b["mask"] for b in batch]
    same = all(m.shape == masks[0].shape for m in masks)
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "mask": torch.stack(masks) if same else masks,
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "path": [b["path"] for b in batch],
    }


def _verify_image(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for bad files
        raise DatasetError(
            f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})"
        ) from exc


def _load(path: Path, mode: str, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop a square."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except Exception as exc:
        raise DatasetError(
            f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})"
        ) from exc
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def _interleave_by_class(samples: list) -> list:
    """Round-robin over classes so that any prefix (a subset) covers all classes."""
    rank: dict[int, int] = {}
    keyed = []
    for position, sample in enumerate(samples):
        r = rank.get(sample[1], 0)
        rank[sample[1]] = r + 1
        keyed.append((r, sample[1], position, sample))
    return [k[3] for k in sorted(keyed, key=lambda k: k[:3])]


class NonFiniteInputError(DatasetError):
    """Dataset items whose pixels are NaN/Inf (each item and its file is named)."""
