"""Throughput of search-value extraction (``index_resource``) on the Synthea data set.

Each resource is serialised with orjson before timing, as the write path has the bytes already.
Rates are per core: CPU time of this process (best of ``--repeat`` passes per type), so other load
on the machine skews them less than wall-clock time would.

Run: ``.venv/bin/python bench/extract_bench.py [DATA_DIR] [--repeat N] [--top N]``. DATA_DIR
defaults to ``../shared/data/synthea-120`` next to the repository.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synthea import DEFAULT_DATA, has_bundles, load_resources  # noqa: E402

from fhir_server.search.extract import index_resource  # noqa: E402

_BASE_URL = "http://127.0.0.1:8080/fhir"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the data; the best is kept")
    parser.add_argument("--top", type=int, default=10, help="resource types shown, most numerous first")
    args = parser.parse_args()
    if not has_bundles(args.data_dir):
        print(f"no Synthea bundles (*.json.bz2) in {args.data_dir}: nothing to measure", file=sys.stderr)
        return 1
    by_type: dict[str, list[tuple[dict[str, Any], bytes]]] = defaultdict(list)
    total = 0
    for r in load_resources(args.data_dir):
        by_type[r["resourceType"]].append((r, orjson.dumps(r)))
        total += 1
    best: dict[str, float] = {}
    values = 0
    for _ in range(args.repeat):
        for rtype, items in by_type.items():
            t0 = time.process_time()
            for resource, raw in items:
                index_resource(resource, raw, _BASE_URL)
            elapsed = time.process_time() - t0
            best[rtype] = min(best.get(rtype, elapsed), elapsed)
    for items in by_type.values():
        for resource, raw in items:
            values += sum(len(v) if isinstance(v, list) else 1 for v in index_resource(resource, raw, _BASE_URL).values())
    total_time = sum(best.values())
    print(f"{total} resources from {args.data_dir}; {values:,} stored values; best of {args.repeat} passes (CPU time)")
    print(f"{'resourceType':<28}{'count':>8}{'resources/s':>14}{'us/resource':>13}")
    for rtype, items in sorted(by_type.items(), key=lambda kv: -len(kv[1]))[: args.top]:
        t = best[rtype]
        print(f"{rtype:<28}{len(items):>8}{len(items) / t:>14,.0f}{t / len(items) * 1e6:>13.1f}")
    print(f"{'overall':<28}{total:>8}{total / total_time:>14,.0f}{total_time / total * 1e6:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
