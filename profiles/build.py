"""Generate the CN EHR StructureDefinitions, examples, ImplementationGuide and docs from profiles/src/.

Sources are compact YAML (profiles/src/*.yaml for artefacts, profiles/src/examples/*.yaml for
examples); everything else under profiles/ is generated. Run `.venv/bin/python profiles/build.py`;
`--check` writes nothing and exits 1 when a generated file would change (a test calls it).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
BASE = "https://fhir.cn-ehr.org"
VERSION = "0.1.0"
CORE = "http://hl7.org/fhir/StructureDefinition/"
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
# Element keys copied verbatim into the differential (fixed[x]/pattern[x] are added by prefix).
_PASSTHROUGH = ("mustSupport", "sliceName", "min", "max", "slicing", "type", "binding", "constraint")
_CARD = re.compile(r"^(\d+)\.\.(\d+|\*)$")
_TYPE = re.compile(r"^(\w+)(?:\((.*)\))?$")


def sd_url(artefact_id: str) -> str:
    return f"{BASE}/StructureDefinition/{artefact_id}"


def vs_url(token: str) -> str:
    """A ValueSet id of the catalogue, or an absolute URL kept as it is."""
    return token if (":" in token) else f"{BASE}/ValueSet/{token}"


def _split(text: str | None) -> tuple[str, str]:
    """'中文 | English' -> (zh, en); one language only -> (text, text)."""
    if not text:
        return "", ""
    zh, sep, en = str(text).partition(" | ")
    return (zh.strip(), en.strip()) if sep else (zh.strip(), zh.strip())


def _pascal(artefact_id: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_.]", artefact_id))


def _target(token: str) -> str:
    """A profile id of this project (cn-…) or a core type name -> canonical URL."""
    token = token.strip()
    if token.startswith("http"):
        return token
    return sd_url(token) if token.startswith("cn-") else CORE + token


def _types(spec: Any) -> list[dict]:
    """'Reference(cn-patient|Organization)', 'Extension(cn-ethnicity)', 'Quantity' -> ElementDefinition.type."""
    out: list[dict] = []
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, dict):
            out.append(item)
            continue
        match = _TYPE.match(item.strip())
        if not match:
            raise ValueError(f"bad type {item!r}")
        code, args = match.groups()
        entry: dict[str, Any] = {"code": code}
        if args:
            targets = [_target(t) for t in args.split("|")]
            key = "targetProfile" if code in ("Reference", "canonical") else "profile"
            entry[key] = targets
        out.append(entry)
    return out


def _binding(spec: Any) -> dict:
    if isinstance(spec, dict):
        return spec
    strength, valueset = str(spec).split()
    return {"strength": strength, "valueSet": vs_url(valueset)}


_SHARED_EXPRESSIONS: dict[str, str] = {}


def _collect_expressions(artefacts: list[dict]) -> None:
    """Let a constraint write `expr: "@<key>"` to reuse the expression defined once under that key."""
    for art in artefacts:
        for spec in [art, *art.get("elements", [])]:
            for c in spec.get("constraints", []):
                if not str(c["expr"]).startswith("@"):
                    _SHARED_EXPRESSIONS.setdefault(c["key"], c["expr"])


def _constraint(spec: dict, source: str) -> dict:
    expr = str(spec["expr"])
    if expr.startswith("@"):
        expr = _SHARED_EXPRESSIONS[expr[1:]]
    return {
        "key": spec["key"],
        "severity": spec.get("severity", "error"),
        "human": spec["en"],
        "_human": {"extension": [{"url": TRANSLATION, "extension": [
            {"url": "lang", "valueCode": "zh-CN"}, {"url": "content", "valueString": spec["zh"]}]}]},
        "expression": " ".join(expr.split()),
        "source": source,
    }


def _slicing(spec: Any) -> dict:
    """'value:system' or 'pattern:code' (comma separated for several) -> ElementDefinition.slicing."""
    if isinstance(spec, dict):
        return spec
    discriminators = []
    for part in str(spec).split(","):
        kind, path = part.strip().split(":", 1)
        discriminators.append({"type": kind, "path": path})
    return {"discriminator": discriminators, "ordered": False, "rules": "open"}


def _element(spec: dict, source: str) -> dict:
    element_id = spec.get("id") or spec["path"]
    path = spec.get("path") or re.sub(r":[^.]+", "", element_id)
    element: dict[str, Any] = {"id": element_id, "path": path}
    last = element_id.rsplit(".", 1)[-1]
    if ":" in last and "sliceName" not in spec:
        element["sliceName"] = last.split(":", 1)[1]
    if "sliceName" in spec:
        element["sliceName"] = spec["sliceName"]
    zh, en = _split(spec.get("short"))
    if zh:
        element["short"] = zh
        element["definition"] = spec.get("definition", en)
    if "card" in spec:
        match = _CARD.match(str(spec["card"]))
        if not match:
            raise ValueError(f"bad card {spec['card']!r} in {element_id}")
        element["min"], element["max"] = int(match.group(1)), match.group(2)
    for key in ("min", "max"):
        if key in spec:
            element[key] = int(spec[key]) if key == "min" else str(spec[key])
    if "slicing" in spec:
        element["slicing"] = _slicing(spec["slicing"])
    if "type" in spec:
        element["type"] = _types(spec["type"])
    for key, value in spec.items():
        if key.startswith(("fixed", "pattern")):
            element[key] = value
    if "binding" in spec:
        element["binding"] = _binding(spec["binding"])
    if "constraints" in spec:
        element["constraint"] = [_constraint(c, source) for c in spec["constraints"]]
    if spec.get("ms"):
        element["mustSupport"] = True
    return element


def _header(art: dict, kind: str, fhir_type: str) -> dict:
    title_zh, title_en = _split(art["title"])
    desc_zh, desc_en = _split(art["description"])
    return {
        "resourceType": "StructureDefinition",
        "id": art["id"],
        "url": sd_url(art["id"]),
        "version": VERSION,
        "name": _pascal(art["id"]),
        "title": f"{title_zh} {title_en}",
        "status": "active",
        "experimental": False,
        "publisher": "CN EHR FHIR project",
        "jurisdiction": [{"coding": [{"system": "urn:iso:std:iso:3166", "code": "CN", "display": "China"}]}],
        "description": f"{desc_zh}\n\n{desc_en}",
        "fhirVersion": "4.0.1",
        "kind": kind,
        "abstract": False,
        "type": fhir_type,
        "baseDefinition": CORE + fhir_type,
        "derivation": "constraint",
    }


def _expand(specs: list[dict], macros: dict[str, list[dict]]) -> list[dict]:
    """Replace `- use: <macro>` items with the macro's elements (macros live in src/_macros.yaml)."""
    out: list[dict] = []
    for spec in specs:
        if "use" in spec:
            out.extend(copy.deepcopy(macros[spec["use"]]))
        else:
            out.append(spec)
    return out


