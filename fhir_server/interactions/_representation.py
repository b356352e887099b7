"""_summary and _elements: the subsets of a resource a client may ask for (search.html#summary)."""

from __future__ import annotations

from typing import Any

import orjson

from fhir_server.definitions import mandatory_elements, summary_elements
from fhir_server.outcome import bad_request

_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = ("resourceType", "id", "meta")


def _mark_subsetted(resource: dict[str, Any]) -> None:
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    tags.append(dict(_SUBSETTED))
    meta["tag"] = tags
    resource["meta"] = meta


def shape(resource: dict[str, Any], summary: str | None, elements: list[str] | None) -> dict[str, Any]:
    """The subset of ``resource`` that ``_summary``/``_elements`` ask for (a new dict)."""
    type_ = resource.get("resourceType", "")
    if summary in (None, "false") and not elements:
        return resource
    # `_birthDate`-style companions (primitive extensions) go with their element.
    if summary == "true":
        keep = summary_elements(type_)
        out = {k: v for k, v in resource.items() if k.lstrip("_") in keep or k in _ALWAYS}
    elif summary == "text":
        keep = mandatory_elements(type_)
        out = {k: v for k, v in resource.items() if k.lstrip("_") in keep or k in _ALWAYS or k == "text"}
    elif summary == "data":
        out = {k: v for k, v in resource.items() if k != "text"}
    elif elements:
        keep = set(elements) | mandatory_elements(type_)
        out = {k: v for k, v in resource.items() if k.lstrip("_") in keep or k in _ALWAYS}
    else:
        raise bad_request(f"Invalid _summary '{summary}'", expression=["_summary"])
    _mark_subsetted(out)
    return out


def shape_raw(raw: bytes, summary: str | None, elements: list[str] | None) -> bytes | dict[str, Any]:
    """Keep the stored bytes when nothing is asked for; otherwise the shaped resource."""
    if summary in (None, "false") and not elements:
        return raw
    return shape(orjson.loads(raw), summary, elements)
