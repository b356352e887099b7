"""Every FHIR request audited (fhir_server/http/audit.py): reads, searches, creates and refusals
give AuditEvents with the BALP subtype, action and outcome, searchable over the API; X-Request-Id
echoed (or made) and recorded; the chain verifies after concurrent requests; no ID number in the
logs. Real mongod, the app through httpx.ASGITransport, auditing on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
import bson
import orjson
import pytest

from conftest import make_settings
from fhir_server.audit import verify
from fhir_server.audit.chain import LINKS
from fhir_server.config import Settings
from fhir_server.http.app import create_app
from helpers import uid

pytestmark = pytest.mark.timeout(180)

INTERACTION = "http://hl7.org/fhir/restful-interaction"
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"
ID = "310101199003071234"  # well-formed GB 11643 number (check digit right); not a real person's


def settings(mongo_uri: str, **overrides: Any) -> Settings:
    if "field_encryption" in Settings.__dataclass_fields__:  # numbers in clear: the logs are the test
        overrides.setdefault("field_encryption", False)
    return make_settings(mongo_uri, **overrides)


@pytest.fixture(scope="module")
async def audited(mongo_uri):
    app = create_app(settings(mongo_uri, audit_enabled=True, audit_anchor_seconds=0, rate_limit_per_second=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.20.30.40", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as http:
            yield app, http


async def _events(app, http: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    await app.state.audit_trail.flush()  # reads are recorded in the background
    r = await http.get("/AuditEvent", params={"_count": "200", **params})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def _request_id(event: dict[str, Any]) -> str | None:
    for e in event.get("entity", []):
        if e["type"]["code"] == "XrequestId":
            return e["what"]["identifier"]["value"]
    return None


def _one(events: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    found = [e for e in events if _request_id(e) == request_id]
    assert len(found) == 1, [_request_id(e) for e in events]
    return found[0]


def _shape(event: dict[str, Any]) -> tuple[str, str, str]:
    (subtype,) = event["subtype"]
    assert subtype["system"] == INTERACTION
    return subtype["code"], event["action"], event["outcome"]


def _refs(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})]


def _query(event: dict[str, Any]) -> str:
    (q,) = [e["query"] for e in event["entity"] if (e.get("role") or {}).get("code") == "24"]
    return base64.b64decode(q).decode("utf-8")


async def test_create_read_search_refusals_are_audited(audited):
    app, http = audited
    rid = uid()
    # create
    r = await http.post("/Patient", json={"resourceType": "Patient", "gender": "female"}, headers={"X-Request-Id": f"create-{rid}", "User-Agent": "jkda-test/1.0"})
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == f"create-{rid}"
    pid = r.json()["id"]
    # read
    r = await http.get(f"/Patient/{pid}", headers={"X-Request-Id": f"read-{rid}"})
    assert r.status_code == 200 and r.headers["x-request-id"] == f"read-{rid}"
    # search
    r = await http.get("/Patient", params={"_id": pid, "gender": "female"}, headers={"X-Request-Id": f"search-{rid}"})
    assert r.status_code == 200 and r.json()["total"] == 1
    # 404
    r = await http.get(f"/Patient/ghost-{rid}", headers={"X-Request-Id": f"missing-{rid}"})
    assert r.status_code == 404
    # 400 (an unknown search parameter)
    r = await http.get("/Observation", params={"no-such-param": "1"}, headers={"X-Request-Id": f"bad-{rid}"})
    assert r.status_code == 400

    # The create: BALP Create, the written version and the patient.
    ev = _one(await _events(app, http, patient=f"Patient/{pid}", subtype="create"), f"create-{rid}")
    assert _shape(ev) == ("create", "C", "0")
    assert f"Patient/{pid}/_history/1" in _refs(ev) and f"Patient/{pid}" in _refs(ev)
    client = [a for a in ev["agent"] if a["type"]["coding"][0]["code"] == "110153"][0]
    assert client["network"]["address"] == "10.20.30.40"
    assert client["who"]["display"] == "jkda-test/1.0"
    assert client["who"]["identifier"]["value"] == "anonymous"  # authentication off: no principal
    # The read.
    ev = _one(await _events(app, http, patient=f"Patient/{pid}", subtype="read"), f"read-{rid}")
    assert _shape(ev) == ("read", "R", "0")
    # The search: BALP Query, the query kept as asked, the patient named by _id.
    ev = _one(await _events(app, http, patient=f"Patient/{pid}", subtype="search-type"), f"search-{rid}")
    assert _shape(ev) == ("search-type", "E", "0")
    assert _query(ev) == f"_id={pid}&gender=female"
    # The refusals are audited too (outcome 4: minor failure).
    ev = _one(await _events(app, http, entity=f"Patient/ghost-{rid}", outcome="4"), f"missing-{rid}")
    assert _shape(ev) == ("read", "R", "4") and ev["outcomeDesc"].startswith("HTTP 404")
    ev = _one(await _events(app, http, subtype="search-type", outcome="4"), f"bad-{rid}")
    assert _shape(ev) == ("search-type", "E", "4") and ev["outcomeDesc"].startswith("HTTP 400")
    assert _query(ev) == "no-such-param=1"


async def test_request_id_made_when_absent_and_post_search_form_recorded(audited):
    app, http = audited
    pid = uid()[:20]
    r = await http.post("/Observation/_search", data={"subject": f"Patient/{pid}", "code": "8867-4"})
    assert r.status_code == 200, r.text
    made = r.headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    ev = _one(await _events(app, http, patient=f"Patient/{pid}"), made)
    assert _shape(ev) == ("search-type", "E", "0")
    assert _query(ev) == f"subject=Patient%2F{pid}&code=8867-4"  # the form body is the query
    # A malformed X-Request-Id (header injection, too long) is replaced, not echoed.
    r = await http.get("/metadata", headers={"X-Request-Id": "x" * 300})
    assert r.headers["x-request-id"] != "x" * 300 and len(r.headers["x-request-id"]) == 32


async def test_handler_added_patients_and_principal_are_recorded(audited, monkeypatch):
    """request.state.audit_patients (from a handler) and request.state.principal (from the
    authentication layer) reach the AuditEvent."""
    app, http = audited
    from fhir_server.http import routes

    @dataclass
    class FakePrincipal:  # the fields of fhir_server.auth.tokens.Principal the audit reads
        subject: str
        client_id: str
        kind: str
        patient: str | None
        fhir_user: str | None
        claims: dict[str, Any] = field(default_factory=dict)

    seen, ctx = uid()[:16], uid()[:16]
    original = routes.render

    def render(request, resp):  # after authentication and the handler, as they would set them
        request.state.principal = FakePrincipal("u-77", "community-app", "user", ctx, "Practitioner/d1", {"name": "王医生"})
        request.state.audit_patients = {seen}
        return original(request, resp)

    monkeypatch.setattr(routes, "render", render)
    r = await http.get("/Observation", params={"code": "8867-4"}, headers={"X-Request-Id": f"p-{seen}"})
    assert r.status_code == 200
    monkeypatch.undo()
    events = await _events(app, http, subtype="search-type", agent="Practitioner/d1")
    mine = [e for e in events if _request_id(e) == f"p-{seen}"]
    # One event per patient: the one the handler named and the launch context.
    assert sorted(r for e in mine for r in _refs(e) if r.startswith("Patient/")) == sorted([f"Patient/{seen}", f"Patient/{ctx}"])
    ev = mine[0]
    client = [a for a in ev["agent"] if a["type"]["coding"][0]["code"] == "110153"][0]
    assert client["who"]["identifier"]["value"] == "community-app"
    user = [a for a in ev["agent"] if a["type"]["coding"][0]["code"] == "IRCP"][0]
    assert user["who"]["identifier"]["value"] == "u-77" and user["who"]["reference"] == "Practitioner/d1"
    assert user["requestor"] is True and user["name"] == "王医生"


async def test_chain_verifies_after_50_concurrent_requests(audited):
    app, http = audited
    tag = uid()

    async def one(i: int) -> httpx.Response:
        h = {"X-Request-Id": f"c{i}-{tag}"}
        if i % 3 == 0:
            return await http.post("/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=h)
        if i % 3 == 1:
            return await http.get("/Patient", params={"gender": "male", "_count": "5"}, headers=h)
        return await http.get(f"/Patient/none-{i}", headers=h)

    responses = await asyncio.gather(*(one(i) for i in range(50)))
    assert sorted({r.status_code for r in responses}) == [200, 201, 404]
    assert all(r.headers["x-request-id"] == f"c{i}-{tag}" for i, r in enumerate(responses))
    await app.state.audit_trail.flush()
    server = app.state.server
    db = server.store.client.get_database(server.settings.database)
    report = await verify(db)
    assert report.ok, report.problems
    assert report.links == report.last_seq == report.head_seq and report.missing == 0
    # Each of the 50 requests left at least one event (a create or a 404 names a patient: one each).
    ids = set()
    async for link in db[LINKS].find({}, {"e": 1}):
        rid = _request_id(orjson.loads(link["e"]))
        if rid and rid.endswith(tag):
            ids.add(rid)
    assert ids == {f"c{i}-{tag}" for i in range(50)}


async def test_no_id_card_number_in_the_logs(audited, caplog, monkeypatch):
    """A search by 身份证号: the AuditEvent keeps the query (access-controlled), the logs never see
    the number, even at DEBUG (the driver's command log) and in a fault's traceback."""
    app, http = audited
    with caplog.at_level(logging.DEBUG):
        r = await http.get("/Patient", params={"identifier": f"{ID_CARD_SYSTEM}|{ID}"}, headers={"X-Request-Id": "idcard-1"})
        assert r.status_code == 200, r.text
        # A fault whose message quotes the query (encoded and decoded): logged with its traceback, redacted.
        from fhir_server.http import routes

        def broken(request, resp):
            raise RuntimeError(f"cannot search {request.url.query} ({urllib.parse.unquote(request.url.query)})")

        monkeypatch.setattr(routes, "render", broken)
        r = await http.get("/Patient", params={"identifier": f"{ID_CARD_SYSTEM}|{ID}"}, headers={"X-Request-Id": "idcard-2"})
        assert r.status_code == 500
        assert r.headers["x-content-type-options"] == "nosniff"
        monkeypatch.undo()
        await app.state.audit_trail.flush()
    server_side = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))]  # not the test client's
    assert any(rec.name.startswith("pymongo.command") for rec in server_side)
    text = "\n".join(caplog.handler.format(rec) for rec in server_side)
    assert "cannot search" in text and "[身份证已脱敏]" in text
    assert ID not in text
    events = await _events(app, http, subtype="search-type")
    assert _query(_one(events, "idcard-1")) == f"identifier={ID_CARD_SYSTEM.replace(':', '%3A')}%7C{ID}"  # encryption off here
    assert _shape(_one(events, "idcard-2")) == ("search-type", "E", "8")


async def test_write_answered_when_the_audit_is_unavailable(audited, caplog, monkeypatch):
    """The write has committed when its events fail to become durable: the client still gets its
    answer, and the failure is an ERROR in the log."""
    app, http = audited
    from fhir_server.audit import AuditUnavailable

    trail = app.state.audit_trail

    async def unavailable(rec, **kw):
        raise AuditUnavailable("audit events not durable after 10 s")

    monkeypatch.setattr(trail, "record", unavailable)
    with caplog.at_level(logging.ERROR, logger="fhir_server"):
        r = await http.post("/Patient", json={"resourceType": "Patient", "gender": "other"}, headers={"X-Request-Id": "no-audit-1"})
    monkeypatch.undo()
    assert r.status_code == 201 and r.headers["x-request-id"] == "no-audit-1"
    assert (await http.get(r.headers["location"])).status_code == 200  # committed
    (rec,) = [x for x in caplog.records if x.name == "fhir_server.http.audit"]
    assert rec.levelno == logging.ERROR and "no-audit-1" in rec.getMessage() and "not durable" in rec.getMessage()


async def test_with_authentication_on_who_is_recorded_and_401_audited(mongo_uri):
    """End to end with the real authentication: the principal it leaves on request.state reaches
    the AuditEvent; a request without a token is refused (401) and audited."""
    import hashlib
    import secrets
    from urllib.parse import parse_qs, urlsplit

    from fhir_server.auth import clients

    fhir = "http://testserver/fhir"
    app = create_app(settings(mongo_uri, auth_enabled=True, audit_enabled=True, audit_anchor_seconds=0, public_base_url=fhir))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=fhir, timeout=60) as http:
            verifier = secrets.token_urlsafe(48)
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            r = await http.get(
                "http://testserver/auth/authorize",
                params={
                    "response_type": "code", "client_id": clients.DEMO_CLINICIAN_APP, "redirect_uri": clients.DEMO_REDIRECT_URI,
                    "scope": "user/*.cruds openid fhirUser", "state": "s", "aud": fhir, "code_challenge": challenge,
                    "code_challenge_method": "S256", "login_hint": "clinician",
                },
            )  # fmt: skip
            assert r.status_code == 302, r.text
            code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
            r = await http.post(
                "http://testserver/auth/token",
                data={"grant_type": "authorization_code", "code": code, "redirect_uri": clients.DEMO_REDIRECT_URI,
                      "client_id": clients.DEMO_CLINICIAN_APP, "code_verifier": verifier},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            bearer = {"Authorization": "Bearer " + r.json()["access_token"]}
            r = await http.get("/Patient/nobody-here", headers={"X-Request-Id": "anon-1"})
            assert r.status_code == 401
            r = await http.post("/Patient", json={"resourceType": "Patient"}, headers={**bearer, "X-Request-Id": "clin-1"})
            assert r.status_code == 201, r.text
            await app.state.audit_trail.flush()
            server = app.state.server
            db = server.store.client.get_database(server.settings.database)
            events = {}
            async for link in db[LINKS].find({}, {"e": 1}):
                ev = orjson.loads(link["e"])
                events[_request_id(ev)] = ev
            anon = events["anon-1"]
            assert _shape(anon) == ("read", "R", "4") and anon["outcomeDesc"].startswith("HTTP 401")
            assert anon["agent"][0]["who"]["identifier"]["value"] == "anonymous"
            clin = events["clin-1"]
            assert _shape(clin) == ("create", "C", "0")
            assert clin["agent"][0]["who"]["identifier"]["value"] == clients.DEMO_CLINICIAN_APP
            (user,) = [a for a in clin["agent"] if a["type"]["coding"][0]["code"] == "AUT"]
            assert user["requestor"] is True and user["who"]["identifier"]["value"]
            assert (await verify(db)).ok


async def test_with_field_encryption_the_trail_holds_no_number(mongo_uri):
    """The trail is hashed byte for byte and not encrypted at rest, so an audited query keeps an
    ID or mobile number as its blind index: neither the chain's links nor the searchable copies
    hold the number, and the query still says what was asked. (Last in this module: the app
    switches the process's field encryption on, as every other module's apps do.)"""
    app = create_app(make_settings(mongo_uri, audit_enabled=True, audit_anchor_seconds=0, rate_limit_per_second=0))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir", timeout=60) as http:
            for params, rid in (({"identifier": f"{ID_CARD_SYSTEM}|{ID}"}, "blind-1"), ({"phone": "13912345678"}, "blind-2")):
                r = await http.get("/Patient", params=params, headers={"X-Request-Id": rid})
                assert r.status_code == 200, r.text
            events = await _events(app, http, subtype="search-type")
            query = _query(_one(events, "blind-1"))
            assert query.startswith(f"identifier={ID_CARD_SYSTEM}|h1:") and ID not in query
            assert _query(_one(events, "blind-2")).startswith("phone=h1:")
            db = app.state.server.store.client.get_database(app.state.server.settings.database)
            for name in (LINKS, "AuditEvent"):
                async for doc in db[name].find({}):
                    raw = bson.encode(doc)
                    assert ID.encode() not in raw and b"13912345678" not in raw, name
