"""Throughput of fhir_server.validation on the Synthea data set: resources/s per type and overall.

Rates are per core: CPU time of this process (best of ``--repeat`` passes), so other load on the
machine skews them less than wall-clock time would.

Run: ``.venv/bin/python bench/validation_bench.py [DATA_DIR] [--repeat N]``. DATA_DIR defaults to
``../shared/data/synthea-120`` next to the repository; the bench skips if it is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synthea import DEFAULT_DATA, has_bundles, load_resources  # noqa: E402

from fhir_server.validation import validate_resource  # noqa: E402



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the data; the best is kept")
    args = parser.parse_args()
    if not has_bundles(args.data_dir):
        print(f"skipped: no Synthea bundles (*.json.bz2) in {args.data_dir}")
        return 0
    resources = load_resources(args.data_dir)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in resources:
        by_type[r["resourceType"]].append(r)
    errors = sum(1 for r in resources for i in validate_resource(r) if i.severity == "error")
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for rtype, items in by_type.items():
            t0 = time.process_time()
            for r in items:
                validate_resource(r)
            elapsed = time.process_time() - t0
            best[rtype] = min(best.get(rtype, elapsed), elapsed)
    total_time = sum(best.values())
    print(f"{len(resources)} resources from {args.data_dir}; {errors} error issues in total")
    print(f"{'resourceType':<28}{'count':>8}{'resources/s':>14}{'us/resource':>13}")
    for rtype, items in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
        t = best[rtype]
        print(f"{rtype:<28}{len(items):>8}{len(items) / t:>14,.0f}{t / len(items) * 1e6:>13.1f}")
    print(f"{'overall':<28}{len(resources):>8}{len(resources) / total_time:>14,.0f}{total_time / len(resources) * 1e6:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
