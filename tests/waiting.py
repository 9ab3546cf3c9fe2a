"""Small helpers the integration tests share: poll for a condition, read another process's SQLite."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll `cond` until it is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def db_rows(db: Path, query: str) -> list[tuple]:
    """Rows of `query` on a database another process writes; [] while it or its tables do not exist yet."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()
