"""Decode one image file into the model's input crop: uint8 (crop, crop, 3) RGB, or raise `ImageFailure`.

This module opens the file, enforces the limits and the deadline and classifies failures; the resize + centre crop
(torchvision's `ImageClassification` geometry, "exact" / "fast", EXIF orientation) is
`featshard.extract.resizecrop`, the
conversion of colour modes to RGB (CMYK/YCCK, alpha on white, 16-bit, I/F) `featshard.extract.colour`.
- Animated images: the first frame.
- Limits: `max_pixels` is checked on the header's size before decoding (`too_large`) and set as
  `Image.MAX_IMAGE_PIXELS`; DecompressionBombError/Warning map to `too_large`. `LOAD_TRUNCATED_IMAGES` stays False.
- Deadline: `prep.timeout` s for open + decode with `setitimer(ITIMER_REAL)` + a SIGALRM handler, in the main thread
  only (loader processes), previous handler and timer restored. Non-regular files (FIFO, socket, device) are refused
  from `fstat` after a non-blocking open, before any read.
"""
from __future__ import annotations

import errno
import io
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

from featshard.extract.preprocess import Preprocess
from featshard.extract.resizecrop import resize_crop
from featshard.store.webdataset import MemberTruncated, TarMember, read_member

REASONS = ("missing", "permission", "is_directory", "symlink_loop", "not_regular_file", "empty", "not_image",
           "truncated", "corrupt", "too_large", "timeout", "error")

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The header check in _decode refuses everything above max_pixels, so Pillow's warning would only add noise (and a
# per-call warnings.catch_warnings is not thread-safe). Pillow's DecompressionBombError (beyond 2x) still applies.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


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


def load_image(path: str | bytes | TarMember, prep: Preprocess) -> np.ndarray:
    """Decode `path` (a file path, an image inside a tar, or the bytes of an image file already in memory, e.g. an
    upload) into a
    C-contiguous uint8 array (prep.crop, prep.crop, 3), RGB; raise ImageFailure otherwise."""
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


def _load(path: str | bytes | TarMember, prep: Preprocess) -> np.ndarray:
    with open_source(path) as f:
        try:
            out = _decode(f, prep)
        except ImageFailure:
            raise
        except Exception as e:  # noqa: BLE001 - every other failure is classified, never propagated
            raise _classify(e, f) from None
    arr = np.asarray(out)
    return arr if arr.flags.writeable else arr.copy()


def open_source(path: str | bytes | TarMember) -> IO[bytes]:
    """The image file to decode: bytes in memory as they are, a tar member read by offset, a path through
    `_open_regular`."""
    if isinstance(path, TarMember):
        path = _read_member(path)
    if isinstance(path, (bytes, bytearray, memoryview)):
        if not len(path):
            raise ImageFailure("empty", "file is empty (0 bytes)")
        return io.BytesIO(bytes(path))
    return _open_regular(path)


def _read_member(member: TarMember) -> bytes:
    try:
        return read_member(member)
    except MemberTruncated as e:
        raise ImageFailure("truncated", str(e)) from None
    except OSError as e:
        raise _os_failure(e) from None


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
    out = resize_crop(im, prep)
    return out if out.mode == "RGB" else out.convert("RGB")
