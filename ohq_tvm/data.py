"""Offline datasets: the bundled Fashion-MNIST test set and crops of photos shipped inside installed packages."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import OhqError

_ASSETS_DIR = Path(__file__).parent / "assets"
# Camera photographs only: scikit-image's synthetic, microscopy and medical images are left out.
_SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                   "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "page.png", "rocket.jpg")
_CROP_SEED = 20240601
_SPLIT_OFFSET = {"calib": 0, "eval": 1}
_CropSpec = tuple[int, tuple[int, int, int, int], bool]  # photo index, (left, top, right, bottom), horizontal flip


def fashion_mnist_test(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First `n` (default all 10,000) Fashion-MNIST test images as float32 [N,1,28,28] in [0,1], int64 labels."""
    with np.load(_ASSETS_DIR / "fmnist_test.npz") as data:
        images, labels = data["x"][:n], data["y"][:n]
    return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)


def _package_dir(package: str) -> Path:
    # find_spec gives the package's __file__ without the cost of importing scikit-learn or scikit-image.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise OhqError(f"photo_crops needs the photos bundled with {package}, which is not installed")
    return Path(spec.origin).parent


def _photo_paths() -> list[Path]:
    skimage_dir = _package_dir("skimage") / "data"
    sklearn_dir = _package_dir("sklearn") / "datasets" / "images"
    matplotlib_dir = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    return ([skimage_dir / name for name in _SKIMAGE_PHOTOS]
            + [sklearn_dir / "china.jpg", sklearn_dir / "flower.jpg", matplotlib_dir / "grace_hopper.jpg"])


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    return tuple(_load_rgb(path) for path in _photo_paths())


def _normalize(image: Image.Image) -> np.ndarray:
    """EfficientNet preprocessing: (x/255 - 0.5)/0.5, HWC uint8 -> CHW float32 in [-1, 1]."""
    return (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def _crop_specs(count: int) -> list[_CropSpec]:
    """The first `count` distinct crops of one fixed random stream."""
    rng = np.random.default_rng(_CROP_SEED)
    specs: dict[_CropSpec, None] = {}  # insertion-ordered set
    while len(specs) < count:
        index = int(rng.integers(len(_photos())))
        width, height = _photos()[index].size
        side = int(rng.uniform(0.3, 1.0) * min(width, height))
        left, top = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
        specs.setdefault((index, (left, top, left + side, top + side), bool(rng.random() < 0.5)))
    return list(specs)


def photo_crops(n: int, split: str = "eval", size: int = 224) -> np.ndarray:
    """`n` deterministic random crops of natural photos, float32 [n,3,size,size], EfficientNet-preprocessed.

    Photos: the camera photographs bundled with scikit-image, scikit-learn and matplotlib (`_photo_paths`), grey
    ones replicated to 3 channels. Each crop is a square of a random 0.3-1.0 of the photo's short side at a random
    position, flipped horizontally with probability 0.5, resized to `size` (PIL bilinear, antialiased), then
    mapped to (x/255 - 0.5)/0.5 in CHW. Crops come from one seeded stream of distinct crops that "calib" and "eval"
    take alternately, so the two splits never share a crop, and `photo_crops(k, split)` is a prefix of
    `photo_crops(n, split)` for k <= n.
    """
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    specs = _crop_specs(2 * n)[_SPLIT_OFFSET[split]::2]
    crops = np.empty((n, 3, size, size), np.float32)
    for i, (index, box, flip) in enumerate(specs):
        crop = _photos()[index].resize((size, size), Image.Resampling.BILINEAR, box=box)
        crops[i] = _normalize(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop)
    return crops


def imagenet_preprocess(img_hwc_uint8: np.ndarray, size: int = 224) -> np.ndarray:
    """Your own image (HWC or HW uint8) -> float32 [3,size,size]: short side to size*256/224, centre crop, normalize."""
    image = Image.fromarray(img_hwc_uint8).convert("RGB")
    short_side = round(size * 256 / 224)
    scale = short_side / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return _normalize(image.crop((left, top, left + size, top + size)))
