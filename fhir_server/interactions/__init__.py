"""One module per FHIR interaction (http.html): read, vread, create, update, patch, delete,
history, search, capabilities, batch/transaction. Each takes a FhirRequest and returns a
FhirResponse; none knows about HTTP or MongoDB."""
