"""Build the compact R4 model in ``data/r4.json.gz`` from HL7's ``hl7.fhir.r4.examples`` package.

Run: ``python -m fhir_server.definitions._generate /path/to/hl7.fhir.r4.examples-4.0.1.tgz``.
Only this generator reads the package; the server loads the committed output.
"""

from __future__ import annotations

import gzip
import json
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterable

_OUT = Path(__file__).with_name("data") / "r4.json.gz"
_SD_BUNDLES = ("package/Bundle-resources.json", "package/Bundle-types.json")
_TERM_BUNDLES = (
    "package/Bundle-valuesets.json",
    "package/Bundle-v3-valuesets.json",
    "package/Bundle-v2-valuesets.json",
    "package/Bundle-externals.json",
)
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
# JSON representation of the primitive roots; descendants (positiveInt, code, ...) inherit it.
_JSON_KIND_ROOTS = {"boolean": "boolean", "integer": "integer", "decimal": "decimal"}

Json = dict[str, Any]


def _read_package(tgz: Path) -> tuple[list[Json], list[Json]]:
    """StructureDefinitions, and ValueSets + CodeSystems, from the package."""
    sds: list[Json] = []
    terms: list[Json] = []
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            is_sd = name in _SD_BUNDLES
            is_term = name in _TERM_BUNDLES or (
                name.startswith(("package/ValueSet-", "package/CodeSystem-")) and name.endswith(".json")
            )
            if not (is_sd or is_term):
                continue
            f = tar.extractfile(member)
            assert f is not None
            doc = json.load(f)
            found = [e["resource"] for e in doc.get("entry", [])] if doc["resourceType"] == "Bundle" else [doc]
            if is_sd:
                sds += [r for r in found if r["resourceType"] == "StructureDefinition"]
            else:
                terms += [r for r in found if r["resourceType"] in ("ValueSet", "CodeSystem")]
    return sds, terms


def _type_code(t: Json) -> str:
    """The FHIR type of an ElementDefinition.type, mapping FHIRPath System.* types back."""
    code: str = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in t.get("extension", ()):
            if ext["url"] == _FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
    return code


def _unversioned(url: str) -> str:
    return url.split("|", 1)[0]


class _Terminology:
    """Offline expansion of value sets from the bundled ValueSets and CodeSystems."""

    def __init__(self, resources: Iterable[Json]) -> None:
        self.value_sets: dict[str, Json] = {}
        self.code_systems: dict[str, Json] = {}
        for r in resources:
            target = self.value_sets if r["resourceType"] == "ValueSet" else self.code_systems
            target.setdefault(r["url"], r)
        self._cache: dict[str, dict[str, set[str]] | None] = {}

    def expand(self, url: str, _stack: tuple[str, ...] = ()) -> dict[str, set[str]] | None:
        """``{system: codes}``, or None when it cannot be computed offline."""
        url = _unversioned(url)
        if url in self._cache:
            return self._cache[url]
        if url in _stack:
            return None
        vs = self.value_sets.get(url)
        result = None if vs is None else self._compose(vs.get("compose"), _stack + (url,))
        self._cache[url] = result
        return result

    def _compose(self, compose: Json | None, stack: tuple[str, ...]) -> dict[str, set[str]] | None:
        if not compose:
            return None
        out: dict[str, set[str]] = {}
        for inc in compose.get("include", ()):
            part = self._include(inc, stack)
            if part is None:
                return None
            for system, codes in part.items():
                out.setdefault(system, set()).update(codes)
        for exc in compose.get("exclude", ()):
            part = self._include(exc, stack)
            # An exclusion we cannot compute only makes us accept more codes; never reject wrongly.
            for system, codes in (part or {}).items():
                out.get(system, set()).difference_update(codes)
        return out if any(out.values()) else None

    def _include(self, inc: Json, stack: tuple[str, ...]) -> dict[str, set[str]] | None:
        result: dict[str, set[str]] | None = None
        system = inc.get("system")
        if system is not None:
            if "concept" in inc:
                codes = {c["code"] for c in inc["concept"]}
            else:
                codes_or_none = self._system_codes(system, inc.get("filter", ()))
                if codes_or_none is None:
                    return None
                codes = codes_or_none
            result = {system: codes}
        for vs_url in inc.get("valueSet", ()):
            other = self.expand(vs_url, stack)
            if other is None:
                return None
            if result is None:
                result = {s: set(c) for s, c in other.items()}
            else:  # several value sets (and a system) in one include intersect
                result = {s: c & other.get(s, set()) for s, c in result.items()}
        return result

    def _system_codes(self, system: str, filters: Iterable[Json]) -> set[str] | None:
        cs = self.code_systems.get(system)
        if cs is None or cs.get("content") != "complete":
            return None
        parents: dict[str, str | None] = {}
        children: dict[str | None, list[str]] = {}

        def walk(concepts: Iterable[Json], parent: str | None) -> None:
            for c in concepts:
                parents[c["code"]] = parent
                children.setdefault(parent, []).append(c["code"])
                walk(c.get("concept", ()), c["code"])

        walk(cs.get("concept", ()), None)
        codes = set(parents)
        for f in filters:
            if f.get("property") != "concept" or f.get("op") not in ("is-a", "descendent-of"):
                return None
            root = f["value"]
            below: set[str] = set()
            todo = list(children.get(root, ()))
            while todo:
                code = todo.pop()
                below.add(code)
                todo += children.get(code, ())
            if f["op"] == "is-a" and root in parents:
                below.add(root)
            codes &= below
        return codes