def build_profile(art: dict, macros: dict[str, list[dict]] | None = None) -> dict:
    sd = _header(art, "resource" if art.get("kind", "resource") == "resource" else art["kind"], art["type"])
    root_zh, root_en = _split(art["title"])
    root = {"id": art["type"], "path": art["type"], "short": root_zh, "definition": _split(art["description"])[1]}
    elements = [root]
    for spec in _expand(art.get("elements", []), macros or {}):
        if spec.get("id", spec.get("path")) == art["type"]:
            root.update({k: v for k, v in _element(spec, sd["url"]).items() if k not in ("id", "path", "short")})
            continue
        elements.append(_element(spec, sd["url"]))
    sd["differential"] = {"element": elements}
    return sd


def build_extension(art: dict) -> dict:
    sd = _header(art, "complex-type", "Extension")
    sd["context"] = [{"type": "element", "expression": c} for c in art["context"]]
    zh, en = _split(art["short"])
    value: dict[str, Any] = {"id": "Extension.value[x]", "path": "Extension.value[x]", "short": zh,
                             "definition": en, "min": 1, "type": _types(art["value"])}
    if "binding" in art:
        value["binding"] = _binding(art["binding"])
    root = {"id": "Extension", "path": "Extension", "short": zh, "definition": _split(art["description"])[1]}
    if "constraints" in art:
        root["constraint"] = [_constraint(c, sd["url"]) for c in art["constraints"]]
    sd["differential"] = {"element": [
        root,
        {"id": "Extension.extension", "path": "Extension.extension", "max": "0"},
        {"id": "Extension.url", "path": "Extension.url", "fixedUri": sd["url"]},
        value,
    ]}
    return sd


# ---------------------------------------------------------------- examples

