"""Run every fault-injection scenario of tests/faults and print what each fault cost.

    python bench/faults.py [-k EXPR]

Each scenario is a test of `tests/faults` (real DeepSpeed ranks on gloo, moto's S3 server,
real files and processes, all on loopback and CPU); its docstring holds the row
`fault injected | what was lost | how it recovered`, and this script adds whether it held
this time and how long it took. Ends with `RESULT scenarios=... held=... failed=...`.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Table:
    """A pytest plugin collecting one row per scenario."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str, float]] = []
        self._docs: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self._docs[item.nodeid] = inspect.getdoc(item.function) or "? | ? | ?"

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            fault, lost, recovery = (part.strip() for part in (self._docs[report.nodeid].split("|") + ["?", "?"])[:3])
            name = report.nodeid.split("::")[-1].removeprefix("test_").replace("_", " ")
            self.rows.append((name, fault, lost, recovery, "held" if report.passed else report.outcome.upper(), report.duration))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default=None, help="pytest -k expression: only these scenarios")
    args = parser.parse_args()
    table = Table()
    start = time.perf_counter()
    pytest.main([str(REPO / "tests" / "faults"), "-q", "-p", "no:cacheprovider", *(["-k", args.k] if args.k else [])],
                plugins=[table])
    print(f"\n| scenario | fault injected | what was lost | how it recovered | result | s |\n|---|---|---|---|---|---|")
    for name, fault, lost, recovery, result, seconds in table.rows:
        print(f"| {name} | {fault} | {lost} | {recovery} | {result} | {seconds:.1f} |")
    held = sum(row[4] == "held" for row in table.rows)
    print(f"RESULT scenarios={len(table.rows)} held={held} failed={len(table.rows) - held} "
          f"total_s={time.perf_counter() - start:.0f}")
    return 0 if held == len(table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
