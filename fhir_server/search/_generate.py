"""Regenerate data/search-parameters.json.gz and data/compartments.json.gz from the HL7 R4 package (CC0-1.0).

    python -m fhir_server.search._generate /path/to/hl7.fhir.r4.examples-4.0.1.tgz
"""

from __future__ import annotations

import gzip
import json
import sys
import tarfile
from pathlib import Path

_KEEP = ("url", "code", "base", "type", "expression", "target", "modifier", "comparator", "multipleOr", "multipleAnd")
# The compartments of R4 (CodeSystem compartment-type), by the file name of their definition.
_COMPARTMENTS = ("patient", "encounter", "practitioner", "relatedPerson", "device")


def main(tgz: str) -> None:
    with tarfile.open(tgz) as tar:
        bundle = json.load(tar.extractfile("package/Bundle-searchParams.json"))  # type: ignore[arg-type]
    out = []
    for entry in bundle["entry"]:
        sp = entry["resource"]
        item = {k: sp[k] for k in _KEEP if k in sp}
        if "component" in sp:
            item["component"] = [{"definition": c["definition"], "expression": c["expression"]} for c in sp["component"]]
        out.append(item)
    data = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()
    target = Path(__file__).parent / "data" / "search-parameters.json.gz"
    target.write_bytes(gzip.compress(data, 9, mtime=0))
    print(f"{len(out)} search parameters -> {target}")
    _compartments(tgz)


def _compartments(tgz: str) -> None:
    """{compartment code: {resource type: [search parameter codes]}}, members only, in spec order."""
    out: dict[str, dict[str, list[str]]] = {}
    with tarfile.open(tgz) as tar:
        for name in _COMPARTMENTS:
            cd = json.load(tar.extractfile(f"package/CompartmentDefinition-{name}.json"))  # type: ignore[arg-type]
            out[cd["code"]] = {r["code"]: list(r["param"]) for r in cd["resource"] if r.get("param")}
    data = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()
    target = Path(__file__).parent / "data" / "compartments.json.gz"
    target.write_bytes(gzip.compress(data, 9, mtime=0))
    print(f"{len(out)} compartments -> {target}")


if __name__ == "__main__":
    main(sys.argv[1])
