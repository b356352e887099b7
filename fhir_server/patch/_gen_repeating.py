"""Regenerate ``_r4_repeating.json.gz``: the R4 element paths whose cardinality is ``..*``.

FHIRPath Patch must know whether a new element is a JSON array (``add`` of ``given`` to a
``HumanName`` without one) and fhirpathpy's model carries types but no cardinality. The table is
derived from ``fhirclient`` (generated from the R4 4.0.1 definitions), a test-only dependency, so
it is shipped pre-built. Run ``python -m fhir_server.patch._gen_repeating`` to rebuild it.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("_r4_repeating.json.gz")


def build_table() -> list[str]:
    """Return the sorted repeating element paths of every R4 resource and data type."""
    import fhirclient.models as fc_models
    from fhirclient.models.fhirabstractbase import FHIRAbstractBase
    from fhirpathpy.models import models

    named_types = set(models["r4"]["type2Parent"]) | {"Element", "BackboneElement", "Resource"}
    roots: dict[str, type] = {}
    for info in pkgutil.iter_modules(fc_models.__path__):
        module = importlib.import_module(f"fhirclient.models.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            rtype = getattr(cls, "resource_type", None)
            if issubclass(cls, FHIRAbstractBase) and rtype in named_types:
                roots.setdefault(rtype, cls)

    repeating: set[str] = set()

    def walk(cls: type, prefix: str, ancestors: tuple[type, ...]) -> None:
        instance: Any = cls(strict=False)
        for name, _js, typ, is_list, of_many, _req in instance.elementProperties():
            path = f"{prefix}.{of_many or name}"
            if is_list:
                repeating.add(path)
            backbone = (
                inspect.isclass(typ)
                and issubclass(typ, FHIRAbstractBase)
                and getattr(typ, "resource_type", None) not in named_types
            )
            # A content reference (Questionnaire.item.item) loops; its children are looked up
            # through pathsDefinedElsewhere instead.
            if backbone and typ not in ancestors:
                walk(typ, path, ancestors + (typ,))

    for rtype, cls in roots.items():
        walk(cls, rtype, (cls,))
    return sorted(repeating)


def main() -> None:
    table = build_table()
    TABLE_PATH.write_bytes(gzip.compress(json.dumps(table, separators=(",", ":")).encode(), mtime=0))
    print(f"{len(table)} repeating paths -> {TABLE_PATH}")


if __name__ == "__main__":
    main()
