"""WebDataset tar input (featshard.store.webdataset, through featshard.store.inputs): brace patterns, rows and names
across tars, reads by offset, a tar truncated after it was opened, bad input refused up front."""
from __future__ import annotations

import gzip
import logging
import os
import tarfile
from pathlib import Path

import pytest

from featshard.errors import UsageError
from featshard.store.inputs import item_size, iter_items, open_input, read_item_bytes, scan_input
from featshard.store.webdataset import MemberTruncated, TarMember, brace_expand
from helpers.tars import add_member, image_bytes, make_tars, member_names


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FEATSHARD_CACHE_DIR", str(path))
    return path


def test_brace_expand_keeps_padding_and_expands_lists_left_to_right() -> None:
    assert brace_expand("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert brace_expand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert brace_expand("x{3..1}") == ["x3", "x2", "x1"]


@pytest.mark.parametrize("form", ["folder", "pattern", "tar"])
def test_rows_names_and_members_across_tars(tmp_path: Path, form: str) -> None:
    tars = make_tars(tmp_path / "shards", [4, 3, 5])
    spec = {"folder": tmp_path / "shards", "pattern": f"{tmp_path}/shards/{{00000..00002}}.tar",
            "tar": tars[1]}[form]
    src = open_input(spec)
    items = list(iter_items(src))
    want = member_names([4, 3, 5]) if form != "tar" else member_names([4, 3, 5])[4:7]
    assert src.kind == "tar" and [i.name for i in items] == want
    assert [i.row for i in items] == list(range(len(want)))
    for item in items:  # the bytes read by offset are the member's own
        with tarfile.open(item.path.tar) as tf:
            assert read_item_bytes(item.path) == tf.extractfile(item.name.split("/", 1)[1]).read()
        assert item_size(item.path) == item.path.size
    for start, stop in [(0, 1), (3, 9), (7, None), (11, 40), (12, None)]:
        assert [i.name for i in iter_items(src, start, stop)] == want[start:stop]
    assert scan_input(src)[0] == len(want)


def test_tar_truncated_after_the_scan_fails_the_rows_past_its_end(tmp_path: Path) -> None:
    """Workers keep the table made when the input was opened: rows past the new end read as truncated."""
    tar = make_tars(tmp_path / "shards", [4])[0]
    src = open_input(tar)
    scan_input(src)
    items = list(iter_items(src))
    with open(tar, "r+b") as fh:
        fh.truncate(items[1].path.offset + items[1].path.size)
    again = list(iter_items(src))  # the same source object, as a worker holds it
    assert [i.name for i in again] == [i.name for i in items]
    assert read_item_bytes(again[1].path) == read_item_bytes(items[1].path)
    for item in again[2:]:
        with pytest.raises(MemberTruncated):
            read_item_bytes(item.path)


def test_tar_member_identity_is_in_the_input_hash(tmp_path: Path) -> None:
    tars = make_tars(tmp_path / "shards", [3, 3])
    before = scan_input(open_input(tmp_path / "shards"))
    with tarfile.open(tars[1], "w") as tf:  # same names, other sizes: other offsets
        for name in member_names([3, 3])[3:]:
            add_member(tf, name.split("/", 1)[1], image_bytes(99, size=(50, 50)))
    after = scan_input(open_input(tmp_path / "shards"))
    assert before[0] == after[0] and before[1] != after[1]


def test_bad_tar_inputs_are_refused_up_front(tmp_path: Path) -> None:
    make_tars(tmp_path / "shards", [1, 1])
    with pytest.raises(UsageError, match="matches no file"):
        open_input(f"{tmp_path}/nothing/{{00000..00003}}.tar")
    with pytest.raises(UsageError, match="2 of the 4 tars do not exist"):
        open_input(f"{tmp_path}/shards/{{00000..00003}}.tar")
    text = tmp_path / "notes.tar"
    text.write_text("hello, I am not a tar file\n" * 40)
    with pytest.raises(UsageError, match="is not a tar file"):
        open_input(text)
    gz = tmp_path / "packed.tar"
    gz.write_bytes(gzip.compress((tmp_path / "shards" / "00000.tar").read_bytes()))
    with pytest.raises(UsageError, match="gzip-compressed"):
        open_input(gz)
    empty = tmp_path / "e" / "00000.tar"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="not a tar file .*empty"):
        open_input(empty.parent)


def test_folder_with_images_and_tars_scans_the_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mixed"
    make_tars(folder, [2])
    (folder / "photo.jpg").write_bytes(image_bytes(3))
    with caplog.at_level(logging.WARNING):
        src = open_input(folder)
    assert src.kind == "dir" and [i.name for i in iter_items(src)] == ["photo.jpg"]
    assert "not read" in caplog.text


def test_tar_member_is_picklable_and_cheap() -> None:
    import pickle

    member = TarMember("/data/shards/00000.tar", 1536, 2048)
    assert pickle.loads(pickle.dumps(member)) == member
    assert len(pickle.dumps(member)) < 200
    assert os.path.basename(member.tar) == "00000.tar"


def test_item_for_row_and_its_bytes_for_files_and_members(tmp_path: Path) -> None:
    """What `serve` needs: the item of a row and its image bytes, for a tar member as for a file."""
    from featshard.store.inputs import item_for_row

    make_tars(tmp_path / "shards", [2, 3])
    src = open_input(tmp_path / "shards")
    item = item_for_row(src, 3)
    assert item is not None and item.name == member_names([2, 3])[3] and item_for_row(src, 5) is None
    assert read_item_bytes(item) == read_item_bytes(item.path) and read_item_bytes(item)[:2] == b"\xff\xd8"
    (tmp_path / "list.txt").write_text("a.bin\n")
    (tmp_path / "a.bin").write_bytes(b"plain file")
    assert read_item_bytes(item_for_row(open_input(tmp_path / "list.txt"), 0)) == b"plain file"


def test_path_key_round_trips_for_members_and_files() -> None:
    from featshard.store.inputs import path_from_key, path_key

    member = TarMember("/data/a#b/00001.tar", 2560, 1234)
    assert path_from_key(path_key(member), "tar") == member
    assert path_from_key(path_key("/imgs/x#1.jpg"), "list") == "/imgs/x#1.jpg"
