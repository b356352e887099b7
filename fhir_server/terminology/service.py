"""The terminology service: code systems, value set expansion, membership, $lookup, $validate-code
and $translate over the canonical resources of a :class:`ConformanceRegistry`, plus the value sets
the R4 specification binds as required (``load_model()["valueSets"]``, codes without displays).

Everything here is synchronous and does no I/O. Derived data (code system indexes, expansions,
membership sets, text-filter keys) is cached until the registry's ``generation`` changes.

Expansion (valueset-operation-expand.html, valueset.html#compose) supports: ``include`` of a whole
code system, of a concept list, or with filters (``is-a``, ``descendent-of``, ``is-not-a``,
``generalizes``, ``=``, ``in``, ``not-in``, ``regex``, ``exists`` on ``concept``/``code``, on
``display``, on ``parent``/``child`` and on the properties a code system defines), ``valueSet``
imports (intersected with the rest of their include), ``exclude`` and ``compose.inactive``. A value
set without compose but with a stored ``expansion`` is taken as it is. Hierarchies (nested
concepts, ``parent``/``child``/``subsumedBy`` properties) come out flattened in depth-first order.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.definitions import load_model

# Beyond this a value set is not expanded (a whole LOINC or SNOMED CT is not held here anyway).
MAX_EXPANSION = 100_000
_PARENT_PROPS = ("parent", "subsumedBy")
_VALUE_KEYS = (
    "valueCode",
    "valueString",
    "valueCoding",
    "valueBoolean",
    "valueInteger",
    "valueDecimal",
    "valueDateTime",
)
_CJK_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")
_INVERSE = {
    "wider": "narrower",
    "narrower": "wider",
    "subsumes": "specializes",
    "specializes": "subsumes",
}


# -- errors -------------------------------------------------------------------------------------


class TerminologyError(Exception):
    """A question the service cannot answer; ``status``/``code`` say how an operation reports it."""

    status = 422
    code = "processing"

    def __init__(self, en: str, zh: str) -> None:
        super().__init__(en)
        self.en = en
        self.zh = zh


class UnknownValueSet(TerminologyError):
    status, code = 404, "not-found"


class UnknownCodeSystem(TerminologyError):
    status, code = 404, "not-found"


class UnknownConceptMap(TerminologyError):
    status, code = 404, "not-found"


class UnknownCode(TerminologyError):
    status, code = 404, "not-found"


class NotExpandable(TerminologyError):
    status, code = 422, "not-supported"


class TooCostly(TerminologyError):
    status, code = 422, "too-costly"


# -- code systems -------------------------------------------------------------------------------


def property_value(prop: dict[str, Any]) -> tuple[str, Any] | None:
    """(value[x] key, value) of a concept property, designation-independent; None without a value."""
    for key in _VALUE_KEYS:
        if key in prop:
            return key, prop[key]
    return None


def _value_text(value: Any) -> str:
    """A property value as the string filters compare with."""
    if isinstance(value, dict):  # Coding
        return str(value.get("code", ""))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(slots=True)
class Concept:
    code: str
    display: str | None = None
    definition: str | None = None
    designations: list[dict[str, Any]] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    inactive: bool = False
    abstract: bool = False

    def values(self, prop: str) -> list[str]:
        out = []
        for p in self.properties:
            if p.get("code") == prop:
                v = property_value(p)
                if v is not None:
                    out.append(_value_text(v[1]))
        return out


class CodeSystemIndex:
    """The concepts of one code system, by code, in definition order (depth first)."""

    def __init__(
        self,
        url: str,
        *,
        resource: dict[str, Any] | None = None,
        codes: Iterable[str] = (),
    ) -> None:
        self.url = url
        self.resource = resource
        r = resource or {}
        self.version: str | None = r.get("version") if isinstance(r.get("version"), str) else None
        self.name: str = str(r.get("title") or r.get("name") or url)
        self.content: str = str(r.get("content") or ("complete" if resource is not None else "fragment"))
        self.case_sensitive = r.get("caseSensitive") is not False
        self.concepts: dict[str, Concept] = {}
        self.declared_properties = {p.get("code") for p in r.get("property") or () if isinstance(p, dict)}
        for code in codes:
            self.concepts.setdefault(code, Concept(code))
        self._walk(r.get("concept") or (), None)
        # parent/child properties, and making parent and child lists agree.
        for concept in self.concepts.values():
            for p in concept.properties:
                v = property_value(p)
                if v is None:
                    continue
                target = _value_text(v[1])
                if p.get("code") in _PARENT_PROPS and target and target not in concept.parents:
                    concept.parents.append(target)
                elif p.get("code") == "child" and target in self.concepts:
                    child = self.concepts[target]
                    if concept.code not in child.parents:
                        child.parents.append(concept.code)
        for concept in self.concepts.values():
            for parent in concept.parents:
                pc = self.concepts.get(parent)
                if pc is not None and concept.code not in pc.children:
                    pc.children.append(concept.code)
        self._lower: dict[str, str] | None = None

    def _walk(self, concepts: Iterable[Any], parent: str | None) -> None:
        for c in concepts:
            if not isinstance(c, dict) or not isinstance(c.get("code"), str):
                continue
            code = c["code"]
            concept = self.concepts.setdefault(code, Concept(code))
            concept.display = c.get("display") if isinstance(c.get("display"), str) else concept.display
            concept.definition = c.get("definition") if isinstance(c.get("definition"), str) else None
            concept.designations = [d for d in c.get("designation") or () if isinstance(d, dict)]
            concept.properties = [p for p in c.get("property") or () if isinstance(p, dict)]
            for p in concept.properties:
                v = property_value(p)
                value = v[1] if v else None
                if p.get("code") == "status" and value in ("retired", "inactive", "deprecated"):
                    concept.inactive = True
                elif p.get("code") == "inactive" and value is True:
                    concept.inactive = True
                elif p.get("code") == "notSelectable" and value is True:
                    concept.abstract = True
            if parent is not None and parent not in concept.parents:
                concept.parents.append(parent)
            self._walk(c.get("concept") or (), code)

    def find(self, code: str) -> Concept | None:
        concept = self.concepts.get(code)
        if concept is None and not self.case_sensitive:
            if self._lower is None:
                self._lower = {c.casefold(): c for c in self.concepts}
            real = self._lower.get(code.casefold())
            concept = self.concepts.get(real) if real else None
        return concept

    def descendants(self, code: str) -> list[str]:
        out: list[str] = []
        seen = {code}
        todo = list(reversed(self.concepts[code].children)) if code in self.concepts else []
        while todo:
            c = todo.pop()
            if c in seen or c not in self.concepts:
                continue
            seen.add(c)
            out.append(c)
            todo.extend(reversed(self.concepts[c].children))
        return out

    def ancestors(self, code: str) -> list[str]:
        out: list[str] = []
        seen = {code}
        todo = list(self.concepts[code].parents) if code in self.concepts else []
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            out.append(c)
            if c in self.concepts:
                todo.extend(self.concepts[c].parents)
        return out


# -- expansions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One code of an expansion."""

    system: str
    code: str
    display: str | None = None
    version: str | None = None
    designations: tuple[dict[str, Any], ...] = ()
    abstract: bool = False
    inactive: bool = False

    def display_in(self, language: str | None) -> str | None:
        """The display in ``language`` when a designation gives one, else the display."""
        if language:
            want = language.casefold()
            for d in self.designations:
                lang = str(d.get("language") or "").casefold()
                if lang and (lang == want or lang.split("-")[0] == want.split("-")[0]) and d.get("value"):
                    return str(d["value"])
        return self.display


