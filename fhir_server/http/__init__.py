"""The HTTP layer: FastAPI routes → FhirRequest → an interaction → FhirResponse → HTTP response."""
