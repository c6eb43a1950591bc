"""Resize + centre crop of an opened image in the displayed orientation, as `decode.load_image` applies it.

Geometry is torchvision's `ImageClassification` preset on a PIL image, `F.center_crop(F.resize(img, resize, interp),
crop)`: shorter side to `resize`, longer side `int(resize * long / short)`, centre crop, zero padding if needed.
- "exact": plain Pillow, bit-identical to that sequence on the RGB image `featshard.extract.colour` makes. Beyond
  `_EXACT_MAX_AREA` (aspect over 256:1, e.g. 1x5000, where torchvision would allocate gigabytes) only the crop is
  resampled via `resize(box=...)`; Pillow takes the box as float32, so those few may differ by a level or two.
- "fast" (and "gpu", whose device path lives elsewhere): JPEG uses `Image.draft` with the largest DCT scale whose
  output is still >= `_DRAFT_MARGIN` x the resize target (never upscaled relative to exact; the last step stays a real
  antialiased downscale), and the crop is folded into `resize(size, box=...)` so only the crop is resampled. On real
  photos (JPEG q90, resize 256/crop 224) the mean |fast - exact| is ~0.35/255, mean cosine of the tensors ~0.9999.
- Orientation: EXIF orientation is applied (as `ImageOps.exif_transpose`) before resizing; draft's target is computed
  in the displayed orientation and swapped back for the 90-degree ones.
"""
from __future__ import annotations

import logging
import math

from PIL import Image

from featshard.extract.colour import to_rgb_or_l
from featshard.extract.preprocess import Preprocess

logger = logging.getLogger("featshard.extract.resizecrop")

_R, _T = Image.Resampling, Image.Transpose
_RESAMPLE = {"nearest": _R.NEAREST, "nearest-exact": _R.NEAREST, "bilinear": _R.BILINEAR, "bicubic": _R.BICUBIC,
             "box": _R.BOX, "hamming": _R.HAMMING, "lanczos": _R.LANCZOS}
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
              7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # EXIF orientation -> what ImageOps.exif_transpose does
_SWAPS_AXES = (5, 6, 7, 8)
_EXACT_MAX_AREA = 256  # exact mode materialises the resized image up to 256 * resize**2 pixels (64 MiB at 256)
_DRAFT_MARGIN = 1.25  # fast: the drafted JPEG is >= 1.25x the resize target, so the last step is a real downscale
_REDUCING_GAP = 3.0  # fast: Pillow's reduce() first for large downscales (non-JPEG); indistinguishable at 3.0
_ORIENTATION_TAG = 0x0112
_DRAFTABLE = ("JPEG", "MPO")  # formats with Image.draft; their getexif() reads the header without decoding


def resize_crop(im: Image.Image, prep: Preprocess) -> Image.Image:
    """Orientation, draft (fast), colour, then resize + centre crop in the displayed orientation."""
    if im.format not in _DRAFTABLE:
        im.load()  # first: a decode error must surface here, not inside getexif() (PNG loads there), which is lenient
    orientation = _orientation(im)
    width, height = im.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    target = _resized_size(width, height, prep.resize)
    fast = prep.decode != "exact"
    scale = _draft(im, target, orientation) if fast else 1.0
    img = to_rgb_or_l(im)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    resample = _RESAMPLE[prep.interpolation]
    if fast:
        return _resize_crop_box(img, (width, height), target, prep.crop, resample, scale, _REDUCING_GAP)
    if target[0] * target[1] > _EXACT_MAX_AREA * prep.resize**2:
        return _resize_crop_box(img, (width, height), target, prep.crop, resample, 1.0, None)
    return _center_crop(img if img.size == target else img.resize(target, resample), prep.crop)  # torchvision


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as e:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
        logger.debug("unreadable EXIF ignored: %s", e)
        return 1
    return value if isinstance(value, int) else 1


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `_compute_resized_output_size` for a single int: (new_width, new_height)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _draft(im: Image.Image, target: tuple[int, int], orientation: int) -> float:
    """JPEG DCT-domain downscale to >= _DRAFT_MARGIN x `target` (displayed orientation); returns the scale used."""
    if im.format not in _DRAFTABLE:
        return 1.0
    tw, th = (target[1], target[0]) if orientation in _SWAPS_AXES else target
    tw, th = math.ceil(tw * _DRAFT_MARGIN), math.ceil(th * _DRAFT_MARGIN)
    if im.size[0] // tw < 2 or im.size[1] // th < 2:
        return 1.0
    if im.draft("RGB", (tw, th)) is None:
        return 1.0
    return float(im.decoderconfig[0])  # type: ignore[attr-defined]  # JpegImageFile: the DCT scale draft chose


def _center_crop(img: Image.Image, crop: int) -> Image.Image:
    """torchvision's center_crop on a PIL image, zero padding included."""
    width, height = img.size
    if crop > width or crop > height:
        padded = Image.new(img.mode, (max(width, crop), max(height, crop)), 0)
        padded.paste(img, ((crop - width) // 2 if crop > width else 0, (crop - height) // 2 if crop > height else 0))
        img = padded
        width, height = img.size
        if (width, height) == (crop, crop):
            return img
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def _resize_crop_box(img: Image.Image, full: tuple[int, int], target: tuple[int, int], crop: int, resample: int,
                     scale: float, gap: float | None) -> Image.Image:
    """Resample only the centre crop: the crop box of the resized image mapped back to (drafted) source pixels.

    `full` is the undrafted size in displayed orientation; the drafted image covers it at 1/scale (Pillow's draft box).
    """
    (width, height), (new_w, new_h) = full, target
    if crop > new_w or crop > new_h:  # only when resize < crop: the padding path
        return _center_crop(img.resize(target, resample), crop)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    if scale == 1.0 and img.size == target:
        return img.crop((left, top, left + crop, top + crop))
    box = (left * width / new_w / scale, top * height / new_h / scale,
           (left + crop) * width / new_w / scale, (top + crop) * height / new_h / scale)
    return img.resize((crop, crop), resample, box=box, reducing_gap=gap)
