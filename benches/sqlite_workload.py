"""The SQLite + small-files workload sandbox vendors publish, as one script.

Run as `python3 sqlite_workload.py WORKDIR` (or `python3 -c "$(cat sqlite_workload.py)" WORKDIR`;
benches/src/bin/gvisor_sqlite.rs passes it that way natively, under raw runsc and in a kiln
sandbox). WORKDIR must not exist or be empty; it is left behind for the caller to remove.
Steps, each timed: 100,000 inserts in transactions of 1,000 rows (one `execute` per row), an
index, 5,000 point lookups through it, 200 updates each committed on its own, 1,000 files of
1 KiB written and read back. SQLite's defaults (rollback journal, synchronous=FULL), so every
commit syncs. Prints one JSON object: seconds per step and in all (from the first line of
this script, so importing sqlite3 is counted; interpreter start is not).
"""
import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402

ROWS, BATCH, LOOKUPS, UPDATES, FILES, FILE_BYTES = 100_000, 1_000, 5_000, 200, 1_000, 1024


def main(work):
    os.makedirs(work, exist_ok=True)
    rnd = random.Random(17)
    steps = {}
    t = time.perf_counter()
    steps["import_s"] = t - T_START

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        steps[name] = now - t
        t = now

    con = sqlite3.connect(os.path.join(work, "bench.db"))
    con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value INTEGER,"
                " payload TEXT)")
    con.commit()
    for b in range(ROWS // BATCH):
        with con:  # one transaction per batch
            for i in range(b * BATCH, (b + 1) * BATCH):
                con.execute("INSERT INTO items (name, value, payload) VALUES (?, ?, ?)",
                            (f"item-{i}", rnd.randrange(1_000_000), "x" * 64))
    lap("insert_s")
    with con:
        con.execute("CREATE INDEX items_name ON items (name)")
    lap("index_s")
    found = 0
    for _ in range(LOOKUPS):
        row = con.execute("SELECT id, value FROM items WHERE name = ?",
                          (f"item-{rnd.randrange(ROWS)}",)).fetchone()
        found += row is not None
    assert found == LOOKUPS, found
    lap("lookup_s")
    for _ in range(UPDATES):
        with con:
            con.execute("UPDATE items SET value = value + 1 WHERE id = ?",
                        (rnd.randrange(1, ROWS + 1),))
    lap("update_s")
    (count,) = con.execute("SELECT count(*) FROM items").fetchone()
    assert count == ROWS, count
    con.close()
    files = os.path.join(work, "files")
    os.makedirs(files)
    data = [os.urandom(FILE_BYTES) for _ in range(16)]
    for i in range(FILES):
        with open(os.path.join(files, f"f{i}"), "wb") as f:
            f.write(data[i % 16])
    for i in range(FILES):
        with open(os.path.join(files, f"f{i}"), "rb") as f:
            assert f.read() == data[i % 16]
    lap("files_s")
    steps["total_s"] = time.perf_counter() - T_START
    out = {k: round(v, 4) for k, v in steps.items()}
    out["python"] = sys.version.split()[0]
    out["sqlite"] = sqlite3.sqlite_version
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
