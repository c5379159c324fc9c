"Raw-data validation (stage 01): every bad input is refused with the file, the column and the first offending row."
import json
from pathlib import Path

import pandas as pd
import pytest

from usermirror_nb.assets import RawDataError, RawTables, load_domain, load_raw, validate_raw, write_raw
from usermirror_nb.config import DomainConfig

USERS = "user_id,age\nu1,20\nu2,30\nu3,40\n"
ITEMS = "item_id,title,release_time\ni1,Alpha,1995-01-01\ni2,Beta,\ni3,Gamma,0\n"
INTER = "user_id,item_id,feedback,timestamp\nu1,i1,5,881250949\nu2,i2,3,2001-09-09T01:46:40Z\nu3,i3,4,\n"


def domain(tmp_path: Path, users=USERS, items=ITEMS, inter=INTER, columns=None, names=("users.csv", "items.csv", "interactions.csv")):
    paths = [tmp_path / n for n in names]
    for p, text in zip(paths, (users, items, inter)): p.write_text(text)
    return DomainConfig(name="t", source="files", positive_min=4, users_file=str(paths[0]), items_file=str(paths[1]),
                        interactions_file=str(paths[2]), columns=columns or {})


def refused(tmp_path, file, column, row, **tables) -> RawDataError:
    "Load the domain, expect a RawDataError that names `file`, `column` and `row`; check the row really is that line."
    with pytest.raises(RawDataError) as ei:
        load_domain(domain(tmp_path, **tables))
    e, msg = ei.value, str(ei.value)
    assert file in msg and f"column '{column}'" in msg, msg
    assert e.file.endswith(file) and e.column == column and e.row == row, (e.file, e.column, e.row)
    if row == "header": assert "header row" in msg, msg
    else: assert f"row {row} (1-based data row" in msg, msg
    return e


def test_good_files_load(tmp_path):
    t = load_domain(domain(tmp_path))
    assert t.counts == {"users": 3, "items": 3, "interactions": 3}
    assert t.interactions.timestamp.tolist()[:2] == [881250949.0, 1e9] and pd.isna(t.interactions.timestamp.iloc[2])
    assert t.items.release_time.iloc[0] == 788918400.0 and t.meta["has_timestamps"] is True
    assert t.interactions.seq.tolist() == [0, 1, 2] and str(t.interactions.feedback.dtype) == "float64"


def test_missing_column(tmp_path):
    refused(tmp_path, "items.csv", "title", "header", items="item_id,name\ni1,Alpha\ni2,Beta\ni3,Gamma\n")


def test_duplicate_user_id(tmp_path):
    e = refused(tmp_path, "users.csv", "user_id", 3, users="user_id,age\nu1,20\nu2,30\nu1,40\n")
    assert "'u1'" in str(e) and "first seen at row 1" in str(e)


def test_duplicate_item_id(tmp_path):
    refused(tmp_path, "items.csv", "item_id", 2, items="item_id,title\ni1,Alpha\ni1,Beta\ni3,Gamma\n")


