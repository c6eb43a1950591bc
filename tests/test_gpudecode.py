"""--decode gpu: header hand-over, orientation, geometry vs the CPU path, batched resize, and the fallback that costs
one CPU decode per bad file.

The device code runs unchanged with device "cpu" (torchvision's CPU JPEG decoder instead of nvjpeg), so the logic is
tested on every machine; the `gpu`-marked test repeats the geometry check with nvjpeg where CUDA exists.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import photo
from PIL import Image

from featshard.extract import gpudecode
from featshard.extract.decode import load_image
from featshard.extract.batch import Encoded
from featshard.extract.gpudecode import decode_batch, orient, read_encoded
from featshard.extract.jpegheader import device_decodable, huffman_tables_ok
from featshard.extract.batch import Batch
from featshard.extract.loader import make_loader
from featshard.extract.models import preprocess_for
from featshard.store.inputs import Item

PREP = replace(preprocess_for("mobilenet_v2", "none"), decode="gpu")
PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def jpeg(path: Path, seed: int, size: tuple[int, int], orientation: int = 1, mode: str = "RGB", **kw: Any) -> Path:
    im = photo(seed, *size).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, "JPEG", quality=92, exif=exif.tobytes(), **kw)
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


def undefined_table_jpeg(path: Path, seed: int = 8) -> Path:
    """A header the loaders' check accepts (valid tables, sequential frame) whose scan uses Huffman tables that were
    never defined: only the decoder finds out, on the device and on the CPU."""
    buf = io.BytesIO()
    photo(seed, 120, 90).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sos = data.index(b"\xff\xda")
    for k in range(data[sos + 4]):
        data[sos + 6 + 2 * k] = 0x33
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation: int) -> None:
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).transpose(PIL_TRANSPOSE[orientation])) if orientation != 1 else arr
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_read_encoded_hands_over_plain_sequential_jpegs_only(tmp_path: Path) -> None:
    rgb = read_encoded(str(jpeg(tmp_path / "a.jpg", 1, (80, 60), orientation=6)), PREP)
    assert isinstance(rgb, Encoded) and rgb.orientation == 6 and rgb.data[:2] == b"\xff\xd8"
    assert read_encoded(str(jpeg(tmp_path / "g.jpg", 2, (80, 60), mode="L")), PREP) is not None
    for sub in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        assert read_encoded(str(jpeg(tmp_path / f"s{sub}.jpg", 2, (80, 60), subsampling=sub)), PREP) is not None
    photo(3, 40, 30).save(tmp_path / "p.png")
    photo(4, 40, 30).convert("CMYK").save(tmp_path / "c.jpg", "JPEG")
    jpeg(tmp_path / "prog.jpg", 5, (80, 60), progressive=True)
    jpeg(tmp_path / "adobe_rgb.jpg", 6, (80, 60), keep_rgb=True)  # Adobe marker: the samples are RGB, not YCbCr
    jpeg(tmp_path / "long.jpg", 6, (650, 10))
    bad_huffman_jpeg(tmp_path / "huff.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:-300])
    (tmp_path / "dir.jpg").mkdir()
    for name in ("p.png", "c.jpg", "prog.jpg", "adobe_rgb.jpg", "long.jpg", "huff.jpg", "cut.jpg", "empty.jpg",
                 "dir.jpg", "missing.jpg"):
        assert read_encoded(str(tmp_path / name), PREP) is None, name
    assert read_encoded(str(tmp_path / "a.jpg"), replace(PREP, interpolation="lanczos")) is None
    assert read_encoded(str(tmp_path / "a.jpg"), replace(PREP, max_pixels=80 * 60 - 1)) is None


def test_header_check_refuses_what_the_device_would_not_decode_like_libjpeg(tmp_path: Path) -> None:
    data = bytearray(jpeg(tmp_path / "a.jpg", 1, (64, 48)).read_bytes())
    assert device_decodable(bytes(data))
    sof = data.index(b"\xff\xc0")
    for offset, value in ((4, 12), (11, 0x31)):  # 12-bit samples; luma sampled 3x1
        odd = bytearray(data)
        odd[sof + offset] = value
        assert not device_decodable(bytes(odd)), (offset, value)
    rgb_ids = bytearray(data)
    for k, ident in enumerate(b"RGB"):
        rgb_ids[sof + 10 + 3 * k] = ident
    assert not device_decodable(bytes(rgb_ids))
    assert not device_decodable(bytes(data[: data.index(b"\xff\xda")]))  # no scan
    assert not device_decodable(b"\x89PNG\r\n\x1a\n")


def test_huffman_table_check_follows_libjpeg() -> None:
    def table(counts: list[int], cls: int = 1, values: list[int] | None = None) -> bytes:
        return bytes([cls << 4, *counts, *(values if values is not None else [1] * sum(counts))])

    assert huffman_tables_ok(table([0, 2, 3] + [0] * 13))  # 2 of length 2, 3 of length 3: fits
    assert huffman_tables_ok(table([0, 2, 3] + [0] * 13) + table([1, 1] + [0] * 14, cls=0, values=[0, 5]))
    assert not huffman_tables_ok(table([2] + [0] * 15))  # both 1-bit codes: the all-ones code is used
    assert not huffman_tables_ok(table([0, 3, 3] + [0] * 13))  # 3 + 6 codes > what 3 bits hold
    assert not huffman_tables_ok(table([1] + [0] * 15, cls=0, values=[16]))  # DC symbol > 15
    assert not huffman_tables_ok(bytes([0x24]) + bytes(16))  # table id 4
    assert not huffman_tables_ok(table([0, 2] + [0] * 14)[:-1])  # values cut short


def loader_batch(paths: list[Path]) -> Batch:
    """What the loader hands over with device decode: JPEG bytes where possible, CPU pixels for the rest."""
    items = [[Item(i, p.name, str(p)) for i, p in enumerate(paths)]]
    (batch,) = list(make_loader(items, PREP, 0, pin=False, device_decode=True))
    return batch


def exact(path: Path) -> np.ndarray:
    return load_image(str(path), replace(PREP, decode="exact")).astype(np.float32)


def test_device_path_matches_cpu_geometry(tmp_path: Path) -> None:
    paths = [jpeg(tmp_path / "wide.jpg", 1, (640, 400)), jpeg(tmp_path / "rot.jpg", 2, (300, 500), orientation=6),
             jpeg(tmp_path / "grey.jpg", 3, (256, 300), mode="L"), jpeg(tmp_path / "small.jpg", 4, (150, 120))]
    photo(5, 400, 300).save(tmp_path / "p.png")
    paths.append(tmp_path / "p.png")
    batch = loader_batch(paths)
    assert [e is None for e in batch.encoded] == [False, False, False, False, True]
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    for got, path in zip(x.permute(0, 2, 3, 1).numpy(), paths):
        diff = np.abs(got - exact(path))
        assert diff.mean() < 0.5 and diff.max() <= 2, (path.name, diff.mean(), diff.max())


def test_images_of_one_size_are_resized_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [(320, 240), (200, 300), (320, 240), (320, 240), (200, 300)]
    paths = [jpeg(tmp_path / f"{i}.jpg", i, size) for i, size in enumerate(sizes)]
    calls: list[int] = []
    real = gpudecode.resize_crop
    monkeypatch.setattr(gpudecode, "resize_crop", lambda x, prep: calls.append(x.shape[0]) or real(x, prep))
    x = decode_batch(loader_batch(paths), PREP, torch.device("cpu"))
    assert sorted(calls) == [2, 3]
    for got, path in zip(x.permute(0, 2, 3, 1).numpy(), paths):  # each row in its place
        assert np.abs(got - exact(path)).mean() < 0.5, path.name


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Spies on the real decoders: sizes of the device calls, and the CPU fallbacks' rows."""
    seen: dict[str, list[int]] = {"device": [], "cpu": []}
    real_device, real_cpu = gpudecode._decode_call, gpudecode._cpu_fallback

    def device(datas: list[Any], device: Any) -> list[Any]:
        seen["device"].append(len(datas))
        return real_device(datas, device)

    def cpu(path: str, prep: Any) -> Any:
        seen["cpu"].append(int(Path(path).stem.split("-")[0]))
        return real_cpu(path, prep)

    monkeypatch.setattr(gpudecode, "_decode_call", device)
    monkeypatch.setattr(gpudecode, "_cpu_fallback", cpu)
    return seen


