"""JSON Patch (RFC 6902) for the FHIR patch interaction, applied with the ``jsonpatch`` library."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer

from ..outcome import FhirError

_VALUE_OPS = ("add", "replace", "test")
_FROM_OPS = ("move", "copy")
_BAD_PATCH_ZH = "JSON Patch 格式无效"
_FAILED_ZH = "补丁无法应用到该资源"


def apply_json_patch(resource: dict[str, Any], operations: object) -> dict[str, Any]:
    """Return a patched copy of ``resource``; ``resource`` itself is not changed.

    Raises FhirError 400 when ``operations`` is not an array of well-formed operations, and
    422 when an operation cannot be applied (missing path, failed ``test``) or would change
    the resource's ``resourceType`` or ``id``.
    """
    if not isinstance(operations, list):
        raise FhirError.of(
            400, "invalid", "JSON Patch body must be a JSON array of operations", details_zh=_BAD_PATCH_ZH
        )
    # Check every operation before applying any, so a malformed patch is always a 400.
    for number, op in enumerate(operations):
        _check(number, op)
    doc: Any = copy.deepcopy(resource)
    for number, op in enumerate(operations):
        try:
            # One operation at a time, so a failure can name its index.
            doc = jsonpatch.JsonPatch([op]).apply(doc, in_place=True)
        except jsonpatch.InvalidJsonPatch as exc:
            raise _bad(number, op, str(exc)) from None
        except jsonpatch.JsonPatchTestFailed as exc:
            raise _failed(number, op, f"test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise _failed(number, op, str(exc)) from None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            # Edge cases where the library trips over the document's shape.
            raise _failed(number, op, f"{type(exc).__name__}: {exc}") from None
        for key in ("resourceType", "id"):
            if not isinstance(doc, dict) or doc.get(key) != resource.get(key):
                raise _failed(number, op, f"a patch must not change the resource's {key}")
    result: dict[str, Any] = doc
    return result


def _check(number: int, op: object) -> None:
    if not isinstance(op, dict):
        raise _bad(number, op, "an operation must be a JSON object")
    try:
        jsonpatch.JsonPatch([op])
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException) as exc:
        raise _bad(number, op, str(exc)) from None
    kind = op["op"]
    if kind in _VALUE_OPS and "value" not in op:
        raise _bad(number, op, f"'{kind}' needs a 'value' member")
    if kind in _FROM_OPS:
        source = op.get("from")
        if not isinstance(source, str):
            raise _bad(number, op, f"'{kind}' needs a 'from' member holding a JSON Pointer")
        try:
            jsonpointer.JsonPointer(source)
        except jsonpointer.JsonPointerException as exc:
            raise _bad(number, op, f"invalid 'from': {exc}") from None


def _describe(number: int, op: object) -> str:
    if isinstance(op, dict):
        return f"JSON Patch operation {number} ({op.get('op')!r} at {op.get('path')!r})"
    return f"JSON Patch operation {number}"


def _bad(number: int, op: object, message: str) -> FhirError:
    return FhirError.of(400, "invalid", f"{_describe(number, op)}: {message}", details_zh=_BAD_PATCH_ZH)


def _failed(number: int, op: object, message: str) -> FhirError:
    return FhirError.of(422, "processing", f"{_describe(number, op)}: {message}", details_zh=_FAILED_ZH)