def test_unknown_user(tmp_path):
    e = refused(tmp_path, "interactions.csv", "user_id", 2,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu9,i2,3,2\nu3,i3,4,3\n")
    assert "'u9'" in str(e) and "users.csv" in str(e)


def test_unknown_item(tmp_path):
    e = refused(tmp_path, "interactions.csv", "item_id", 3,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu2,i2,3,2\nu3,i7,4,3\n")
    assert "'i7'" in str(e)


def test_unparseable_timestamp(tmp_path):
    e = refused(tmp_path, "interactions.csv", "timestamp", 3,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu2,i2,3,2020-02-03\nu3,i3,4,yesterday\n")
    assert "'yesterday'" in str(e)


def test_empty_table(tmp_path):
    refused(tmp_path, "interactions.csv", "user_id", 1, inter="user_id,item_id,feedback,timestamp\n")


def test_non_numeric_feedback(tmp_path):
    e = refused(tmp_path, "interactions.csv", "feedback", 2,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu2,i2,five,2\nu3,i3,4,3\n")
    assert "'five'" in str(e)


def test_row_number_is_the_file_line(tmp_path):
    "Row N (1-based data row) is line N+1 of the file: the offending value is really there."
    text = "user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu2,i2,3,2\nu3,i3,4,never\n"
    e = refused(tmp_path, "interactions.csv", "timestamp", 3, inter=text)
    assert "never" in text.splitlines()[e.row]


def test_own_files_with_column_renames(tmp_path):
    "A user's own three files (their column names) load via source='files' with only a `columns` mapping."
    d = domain(tmp_path,
               users="customer,city\nc1,Oslo\nc2,Lima\nc3,Pune\n",
               items="sku,name,launched,brand\np1,Tea,2001-01-01,A\np2,Coffee,,B\np3,Cocoa,1000000000,C\n",
               inter="customer,sku,stars,when\nc1,p1,1,2002-05-01T10:00:00Z\nc2,p2,3,1020000000\nc3,p3,2,\nc1,p3,5,2003-01-01\n",
               names=("customers.csv", "products.csv", "orders.csv"),
               columns={"users": {"customer": "user_id"},
                        "items": {"sku": "item_id", "name": "title", "launched": "release_time"},
                        "interactions": {"customer": "user_id", "sku": "item_id", "stars": "feedback", "when": "timestamp"}})
    t = load_domain(d)
    assert t.counts == {"users": 3, "items": 3, "interactions": 4}
    assert list(t.users.columns) == ["user_id", "city"] and list(t.items.columns)[:3] == ["item_id", "title", "release_time"]
    assert "brand" in t.items.columns and t.items.release_time.iloc[2] == 1e9
    assert t.interactions.timestamp.iloc[0] == pd.Timestamp("2002-05-01T10:00:00Z").timestamp()
    assert t.meta["source"] == "files" and set(t.meta["source_files"]) == {"customers.csv", "products.csv", "orders.csv"}
    # a rename whose source column is absent is named with the file
    d.columns["items"]["nom"] = "title"; del d.columns["items"]["name"]
    with pytest.raises(RawDataError, match=r"products.csv: column 'nom', header row"):
        load_domain(d)


def test_tsv_and_parquet(tmp_path):
    (tmp_path / "u.tsv").write_text("user_id\tage\n1\t20\n2\t30\n")
    pd.DataFrame({"item_id": [10, 11], "title": ["A", "B"]}).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "feedback": [1.0, 0.0],
                  "timestamp": pd.to_datetime(["2020-01-01", "2020-01-02"])}).to_parquet(tmp_path / "x.parquet")
    t = load_domain(DomainConfig(name="p", source="files", positive_min=1, users_file=str(tmp_path / "u.tsv"),
                                 items_file=str(tmp_path / "i.parquet"), interactions_file=str(tmp_path / "x.parquet")))
    assert t.interactions.item_id.tolist() == ["10", "11"] and t.interactions.timestamp.tolist() == [1577836800.0, 1577923200.0]


def test_failed_write_keeps_older_folder(tmp_path):
    good = validate_raw({"users": pd.DataFrame({"user_id": ["a", "b"]}),
                         "items": pd.DataFrame({"item_id": ["x"], "title": ["X"]}),
                         "interactions": pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "x"], "feedback": [1, 2]})})
    out = write_raw(good, tmp_path / "raw" / "d")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = RawTables(good.users, good.items, good.interactions.assign(junk=[object(), object()]), good.meta)
    with pytest.raises(Exception):
        write_raw(bad, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before          # the older folder is intact
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["d"]             # no temporary left behind
    back = load_raw(out)
    pd.testing.assert_frame_equal(back.interactions, good.interactions)
    assert json.loads((out / "domain.json").read_text())["counts"] == {"users": 2, "items": 1, "interactions": 2}


def test_empty_feedback_says_empty_without_a_numpy_repr(tmp_path):
    e = refused(tmp_path, "interactions.csv", "feedback", 2,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,1\nu2,i2,,2\nu3,i3,4,3\n")
    assert "feedback is empty" in str(e) and "np.float64" not in str(e) and "nan" not in str(e)


def test_negative_interaction_timestamp_is_refused(tmp_path):
    e = refused(tmp_path, "interactions.csv", "timestamp", 2,
                inter="user_id,item_id,feedback,timestamp\nu1,i1,5,881250949\nu2,i2,3,-975000000\nu3,i3,4,3\n")
    assert "before 1970-01-01" in str(e)


def test_release_years_are_read_as_years_not_seconds(tmp_path):
    "A `year` column mapped to release_time (1995, 2001) is 1 January of that year, not 1995 seconds after 1970."
    t = load_domain(domain(tmp_path, items="item_id,title,year\ni1,Alpha,1995\ni2,Beta,\ni3,Gamma,2001\n",
                           columns={"items": {"year": "release_time"}}))
    assert t.items.release_time.tolist()[0] == 788918400.0 and t.items.release_time.tolist()[2] == 978307200.0
    assert pd.isna(t.items.release_time.tolist()[1]) and t.meta["release_time_read_as"] == "years"
    plain = load_domain(domain(tmp_path))                     # ISO dates and 0 stay seconds
    assert plain.items.release_time.tolist()[2] == 0.0 and "release_time_read_as" not in plain.meta


def test_latin1_csv_names_file_column_and_row_and_reads_with_encoding(tmp_path):
    "#13.3: a latin-1 file read as UTF-8 stops in the raw stage at the first bad byte (quoting respected), not as a bare UnicodeDecodeError."
    items = 'item_id,title,release_time\ni1,"Alpha, the film",1995-01-01\ni2,"Beta, café",\ni3,Gamma,0\n'
    d = domain(tmp_path)
    Path(d.items_file).write_bytes(items.encode("latin-1"))
    with pytest.raises(RawDataError) as ei:
        load_domain(d)
    e, msg = ei.value, str(ei.value)
    assert e.file.endswith("items.csv") and e.column == "title" and e.row == 2, (e.file, e.column, e.row)
    assert "row 2 (1-based data row" in msg and "not valid utf-8" in msg and "encoding:" in msg and "caf" in msg, msg
    t = load_domain(DomainConfig(**{**d.__dict__, "encoding": "latin-1"}))
    assert t.items.title.tolist() == ["Alpha, the film", "Beta, café", "Gamma"]
    # a bad byte in a header name is named as the header
    Path(d.users_file).write_bytes("user_id,\xe2ge\nu1,20\nu2,30\nu3,40\n".encode("latin-1"))
    with pytest.raises(RawDataError, match="header row") as ei:
        load_domain(d)
    assert ei.value.row == "header" and ei.value.file.endswith("users.csv")


def test_invalid_utf8_in_a_parquet_string_column_is_named(tmp_path):
    "#13.3: pyarrow's own error ('Wrapping caf? failed') names neither column nor row; the raw stage does."
    import pyarrow as pa, pyarrow.parquet as pq
    d = domain(tmp_path)
    bad = pa.array([b"Alpha", b"Beta", b"Gamma caf\xe9"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"item_id": ["i1", "i2", "i3"], "title": bad}), tmp_path / "items.parquet")
    d = DomainConfig(**{**d.__dict__, "items_file": str(tmp_path / "items.parquet")})
    with pytest.raises(RawDataError) as ei:
        load_domain(d)
    e = ei.value
    assert e.file.endswith("items.parquet") and e.column == "title" and e.row == 3 and "must be UTF-8" in str(e), str(e)
    pq.write_table(pa.table({"item_id": ["i1", "i2", "i3"], "title": ["Alpha", "Beta", "Gamma café"]}), tmp_path / "items.parquet")
    assert load_domain(d).items.title.tolist()[2] == "Gamma café"


def test_encoding_must_be_a_text_encoding():
    from usermirror_nb.config import ConfigError
    for bad in ("utf-9", "rot13x", "base64"):
        with pytest.raises(ConfigError, match=r"domains\[t\]\.encoding"):
            DomainConfig(name="t", source="files", positive_min=1, users_file="u", items_file="i", interactions_file="x", encoding=bad)
