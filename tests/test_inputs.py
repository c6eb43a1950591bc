from __future__ import annotations

import csv

import pytest

from featshard.errors import UsageError
from featshard.store.inputs import iter_items, open_input, scan_input


def test_list_file_skips_blanks_and_comments_and_resolves_relative(tmp_path):
    lst = tmp_path / "sub" / "list.txt"
    lst.parent.mkdir()
    lst.write_text("a.jpg\n\n# comment\n  \nimgs/b c.png\n/abs/x.jpg\n")
    items = list(iter_items(open_input(lst)))
    assert [i.row for i in items] == [0, 1, 2]
    assert [i.name for i in items] == ["a.jpg", "imgs/b c.png", "/abs/x.jpg"]
    assert items[0].path == str(tmp_path / "sub" / "a.jpg")
    assert items[2].path == "/abs/x.jpg"
    assert [i.row for i in iter_items(open_input(lst), 1, 2)] == [1]


def test_csv_with_name_column_and_awkward_names(tmp_path):
    path = tmp_path / "in.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "Path", "name"])
        w.writerow(["1", "x, y.jpg", "first"])
        w.writerow(["2", 'q"uote\nnewline.jpg', "zweite ü"])
        w.writerow(["3", "plain.jpg", ""])
    items = list(iter_items(open_input(path)))
    assert [i.name for i in items] == ["first", "zweite ü", ""]
    assert items[1].path == str(tmp_path / 'q"uote\nnewline.jpg')


def test_tsv_without_name_uses_path(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_text("path\tlabel\na.jpg\tcat\nb.jpg\tdog\n")
    assert [i.name for i in iter_items(open_input(path))] == ["a.jpg", "b.jpg"]


def test_csv_without_path_column_is_refused(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("file,label\na.jpg,1\n")
    with pytest.raises(UsageError, match="no 'path' column"):
        open_input(path)


def test_directory_scan_is_sorted_recursive_and_filters_images(tmp_path):
    for rel in ["b/2.jpg", "b/1.PNG", "a.jpg", "c/notes.txt", "c/d/e.webp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = [i.name for i in iter_items(open_input(tmp_path))]
    assert names == ["a.jpg", "b/1.PNG", "b/2.jpg", "c/d/e.webp"]


def test_scan_counts_and_hash_changes_with_content(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a\nb\n")
    n1, h1 = scan_input(open_input(lst))
    lst.write_text("a\nc\n")
    n2, h2 = scan_input(open_input(lst))
    assert (n1, n2) == (2, 2) and h1 != h2


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_input(tmp_path / "nope.txt")


def _parquet(dest, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), dest, row_group_size=2)
    return dest


def test_parquet_with_path_and_name_streams_by_batches(tmp_path, monkeypatch):
    from featshard.store import inputs

    monkeypatch.setattr(inputs, "PARQUET_BATCH", 2)  # several batches and row groups
    path = _parquet(tmp_path / "in.parquet", Path=["a.jpg", None, "sub/b.png", "  ", "/abs/c.jpg", "d.jpg"],
                    NAME=["first", "skipped", None, "blank", "third", "fourth"], other=[1, 2, 3, 4, 5, 6])
    src = open_input(path)
    items = list(iter_items(src))
    assert src.kind == "parquet"
    assert [(i.row, i.name) for i in items] == [(0, "first"), (1, "sub/b.png"), (2, "third"), (3, "fourth")]
    assert items[0].path == str(tmp_path / "a.jpg") and items[2].path == "/abs/c.jpg"
    assert [i.name for i in iter_items(src, 1, 3)] == ["sub/b.png", "third"]
    assert scan_input(src)[0] == 4


def test_parquet_without_name_uses_path(tmp_path):
    path = _parquet(tmp_path / "in.pq", path=["x.jpg", "y.jpg"])
    assert [i.name for i in iter_items(open_input(path))] == ["x.jpg", "y.jpg"]


def test_parquet_without_path_or_not_parquet_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no 'path' column"):
        open_input(_parquet(tmp_path / "in.parquet", url=["http://x/a.jpg"], key=["0"]))
    bad = tmp_path / "bad.parquet"
    bad.write_text("path\na.jpg\n")
    with pytest.raises(UsageError, match="not a readable parquet file"):
        open_input(bad)
