"""The two patch engines of the FHIR patch interaction, as pure functions.

``apply_json_patch`` takes an RFC 6902 operation array; ``apply_fhirpath_patch`` takes a FHIRPath
Patch ``Parameters`` resource. Both return a new dict and raise ``FhirError`` (400 for a malformed
patch, 422 for one that cannot be applied). Neither validates the result against FHIR: the
caller does.
"""

from .fhirpath_patch import apply_fhirpath_patch
from .json_patch import apply_json_patch

__all__ = ["apply_fhirpath_patch", "apply_json_patch"]