class Expanded:
    """A value set's codes, in order, with membership lookups and (lazily) text-filter keys."""

    def __init__(self, url: str | None, resource: dict[str, Any] | None, entries: list[Entry]) -> None:
        self.url = url
        self.resource = resource
        self.entries = entries
        self.members: dict[tuple[str, str], Entry] = {}
        self.by_code: dict[str, list[Entry]] = {}
        for e in entries:
            self.members.setdefault((e.system, e.code), e)
            self.by_code.setdefault(e.code, []).append(e)
        self._keys: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] | None = None

    def filtered(self, text: str | None) -> list[Entry]:
        """The entries matching a text filter: every word of ``text`` must occur in the code, the
        display or a designation, or start a syllable of their pinyin (全拼) or of its initials
        (首字母): ``hanzu``, ``hz``, ``zu`` and ``汉`` all find 汉族. Entries whose code, display
        or designation (or its pinyin) starts with the filter come first."""
        words = (text or "").casefold().split()
        if not words:
            return self.entries
        if self._keys is None:
            self._keys = [_search_keys(e) for e in self.entries]
        whole = "".join(words)
        first: list[Entry] = []
        rest: list[Entry] = []
        for entry, (texts, pinyins, heads) in zip(self.entries, self._keys):
            if all(any(w in t for t in texts) or any(p.startswith(w) for p in pinyins) for w in words):
                (first if any(h.startswith(whole) for h in heads) else rest).append(entry)
        return first + rest


