"""The search parameters the server knows: the R4 definitions, per resource type, and the custom
SearchParameter resources registered at run time (the CN profiles add their own)."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

_DATA = Path(__file__).parent / "data" / "search-parameters.json.gz"
# Parameters on Resource/DomainResource apply to every type.
_ABSTRACT_BASES = ("Resource", "DomainResource")
# Parameters whose values the storage keeps outside the `s` index (or that mean something else).
SPECIAL = frozenset({"_id", "_lastUpdated", "_query", "_content", "_text", "_list", "_has", "_type"})


_change_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the set of known parameters changes (to drop derived caches)."""
    _change_listeners.append(listener)


def _changed() -> None:
    params_for.cache_clear()
    for listener in _change_listeners:
        listener()


@dataclass(frozen=True, slots=True)
class SearchParam:
    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    expression: str | None
    targets: tuple[str, ...]
    url: str
    modifiers: tuple[str, ...] = ()
    # Composite parameters: (definition URL, expression relative to the composite's node) per part.
    components: tuple[tuple[str, str], ...] = ()
    base: tuple[str, ...] = ()


def _load() -> list[dict[str, Any]]:
    return json.loads(gzip.decompress(_DATA.read_bytes()))


@lru_cache(maxsize=1)
def _by_base() -> dict[str, dict[str, SearchParam]]:
    out: dict[str, dict[str, SearchParam]] = {}
    for d in _load():
        sp = SearchParam(
            code=d["code"],
            type=d["type"],
            expression=d.get("expression"),
            targets=tuple(d.get("target", ())),
            url=d["url"],
            modifiers=tuple(d.get("modifier", ())),
            components=tuple((c["definition"], c["expression"]) for c in d.get("component", ())),
            base=tuple(d["base"]),
        )
        for base in d["base"]:
            out.setdefault(base, {})[sp.code] = sp
    return out


