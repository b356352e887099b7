"""Profile validation throughput on one core: a CN Patient and the CN vital-signs Observations.

Each resource is validated the way a write claiming its profile is (``Validator.validate``:
structure of the base type, the R4 invariants, extensions against their definitions, the profile
with its FHIRPath invariants and bindings), against the shipped profiles/ and terminology/ loaded
into a registry. Inputs are varied copies of the shipped examples (new ID numbers with correct
check characters, names, values), so nothing is answered from a cache of a previous resource.

The floor is the structural validation alone (what every write pays); the goal is ≥ 3,000
resources/s for a CN Patient or a vital-signs Observation. Rates are CPU time of this process
(best of ``--repeat`` passes), i.e. per core.

Run: ``.venv/bin/python bench/profile_bench.py [--count N] [--repeat N]``; the table is also
written to ``bench/results/profile-latest.md`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from _report import machine_facts, machine_table  # noqa: E402

from fhir_server.conformance.registry import ConformanceRegistry  # noqa: E402
from fhir_server.validation import validate_resource  # noqa: E402
from fhir_server.validation.cn_identity import check_character  # noqa: E402
from fhir_server.validation.registry_definitions import validator_for  # noqa: E402

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀英华"
_DISTRICTS = ["310101", "310104", "310105", "310106", "310107", "310109", "310110", "310112", "310115"]


def _registry() -> ConformanceRegistry:
    registry = ConformanceRegistry()
    for path in sorted([*ROOT.joinpath("terminology").glob("*.json"), *ROOT.joinpath("profiles").glob("*.json")]):
        res = json.loads(path.read_text(encoding="utf-8"))
        registry.apply(res["resourceType"], res["id"], 1, res)
    return registry


def _example(name: str) -> dict[str, Any]:
    return json.loads(ROOT.joinpath("profiles", "examples", name).read_text(encoding="utf-8"))


def _patients(n: int, rng: random.Random) -> list[dict[str, Any]]:
    base = _example("Patient-cn-patient-example.json")
    out = []
    for i in range(n):
        p = copy.deepcopy(base)
        p["id"] = f"bench-{i}"
        born = f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        male = rng.random() < 0.5
        seq = rng.randrange(0, 999) // 2 * 2 + (1 if male else 0)
        first17 = f"{rng.choice(_DISTRICTS)}{born.replace('-', '')}{seq:03d}"
        for ident in p["identifier"]:
            if ident.get("system") == "urn:oid:2.16.156.10011.1.3":
                ident["value"] = first17 + check_character(first17)
        family, given = rng.choice(_SURNAMES), "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2)))
        p["name"][0].update(text=family + given, family=family, given=[given])
        p["birthDate"] = born
        p["gender"] = "male" if male else "female"
        for ext in (p.get("_gender") or {}).get("extension", ()):
            if "valueCoding" in ext:
                ext["valueCoding"]["code"] = "1" if male else "2"
                ext["valueCoding"]["display"] = "男性" if male else "女性"
        out.append(p)
    return out


def _observations(name: str, n: int, rng: random.Random, vary: Callable[[dict[str, Any], random.Random], None]) -> list[dict[str, Any]]:
    base = _example(name)
    out = []
    for i in range(n):
        o = copy.deepcopy(base)
        o["id"] = f"bench-{i}"
        vary(o, rng)
        out.append(o)
    return out


def _vary_bp(o: dict[str, Any], rng: random.Random) -> None:
    o["component"][0]["valueQuantity"]["value"] = rng.randint(95, 180)
    o["component"][1]["valueQuantity"]["value"] = rng.randint(55, 110)


def _vary_value(low: float, high: float) -> Callable[[dict[str, Any], random.Random], None]:
    def vary(o: dict[str, Any], rng: random.Random) -> None:
        o["valueQuantity"]["value"] = round(rng.uniform(low, high), 1)

    return vary


def _rate(items: list[dict[str, Any]], check: Callable[[dict[str, Any]], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for r in items:
            check(r)
        best = min(best, time.process_time() - t0)
    return len(items) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="resources of each kind")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(20261122)
    machine = machine_facts("not used")
    validator = validator_for(_registry())
    # Built one kind at a time and frozen out of the collector's way: thousands of live resources
    # would otherwise make every garbage collection walk them, which a server never holds.
    cases: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "CN Patient (cn-patient)": lambda: _patients(args.count, rng),
        "blood pressure (cn-blood-pressure)": lambda: _observations("Observation-cn-bp-example.json", args.count, rng, _vary_bp),
        "body weight (cn-body-weight)": lambda: _observations("Observation-cn-weight-example.json", args.count, rng, _vary_value(40, 120)),
        "heart rate (cn-heart-rate)": lambda: _observations("Observation-cn-heart-rate-example.json", args.count, rng, _vary_value(50, 110)),
    }
    def on_write(resource: dict[str, Any]) -> None:
        # What the write path does for a resource claiming a profile (interceptors/validation.py).
        found: list[tuple[dict[str, Any], str]] = []
        validate_resource(resource, extensions=found)
        validator.validate(resource, structure=False, extensions=found)

    print(f"{'resource':<38}{'on write':>10}{'$validate':>11}{'structure only':>16}{'errors':>8}   (resources/s, one core)")
    rows = []
    for label, make in cases.items():
        items = make()
        gc.collect()
        gc.freeze()
        errors = sum(1 for r in items for i in validator.validate(r) if i.severity == "error")
        write = _rate(items, on_write, args.repeat)
        full = _rate(items, validator.validate, args.repeat)
        floor = _rate(items, validate_resource, args.repeat)
        print(f"{label:<38}{write:>10,.0f}{full:>11,.0f}{floor:>16,.0f}{errors:>8}")
        rows.append(f"| {label} | {write:,.0f} | {full:,.0f} | {floor:,.0f} | {errors} |")
        gc.unfreeze()
        del items
    print("on write / $validate: structure + R4 invariants + extensions + the profile; structure only: what a")
    print("write without a profile claim pays. Goal: >= 3,000 resources/s per core; errors must be 0.")
    report = [
        "# Profile validation, resources/s on one core (bench/profile_bench.py)",
        "",
        f"{args.count} varied copies of each shipped example, best of {args.repeat} passes, CPU time.",
        "",
        "| resource | on write | $validate | structure only | errors |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "*on write* and *$validate*: structure + R4 invariants + extensions + the profile (the same work;",
        "the write path shares one walk between structure and extensions); *structure only*: what a write",
        "without a profile claim pays. Goal: ≥ 3,000 resources/s per core.",
        "",
        *[line for line in machine_table(machine) if not line.startswith("| MongoDB")],
        "",
    ]
    ROOT.joinpath("bench", "results", "profile-latest.md").write_text("\n".join(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