def _walk(node: Any, dotted: str) -> tuple[Any, Any]:
    """Parent container and key/index of a dotted path like 'identifier[0].value'."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    keys: list[Any] = [int(p[1:-1]) if p.startswith("[") else p for p in parts]
    for key in keys[:-1]:
        node = node[key]
    return node, keys[-1]


def _apply(resource: dict, ops: list[dict]) -> dict:
    result = copy.deepcopy(resource)
    for op in ops:
        if "set" in op:
            parent, key = _walk(result, op["set"])
            parent[key] = op["value"]
        elif "delete" in op:
            parent, key = _walk(result, op["delete"])
            del parent[key]
        elif "append" in op:
            parent, key = _walk(result, op["append"])
            parent.setdefault(key, []).append(op["value"])
        else:
            raise ValueError(f"unknown op {op}")
    return result


def _resource(entry: dict, resource: dict) -> dict:
    body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
    meta = dict(resource.get("meta", {}))
    meta["profile"] = [sd_url(entry["profile"])]
    return {"resourceType": entry["type"], "id": entry["id"], "meta": meta, **body}


def build_examples(entries: list[dict]) -> tuple[dict[str, dict], dict[str, dict], dict[str, list]]:
    """(valid file -> resource, invalid file -> resource, expectations)."""
    by_id: dict[str, dict] = {}
    valid: dict[str, dict] = {}
    invalid: dict[str, dict] = {}
    expected: dict[str, list] = {}
    for entry in entries:
        if "from" in entry:
            base = by_id[entry["from"]]
            entry = {"type": base["type"], "profile": base["profile"], **entry}
            resource = _apply(base["resource"], entry.get("ops", []))
        else:
            resource = entry["resource"]
        if entry["id"] in by_id:
            raise ValueError(f"duplicate example id {entry['id']}")
        by_id[entry["id"]] = {**entry, "resource": resource}
        name = f"{entry['type']}-{entry['id']}.json"
        built = _resource(entry, resource)
        if entry.get("expect"):
            invalid[name] = built
            expected[name] = [{"severity": e.get("severity", "error"), "expression": e["expression"], "key": e["key"]}
                              for e in entry["expect"]]
        else:
            valid[name] = built
    return valid, invalid, expected


# ---------------------------------------------------------------- IG and docs

def build_ig(sds: list[dict], examples: dict[str, dict]) -> dict:
    resources = [{
        "reference": {"reference": f"StructureDefinition/{sd['id']}"},
        "name": sd["title"],
        "description": sd["description"],
        "exampleBoolean": False,
    } for sd in sds]
    for resource in examples.values():
        resources.append({
            "reference": {"reference": f"{resource['resourceType']}/{resource['id']}"},
            "name": resource["id"],
            "exampleCanonical": resource["meta"]["profile"][0],
        })
    return {
        "resourceType": "ImplementationGuide",
        "id": "cn-ehr",
        "url": f"{BASE}/ImplementationGuide/cn-ehr",
        "version": VERSION,
        "name": "CnEhrCore",
        "title": "居民电子健康档案首页 FHIR 规范 CN EHR Homepage Core",
        "status": "active",
        "experimental": False,
        "publisher": "CN EHR FHIR project",
        "description": ("居民电子健康档案首页（国卫办基层发〔2024〕15号）及相关记录的 FHIR R4 规范（上海区域平台）。\n\n"
                        "FHIR R4 profiles of China's national resident EHR homepage and the records around it."),
        "jurisdiction": [{"coding": [{"system": "urn:iso:std:iso:3166", "code": "CN"}]}],
        "packageId": "cn.ehr.core",
        "license": "CC0-1.0",
        "fhirVersion": ["4.0.1"],
        "definition": {"resource": resources},
    }


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") if text not in (None, "") else ""


def _type_text(types: list[dict]) -> str:
    parts = []
    for t in types:
        targets = t.get("targetProfile") or t.get("profile")
        short = [u.rsplit("/", 1)[-1] for u in targets] if targets else []
        joined = " \\| ".join(short)
        parts.append(f"{t['code']}({joined})" if short else t["code"])
    return ", ".join(parts)


def build_doc(sd: dict, art: dict) -> str:
    zh, en = _split(art["description"])
    lines = [f"# {sd['title']}", "", f"`{sd['url']}` (version {sd['version']}, base {sd['type']})", "",
             zh, "", en, ""]
    if sd["type"] == "Extension":
        lines += ["Context: " + ", ".join(c["expression"] for c in sd["context"]), ""]
    lines += ["## 约束元素 Constrained elements", "",
              "| Path | Card. | Type | Fixed / pattern | Binding | MS | 说明 | Description |",
              "|---|---|---|---|---|---|---|---|"]
    rules = []
    for el in sd["differential"]["element"]:
        card = f"{el.get('min', '')}..{el.get('max', '')}" if ("min" in el or "max" in el) else ""
        fixed = "; ".join(f"{k}: `{json.dumps(v, ensure_ascii=False)}`" for k, v in el.items()
                          if k.startswith(("fixed", "pattern")))
        binding = f"{el['binding']['strength']} {el['binding']['valueSet']}" if "binding" in el else ""
        slicing = ""
        if "slicing" in el:
            slicing = " (sliced by " + ", ".join(f"{d['type']}:{d['path']}" for d in el["slicing"]["discriminator"]) + ")"
        lines.append("| " + " | ".join(_cell(x) for x in (
            el["id"] + slicing, card, _type_text(el.get("type", [])), fixed, binding,
            "Y" if el.get("mustSupport") else "", el.get("short", ""), el.get("definition", ""))) + " |")
        for c in el.get("constraint", []):
            rules.append((el["id"], c))
    if rules:
        lines += ["", "## 规则 Rules", "",
                  "| Key | Context | Severity | 中文 | English | FHIRPath |", "|---|---|---|---|---|---|"]
        for context, c in rules:
            zh_text = c["_human"]["extension"][0]["extension"][1]["valueString"]
            lines.append("| " + " | ".join(_cell(x) for x in (
                c["key"], context, c["severity"], zh_text, c["human"], f"`{c['expression']}`")) + " |")
    return "\n".join(lines) + "\n"


def build_index(sds: list[dict]) -> str:
    lines = ["# 居民电子健康档案 FHIR 规范 — CN EHR profiles", "",
             "Generated by `profiles/build.py` from `profiles/src/`; do not edit.", "",
             "| Id | Title | Type | Page |", "|---|---|---|---|"]
    for sd in sds:
        lines.append(f"| {sd['id']} | {_cell(sd['title'])} | {sd['type']} | [{sd['id']}.md]({sd['id']}.md) |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- driver

def _load(pattern: str) -> list[dict]:
    items: list[dict] = []
    for path in sorted(SRC.glob(pattern)):
        if path.name.startswith("_"):
            continue
        items.extend(yaml.safe_load(path.read_text(encoding="utf-8")) or [])
    return items


def generate() -> dict[Path, str]:
    """Every generated file and its text."""
    artefacts = _load("*.yaml")
    _collect_expressions(artefacts)
    macros = yaml.safe_load((SRC / "_macros.yaml").read_text(encoding="utf-8"))
    ids = [a["id"] for a in artefacts]
    if len(ids) != len(set(ids)):
        raise ValueError("duplicate artefact ids")
    files: dict[Path, str] = {}
    sds = []
    for art in artefacts:
        sd = build_extension(art) if art.get("kind") == "extension" else build_profile(art, macros)
        sds.append(sd)
        files[ROOT / f"StructureDefinition-{sd['id']}.json"] = _json(sd)
        files[ROOT / "docs" / f"{sd['id']}.md"] = build_doc(sd, art)
    files[ROOT / "docs" / "index.md"] = build_index(sds)
    valid, invalid, expected = build_examples(_load("examples/*.yaml"))
    for name, resource in valid.items():
        files[ROOT / "examples" / name] = _json(resource)
    for name, resource in invalid.items():
        files[ROOT / "examples" / "invalid" / name] = _json(resource)
    files[ROOT / "examples" / "invalid" / "expected.json"] = _json(expected)
    files[ROOT / "ImplementationGuide-cn-ehr.json"] = _json(build_ig(sds, valid))
    return files


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _stale(files: dict[Path, str]) -> list[Path]:
    """Generated files that differ, and old generated files that would be removed."""
    changed = [p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    existing = set(ROOT.glob("StructureDefinition-*.json")) | set((ROOT / "docs").glob("*.md"))
    existing |= set((ROOT / "examples").glob("*.json")) | set((ROOT / "examples" / "invalid").glob("*.json"))
    return changed + sorted(existing - set(files))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file would change")
    args = parser.parse_args(argv)
    files = generate()
    stale = _stale(files)
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}")
        return 1 if stale else 0
    for path in stale:
        if path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path], encoding="utf-8")
        else:
            path.unlink()
    print(f"{len(files)} files, {len(stale)} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
