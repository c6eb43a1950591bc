"""Preprocessing recipe taken from the model's weights (`weights.transforms()`), never hand-copied numbers.

The loader applies the geometric part on uint8 pixels (decode, resize shorter side, center crop); the worker applies
the photometric part (scale to [0, 1], normalise by mean/std) on the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DECODE_MODES = ("exact", "fast", "gpu")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocess:
    resize: int  # shorter side after resize (torchvision `resize_size`)
    crop: int  # square center crop (torchvision `crop_size`)
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    decode: str = "fast"  # "exact": plain PIL like torchvision; "fast": JPEG draft + crop folded into resize; "gpu"
    max_pixels: int = 178_956_970  # decompression-bomb limit (2 x PIL's default warning threshold)
    timeout: float = 60.0  # per-image deadline in seconds for open + decode

    def __post_init__(self) -> None:
        from featshard.errors import UsageError

        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation {self.interpolation!r} is not supported ({', '.join(INTERPOLATIONS)})")
        if self.decode not in DECODE_MODES:
            raise UsageError(f"--decode {self.decode!r}: choose from {', '.join(DECODE_MODES)}")
        if self.crop < 1 or self.resize < 1 or self.max_pixels < 1 or self.timeout <= 0:
            raise UsageError("resize, crop, --max-pixels and --image-timeout must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def vector_fields(self) -> dict[str, Any]:
        """The fields that change the vectors (part of the run fingerprint): not the limits."""
        d = self.to_dict()
        d.pop("timeout")
        d.pop("max_pixels")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)


def from_transforms(transforms: Any, **overrides: Any) -> Preprocess:
    """Read torchvision's ImageClassification preset (`weights.transforms()`) into a Preprocess."""
    def first(v: Any) -> int:
        return int(v[0] if isinstance(v, (list, tuple)) else v)

    interp = getattr(transforms, "interpolation", "bilinear")
    interp_name = getattr(interp, "value", str(interp)).lower()
    return Preprocess(
        resize=first(transforms.resize_size),
        crop=first(transforms.crop_size),
        interpolation=interp_name,
        antialias=bool(getattr(transforms, "antialias", True)),
        mean=tuple(float(x) for x in transforms.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in transforms.std),  # type: ignore[arg-type]
        **overrides,
    )
