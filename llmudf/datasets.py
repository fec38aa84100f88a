"""Demo tables from files already on this machine: the movies of bokeh-sampledata's movies.db.

`omdb` (one row per movie: Title, Year, Rating, Runtime, Genre, Director, Cast, Language,
Country, ...) and `tomatoes` (Rotten Tomatoes scores of the same movies, joined on `ID`):
17,472 movies. The SQLite file is read with `sqlite3`, so DuckDB downloads no extension.

>>> import llmudf
>>> con = llmudf.connect()                                        # doctest: +SKIP
>>> llmudf.datasets.movies(con)                                   # doctest: +SKIP
>>> con.sql("SELECT Title, Year, Runtime FROM omdb WHERE ID = 372").fetchall()  # doctest: +SKIP
[('We Live in Public', 2009, 90)]
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pyarrow as pa

from llmudf.runtime import paths

TABLES = ("omdb", "tomatoes")
_SQLITE_TYPES = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
# columns whose declared type is looser than their values: whole minutes, ISO dates
_COLUMN_TYPES = {
    "Runtime": pa.int64(),
    "Released": pa.date32(),
    "DVD": pa.date32(),
    "lastUpdated": pa.date32(),
}


def read_movies(num_rows: int | None = None, rated_only: bool = False) -> dict[str, pa.Table]:
    """`{"omdb": ..., "tomatoes": ...}` as Arrow tables, rows in `ID` order.

    num_rows: only the first `num_rows` movies (both tables hold the same movies).
    rated_only: only movies with an MPAA `Rating` (2,568 of them).

    >>> read_movies(2)["omdb"].column("Title").to_pylist()
    ['We Live in Public', 'A Gang Story']
    >>> read_movies(2, rated_only=True)["tomatoes"].column("Meter").to_pylist()
    [76, 77]
    """
    if num_rows is not None and num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    where = "WHERE Rating IS NOT NULL" if rated_only else ""
    limit = "" if num_rows is None else f"LIMIT {int(num_rows)}"
    ids = f"SELECT ID FROM omdb {where} ORDER BY ID {limit}"
    with closing(sqlite3.connect(paths.movies_db())) as db:
        return {
            name: _read_table(db, name, f"SELECT * FROM {name} WHERE ID IN ({ids}) ORDER BY ID")
            for name in TABLES
        }


def movies(con, num_rows: int | None = None, rated_only: bool = False) -> None:
    """Create (or replace) the tables `omdb` and `tomatoes` on `con`, an llmudf or a plain
    DuckDB connection (arguments as for `read_movies`).

    >>> import duckdb
    >>> con = duckdb.connect()
    >>> movies(con, num_rows=100)
    >>> con.sql("SELECT COUNT(*) FROM omdb JOIN tomatoes USING (ID)").fetchall()
    [(100,)]
    """
    for name, table in read_movies(num_rows, rated_only).items():
        view = f"__llmudf_{name}_arrow"
        con.register(view, table)
        try:
            con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM {view}")
        finally:
            con.unregister(view)


def _read_table(db: sqlite3.Connection, name: str, query: str) -> pa.Table:
    """The rows of `query` over table `name`, typed by the columns' declared SQLite types."""
    declared = {row[1]: row[2] for row in db.execute(f"PRAGMA table_info({name})")}
    cursor = db.execute(query)
    names = [c[0] for c in cursor.description]
    rows = cursor.fetchall()
    values = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    columns = {}
    for column, data in zip(names, values, strict=True):
        target = _COLUMN_TYPES.get(column, _SQLITE_TYPES[declared[column]])
        array = pa.array(data, type=_SQLITE_TYPES[declared[column]])
        columns[column] = array.cast(target)
    return pa.table(columns)
