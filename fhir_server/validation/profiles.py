"""Validation against profiles: StructureDefinitions that constrain a type (``derivation: constraint``).

A profile's differential is compiled once into a tree of :class:`_Rule` (one per constrained
element, slices under their element) and the resource is checked by walking that tree only, so a
profile costs in proportion to what it constrains, not to the size of the resource. What the
differential does not say is left to the structural validation of the base type, which runs first.

Supported: cardinality (elements and slices), types (choice types, type slices such as
``value[x]:valueQuantity``), fixed[x] and pattern[x], bindings (required: error; extensible:
warning) through the terminology service, reference target profiles, FHIRPath invariants (see
invariants.py), slicing with ``value``/``pattern`` discriminators (``system``, ``url``, ``code``,
``$this`` and deeper paths) and open/closed rules, extensions checked against their own
definitions, and a profile's ``baseDefinition`` when that is a profile too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import orjson

from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.outcome import Issue

from .invariants import Invariant, compile_invariant, evaluate

log = logging.getLogger("fhir_server.validation")

__all__ = ["Definitions", "ProfileValidator", "CORE_PREFIX"]

CORE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
# Core type names a targetProfile may end with (others, such as .../vitalsigns, are profiles).
_TARGET_TYPES = RESOURCE_TYPES | {"Resource", "DomainResource"}
_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
_UNBOUNDED = 1 << 62


class Definitions(Protocol):
    """What profile validation needs from the server's conformance resources (no I/O)."""

    @property
    def generation(self) -> int: ...

    def structure_definition(self, url: str) -> dict[str, Any] | None: ...

    def value_set_contains(self, url: str, system: str | None, code: str) -> bool | None:
        """Whether (system, code) is in the value set (system None: any system); None: unknown."""
        ...


@dataclass(eq=False)
class _Rule:
    """The constraints of one element (or slice) of a profile."""

    path: str  # element path, e.g. Patient.identifier
    name: str  # JSON name: "identifier", "value[x]", "valueQuantity"
    label: str  # what a clerk calls it (the Chinese short when there is one)
    slice_name: str | None = None
    min: int | None = None
    max: int | None = None
    types: tuple[str, ...] | None = None
    extension_urls: tuple[str, ...] = ()
    target_types: tuple[str, ...] | None = None
    fixed: Any = None
    has_fixed: bool = False
    pattern: Any = None
    has_pattern: bool = False
    binding: tuple[str, str] | None = None  # strength, value set url
    invariants: list[Invariant] = field(default_factory=list)
    discriminators: tuple[tuple[str, str], ...] = ()
    closed: bool = False
    slices: dict[str, "_Rule"] = field(default_factory=dict)
    children: dict[str, "_Rule"] = field(default_factory=dict)
    unknown_extensions: tuple[str, ...] = ()  # extension urls without a definition on this server
    # (discriminator path, {value: slice name}) when every slice is told apart by one scalar value
    slice_index: tuple[str, dict[Any, str]] | None = None


@dataclass
class _Profile:
    url: str
    type: str
    root: _Rule
    base: str | None  # a base profile to check too (not a core type)
    title: str
    # Whether the verdict on an element depends only on the element (no %resource, resolve()):
    # then an extension's verdict can be kept by its content.
    self_contained: bool = False


def _zh(element: dict[str, Any], key: str) -> str | None:
    for ext in (element.get("_" + key) or {}).get("extension", ()):
        if ext.get("url") == _TRANSLATION:
            parts = {e.get("url"): e for e in ext.get("extension", ())}
            lang = parts.get("lang", {}).get("valueCode", "")
            if lang.startswith("zh"):
                return parts.get("content", {}).get("valueString")
    return None


def _has_cjk(text: str | None) -> bool:
    return bool(text) and any("\u4e00" <= ch <= "\u9fff" for ch in text)  # type: ignore[union-attr]


