"""--decode gpu: header hand-over, orientation, geometry vs the CPU path, and the per-image fallback.

The device code runs unchanged with device "cpu" (torchvision's CPU JPEG decoder instead of nvjpeg), so the logic is
tested on every machine; the `gpu`-marked test repeats the geometry check with nvjpeg where CUDA exists.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import photo
from PIL import Image

from featshard.extract.decode import load_image
from featshard.extract.gpudecode import Encoded, decode_batch, orient, read_encoded
from featshard.extract.loader import Batch
from featshard.extract.models import preprocess_for

PREP = replace(preprocess_for("mobilenet_v2", "none"), decode="gpu")
PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def jpeg(path: Path, seed: int, size: tuple[int, int], orientation: int = 1, mode: str = "RGB") -> Path:
    im = photo(seed, *size).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, "JPEG", quality=92, exif=exif.tobytes())
    return path


def bad_huffman_jpeg(path: Path) -> Path:
    """Parses as a JPEG header (size, mode) but fails to decode: a damaged Huffman table."""
    buf = io.BytesIO()
    photo(7, 120, 90).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc4")
    data[i + 5: i + 25] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation: int) -> None:
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).transpose(PIL_TRANSPOSE[orientation])) if orientation != 1 else arr
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_read_encoded_hands_over_plain_jpegs_only(tmp_path: Path) -> None:
    rgb = read_encoded(str(jpeg(tmp_path / "a.jpg", 1, (80, 60), orientation=6)), PREP)
    assert isinstance(rgb, Encoded) and rgb.orientation == 6 and rgb.data[:2] == b"\xff\xd8"
    assert read_encoded(str(jpeg(tmp_path / "g.jpg", 2, (80, 60), mode="L")), PREP) is not None
    photo(3, 40, 30).save(tmp_path / "p.png")
    photo(4, 40, 30).convert("CMYK").save(tmp_path / "c.jpg", "JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:-300])
    (tmp_path / "dir.jpg").mkdir()
    for name in ("p.png", "c.jpg", "cut.jpg", "empty.jpg", "dir.jpg", "missing.jpg"):
        assert read_encoded(str(tmp_path / name), PREP) is None, name
    assert read_encoded(str(tmp_path / "a.jpg"), replace(PREP, interpolation="lanczos")) is None
    assert read_encoded(str(tmp_path / "a.jpg"), replace(PREP, max_pixels=80 * 60 - 1)) is None


def make_batch(paths: list[Path]) -> Batch:
    """What the loader hands over with device decode: JPEG bytes where possible, CPU pixels for the rest."""
    encoded = [read_encoded(str(p), PREP) for p in paths]
    cpu = [load_image(str(p), PREP) for p, e in zip(paths, encoded) if e is None]
    pixels = torch.from_numpy(np.stack(cpu)) if cpu else torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    return Batch(rows=list(range(len(paths))), names=[p.name for p in paths], pixels=pixels, failed_rows=[],
                 failed_names=[], failed_reasons=[], encoded=encoded)


def exact(path: Path) -> np.ndarray:
    return load_image(str(path), replace(PREP, decode="exact")).astype(np.float32)


def test_device_path_matches_cpu_geometry(tmp_path: Path) -> None:
    paths = [jpeg(tmp_path / "wide.jpg", 1, (640, 400)), jpeg(tmp_path / "rot.jpg", 2, (300, 500), orientation=6),
             jpeg(tmp_path / "grey.jpg", 3, (256, 300), mode="L"), jpeg(tmp_path / "small.jpg", 4, (150, 120))]
    photo(5, 400, 300).save(tmp_path / "p.png")
    paths.append(tmp_path / "p.png")
    batch = make_batch(paths)
    assert [e is None for e in batch.encoded] == [False, False, False, False, True]
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    for got, path in zip(x.permute(0, 2, 3, 1).numpy(), paths):
        diff = np.abs(got - exact(path))
        assert diff.mean() < 0.5 and diff.max() <= 2, (path.name, diff.mean(), diff.max())


def test_undecodable_file_fails_alone_and_rows_stay_aligned(tmp_path: Path) -> None:
    paths = [jpeg(tmp_path / "a.jpg", 1, (320, 240)), bad_huffman_jpeg(tmp_path / "bad.jpg"),
             jpeg(tmp_path / "b.jpg", 2, (240, 320))]
    batch = make_batch(paths)
    batch.failed_rows, batch.failed_names, batch.failed_reasons = [5], ["later.jpg"], ["missing: gone"]
    assert all(e is not None for e in batch.encoded)
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape[0] == 2 and batch.rows == [0, 2] and batch.names == ["a.jpg", "b.jpg"]
    assert batch.failed_rows == [1, 5] and batch.failed_names == ["bad.jpg", "later.jpg"]
    assert batch.failed_reasons[0].split(":")[0] in ("corrupt", "truncated")
    for got, path in zip(x.permute(0, 2, 3, 1).numpy(), [paths[0], paths[2]]):
        assert np.abs(got - exact(path)).mean() < 0.5


def test_every_row_failing_gives_an_empty_batch(tmp_path: Path) -> None:
    batch = make_batch([bad_huffman_jpeg(tmp_path / "bad.jpg")])
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape == (0, 3, 224, 224) and batch.rows == [] and batch.failed_rows == [0]


@pytest.mark.gpu
def test_nvjpeg_matches_cpu_geometry(tmp_path: Path) -> None:
    paths = [jpeg(tmp_path / f"{i}.jpg", i, size, orientation=o)
             for i, (size, o) in enumerate([((640, 400), 1), ((300, 500), 6), ((2000, 1500), 1)])]
    paths.append(bad_huffman_jpeg(tmp_path / "bad.jpg"))
    batch = make_batch(paths)
    x = decode_batch(batch, PREP, torch.device("cuda"))
    assert x.device.type == "cuda" and x.shape[0] == 3 and batch.failed_rows == [3]
    for got, path in zip(x.permute(0, 2, 3, 1).cpu().numpy(), paths):
        assert np.abs(got - exact(path)).mean() < 2.0


def test_tar_members_take_the_device_path_and_fail_alone(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """WebDataset members: a JPEG member is handed over as bytes read by offset, a damaged one fails alone."""
    import tarfile

    from featshard.store.inputs import iter_items, open_input

    monkeypatch.setenv("FEATSHARD_CACHE_DIR", str(tmp_path / "cache"))
    paths = [jpeg(tmp_path / "a.jpg", 1, (320, 240)), bad_huffman_jpeg(tmp_path / "b.jpg")]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for path in paths:
            tf.add(path, arcname=path.name)
    items = list(iter_items(open_input(tmp_path / "s.tar")))
    encoded = read_encoded(items[0].path, PREP)
    assert encoded is not None and encoded.data == paths[0].read_bytes() and encoded.path == items[0].path
    batch = Batch(rows=[0, 1], names=[i.name for i in items], pixels=torch.zeros((0, 0, 0, 3), dtype=torch.uint8),
                  failed_rows=[], failed_names=[], failed_reasons=[],
                  encoded=[read_encoded(i.path, PREP) for i in items])
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape[0] == 1 and batch.rows == [0] and batch.failed_names == ["s.tar/b.jpg"]
    assert np.abs(x.permute(0, 2, 3, 1).numpy()[0] - exact(paths[0])).mean() < 0.5