def _search_keys(entry: Entry) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(texts, pinyin from each syllable on, the keys a filter may start with)."""
    texts = [entry.code.casefold()]
    if entry.display:
        texts.append(entry.display.casefold())
    texts += [str(d["value"]).casefold() for d in entry.designations if d.get("value")]
    pinyins: list[str] = []
    heads: list[str] = [t.replace(" ", "") for t in texts]
    for t in texts:
        syllables = _syllables(t)
        for i in range(len(syllables)):
            full, initials = "".join(syllables[i:]), "".join(s[0] for s in syllables[i:])
            pinyins += [full, initials]
            if i == 0:
                heads += [full, initials]
    return tuple(dict.fromkeys(texts)), tuple(dict.fromkeys(pinyins)), tuple(dict.fromkeys(heads))


def _syllables(text: str) -> list[str]:
    """Toneless pinyin syllables of the Chinese characters of ``text`` (phrase-aware, everyday readings)."""
    runs = _CJK_RUN.findall(text)
    if not runs:
        return []
    # Imported on first use: its dictionaries are large (see fhir_server/search/pinyin.py).
    from pypinyin import Style, lazy_pinyin

    out: list[str] = []
    for run in runs:
        out += [s.casefold() for s in lazy_pinyin(run, style=Style.NORMAL, errors="ignore") if s]
    return out


# -- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class LookupResult:
    system: str
    code: str
    name: str
    version: str | None
    display: str | None
    definition: str | None
    designations: list[dict[str, Any]]
    # (property code, value[x] key, value): the concept's own properties, then parent and child.
    properties: list[tuple[str, str, Any]]
    abstract: bool = False
    inactive: bool = False


@dataclass(slots=True)
class CodeValidation:
    """The outcome of $validate-code: ``result`` False is an error; True with a ``message`` is a
    warning (a display that is not one of the code's names)."""

    result: bool
    message: str | None = None
    display: str | None = None
    system: str | None = None
    code: str | None = None


@dataclass(slots=True)
class TranslationMatch:
    equivalence: str
    system: str | None
    code: str | None
    display: str | None
    source: str | None  # the ConceptMap's url
    comment: str | None = None


@dataclass(slots=True)
class Translation:
    result: bool
    message: str
    matches: list[TranslationMatch]


# -- the service --------------------------------------------------------------------------------


class TerminologyService:
    """Terminology over one registry; get the shared instance with :func:`terminology_for`."""

    def __init__(self, registry: ConformanceRegistry | None = None) -> None:
        self.registry = registry if registry is not None else ConformanceRegistry()
        self._generation = -1
        self._code_systems: dict[str, CodeSystemIndex | None] = {}
        self._expansions: dict[str, Expanded | TerminologyError] = {}
        model = load_model()
        self._builtin_vs: dict[str, dict[str, list[str]]] = model["valueSets"]
        builtin_cs: dict[str, list[str]] = {}
        for systems in self._builtin_vs.values():
            for system, codes in (systems or {}).items():
                known = builtin_cs.setdefault(system, [])
                known += [c for c in codes if c not in known]
        self._builtin_cs = builtin_cs

    def _fresh(self) -> None:
        if self._generation != self.registry.generation:
            self._code_systems.clear()
            self._expansions.clear()
            self._generation = self.registry.generation

    # -- code systems

    def code_system(self, url: str, version: str | None = None) -> CodeSystemIndex | None:
        """The code system ``url`` (``url|version`` or ``version`` picks one version)."""
        self._fresh()
        key = f"{url}|{version}" if version and "|" not in url else url
        if key in self._code_systems:
            return self._code_systems[key]
        resource = self.registry.get("CodeSystem", key)
        index: CodeSystemIndex | None
        if resource is not None:
            index = CodeSystemIndex(key.partition("|")[0], resource=resource)
        elif key in self._builtin_cs:
            index = CodeSystemIndex(key, codes=self._builtin_cs[key])
        else:
            index = None
        self._code_systems[key] = index
        return index

    def code_system_of(self, resource: dict[str, Any]) -> CodeSystemIndex:
        """The index of a CodeSystem resource (cached when it is the registry's current one for its url)."""
        self._fresh()
        url = resource.get("url")
        if isinstance(url, str) and url:
            current = self.registry.get("CodeSystem", url)
            if current is not None and current.get("id") == resource.get("id") and (current.get("meta") or {}).get(
                "versionId"
            ) == (resource.get("meta") or {}).get("versionId"):
                found = self.code_system(url)
                if found is not None:
                    return found
        return CodeSystemIndex(url if isinstance(url, str) and url else f"CodeSystem/{resource.get('id')}", resource=resource)

    def lookup(
        self, system: str, code: str, version: str | None = None, *, code_system: dict[str, Any] | None = None
    ) -> LookupResult:
        """$lookup: what the server knows about ``code`` in ``system`` (or in the resource
        ``code_system``); raises UnknownCodeSystem / UnknownCode."""
        cs = self.code_system_of(code_system) if code_system is not None else self._require_code_system(system, version)
        concept = cs.find(code)
        if concept is None:
            raise UnknownCode(
                f"The code '{code}' is not in the code system {system}",
                f"代码 {code} 在代码系统 {cs.name}（{system}）中不存在",
            )
        props: list[tuple[str, str, Any]] = []
        for p in concept.properties:
            v = property_value(p)
            if v is not None and p.get("code") not in ("parent", "child"):
                props.append((str(p.get("code")), v[0], v[1]))
        props += [("parent", "valueCode", c) for c in concept.parents]
        props += [("child", "valueCode", c) for c in concept.children]
        if concept.inactive and not any(p[0] == "inactive" for p in props):
            props.append(("inactive", "valueBoolean", True))
        return LookupResult(
            system=cs.url,
            code=concept.code,
            name=cs.name,
            version=cs.version,
            display=concept.display,
            definition=concept.definition,
            designations=list(concept.designations),
            properties=props,
            abstract=concept.abstract,
            inactive=concept.inactive,
        )

    def _require_code_system(self, system: str, version: str | None = None) -> CodeSystemIndex:
        cs = self.code_system(system, version)
        if cs is None:
            shown = f"{system}|{version}" if version else system
            raise UnknownCodeSystem(
                f"The code system {shown} is not known to this server",
                f"服务器上没有代码系统 {shown}",
            )
        return cs

    # -- value sets

    def value_set(self, url: str) -> dict[str, Any] | None:
        """The stored ValueSet for a canonical, or None (built-in R4 value sets included: see expanded)."""
        return self.registry.get("ValueSet", url)

    def expanded(self, value_set: str | dict[str, Any]) -> Expanded:
        """The expansion of a ValueSet given by canonical or as a resource. Raises UnknownValueSet,
        NotExpandable, TooCostly. Cached by canonical; a resource that is the registry's current
        version of its url uses the cache too."""
        self._fresh()
        if isinstance(value_set, dict):
            url = value_set.get("url")
            if isinstance(url, str) and self._is_registered(value_set):
                return self._expanded_url(url, ())
            return self._expand_resource(url if isinstance(url, str) else None, value_set, ())
        return self._expanded_url(value_set, ())

    def _is_registered(self, resource: dict[str, Any]) -> bool:
        current = self.registry.by_id("ValueSet", str(resource.get("id")))
        if current is None or current is not self.registry.get("ValueSet", str(resource.get("url"))):
            return False
        return (current.get("meta") or {}).get("versionId") == (resource.get("meta") or {}).get("versionId")

    def _expanded_url(self, url: str, stack: tuple[str, ...]) -> Expanded:
        cached = self._expansions.get(url)
        if cached is not None:
            if isinstance(cached, TerminologyError):
                raise cached
            return cached
        if url in stack:
            raise NotExpandable(
                f"The value set {url} includes itself (through {' > '.join(stack)})",
                f"值集 {url} 循环引用了自身",
            )
        try:
            resource = self.registry.get("ValueSet", url)
            if resource is not None:
                result = self._expand_resource(url.partition("|")[0], resource, stack + (url,))
            else:
                canonical = url.partition("|")[0]
                if canonical not in self._builtin_vs:
                    raise UnknownValueSet(
                        f"The value set {url} is not known to this server",
                        f"服务器上没有值集 {url}",
                    )
                builtin = self._builtin_vs[canonical]
                if builtin is None:  # a grammar (UCUM, MIME types, currencies), not a list of codes
                    raise NotExpandable(
                        f"The value set {url} is defined by a grammar and cannot be expanded",
                        f"值集 {url} 由语法规则定义，无法展开",
                    )
                entries = [Entry(system, code) for system, codes in builtin.items() for code in codes]
                result = Expanded(url.partition("|")[0], None, entries)
        except TerminologyError as e:
            self._expansions[url] = e
            raise
        self._expansions[url] = result
        return result

    def contains(self, vs_url: str, system: str | None, code: str) -> bool | None:
        """Whether ``system|code`` is in the value set ``vs_url`` (``system`` None: any system);
        None when the value set is unknown or cannot be expanded. Fast after the first call."""
        if self._generation != self.registry.generation:
            self._fresh()
        expansion = self._expansions.get(vs_url)
        if expansion is None:
            try:
                expansion = self._expanded_url(vs_url, ())
            except TerminologyError:
                return None
        if isinstance(expansion, TerminologyError):
            return None
        if system is None:
            return code in expansion.by_code
        return (system, code) in expansion.members

    def members(self, vs_url: str) -> set[tuple[str, str]] | None:
        """The (system, code) pairs of a value set (for search ``:in``); None when unknown or not expandable."""
        try:
            return set(self.expanded(vs_url).members)
        except TerminologyError:
            return None

    def expand(
        self,
        value_set: str | dict[str, Any],
        *,
        filter: str | None = None,
        offset: int = 0,
        count: int | None = None,
        display_language: str | None = None,
        include_designations: bool = False,
        active_only: bool = False,
        timestamp: str | None = None,
    ) -> dict[str, Any]:
        """$expand: the ValueSet with an ``expansion`` (total, offset, the page of ``contains``)."""
        import uuid
        from datetime import datetime, timezone

        exp = self.expanded(value_set)
        entries = exp.filtered(filter)
        if active_only:
            entries = [e for e in entries if not e.inactive]
        total = len(entries)
        page = entries[offset : offset + count if count is not None else None] if offset or count is not None else entries
        source = exp.resource or {}
        out: dict[str, Any] = {"resourceType": "ValueSet"}
        for key in ("id", "url", "version", "name", "title", "status", "experimental", "publisher", "description"):
            if key in source:
                out[key] = source[key]
        if "url" not in out and exp.url:
            out["url"] = exp.url
            out["status"] = "active"
        out.setdefault("status", "unknown")
        params: list[dict[str, Any]] = []
        if filter:
            params.append({"name": "filter", "valueString": filter})
        if offset:
            params.append({"name": "offset", "valueInteger": offset})
        if count is not None:
            params.append({"name": "count", "valueInteger": count})
        if display_language:
            params.append({"name": "displayLanguage", "valueCode": display_language})
        contains = []
        for e in page:
            item: dict[str, Any] = {"system": e.system}
            if e.version:
                item["version"] = e.version
            if e.abstract:
                item["abstract"] = True
            if e.inactive:
                item["inactive"] = True
            item["code"] = e.code
            display = e.display_in(display_language)
            if display:
                item["display"] = display
            if include_designations and e.designations:
                item["designation"] = list(e.designations)
            contains.append(item)
        expansion: dict[str, Any] = {
            "identifier": f"urn:uuid:{uuid.uuid4()}",
            "timestamp": timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "total": total,
        }
        if offset:
            expansion["offset"] = offset
        if params:
            expansion["parameter"] = params
        if contains:
            expansion["contains"] = contains
        out["expansion"] = expansion
        return out

    # -- compose

    def _expand_resource(self, url: str | None, vs: dict[str, Any], stack: tuple[str, ...]) -> Expanded:
        compose = vs.get("compose")
        name = url or f"ValueSet/{vs.get('id')}"
        if not isinstance(compose, dict):
            contains = (vs.get("expansion") or {}).get("contains")
            if isinstance(contains, list):
                return Expanded(url, vs, list(_flatten(contains)))
            raise NotExpandable(
                f"The value set {name} has neither compose nor expansion",
                f"值集 {name} 既没有 compose 定义也没有扩展结果，无法展开",
            )
        included: dict[tuple[str, str], Entry] = {}
        for inc in compose.get("include") or ():
            for e in self._include(inc, stack, name):
                included.setdefault((e.system, e.code), e)
                if len(included) > MAX_EXPANSION:
                    raise TooCostly(
                        f"The value set {name} has more than {MAX_EXPANSION} codes",
                        f"值集 {name} 的代码超过 {MAX_EXPANSION} 个，无法展开",
                    )
        excluded = {(e.system, e.code) for exc in compose.get("exclude") or () for e in self._include(exc, stack, name)}
        entries = [e for k, e in included.items() if k not in excluded]
        if compose.get("inactive") is False:
            entries = [e for e in entries if not e.inactive]
        return Expanded(url, vs, entries)

    def _include(self, inc: Any, stack: tuple[str, ...], name: str) -> list[Entry]:
        if not isinstance(inc, dict):
            return []
        imports = [self._expanded_url(u, stack) for u in inc.get("valueSet") or () if isinstance(u, str)]
        system = inc.get("system")
        if not isinstance(system, str) or not system:
            if not imports:
                return []
            first, rest = imports[0], imports[1:]
            return [e for e in first.entries if all((e.system, e.code) in o.members for o in rest)]
        version = inc.get("version") if isinstance(inc.get("version"), str) else None
        cs = self.code_system(system, version) or (self.code_system(system) if version else None)
        entries: list[Entry]
        if inc.get("concept"):
            entries = []
            for c in inc["concept"]:
                if not isinstance(c, dict) or not isinstance(c.get("code"), str):
                    continue
                concept = cs.find(c["code"]) if cs else None
                if cs is not None and concept is None and cs.content == "complete" and cs.resource is not None:
                    continue  # not a code of the system
                designations = tuple(c.get("designation") or ()) + tuple(concept.designations if concept else ())
                entries.append(
                    Entry(
                        system,
                        concept.code if concept else c["code"],
                        c.get("display") or (concept.display if concept else None),
                        cs.version if cs else version,
                        designations,
                        concept.abstract if concept else False,
                        concept.inactive if concept else False,
                    )
                )
        else:
            if cs is None:
                raise NotExpandable(
                    f"The value set {name} includes the code system {system}, which this server does not hold",
                    f"值集 {name} 引用的代码系统 {system} 在服务器上不存在，无法展开",
                )
            if cs.content == "not-present":
                raise NotExpandable(
                    f"The code system {system} is stored without its concepts (content not-present)",
                    f"代码系统 {system} 未包含具体代码（content 为 not-present），无法展开",
                )
            codes: list[str] = list(cs.concepts)
            for f in inc.get("filter") or ():
                allowed = self._filter(cs, f, name)
                codes = [c for c in codes if c in allowed]
            entries = [_entry(cs, cs.concepts[c]) for c in codes]
        if imports:
            entries = [e for e in entries if all((e.system, e.code) in o.members for o in imports)]
        return entries

    def _filter(self, cs: CodeSystemIndex, f: Any, name: str) -> set[str]:
        if not isinstance(f, dict):
            return set()
        prop, op, value = str(f.get("property") or ""), str(f.get("op") or ""), str(f.get("value") or "")
        every = set(cs.concepts)

        def unsupported() -> NotExpandable:
            return NotExpandable(
                f"The value set {name} uses the filter {prop} {op} {value!r}, which is not supported on {cs.url}",
                f"值集 {name} 使用的过滤条件（{prop} {op} {value}）在代码系统 {cs.url} 上不受支持",
            )

        if prop in ("concept", "code"):
            if op == "is-a":
                return {value, *cs.descendants(value)} if value in cs.concepts else set()
            if op == "descendent-of":
                return set(cs.descendants(value))
            if op == "is-not-a":
                return every - {value, *cs.descendants(value)}
            if op == "generalizes":
                return {value, *cs.ancestors(value)} if value in cs.concepts else set()
            if op == "=":
                return {value} & every
            if op == "in":
                return {v.strip() for v in value.split(",")} & every
            if op == "not-in":
                return every - {v.strip() for v in value.split(",")}
            if op == "regex":
                pattern = _regex(value, unsupported)
                return {c for c in every if pattern.fullmatch(c)}
            raise unsupported()
        if prop in ("parent", "child"):
            # The hierarchy, whether nested or given by parent/child properties.
            def related(con: Concept) -> list[str]:
                return con.parents if prop == "parent" else con.children

            if op == "=":
                return {c for c, con in cs.concepts.items() if value in related(con)}
            if op == "in":
                wanted = {v.strip() for v in value.split(",")}
                return {c for c, con in cs.concepts.items() if wanted & set(related(con))}
            if op == "exists":
                return {c for c, con in cs.concepts.items() if bool(related(con)) == (value == "true")}
            raise unsupported()
        if prop == "display":
            values_of: Any = lambda con: [con.display] if con.display else []  # noqa: E731
        else:
            if prop not in cs.declared_properties and not any(con.values(prop) for con in cs.concepts.values()):
                raise unsupported()
            values_of = lambda con: con.values(prop)  # noqa: E731
        if op == "=":
            return {c for c, con in cs.concepts.items() if value in values_of(con)}
        if op == "in":
            wanted = {v.strip() for v in value.split(",")}
            return {c for c, con in cs.concepts.items() if wanted & set(values_of(con))}
        if op == "not-in":
            wanted = {v.strip() for v in value.split(",")}
            return {c for c, con in cs.concepts.items() if not wanted & set(values_of(con))}
        if op == "regex":
            pattern = _regex(value, unsupported)
            return {c for c, con in cs.concepts.items() if any(pattern.fullmatch(v) for v in values_of(con))}
        if op == "exists":
            want = value == "true"
            return {c for c, con in cs.concepts.items() if bool(values_of(con)) == want}
        raise unsupported()

    # -- validation

    def validate_code(
        self,
        value_set: str | dict[str, Any],
        codings: Sequence[tuple[str | None, str, str | None]],
    ) -> CodeValidation:
        """$validate-code against a value set: ``codings`` are (system, code, display) (several: a
        CodeableConcept, valid when one coding is). Raises UnknownValueSet / NotExpandable."""
        exp = self.expanded(value_set)
        vs_name = _vs_label(exp)
        failures: list[str] = []
        for system, code, display in codings:
            if system is not None:
                entry = exp.members.get((system, code))
            else:
                found = exp.by_code.get(code) or []
                entry = found[0] if found else None
            if entry is None:
                failures.append(self._not_in_value_set(system, code, vs_name))
                continue
            return self._check_display(entry.system, entry.code, entry.display, entry.designations, display)
        first = codings[0] if codings else (None, "", None)
        return CodeValidation(False, "；".join(failures) or "没有要验证的代码 (no code to validate)", None, first[0], first[1])

    def validate_code_in_system(
        self,
        system: str,
        code: str,
        display: str | None = None,
        version: str | None = None,
        *,
        code_system: dict[str, Any] | None = None,
    ) -> CodeValidation:
        """$validate-code against a code system (or the resource ``code_system``). Raises UnknownCodeSystem."""
        cs = self.code_system_of(code_system) if code_system is not None else self._require_code_system(system, version)
        system = cs.url
        concept = cs.find(code)
        if concept is None:
            partial = "（该代码系统在服务器上只有部分代码）" if cs.content != "complete" else ""
            return CodeValidation(
                False,
                f"代码 {code} 在代码系统 {cs.name} 中不存在{partial}。The code '{code}' is not in the code system {system}",
                None,
                system,
                code,
            )
        return self._check_display(system, concept.code, concept.display, tuple(concept.designations), display)

    def _check_display(
        self, system: str, code: str, display: str | None, designations: Iterable[dict[str, Any]], given: str | None
    ) -> CodeValidation:
        names = {display} if display else set()
        names |= {str(d["value"]) for d in designations if d.get("value")}
        cs = self.code_system(system)
        concept = cs.find(code) if cs else None
        if concept is not None:
            names |= {concept.display} if concept.display else set()
            names |= {str(d["value"]) for d in concept.designations if d.get("value")}
        best = display or (concept.display if concept else None)
        if given is None or not names or _norm(given) in {_norm(n) for n in names}:
            return CodeValidation(True, None, best, system, code)
        return CodeValidation(
            True,
            f"显示名称“{given}”与代码 {code} 的标准名称“{best}”不一致。"
            f"The display '{given}' is not a display of the code {system}#{code}; it should be '{best}'",
            best,
            system,
            code,
        )

    def _not_in_value_set(self, system: str | None, code: str, vs_name: str) -> str:
        shown = f"{system}#{code}" if system else code
        if system is not None:
            cs = self.code_system(system)
            if cs is not None and cs.find(code) is None:
                return (
                    f"代码 {code} 在代码系统 {cs.name} 中不存在。"
                    f"The code '{code}' is not in the code system {system} (value set {vs_name})"
                )
        return f"代码 {shown} 不在值集 {vs_name} 中。The code {shown} is not in the value set {vs_name}"

    # -- translation

    def translate(
        self,
        system: str | None,
        code: str,
        *,
        concept_map: dict[str, Any] | None = None,
        map_url: str | None = None,
        source_vs: str | None = None,
        target_vs: str | None = None,
        target_system: str | None = None,
        reverse: bool = False,
    ) -> Translation:
        """$translate: the mappings of ``system|code`` in the chosen concept map(s). Raises UnknownConceptMap."""
        if concept_map is not None:
            maps = [concept_map]
        elif map_url:
            found = self.registry.get("ConceptMap", map_url)
            if found is None:
                raise UnknownConceptMap(
                    f"The concept map {map_url} is not known to this server",
                    f"服务器上没有概念映射 {map_url}",
                )
            maps = [found]
        else:
            maps = [m for m in self.registry.all("ConceptMap") if _map_fits(m, source_vs, target_vs, reverse)]
        matches: list[TranslationMatch] = []
        for cm in maps:
            matches += _translate_in(cm, system, code, target_system, reverse)
        shown = f"{system}#{code}" if system else code
        good = [m for m in matches if m.equivalence not in ("unmatched", "disjoint")]
        if good:
            targets = "、".join(f"{m.code}（{m.display}）" if m.display else str(m.code) for m in good)
            message = f"代码 {shown} 映射为：{targets}。{len(good)} match(es) found for {shown}"
        elif not maps:
            message = f"没有可用于代码 {shown} 的概念映射。No concept map applies to {shown}"
        else:
            message = f"代码 {shown} 在概念映射中没有对应的目标代码。No mapping found for {shown}"
        return Translation(bool(good), message, matches)


def _map_fits(cm: dict[str, Any], source_vs: str | None, target_vs: str | None, reverse: bool) -> bool:
    source = cm.get("sourceUri") or cm.get("sourceCanonical")
    target = cm.get("targetUri") or cm.get("targetCanonical")
    if reverse:
        source, target = target, source
    if source_vs and source != source_vs:
        return False
    if target_vs and target != target_vs:
        return False
    return True


def _translate_in(
    cm: dict[str, Any], system: str | None, code: str, target_system: str | None, reverse: bool
) -> list[TranslationMatch]:
    url = cm.get("url")
    out: list[TranslationMatch] = []
    for group in cm.get("group") or ():
        if not isinstance(group, dict):
            continue
        src, tgt = group.get("source"), group.get("target")
        if reverse:
            src, tgt = tgt, src
        if system is not None and src and src != system:
            continue
        if target_system and tgt != target_system:
            continue
        found = False
        for element in group.get("element") or ():
            if not isinstance(element, dict):
                continue
            targets = [t for t in element.get("target") or () if isinstance(t, dict)]
            if not reverse and element.get("code") == code:
                found = True
                if not targets:  # an element without targets maps to nothing
                    out.append(TranslationMatch("unmatched", None, None, None, url))
                for t in targets:
                    eq = t.get("equivalence") or "equivalent"
                    tcode = t.get("code")
                    out.append(TranslationMatch(eq, tgt if tcode else None, tcode, t.get("display"), url, t.get("comment")))
            elif reverse:
                for t in targets:
                    if t.get("code") == code:
                        found = True
                        eq = t.get("equivalence") or "equivalent"
                        out.append(
                            TranslationMatch(
                                _INVERSE.get(eq, eq), tgt, element.get("code"), element.get("display"), url, t.get("comment")
                            )
                        )
        unmapped = group.get("unmapped")
        if not found and not reverse and isinstance(unmapped, dict):
            mode = unmapped.get("mode")
            if mode == "provided":
                out.append(TranslationMatch("equal", tgt, code, None, url))
            elif mode == "fixed" and unmapped.get("code"):
                out.append(TranslationMatch("wider", tgt, unmapped["code"], unmapped.get("display"), url))
    return out


def _entry(cs: CodeSystemIndex, concept: Concept) -> Entry:
    return Entry(cs.url, concept.code, concept.display, cs.version, tuple(concept.designations), concept.abstract, concept.inactive)


def _flatten(contains: Iterable[Any]) -> Iterator[Entry]:
    for c in contains:
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("code"), str) and isinstance(c.get("system"), str):
            yield Entry(
                c["system"],
                c["code"],
                c.get("display"),
                c.get("version"),
                tuple(c.get("designation") or ()),
                bool(c.get("abstract")),
                bool(c.get("inactive")),
            )
        yield from _flatten(c.get("contains") or ())


def _regex(value: str, error: Any) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error:
        raise error() from None


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _vs_label(exp: Expanded) -> str:
    r = exp.resource or {}
    title = r.get("title") or r.get("name")
    return f"{title}（{exp.url}）" if title and exp.url else str(exp.url or title or "(inline)")


_services: weakref.WeakKeyDictionary[ConformanceRegistry, TerminologyService] = weakref.WeakKeyDictionary()


def terminology_for(registry: ConformanceRegistry) -> TerminologyService:
    """The service (and its caches) shared by everything that uses ``registry``."""
    service = _services.get(registry)
    if service is None:
        service = _services[registry] = TerminologyService(registry)
    return service
