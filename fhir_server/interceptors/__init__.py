"""Cross-cutting policy that wraps the interactions (as HAPI FHIR's interceptors do):
validation before a resource is stored, referential integrity before a unit commits.
Authorization and audit (issue #6) plug in here too."""