def test_a_bad_file_costs_one_fallback_and_rows_stay_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [jpeg(tmp_path / f"{i}-ok.jpg", i, (160 + 8 * i, 120)) for i in range(16)]
    paths[5] = undefined_table_jpeg(tmp_path / "5-bad.jpg")
    batch = loader_batch(paths)
    batch.failed_rows, batch.failed_names, batch.failed_reasons = [20], ["later.jpg"], ["missing: gone"]
    assert all(e is not None for e in batch.encoded)
    seen = count_calls(monkeypatch)
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert seen["cpu"] == [5]  # one CPU decode: the bad file's
    assert len(seen["device"]) <= 2 * 4 + 1 and sum(seen["device"]) < 16 * 4  # halving, not 16 single calls
    assert x.shape[0] == 15 and batch.rows == [r for r in range(16) if r != 5]
    assert batch.failed_rows == [5, 20] and batch.failed_names == ["5-bad.jpg", "later.jpg"]
    assert batch.failed_reasons[0].split(":")[0] == "corrupt"
    for got, path in zip(x.permute(0, 2, 3, 1).numpy(), [p for i, p in enumerate(paths) if i != 5]):
        assert np.abs(got - exact(path)).mean() < 0.5, path.name


def test_damaged_tables_never_reach_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders' header check sends a file with a damaged Huffman table to the CPU, which records the failure."""
    paths = [jpeg(tmp_path / "0-ok.jpg", 1, (320, 240)), bad_huffman_jpeg(tmp_path / "1-bad.jpg")]
    batch = loader_batch(paths)
    assert batch.rows == [0] and batch.failed_rows == [1] and batch.failed_reasons[0].startswith("corrupt")
    seen = count_calls(monkeypatch)
    assert decode_batch(batch, PREP, torch.device("cpu")).shape[0] == 1
    assert seen == {"device": [1], "cpu": []}


