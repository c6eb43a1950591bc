"""featshard.tools.serve.thumbs: bounded JPEG thumbnails, refused for bombs before decoding; byte-bounded LRU cache."""
from __future__ import annotations

import io
import time

import pytest
from helpers import photo
from PIL import Image
from serverproc import bomb_png

from featshard.extract.decode import ImageFailure
from featshard.tools.serve.thumbs import ThumbCache, make_thumbnail


def test_thumbnail_is_a_small_jpeg_of_the_image(tmp_path):
    path = tmp_path / "wide.png"
    photo(1, 640, 200).save(path)
    data = make_thumbnail(str(path), max_pixels=10 ** 8)
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.size == (256, 80)


def test_bomb_missing_and_broken_files_are_image_failures(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    t = time.monotonic()
    with pytest.raises(ImageFailure) as err:
        make_thumbnail(str(tmp_path / "bomb.png"), max_pixels=10 ** 8)
    assert err.value.reason == "too_large" and time.monotonic() - t < 1.0  # refused from the header
    with pytest.raises(ImageFailure) as err:
        make_thumbnail(str(tmp_path / "gone.jpg"), max_pixels=10 ** 8)
    assert err.value.reason == "missing"
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageFailure) as err:
        make_thumbnail(str(tmp_path / "text.jpg"), max_pixels=10 ** 8)
    assert err.value.reason == "corrupt"


def test_cache_keeps_the_recently_used_within_its_byte_budget():
    cache = ThumbCache(max_bytes=100)
    for key in range(4):
        cache.put(key, bytes(30))
    assert cache.get(0) is None and cache.stats()["bytes"] == 90  # the oldest went
    assert cache.get(1) == bytes(30)  # 1 is now the most recent
    cache.put(9, bytes(30))
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(9) is not None
    cache.put(10, bytes(101))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get(10) is None and cache.stats()["items"] == 3
    stats = cache.stats()
    assert stats["hits"] == 3 and stats["misses"] == 3