@lru_cache(maxsize=None)
def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Every search parameter that applies to ``resource_type``, by code."""
    table = _by_base()
    merged: dict[str, SearchParam] = {}
    for base in (*_ABSTRACT_BASES, resource_type):
        merged.update(table.get(base, {}))
    for sp in _custom.values():
        if resource_type in sp.base:
            merged[sp.code] = sp
    return merged


@lru_cache(maxsize=1)
def _builtin_urls() -> dict[str, SearchParam]:
    return {sp.url: sp for by_code in _by_base().values() for sp in by_code.values()}


def parameter_by_url(url: str) -> SearchParam | None:
    """The built-in or registered custom parameter with this canonical URL."""
    return _custom.get(url) or _builtin_urls().get(url)


def is_builtin_url(url: str) -> bool:
    return url in _builtin_urls()


# -- custom SearchParameters --------------------------------------------------------------
#
# Policy (applied by fhir_server.interceptors.search_parameters): a stored SearchParameter with
# status ``active`` whose url is not a built-in one is registered; draft, retired and unknown ones
# are stored but not used (the R4 package itself ships 1,400 drafts, many without an expression).

# The types index_resource extracts values for; composite and special need code, not a definition.
CUSTOM_TYPES = ("token", "string", "reference", "date", "uri", "number", "quantity")
# Letters, digits, - and _: the code is part of a query string and a MongoDB field name (`s.<code>`).
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

_custom: dict[str, SearchParam] = {}  # by url


class UnusableSearchParameter(ValueError):
    """Why a SearchParameter cannot be used: ``element`` is where (FHIRPath), ``zh`` says it in
    Chinese, ``code`` is the OperationOutcome issue type (required | invalid)."""

    def __init__(self, message: str, element: str, zh: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.element = element
        self.zh = zh
        self.code = code


def check_custom(resource: dict[str, Any], *, replacing: str | None = None) -> SearchParam:
    """The :class:`SearchParam` a SearchParameter resource defines, or UnusableSearchParameter.
    ``replacing``: the url this resource registered before (an update may change the url)."""
    from fhir_server.definitions import RESOURCE_TYPES

    def bad(message: str, element: str, zh: str) -> UnusableSearchParameter:
        code = "required" if message.startswith("A SearchParameter needs") else "invalid"
        return UnusableSearchParameter(message, "SearchParameter." + element, zh, code)

    url = resource.get("url")
    if not isinstance(url, str) or not url:
        raise bad("A SearchParameter needs a url (it identifies the parameter)", "url", "检索参数缺少 url（规范地址）")
    code = resource.get("code")
    if not isinstance(code, str) or not code:
        raise bad("A SearchParameter needs a code (the name used in queries)", "code", "检索参数缺少 code（检索代码）")
    if not _CODE.match(code):
        raise bad(
            f"Code {code[:80]!r} is not usable: letters, digits, '-' and '_' only, starting with a letter",
            "code",
            f"检索代码 {code[:80]} 无效：只能包含字母、数字、- 和 _，并以字母开头",
        )
    bases = resource.get("base")
    if not isinstance(bases, list) or not bases:
        raise bad("A SearchParameter needs a base (the resource types it applies to)", "base", "检索参数缺少 base（适用的资源类型）")
    for i, base in enumerate(bases):
        if not isinstance(base, str) or base not in RESOURCE_TYPES:
            raise bad(
                f"Unknown resource type {str(base)[:80]!r} in base (custom parameters apply to concrete types)",
                f"base[{i}]",
                f"base 中的资源类型 {str(base)[:80]} 未知（自定义检索参数只能用于具体资源类型）",
            )
    kind = resource.get("type")
    if not isinstance(kind, str) or not kind:
        raise bad("A SearchParameter needs a type", "type", "检索参数缺少 type（参数类型）")
    if kind not in CUSTOM_TYPES:
        known = kind in ("composite", "special")
        raise bad(
            f"Type {kind[:40]!r} is not supported for custom parameters (supported: {', '.join(CUSTOM_TYPES)})"
            if known
            else f"Unknown search parameter type {kind[:40]!r} (supported: {', '.join(CUSTOM_TYPES)})",
            "type",
            f"自定义检索参数不支持 {kind[:40]} 类型" if known else f"未知的检索参数类型 {kind[:40]}",
        )
    expression = resource.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise bad("A SearchParameter needs an expression (FHIRPath)", "expression", "检索参数缺少 expression（FHIRPath 表达式）")
    for base in bases:
        problem = _expression_problem(expression, base)
        if problem:
            en, zh = problem
            raise bad(f"Expression {expression[:200]!r} is not usable on {base}: {en}", "expression", zh)
    targets = resource.get("target") or []
    if kind == "reference":
        for i, target in enumerate(targets if isinstance(targets, list) else [targets]):
            if target not in RESOURCE_TYPES:
                raise bad(f"Unknown target resource type {str(target)[:80]!r}", f"target[{i}]", f"target 中的资源类型 {str(target)[:80]} 未知")
    builtin = _by_base()
    for i, base in enumerate(bases):
        for table in (*_ABSTRACT_BASES, base):
            if code in builtin.get(table, {}):
                raise bad(
                    f"Code {code!r} is already a built-in search parameter of {base}",
                    "code",
                    f"检索代码 {code} 与 {base} 的内置检索参数冲突",
                )
        for other in _custom.values():
            if other.url not in (url, replacing) and other.code == code and base in other.base:
                raise bad(
                    f"Code {code!r} is already used on {base} by the custom search parameter {other.url}",
                    "code",
                    f"检索代码 {code} 已被 {base} 的自定义检索参数 {other.url} 使用",
                )
    modifiers = resource.get("modifier") or []
    return SearchParam(
        code=code,
        type=kind,
        expression=expression,
        targets=tuple(t for t in targets if isinstance(t, str)) if kind == "reference" and isinstance(targets, list) else (),
        url=url,
        modifiers=tuple(m for m in modifiers if isinstance(m, str)) if isinstance(modifiers, list) else (),
        base=tuple(dict.fromkeys(bases)),
    )


def _expression_problem(expression: str, base: str) -> tuple[str, str] | None:
    """Why ``expression`` cannot extract values from a ``base`` resource (English, Chinese), or None."""
    from fhir_server.search.extract import compile_expression  # extract imports this module

    problem = _syntax_problem(expression)
    if problem:
        return problem, f"FHIRPath 表达式语法错误：{problem}"
    roots = {_root(part) for part in _split_union(expression)}
    if not roots & {base, *_ABSTRACT_BASES}:
        return (
            f"no part of it starts at {base} (for example {base}.identifier)",
            f"FHIRPath 表达式没有以 {base} 开头的部分（例如 {base}.identifier）",
        )
    try:
        compile_expression(expression, base)
        # fhirpathpy resolves function names only when evaluating; an empty resource finds typos.
        import fhirpathpy

        fhirpathpy.evaluate({"resourceType": base}, expression)
    except Exception as e:  # any failure here means the expression would never yield values
        detail = str(e)[:200] or type(e).__name__
        return detail, f"FHIRPath 表达式无法求值：{detail}"
    return None


def _syntax_problem(expression: str) -> str | None:
    """The FHIRPath grammar's complaint about ``expression`` (fhirpathpy's parser recovers silently)."""
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class _Raise(ErrorListener):
        def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any) -> None:
            raise SyntaxError(f"syntax error at column {column + 1}: {msg}")

    try:
        lexer = FHIRPathLexer(InputStream(expression))
        lexer.removeErrorListeners()
        lexer.addErrorListener(_Raise())
        tokens = CommonTokenStream(lexer)
        parser = FHIRPathParser(tokens)
        parser.removeErrorListeners()
        parser.addErrorListener(_Raise())
        parser.expression()
        if tokens.LT(1).type != Token.EOF:
            return f"syntax error: unexpected {tokens.LT(1).text!r}"
    except SyntaxError as e:
        return str(e.msg)[:200]
    except Exception as e:  # the generated lexer raises its own errors on stray characters
        return f"syntax error: {str(e)[:160] or type(e).__name__}"
    return None


def _split_union(expression: str) -> list[str]:
    """The top-level ``|`` alternatives (outside quotes and parentheses)."""
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quote = not quote
        elif not quote:
            depth += (ch == "(") - (ch == ")")
            if ch == "|" and depth == 0:
                parts.append(expression[start:i])
                start = i + 1
    parts.append(expression[start:])
    return parts


def _root(part: str) -> str:
    """The first name of a path (``Patient`` of ``(Patient.name as HumanName)``)."""
    match = re.match(r"[\s(]*([A-Za-z][A-Za-z0-9_]*)", part)
    return match.group(1) if match else ""


def register_custom(resource: dict[str, Any], *, replacing: str | None = None) -> SearchParam:
    """Check a SearchParameter resource and make its parameter searchable and indexed (replacing
    the one registered under the same url). Raises UnusableSearchParameter (a ValueError).
    ``replacing``: the url this resource registered before, if it changed; unregister it after."""
    sp = check_custom(resource, replacing=replacing)
    if _custom.get(sp.url) != sp:
        _custom[sp.url] = sp
        _changed()
    return sp


def unregister_custom(url: str) -> bool:
    """Forget the custom parameter with this url; False when none was registered."""
    if _custom.pop(url, None) is None:
        return False
    _changed()
    return True


def custom_parameters() -> tuple[SearchParam, ...]:
    """The registered custom parameters, by url."""
    return tuple(sp for _, sp in sorted(_custom.items()))