def test_every_row_failing_gives_an_empty_batch(tmp_path: Path) -> None:
    batch = loader_batch([undefined_table_jpeg(tmp_path / "0-bad.jpg")])
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape == (0, 3, 224, 224) and batch.rows == [] and batch.failed_rows == [0]


@pytest.mark.gpu
def test_nvjpeg_matches_cpu_geometry(tmp_path: Path) -> None:
    paths = [jpeg(tmp_path / f"{i}.jpg", i, size, orientation=o)
             for i, (size, o) in enumerate([((640, 400), 1), ((300, 500), 6), ((2000, 1500), 1), ((640, 400), 3)])]
    paths.append(undefined_table_jpeg(tmp_path / "bad.jpg"))
    batch = loader_batch(paths)
    assert all(e is not None for e in batch.encoded)
    x = decode_batch(batch, PREP, torch.device("cuda"))
    assert x.device.type == "cuda" and x.shape[0] == 4 and batch.failed_rows == [4]
    for got, path in zip(x.permute(0, 2, 3, 1).cpu().numpy(), paths):
        assert np.abs(got - exact(path)).mean() < 2.0


def test_tar_members_take_the_device_path_and_fail_alone(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """WebDataset members: a JPEG member is handed over as bytes read by offset; a damaged one (its Huffman tables
    broken) never reaches the device: the loader decodes it on the CPU, where it fails alone."""
    import tarfile

    from featshard.extract.loader import DecodeDataset, collate
    from featshard.store.inputs import iter_items, open_input

    monkeypatch.setenv("FEATSHARD_CACHE_DIR", str(tmp_path / "cache"))
    paths = [jpeg(tmp_path / "a.jpg", 1, (320, 240)), bad_huffman_jpeg(tmp_path / "b.jpg")]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for path in paths:
            tf.add(path, arcname=path.name)
    items = list(iter_items(open_input(tmp_path / "s.tar")))
    encoded = read_encoded(items[0].path, PREP)
    assert encoded is not None and encoded.data == paths[0].read_bytes() and encoded.path == items[0].path
    assert read_encoded(items[1].path, PREP) is None
    batch = collate([DecodeDataset(PREP, device_decode=True)[item] for item in items])
    x = decode_batch(batch, PREP, torch.device("cpu"))
    assert x.shape[0] == 1 and batch.rows == [0] and batch.failed_names == ["s.tar/b.jpg"]
    assert np.abs(x.permute(0, 2, 3, 1).numpy()[0] - exact(paths[0])).mean() < 0.5
