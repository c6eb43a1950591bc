"""Decode one image file into the model's input crop: uint8 (crop, crop, 3) RGB, or raise `ImageFailure`.

Geometry is torchvision's `ImageClassification` preset on a PIL image, `F.center_crop(F.resize(img, resize, interp),
crop)`: shorter side to `resize`, longer side `int(resize * long / short)`, centre crop, zero padding if needed.
- "exact": plain Pillow, bit-identical to that sequence on the RGB image described below. Beyond `_EXACT_MAX_AREA`
  (aspect over 256:1, e.g. 1x5000, where torchvision would allocate gigabytes) only the crop is resampled via
  `resize(box=...)`; Pillow takes the box as float32, so those few may differ by a level or two.
- "fast" (and "gpu", whose device path lives elsewhere): JPEG uses `Image.draft` with the largest DCT scale whose
  output is still >= `_DRAFT_MARGIN` x the resize target (never upscaled relative to exact; the last step stays a real
  antialiased downscale), and the crop is folded into `resize(size, box=...)` so only the crop is resampled. On real
  photos (JPEG q90, resize 256/crop 224) the mean |fast - exact| is ~0.35/255, mean cosine of the tensors ~0.9999.
- Orientation: EXIF orientation is applied (as `ImageOps.exif_transpose`) before resizing; draft's target is computed
  in the displayed orientation and swapped back for the 90-degree ones.
- Colour: CMYK/YCCK JPEG via libjpeg + Pillow's Adobe inversion. Alpha or a transparency key (RGBA, LA, PA, P/L/RGB with
  `transparency`) is composited on WHITE, what a viewer shows behind a transparent web image. 16-bit grey (I;16) is
  scaled by 1/257 (never clipped); "I"/"F" have no defined range: [0, 1] (F) x255, [0, 255] kept, [0, 65535] /257,
  beyond 255/max. Animated images: the first frame.
- Limits: `max_pixels` is checked on the header's size before decoding (`too_large`) and set as
  `Image.MAX_IMAGE_PIXELS`; DecompressionBombError/Warning map to `too_large`. `LOAD_TRUNCATED_IMAGES` stays False.
- Deadline: `prep.timeout` s for open + decode with `setitimer(ITIMER_REAL)` + a SIGALRM handler, in the main thread
  only (loader processes), previous handler and timer restored. Non-regular files (FIFO, socket, device) are refused
  from `fstat` after a non-blocking open, before any read.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import signal
import stat
import struct
import threading
import time
import warnings
import zlib
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from featshard.preprocess import Preprocess

logger = logging.getLogger("featshard.decode")

REASONS = ("missing", "permission", "is_directory", "symlink_loop", "not_regular_file", "empty", "not_image",
           "truncated", "corrupt", "too_large", "timeout", "error")

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The header check in _decode refuses everything above max_pixels, so Pillow's warning would only add noise (and a
# per-call warnings.catch_warnings is not thread-safe). Pillow's DecompressionBombError (beyond 2x) still applies.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_R, _T = Image.Resampling, Image.Transpose
_RESAMPLE = {"nearest": _R.NEAREST, "nearest-exact": _R.NEAREST, "bilinear": _R.BILINEAR, "bicubic": _R.BICUBIC,
             "box": _R.BOX, "hamming": _R.HAMMING, "lanczos": _R.LANCZOS}
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
              7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # EXIF orientation -> what ImageOps.exif_transpose does
_SWAPS_AXES = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_EXACT_MAX_AREA = 256  # exact mode materialises the resized image up to 256 * resize**2 pixels (64 MiB at 256)
_DRAFT_MARGIN = 1.25  # fast: the drafted JPEG is >= 1.25x the resize target, so the last step is a real downscale
_REDUCING_GAP = 3.0  # fast: Pillow's reduce() first for large downscales (non-JPEG); indistinguishable at 3.0
_ORIENTATION_TAG = 0x0112
_DRAFTABLE = ("JPEG", "MPO")  # formats with Image.draft; their getexif() reads the header without decoding


class ImageFailure(Exception):
    """An image that cannot become a crop; `reason` is one of REASONS, `message` human text."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class _Timeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that no `except Exception` inside Pillow swallows it."""


