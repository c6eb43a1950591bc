"""Colour modes of a decoded image to RGB (or L) for the crop: alpha or a transparency key (RGBA, LA, PA, P/L/RGB
with `transparency`) is composited on WHITE, what a viewer shows behind a transparent web image; CMYK/YCCK JPEG
arrive through libjpeg + Pillow's Adobe inversion and are converted like any other mode. 16-bit grey (I;16) is scaled
by 1/257 (never clipped); "I"/"F" have no defined range: [0, 1] (F) x255, [0, 255] kept, [0, 65535] /257, beyond
255/max."""
from __future__ import annotations

import numpy as np
from PIL import Image

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb_or_l(im: Image.Image) -> Image.Image:
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