# Checked natively by the validator (and hasValue() is missing from fhirpathpy).
_NATIVE_INVARIANTS = {"ele-1", "ext-1"}


def _constraints(el: Json) -> list[list[str]]:
    """[key, severity, expression, human] of each invariant an element declares."""
    return [
        [c["key"], c["severity"], c["expression"], c.get("human", "")]
        for c in el.get("constraint", ())
        if c.get("expression") and c["key"] not in _NATIVE_INVARIANTS
    ]


def _elements(sd: Json) -> list[Json]:
    """Compact element rows: p path, n min, x max, t types, s summary, m modifier, b vs, r ref,
    c invariants."""
    rows: list[Json] = []
    root = sd["type"]
    for el in sd["snapshot"]["element"]:
        path = el["path"]
        if path == root:
            continue
        row: Json = {"p": path, "n": el["min"], "x": el["max"]}
        if "contentReference" in el:
            row["r"] = el["contentReference"]
        else:
            types = [_type_code(t) for t in el.get("type", ())]
            if sd["kind"] == "resource" and path == f"{root}.id":
                # 4.0.1 snapshots type Resource.id as System.String; resource.html#id says ``id``.
                types = ["id"]
            row["t"] = types
        if el.get("isSummary"):
            row["s"] = 1
        if el.get("isModifier"):
            row["m"] = 1
        binding = el.get("binding")
        if binding and binding.get("strength") == "required" and binding.get("valueSet"):
            row["b"] = _unversioned(binding["valueSet"])
        constraints = _constraints(el)
        if constraints:
            row["c"] = constraints
        rows.append(row)
    return rows


def _primitive(sd: Json, by_name: dict[str, Json]) -> Json:
    regex = None
    for el in sd["snapshot"]["element"]:
        if el["path"] == f"{sd['type']}.value":
            for t in el.get("type", ()):
                for ext in t.get("extension", ()):
                    if ext["url"] == _REGEX_EXT:
                        regex = ext["valueString"]
    kind, cur = "string", sd
    while cur is not None:
        if cur["type"] in _JSON_KIND_ROOTS:
            kind = _JSON_KIND_ROOTS[cur["type"]]
            break
        cur = by_name.get(cur.get("baseDefinition", "").rsplit("/", 1)[-1])
    return {"json": kind, "regex": regex}


def build(tgz: Path) -> Json:
    """The whole model as one JSON-able dict."""
    sds, terms = _read_package(tgz)
    by_name = {sd["type"]: sd for sd in sds if sd.get("derivation") != "constraint"}
    model: Json = {
        "fhirVersion": "4.0.1",
        "source": "hl7.fhir.r4.examples 4.0.1 (CC0-1.0)",
        "primitives": {},
        "types": {},
        "valueSets": {},
    }
    for sd in sorted(sds, key=lambda s: s["type"]):
        if sd.get("derivation") == "constraint" or sd["kind"] == "logical":
            continue
        name = sd["type"]
        if sd["kind"] == "primitive-type":
            model["primitives"][name] = _primitive(sd, by_name)
            continue
        model["types"][name] = {
            "kind": "resource" if sd["kind"] == "resource" else "complex",
            "abstract": bool(sd.get("abstract")),
            "elements": _elements(sd),
        }
        root_constraints = _constraints(sd["snapshot"]["element"][0])
        if root_constraints:
            model["types"][name]["c"] = root_constraints
    term = _Terminology(terms)
    urls = {row["b"] for t in model["types"].values() for row in t["elements"] if "b" in row}
    for url in sorted(urls):
        expanded = term.expand(url)
        model["valueSets"][url] = (
            None if expanded is None else {s: sorted(c) for s, c in sorted(expanded.items()) if c}
        )
    return model


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m fhir_server.definitions._generate PACKAGE.tgz [OUT.json.gz]", file=sys.stderr)
        return 2
    model = build(Path(argv[0]))
    out = Path(argv[1]) if len(argv) == 2 else _OUT
    raw = json.dumps(model, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    # mtime=0 so regenerating from the same package gives identical bytes.
    out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    vs = model["valueSets"]
    print(
        f"{out}: {out.stat().st_size} bytes; {len(model['types'])} types, "
        f"{len(model['primitives'])} primitives, {sum(v is not None for v in vs.values())}/{len(vs)} "
        "required value sets expanded"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