def _segments(element: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``Patient.identifier:idCard.system`` → [(identifier, idCard), (system, None)]."""
    eid = element.get("id")
    if not eid:
        eid = element["path"] + (f":{element['sliceName']}" if element.get("sliceName") else "")
    out = []
    for seg in eid.split(".")[1:]:
        name, _, slice_name = seg.partition(":")
        out.append((name, slice_name or None))
    return out


def _index_slices(rule: _Rule) -> None:
    """Slices told apart by one value each (identifier system, extension url): a dict lookup
    instead of trying every slice on every item."""
    for child in rule.children.values():
        _index_slices(child)
    for sl in rule.slices.values():
        _index_slices(sl)
    if not rule.slices:
        return
    discriminators = rule.discriminators or ((("value", "url"),) if rule.name in ("extension", "modifierExtension") else ())
    usable = [d for d in discriminators if d[0] in ("value", "pattern")]
    if len(usable) != 1:
        return
    path = usable[0][1]
    index: dict[Any, str] = {}
    for name, sl in rule.slices.items():
        found, expected = _expected(sl, path)
        if not found or isinstance(expected, (dict, list)) or expected in index:
            return
        index[expected] = name
    rule.slice_index = (path, index)


def _prune(rule: _Rule) -> bool:
    """Drop rules that check nothing (elements a profile only documents or marks must-support);
    True when ``rule`` itself checks nothing either."""
    rule.children = {k: c for k, c in rule.children.items() if not _prune(c)}
    for sl in rule.slices.values():
        _prune(sl)
    return not (
        rule.children
        or rule.slices
        or rule.min
        or (rule.max is not None and rule.max != _UNBOUNDED)
        or (rule.types is not None and rule.name.endswith("[x]"))
        or rule.extension_urls
        or rule.target_types
        or rule.has_fixed
        or rule.has_pattern
        or rule.binding
        or rule.invariants
        or rule.slice_name
    )


def _compile(sd: dict[str, Any]) -> _Profile:
    type_ = sd["type"]
    root = _Rule(type_, type_, sd.get("title") or type_)
    for el in sd.get("differential", {}).get("element", ()):
        node = root
        path = type_
        for name, slice_name in _segments(el):
            path = f"{path}.{name}"
            if slice_name and name.endswith("[x]"):
                # value[x]:valueQuantity is the valueQuantity property
                name, slice_name = slice_name, None
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Rule(path, name, path)
            if slice_name:
                sl = child.slices.get(slice_name)
                if sl is None:
                    sl = child.slices[slice_name] = _Rule(path, name, f"{path}:{slice_name}", slice_name=slice_name)
                child = sl
            node = child
        _apply(node, el, sd.get("url", ""))
    _index_slices(root)
    _prune(root)
    base = sd.get("baseDefinition")
    base_profile = base if base and not base.startswith(CORE_PREFIX) else None
    expressions = [c.get("expression", "") for el in sd.get("differential", {}).get("element", ()) for c in el.get("constraint", ())]
    self_contained = not any(w in e for e in expressions for w in ("%resource", "%rootResource", "%context", "resolve("))
    title = sd.get("title") or sd.get("name") or sd.get("url", "")
    return _Profile(sd.get("url", ""), type_, root, base_profile, title, self_contained and base_profile is None)


def _apply(rule: _Rule, el: dict[str, Any], source: str) -> None:
    short = el.get("short")
    zh = _zh(el, "short") or (short if _has_cjk(short) else None)
    if zh:
        rule.label = zh
    elif short and rule.label == rule.path:
        rule.label = f"{rule.path}（{short}）" if rule.slice_name is None else rule.label
    if "min" in el:
        rule.min = int(el["min"])
    if "max" in el:
        rule.max = _UNBOUNDED if el["max"] == "*" else int(el["max"])
    if el.get("type"):
        rule.types = tuple(t.get("code", "") for t in el["type"])
        urls = [p for t in el["type"] if t.get("code") == "Extension" for p in t.get("profile", ())]
        if urls:
            rule.extension_urls = tuple(urls)
        targets = [p for t in el["type"] for p in t.get("targetProfile", ())]
        if targets:
            rule.target_types = tuple(targets)
    for key, value in el.items():
        if key.startswith("fixed"):
            rule.fixed, rule.has_fixed = value, True
        elif key.startswith("pattern"):
            rule.pattern, rule.has_pattern = value, True
    binding = el.get("binding")
    if binding and binding.get("valueSet") and binding.get("strength") in ("required", "extensible"):
        rule.binding = (binding["strength"], binding["valueSet"])
    for c in el.get("constraint", ()):
        if not c.get("expression") or c.get("key") in ("ele-1", "ext-1"):
            continue
        try:
            rule.invariants.append(
                compile_invariant(
                    c["key"],
                    c.get("severity", "error"),
                    c["expression"],
                    c.get("human", ""),
                    rule.path.replace("[x]", ""),
                    human_zh=_zh(c, "human"),
                    source=source,
                )
            )
        except ValueError as e:
            log.warning("profile %s: %s", source, e)
    slicing = el.get("slicing")
    if slicing:
        rule.discriminators = tuple((d.get("type", ""), d.get("path", "")) for d in slicing.get("discriminator", ()))
        rule.closed = slicing.get("rules") == "closed"


# -- reading values ---------------------------------------------------------------------------

_Item = tuple[Any, Any, str]  # value, its "_name" companion (primitives), location


def _items(container: Any, name: str, location: str) -> list[_Item]:
    if not isinstance(container, dict):
        return []
    if name[-1] != "]":
        value = container.get(name)
        companion = container.get("_" + name)
        if value is None and companion is None:
            return []
        if type(value) is list and companion is None:
            return [(v, None, f"{location}.{name}[{i}]") for i, v in enumerate(value) if v is not None]
        if type(value) is not list and type(companion) is not list:
            return [(value, companion, f"{location}.{name}")]
    keys: Iterable[str]
    if name.endswith("[x]"):
        prefix = name[:-3]
        keys = [k for k in container if k.startswith(prefix) and len(k) > len(prefix) and k[len(prefix)].isupper()]
        keys = keys or [
            k[1:] for k in container if k.startswith("_" + prefix) and len(k) > len(prefix) + 1 and k[len(prefix) + 1].isupper()
        ]
    else:
        keys = (name,)
    out: list[_Item] = []
    for key in keys:
        value = container.get(key)
        companion = container.get("_" + key)
        if value is None and companion is None:
            continue
        if isinstance(value, list) or isinstance(companion, list):
            values = value if isinstance(value, list) else []
            companions = companion if isinstance(companion, list) else []
            for i in range(max(len(values), len(companions))):
                v = values[i] if i < len(values) else None
                c = companions[i] if i < len(companions) else None
                if v is not None or c is not None:
                    out.append((v, c, f"{location}.{key}[{i}]"))
        else:
            out.append((value, companion, f"{location}.{key}"))
    return out


def _matches_pattern(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(_matches_pattern(value.get(k), p) for k, p in pattern.items())
    if isinstance(pattern, list):
        if not isinstance(value, list):
            value = [value] if value is not None else []
        return all(any(_matches_pattern(v, p) for v in value) for p in pattern)
    return value == pattern


def _at(value: Any, path: str) -> list[Any]:
    """Values at a simple dotted path below ``value`` (lists flattened)."""
    current = [value]
    if path in ("$this", ""):
        return current
    for step in path.split("."):
        nxt: list[Any] = []
        for v in current:
            if isinstance(v, dict):
                got = v.get(step)
                if isinstance(got, list):
                    nxt += got
                elif got is not None:
                    nxt.append(got)
        current = nxt
    return current


def _expected(slice_rule: _Rule, path: str) -> tuple[bool, Any]:
    """What a slice fixes at a discriminator path: (found, value-or-pattern). The value may sit
    in a slice of an element on the way (bp: code.coding:SBPCode.code fixed to 8480-6)."""
    if path in ("$this", ""):
        if slice_rule.has_fixed:
            return True, slice_rule.fixed
        if slice_rule.has_pattern:
            return True, slice_rule.pattern
        return False, None
    if path == "url" and slice_rule.extension_urls and "url" not in slice_rule.children:
        return True, slice_rule.extension_urls[0]
    return _fixed_at(slice_rule, path.split("."))


def _fixed_at(node: _Rule, steps: list[str]) -> tuple[bool, Any]:
    if not steps:
        if node.has_fixed:
            return True, node.fixed
        if node.has_pattern:
            return True, node.pattern
        return False, None
    for holder in (node, *node.slices.values()):
        child = holder.children.get(steps[0])
        if child is not None:
            found = _fixed_at(child, steps[1:])
            if found[0]:
                return found
    return False, None


# -- the walk ---------------------------------------------------------------------------------


class _Run:
    """One validation: the resource, the issues, and how to reach definitions."""

    def __init__(self, validator: "ProfileValidator", resource: dict[str, Any], profile: _Profile) -> None:
        self.v = validator
        self.resource = resource
        self.profile = profile
        self.issues: list[Issue] = []

    def add(self, code: str, en: str, zh: str, location: str, severity: str = "error") -> None:
        self.issues.append(Issue(code, f"{en} (profile {self.profile.url})", severity, (location,), zh))  # type: ignore[arg-type]

    def element(self, rule: _Rule, items: list[_Item], parent_location: str) -> None:
        n = len(items)
        where = f"{parent_location}.{rule.name}"
        if rule.min is not None and n < rule.min:
            if rule.slice_name:
                en = f"Slice {rule.slice_name} of {rule.path}: minimum required = {rule.min}, found {n}"
            else:
                en = f"{rule.path}: minimum required = {rule.min}, found {n}"
            zh = f"缺少{rule.label}" if n == 0 else f"{rule.label}至少需要 {rule.min} 个，实际 {n} 个"
            self.add("required", en, zh, where)
        if rule.max is not None and n > rule.max:
            en = f"{rule.label if rule.slice_name else rule.path}: maximum allowed = {rule.max}, found {n}"
            zh = f"{rule.label}不允许出现" if rule.max == 0 else f"{rule.label}最多 {rule.max} 个，实际 {n} 个"
            self.add("structure", en, zh, items[rule.max][2] if rule.max < n else where)
        for item in items:
            self.item(rule, item)
        if rule.slices:
            self.slices(rule, items, parent_location)
        # The extensions' own definitions are checked once for the whole resource
        # (ProfileValidator.check_extensions); here only that they are known.
        for url in rule.unknown_extensions:
            if items:
                self.add(
                    "not-found",
                    f"Extension definition {url} is not known to this server",
                    f"未找到扩展定义 {url}",
                    items[0][2],
                    "warning",
                )

    def item(self, rule: _Rule, item: _Item) -> None:
        value, companion, location = item
        if rule.types is not None and rule.name.endswith("[x]"):
            key = location.rsplit(".", 1)[-1].split("[", 1)[0]
            type_ = key[len(rule.name) - 3 :]
            allowed = [t for t in rule.types]
            if not any(type_.lower() == t.lower() for t in allowed):
                self.add(
                    "structure",
                    f"{rule.path}: type {type_} is not allowed here (allowed: {', '.join(allowed)})",
                    f"{rule.label}的类型 {type_} 不允许，应为 {'、'.join(allowed)}",
                    location,
                )
        if rule.has_fixed and value != rule.fixed:
            self.add(
                "value",
                f"{rule.path}: value must be exactly {_show(rule.fixed)}, found {_show(value)}",
                f"{rule.label}的值必须为 {_show(rule.fixed)}",
                location,
            )
        if rule.has_pattern and not _matches_pattern(value, rule.pattern):
            self.add(
                "value",
                f"{rule.path}: value must match the pattern {_show(rule.pattern)}, found {_show(value)}",
                f"{rule.label}应为 {_show_code(rule.pattern)}",
                location,
            )
        if rule.binding is not None and value is not None:
            self.binding(rule, value, location)
        if rule.target_types is not None and isinstance(value, dict):
            self.target(rule, value, location)
        for inv in rule.invariants:
            self.issues += evaluate(inv, value if value is not None else companion, self.resource, location)
        if rule.children:
            container = value if isinstance(value, dict) else companion
            for child in rule.children.values():
                self.element(child, _items(container, child.name, location), location)

    def binding(self, rule: _Rule, value: Any, location: str) -> None:
        strength, vs = rule.binding  # type: ignore[misc]
        if isinstance(value, str):
            codings = [(None, value)]
        elif isinstance(value, dict) and "coding" in value:
            codings = [(c.get("system"), c.get("code")) for c in value.get("coding") or () if isinstance(c, dict)]
        elif isinstance(value, dict) and "code" in value:
            codings = [(value.get("system"), value.get("code"))]
        else:
            codings = []
        codings = [(s, c) for s, c in codings if isinstance(c, str)]
        if not codings:
            if strength == "required" and isinstance(value, dict) and "text" not in value:
                self.add("code-invalid", f"{rule.path}: no code given for a required binding to {vs}", f"{rule.label}缺少编码", location)
            return
        unknown = False
        for system, code in codings:
            found = self.v.definitions.value_set_contains(vs, system, code)
            if found:
                return
            unknown = unknown or found is None
        if unknown:
            self.add(
                "not-supported",
                f"{rule.path}: value set {vs} is unknown here or its code system is partial; code not checked",
                f"值集 {vs} 未加载或其代码系统不完整，未检查{rule.label}的代码",
                location,
                "warning",
            )
            return
        shown = ", ".join(f"{s}|{c}" if s else c for s, c in codings)
        severity = "error" if strength == "required" else "warning"
        self.add(
            "code-invalid",
            f"{rule.path}: {shown} is not in the value set {vs} ({strength})",
            f"{rule.label}的代码 {shown.rsplit('|', 1)[-1]} 不在规定的值集中",
            location,
            severity,
        )

    def target(self, rule: _Rule, value: dict[str, Any], location: str) -> None:
        ref = value.get("reference")
        if not isinstance(ref, str) or ref.startswith("#") or "/" not in ref:
            return
        parts = ref.split("/")
        ref_type = parts[-4] if len(parts) >= 4 and parts[-2] == "_history" else parts[-2]
        allowed = set()
        for url in rule.target_types or ():
            if url.startswith(CORE_PREFIX) and url[len(CORE_PREFIX) :] in _TARGET_TYPES:
                allowed.add(url[len(CORE_PREFIX) :])
            else:
                sd = self.v.definitions.structure_definition(url)
                if sd is None or not sd.get("type"):
                    return  # an unknown target profile: cannot decide
                allowed.add(sd["type"])
        if "Resource" in allowed or ref_type in allowed:
            return
        self.add(
            "structure",
            f"{rule.path}: reference to {ref_type} is not allowed (allowed: {', '.join(sorted(allowed))})",
            f"{rule.label}只能引用 {'、'.join(sorted(allowed))}",
            location,
        )

    def slices(self, rule: _Rule, items: list[_Item], parent_location: str) -> None:
        discriminators = rule.discriminators or ((("value", "url"),) if rule.name in ("extension", "modifierExtension") else ())
        groups: dict[str, list[_Item]] = {name: [] for name in rule.slices}
        unmatched: list[_Item] = []
        if rule.slice_index is not None:
            path, index = rule.slice_index
            for item in items:
                name = None
                for actual in _at(item[0], path):
                    if isinstance(actual, (str, int, float, bool)) and actual in index:
                        name = index[actual]
                        break
                (groups[name] if name is not None else unmatched).append(item)
        else:
            for item in items:
                for name, sl in rule.slices.items():
                    if _in_slice(item[0], sl, discriminators):
                        groups[name].append(item)
                        break
                else:
                    unmatched.append(item)
        for name, sl in rule.slices.items():
            self.element(sl, groups[name], parent_location)
        if rule.closed:
            for item in unmatched:
                self.add(
                    "structure",
                    f"{rule.path}: this item matches none of the slices {', '.join(rule.slices)} and the slicing is closed",
                    f"{rule.label}不属于任何允许的分片",
                    item[2],
                )


def _in_slice(value: Any, sl: _Rule, discriminators: Iterable[tuple[str, str]]) -> bool:
    decided = False
    for kind, path in discriminators:
        if kind not in ("value", "pattern"):
            continue
        found, expected = _expected(sl, path)
        if not found:
            continue
        decided = True
        actual = _at(value, path)
        if isinstance(expected, (dict, list)):
            if not any(_matches_pattern(a, expected) for a in actual) and not (
                isinstance(expected, list) and _matches_pattern(actual, expected)
            ):
                return False
        elif expected not in actual:
            return False
    return decided


def _show(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def _show_code(pattern: Any) -> str:
    """A pattern as a clerk reads it: the code and display of its first coding."""
    codings = []
    if isinstance(pattern, dict):
        codings = pattern.get("coding") or ([pattern] if "code" in pattern else [])
    for c in codings:
        if isinstance(c, dict) and c.get("code"):
            return f"{c['code']}" + (f"（{c['display']}）" if c.get("display") else "")
    return _show(pattern)


def _note_unknown_extensions(rule: _Rule, definitions: Definitions) -> None:
    # Compiled profiles are dropped whenever the definitions change, so this stays true.
    rule.unknown_extensions = tuple(u for u in rule.extension_urls if definitions.structure_definition(u) is None)
    for child in [*rule.children.values(), *rule.slices.values()]:
        _note_unknown_extensions(child, definitions)


class ProfileValidator:
    """Validates resources against profiles held by ``definitions``; compiled profiles are kept
    until the definitions change."""

    def __init__(self, definitions: Definitions) -> None:
        self.definitions = definitions
        self._compiled: dict[str, _Profile | None] = {}
        self._extension_verdicts: dict[tuple[str, bytes], list[tuple[str, str, str, str, str | None]]] = {}
        self._generation = -1

    def profile(self, url: str) -> _Profile | None:
        if self.definitions.generation != self._generation:
            self._compiled.clear()
            self._extension_verdicts.clear()
            self._generation = self.definitions.generation
        if url in self._compiled:
            return self._compiled[url]
        sd = self.definitions.structure_definition(url)
        compiled = None
        if sd is not None and sd.get("differential"):
            try:
                compiled = _compile(sd)
                _note_unknown_extensions(compiled.root, self.definitions)
            except Exception:  # a malformed stored profile must not break every write
                log.exception("StructureDefinition %s cannot be compiled", url)
        self._compiled[url] = compiled
        return compiled

    def validate(self, resource: dict[str, Any], url: str, location: str | None = None) -> list[Issue]:
        """Issues of ``resource`` against the profile ``url`` (and its base profiles)."""
        issues: list[Issue] = []
        seen: set[str] = set()
        current: str | None = url
        while current and current not in seen:
            seen.add(current)
            prof = self.profile(current)
            if prof is None:
                issues.append(
                    Issue(
                        "not-found",
                        f"Profile {current} is not known to this server",
                        "error" if current == url else "warning",
                        (location or resource.get("resourceType", ""),),
                        f"未找到规范（profile）{current}",
                    )
                )
                break
            rtype = resource.get("resourceType")
            if prof.type != rtype:
                issues.append(
                    Issue(
                        "invalid",
                        f"Profile {current} is for {prof.type}, not {rtype}",
                        "error",
                        (location or str(rtype),),
                        f"规范 {prof.title} 适用于 {prof.type}，不适用于 {rtype}",
                    )
                )
                break
            run = _Run(self, resource, prof)
            run.item(prof.root, (resource, None, location or prof.type))
            issues += run.issues
            current = prof.base
        return issues

    def _extension(self, run: _Run, url: str, item: _Item) -> None:
        """Check one extension against its definition."""
        value, _, location = item
        if not isinstance(value, dict):
            return
        prof = self.profile(url)
        if prof is None:
            run.add(
                "not-found",
                f"Extension definition {url} is not known to this server",
                f"未找到扩展定义 {url}",
                location,
                "warning",
            )
            return
        key = None
        if prof.self_contained:
            try:
                key = (url, orjson.dumps(value))
            except TypeError:  # not JSON (a dict built by hand with odd values): no caching
                key = None
            hit = self._extension_verdicts.get(key) if key else None
            if hit is not None:
                run.issues += [Issue(c, en, sev, (location + suffix,), zh) for c, en, sev, suffix, zh in hit]  # type: ignore[arg-type]
                return
        inner = _Run(self, run.resource, prof)
        inner.item(prof.root, (value, None, location))
        run.issues += inner.issues
        if key is not None:
            # Extensions repeat across resources (the same ethnicity, occupation, district...).
            if len(self._extension_verdicts) > 20_000:
                self._extension_verdicts.clear()
            self._extension_verdicts[key] = [
                (i.code, i.diagnostics, i.severity, (i.expression[0] if i.expression else location)[len(location) :], i.details_zh)
                for i in inner.issues
            ]

    def check_extensions(
        self, resource: dict[str, Any], location: str, found: list[tuple[dict[str, Any], str]] | None = None
    ) -> list[Issue]:
        """Every extension in ``resource`` whose definition this server holds, checked against it
        (``found``: the extensions and their locations, when the structural walk collected them)."""
        issues: list[Issue] = []
        dummy = _Profile("", resource.get("resourceType", ""), _Rule("", "", ""), None, "")
        run = _Run(self, resource, dummy)
        if found is None:
            self._walk_extensions(run, resource, location, 0)
        else:
            for ext, where in found:
                url = ext.get("url")
                if isinstance(url, str) and self.definitions.structure_definition(url) is not None:
                    self._extension(run, url, (ext, None, where))
        for i in run.issues:
            issues.append(Issue(i.code, i.diagnostics.replace(" (profile )", ""), i.severity, i.expression, i.details_zh))
        return issues

    def _walk_extensions(self, run: _Run, node: Any, location: str, depth: int) -> None:
        if depth > 32:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{location}.{key[1:] if key[:1] == '_' else key}"
                if key in ("extension", "modifierExtension") and isinstance(value, list):
                    for i, ext in enumerate(value):
                        url = ext.get("url") if isinstance(ext, dict) else None
                        if isinstance(url, str) and self.definitions.structure_definition(url) is not None:
                            self._extension(run, url, (ext, None, f"{here}[{i}]"))
                elif isinstance(value, (dict, list)):
                    self._walk_extensions(run, value, here, depth + 1)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                self._walk_extensions(run, value, f"{location}[{i}]", depth + 1)
