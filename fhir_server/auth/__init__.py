"""Access control (issue #6): SMART scopes and grants, access-token validation, and the built-in
development authorization server.

    from fhir_server.auth import install, bearer_token, TokenError
    validator = install(app, settings)             # mounts /auth/* and smart-configuration
    principal = await validator.validate(token)    # Principal(kind, grant, patient, …)
    decision = principal.grant.decide("search", "Observation")   # None → 403; .patient → confine
"""

from fhir_server.auth.dev_server import DevAuthServer, OAuthError, install
from fhir_server.auth.scopes import Decision, Grant, Scope, ScopeError, ScopeSet, parse_scope, parse_scopes, permission_for
from fhir_server.auth.tokens import (
    ALLOWED_ALGORITHMS,
    Principal,
    TokenError,
    TokenValidator,
    bearer_token,
    insufficient_scope,
    unauthenticated,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "Decision",
    "DevAuthServer",
    "Grant",
    "OAuthError",
    "Principal",
    "Scope",
    "ScopeError",
    "ScopeSet",
    "TokenError",
    "TokenValidator",
    "bearer_token",
    "install",
    "insufficient_scope",
    "parse_scope",
    "parse_scopes",
    "permission_for",
    "unauthenticated",
]
