"""Field-level protection of ID-document numbers and phone numbers at rest (issue #6).

A database dump (``mongodump``, a copy of the data files, a backup) must not reveal residents'
身份证 numbers or phone numbers, while exact search on them keeps working. MongoDB's own
client-side field-level encryption does not fit: automatic CSFLE needs the enterprise
``mongocryptd``/``crypt_shared``, and the server keeps each resource as raw JSON bytes (``r``), which
MongoDB cannot see into anyway. So the storage layer does it itself:

- **At rest** (the current collection and ``_history``): each protected value inside the stored JSON
  is replaced by a token ``enc:v1:<kid>.<base64url(nonce | AES-256-GCM ciphertext+tag)>~``, with a
  fresh random 96-bit nonce per value per version (randomised: equal numbers give different
  tokens). ``kid`` names the key (6 characters derived from it), so a later key can be added while
  old tokens still decrypt (``field_previous_keys``). Where the number also appears inside other
  text of the same resource (the narrative ``div``, a note), that occurrence is replaced too.
- **Search**: the index values of protected values are a blind index, ``h1:`` + HMAC-SHA256 of the
  normalised value (NFKC, spaces/hyphens/parentheses removed, upper case), 132 bits, keyed: without
  the key a dump gives no way to test guesses (an ID number has only ~10^10 plausible values, so an
  unkeyed hash would be no protection). A query on ``identifier``, ``phone`` or ``telecom`` (and a
  reference ``:identifier``) looks up both the plain and the blind form of its value, so exact
  match works, with or without a system, and also on data written before protection was on.
- **Reading**: every raw JSON the storage layer hands out goes through :func:`decode`, which puts
  the plaintext back (a byte search for ``enc:v1:`` first, so resources without tokens cost ~nothing).

What is protected: ``value`` of every Identifier whose system is the 身份证 system (or one listed in
``field_protected_systems``) or whose type is a CV02.01.101 ID-document type (passport, 港澳通行证 …;
not the connectors' source record numbers, typed ``cn-identifier-type#source-record``),
and of every ContactPoint whose system is phone, sms, fax or pager — anywhere in any resource
(Patient.telecom and contact.telecom, Practitioner, RelatedPerson, Organization, references'
``identifier``, contained resources); and ``data`` of every Binary and Attachment (the source
CDA/XML records the connectors keep contain ID numbers). AuditEvents are left as they are: they are
hash-chained byte for byte and the audit module redacts ID numbers and phones itself.

Keys: one 32-byte master key (base64; ``FHIR_FIELD_KEY`` or a file named by
``FHIR_FIELD_KEY_FILE``), from which HKDF-SHA256 derives the AES key, the HMAC key and the key id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import stat
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

PREFIX = b"enc:v1:"
BLIND_PREFIX = "h1:"
KEY_BYTES = 32
# Where `fhir-server run` keeps the key it generates for the default embedded data folder
# (.data/mongod): beside the database files, not among them, so a copy of those lacks it.
DEFAULT_KEY_FILE = Path(".data/field.key")

# The 身份证 number system (fhir_server/validation/cn_identity.py: ID_CARD_SYSTEM); repeated here so
# that the storage layer does not import the validation package.
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"
# An Identifier typed with a CV02.01.101 code is an ID document (passport, 军官证, 港澳通行证 ...).
ID_DOCUMENT_TYPE_SUFFIX = "/CodeSystem/cv02-01-101-id-document-type"
# ... except a source system's record number (fhir_server/connectors/mapping.py: source_identifier).
SOURCE_RECORD_TYPE_SUFFIX = "/CodeSystem/cn-identifier-type"
# ContactPoint systems whose values are phone numbers.
PHONE_SYSTEMS = frozenset({"phone", "sms", "fax", "pager"})
# Resource types whose stored bytes are never altered (hash-chained; redacted by fhir_server/audit).
UNPROTECTED_TYPES = frozenset({"AuditEvent"})

# A token: key id, ".", base64url of nonce + ciphertext, "~" (not in the base64url alphabet, so the
# token's end is unambiguous even when text follows it directly).
_TOKEN = re.compile(rb"enc:v1:([A-Za-z0-9_-]{6})\.([A-Za-z0-9_-]+)~")
# Values that look like numbers are also replaced where they occur inside other text; others
# (rare: a phone written with letters) only where a JSON string is exactly the value.
_NUMBER_LIKE = re.compile(r"\+?[0-9][0-9 ()\-]{4,}[0-9Xx]")
_BLIND_STRIP = re.compile(r"[\s\-()]")


class FieldCryptoError(Exception):
    """Stored protected values cannot be decrypted (wrong or missing key, altered data)."""


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def _derive(master: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def parse_key(text: str | bytes, where: str = "field key") -> bytes:
    """A 32-byte key from its base64 (standard or URL-safe) text."""
    raw = text.strip() if isinstance(text, bytes) else text.strip().encode()
    try:
        key = base64.b64decode(raw.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(raw) % 4), validate=True)
    except ValueError:
        raise FieldCryptoError(f"{where}: not base64") from None
    if len(key) != KEY_BYTES:
        raise FieldCryptoError(f"{where}: {len(key)} bytes, expected {KEY_BYTES} (base64 of 32 random bytes)")
    return key


def new_key_text() -> str:
    """A fresh random master key, as the base64 text a key file or FHIR_FIELD_KEY holds."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def write_key_file(path: Path) -> None:
    """Create ``path`` holding a new key, readable by its owner only (never overwrites)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_text() + "\n")


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        text = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as e:
        raise FieldCryptoError(f"field key file {p}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("field key file %s is readable by others (mode %o): chmod 600 it", p, stat.S_IMODE(mode))
    return parse_key(text, f"field key file {p}")


class FieldCrypto:
    """Encrypts protected values in stored JSON, decrypts them back, and blinds them for search."""

    def __init__(self, key: bytes, previous: Sequence[bytes] = (), extra_systems: Iterable[str] = ()) -> None:
        self.kid = self._kid(key)
        self._aead: dict[bytes, AESGCM] = {}
        for k in (*previous, key):
            self._aead[self._kid(k)] = AESGCM(_derive(k, b"fhir-server field encryption v1"))
        self._current = self._aead[self.kid]
        self._mac = hmac.new(_derive(key, b"fhir-server blind index v1"), digestmod=hashlib.sha256)
        # One resource blinds the same number for several parameters (phone, telecom), and a search
        # page for the same few values: a small cache saves the HMAC.
        self.blind = lru_cache(maxsize=4096)(self._blind)  # type: ignore[method-assign]
        self._lock_key = _derive(key, b"fhir-server lock keys v1")
        self.systems = frozenset({ID_CARD_SYSTEM, *(s for s in extra_systems if s)})
        # Bytes whose absence proves a resource has nothing to protect (a few substring searches,
        # far cheaper than parsing the JSON).
        self._markers = (
            *(orjson.dumps(p) for p in sorted(PHONE_SYSTEMS)),
            *(orjson.dumps(s) for s in sorted(self.systems)),
            b"cv02-01-101-id-document-type",
            b'"data":"',
            PREFIX,
        )

    @staticmethod
    def _kid(key: bytes) -> bytes:
        return _b64(_derive(key, b"fhir-server field key id v1", 6))[:6]

    # -- what is protected --------------------------------------------------------------------

    def protects(self, node: dict[str, Any]) -> bool:
        """Whether the ``value`` of this Identifier or ContactPoint is protected."""
        system = node.get("system")
        if isinstance(system, str) and (system in self.systems or system in PHONE_SYSTEMS):
            return True
        type_ = node.get("type")
        if not isinstance(type_, dict):
            return False
        document = False
        for c in type_.get("coding") or ():
            if isinstance(c, dict) and isinstance(c.get("system"), str):
                if c["system"].endswith(ID_DOCUMENT_TYPE_SUFFIX):
                    document = True
                elif c["system"].endswith(SOURCE_RECORD_TYPE_SUFFIX) and c.get("code") == "source-record":
                    return False  # a source system's record number, typed 99 only to satisfy cn-patient
        return document

    def _collect(self, node: Any, found: dict[str, bool]) -> None:
        """Protected strings under ``node``: value → whether only whole JSON strings are replaced."""
        if isinstance(node, dict):
            value = node.get("value")
            if isinstance(value, str) and value and self.protects(node):
                found.setdefault(value, not _NUMBER_LIKE.fullmatch(value))
            data = node.get("data")
            if isinstance(data, str) and data and "contentType" in node:
                found[data] = True
            for child in node.values():
                if isinstance(child, (dict, list)):
                    self._collect(child, found)
        elif isinstance(node, list):
            for child in node:
                if isinstance(child, (dict, list)):
                    self._collect(child, found)

    # -- tokens ---------------------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        """One token for ``plaintext`` (a fresh nonce each time)."""
        nonce = os.urandom(12)
        aad = PREFIX + self.kid
        return PREFIX + self.kid + b"." + _b64(nonce + self._current.encrypt(nonce, plaintext, aad)) + b"~"

    def _open(self, m: re.Match[bytes]) -> bytes:
        kid, body = m.group(1), m.group(2)
        aead = self._aead.get(kid)
        if aead is None:
            raise FieldCryptoError(
                f"a stored value was encrypted with field key {kid.decode()}, but the configured key is "
                f"{self.kid.decode()} (add the old key to field_previous_keys, or configure the right FHIR_FIELD_KEY)"
            )
        try:
            blob = _unb64(body)
            return aead.decrypt(blob[:12], blob[12:], PREFIX + kid)
        except (InvalidTag, ValueError):
            raise FieldCryptoError(f"a stored value encrypted with field key {kid.decode()} fails authentication (altered data?)") from None

    # -- stored JSON ----------------------------------------------------------------------------

    def encrypt_raw(self, raw: bytes) -> bytes:
        """``raw`` with every protected value (and any ``enc:v1:`` a client wrote) replaced by a token.
        :meth:`decrypt_raw` gives back exactly ``raw``."""
        for marker in self._markers:
            if marker in raw:
                break
        else:
            return raw
        found: dict[str, bool] = {}
        self._collect(orjson.loads(raw), found)
        needles: list[tuple[bytes, bytes]] = []
        for value, whole in found.items():
            quoted = orjson.dumps(value)
            if whole:
                needles.append((quoted, b'"' + self.seal(quoted[1:-1]) + b'"'))
            else:
                needles.append((quoted[1:-1], self.seal(quoted[1:-1])))
        if PREFIX in raw:
            # A client's own text that looks like a token: stored as a token of itself, so reading
            # gives back exactly what was written.
            needles.append((PREFIX, self.seal(PREFIX)))
        if not needles:
            return raw
        spans: list[tuple[int, int, bytes]] = []
        for needle, token in needles:
            start = raw.find(needle)
            while start >= 0:
                spans.append((start, -len(needle), token))
                start = raw.find(needle, start + len(needle))
        spans.sort()
        out: list[bytes] = []
        pos = 0
        for start, neg_len, token in spans:
            if start < pos:
                continue  # overlaps a longer (or earlier) replacement
            out.append(raw[pos:start])
            out.append(token)
            pos = start - neg_len
        out.append(raw[pos:])
        sealed = b"".join(out)
        if PREFIX in _TOKEN.sub(b"", sealed):
            # Contrived overlaps (a value straddling a client's "enc:v1:"): seal the whole document.
            return self.seal(raw)
        return sealed

    def decrypt_raw(self, raw: bytes) -> bytes:
        if PREFIX not in raw:
            return raw
        return _TOKEN.sub(self._open, raw)

    # -- search ---------------------------------------------------------------------------------

    def blind(self, value: str) -> str:
        """The blind index form of a protected value (what the search index stores and queries use)."""
        return self._blind(value)

    def _blind(self, value: str) -> str:
        norm = _BLIND_STRIP.sub("", unicodedata.normalize("NFKC", value)).upper()
        mac = self._mac.copy()
        mac.update(norm.encode())
        return BLIND_PREFIX + _b64(mac.digest()).decode()[:22]

    def lock_key(self, key: str) -> str:
        """A lock name that does not reveal ``key`` (the MPI locks on ID numbers and phones)."""
        return "k:" + _b64(hmac.new(self._lock_key, key.encode(), hashlib.sha256).digest()).decode()[:32]


# -- the process-wide instance (configured from the settings at startup) -----------------------

_active: FieldCrypto | None = None
_configured = False


def active() -> FieldCrypto | None:
    """The configured protection, None when field encryption is off."""
    return _active


def set_active(crypto: FieldCrypto | None) -> None:
    global _active, _configured
    _active, _configured = crypto, True


def from_settings(settings: Any) -> FieldCrypto | None:
    """The protection the settings ask for; None when ``field_encryption`` is off. Raises
    FieldCryptoError when it is on and no usable key is configured."""
    if not getattr(settings, "field_encryption", True):
        return None
    key_text = getattr(settings, "field_key", "") or ""
    key_file = getattr(settings, "field_key_file", "") or ""
    if key_text:
        key = parse_key(key_text, "FHIR_FIELD_KEY")
    elif key_file:
        key = read_key_file(key_file)
    elif DEFAULT_KEY_FILE.is_file():
        # The key `fhir-server run` made beside the default embedded data folder: other commands
        # run from the same folder (sync, deadletter) find it without being told.
        log.info("field key from %s", DEFAULT_KEY_FILE)
        key = read_key_file(DEFAULT_KEY_FILE)
    else:
        raise FieldCryptoError(
            "field encryption is on but no key is configured: set FHIR_FIELD_KEY (base64 of 32 random bytes, "
            "e.g. `python -c \"import base64,os;print(base64.b64encode(os.urandom(32)).decode())\"`) or "
            "FHIR_FIELD_KEY_FILE, or set FHIR_FIELD_ENCRYPTION=false to store ID and phone numbers in clear"
        )
    previous = [parse_key(p, "field_previous_keys") for p in (getattr(settings, "field_previous_keys", "") or "").split(",") if p.strip()]
    systems = [s.strip() for s in (getattr(settings, "field_protected_systems", "") or "").split(",")]
    return FieldCrypto(key, previous, systems)


def configure(settings: Any) -> FieldCrypto | None:
    """Set the process-wide protection from ``settings`` (at startup, before any read or write)."""
    crypto = from_settings(settings)
    if crypto is None:
        log.warning(
            "FIELD ENCRYPTION IS OFF (field_encryption=false): ID-card numbers and phone numbers are stored in "
            "clear and a database dump reveals them"
        )
    elif _active is not None and _active.kid != crypto.kid:
        log.warning("field key changed in this process from %s to %s", _active.kid.decode(), crypto.kid.decode())
    set_active(crypto)
    return crypto


def encode(type_: str, raw: bytes | None) -> bytes | None:
    """The bytes to store for a version of a ``type_`` resource."""
    crypto = _active
    if crypto is None or raw is None or type_ in UNPROTECTED_TYPES:
        return raw
    return crypto.encrypt_raw(raw)


def decode(raw: bytes | None, type_: str = "") -> bytes | None:
    """Stored bytes back to the JSON that was written (every read of ``r`` goes through here)."""
    if raw is None or PREFIX not in raw or type_ in UNPROTECTED_TYPES:
        return raw
    crypto = _active
    if crypto is None:
        if not _TOKEN.search(raw):
            return raw
        raise FieldCryptoError(
            "the database holds field-encrypted values but field encryption is not configured in this process "
            "(set FHIR_FIELD_KEY or FHIR_FIELD_KEY_FILE)"
        )
    return crypto.decrypt_raw(raw)