class _Alarm:
    """One-shot ITIMER_REAL deadline in the main thread; `cancel()` is idempotent and restores what was there."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = False
        self.old_handler: Any = None
        self.old_timer = (0.0, 0.0)
        self.started = 0.0

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self.armed and not self.fired:
            self.fired = True
            raise _Timeout()

    def start(self, seconds: float | None) -> None:
        if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
            return
        self.old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
        self.armed = True
        self.started = time.monotonic()
        self.old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel(self) -> None:
        if not self.armed:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if self.old_handler is None else self.old_handler)
        self.armed = False
        delay, interval = self.old_timer
        if delay > 0:  # someone else's timer was running: give it back, minus the time we spent
            remaining = delay - (time.monotonic() - self.started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), interval)


def load_image(path: str, prep: Preprocess) -> np.ndarray:
    """Decode `path` into a C-contiguous uint8 array (prep.crop, prep.crop, 3), RGB; raise ImageFailure otherwise."""
    alarm = _Alarm()
    try:
        alarm.start(prep.timeout)
        try:
            return _load(path, prep)
        finally:
            alarm.cancel()
    except _Timeout:
        alarm.cancel()  # completes a cancel that the alarm itself may have interrupted
        raise ImageFailure("timeout", f"no result within {prep.timeout:g} s (open + decode)") from None


def _load(path: str, prep: Preprocess) -> np.ndarray:
    with _open_regular(path) as f:
        try:
            out = _decode(f, prep)
        except ImageFailure:
            raise
        except Exception as e:  # noqa: BLE001 - every other failure is classified, never propagated
            raise _classify(e, f) from None
    arr = np.asarray(out)
    return arr if arr.flags.writeable else arr.copy()


def _open_regular(path: str) -> IO[bytes]:
    """Open without blocking (a FIFO opens at once), then refuse anything that is not a non-empty regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise _os_failure(e) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageFailure("is_directory", "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageFailure("not_regular_file", f"not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size == 0:
            raise ImageFailure("empty", "file is empty (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_failure(e: OSError) -> ImageFailure:
    text = e.strerror or str(e)
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return ImageFailure("missing", text)
    if isinstance(e, PermissionError):
        return ImageFailure("permission", text)
    if isinstance(e, IsADirectoryError):
        return ImageFailure("is_directory", text)
    if e.errno == errno.ELOOP:
        return ImageFailure("symlink_loop", text)
    if e.errno in (errno.ENXIO, errno.ENODEV):  # a socket, or a device without a driver
        return ImageFailure("not_regular_file", text)
    return ImageFailure("error", f"{type(e).__name__}: {e}")


def _classify(e: Exception, f: IO[bytes]) -> ImageFailure:
    """Map what Pillow (or the file system) raised while decoding onto a reason class."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageFailure("too_large", str(e))
    if isinstance(e, UnidentifiedImageError):
        if _has_image_signature(f):
            return ImageFailure("corrupt", "starts like an image but its header cannot be parsed")
        return ImageFailure("not_image", "cannot identify image file")
    if isinstance(e, OSError) and e.errno is not None:  # a real I/O error (EIO on a network mount, ...)
        return ImageFailure("error", text)
    if isinstance(e, EOFError) or (isinstance(e, OSError) and "truncated" in str(e).lower()):
        return ImageFailure("truncated", str(e) or type(e).__name__)
    if isinstance(e, (OSError, SyntaxError, struct.error, zlib.error)):  # decoder errors on damaged data
        return ImageFailure("corrupt", text)
    return ImageFailure("error", text)


def _has_image_signature(f: IO[bytes]) -> bool:
    try:
        f.seek(0)
        head = f.read(16)
    except (OSError, ValueError):
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _decode(f: IO[bytes], prep: Preprocess) -> Image.Image:
    limit = prep.max_pixels if prep.max_pixels and prep.max_pixels > 0 else None
    if Image.MAX_IMAGE_PIXELS != limit:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow raises DecompressionBombError beyond 2x, warns beyond 1x
    im = Image.open(f)
    width, height = im.size
    if limit is not None and width * height > limit:  # the warning's range, refused here: nothing decoded yet
        raise ImageFailure("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {limit}")
    out = _resize_crop(im, prep)
    return out if out.mode == "RGB" else out.convert("RGB")


def _resize_crop(im: Image.Image, prep: Preprocess) -> Image.Image:
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
    img = _to_rgb_or_l(im)
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
    return float(im.decoderconfig[0])  # the DCT scale denominator draft chose (1, 2, 4 or 8)


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    """RGB (or L, converted after the resize: the same numbers, a third of the work); alpha composited on white."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), "L")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, (0, 0), rgba)
        return white
    if mode in ("RGB", "L"):
        im.load()
        return im
    return im.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    if a.ndim != 2:
        raise ValueError(f"unsupported {mode} image with shape {a.shape}")
    if mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    x = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    hi = float(x.max()) if x.size else 0.0
    if mode == "F" and hi <= 1.0:
        x = x * 255.0
    elif hi > 65535:
        x = x * (255.0 / hi)
    elif hi > 255:
        x = x / 257.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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
