"""Who may call the REST gateway: bearer tokens scoped to apps and operations, and TLS.

A token is a random secret (``cs_`` and 43 URL-safe characters: 256 bits) that an operator
makes with ``clipstream gateway token`` and hands to one client. The gateway stores only
its SHA-256 hash, in one line per token:

    NAME sha256:HEX SCOPE[,SCOPE...]

A scope is ``APP`` (predict and feedback for that app), ``APP:predict`` or
``APP:feedback``; ``*`` in place of APP stands for every app. Lines come from the file
named by ``CLIPSTREAM_GATEWAY_TOKENS_FILE`` (re-read when it changes, so tokens are added
and revoked without a restart) and from ``CLIPSTREAM_GATEWAY_TOKENS`` (lines separated by
``;`` or newlines); blank lines and ``#`` comments are ignored.

An unsalted SHA-256 is enough because a token is a 256-bit random secret, not a password
someone chose: there is no dictionary to try against a leaked hash.

``CLIPSTREAM_GATEWAY_AUTH`` says which way the gateway runs: ``tokens`` (the default:
every request needs a token, and with no token configured every request is refused) or
``open`` (no authentication, for the tour and a closed network; logged at start-up).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import ssl
import time
from dataclasses import dataclass

from clipstream.streams.wire.config import Settings

log = logging.getLogger("clipstream.gateway")

OPERATIONS = ("predict", "feedback")
MODES = ("tokens", "open")
TOKEN_PREFIX = "cs_"
ALL_APPS = "*"
#: how often (at most) the tokens file is checked for changes
RELOAD_INTERVAL_S = 1.0
REALM = 'Bearer realm="clipstream"'

_NAME = re.compile(r"^[A-Za-z0-9_.@-]+$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


class GatewayConfigError(ValueError):
    """Gateway security settings that cannot work (a broken tokens file, half a TLS pair)."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """One token's hash and what it may do."""

    name: str
    digest: str
    scopes: frozenset[tuple[str, str]]  # (app or "*", operation)

    def allows(self, app: str, operation: str) -> bool:
        return (app, operation) in self.scopes or (ALL_APPS, operation) in self.scopes

    def line(self) -> str:
        """The entry as a line of a tokens file."""
        scopes = []
        for app in sorted({app for app, _ in self.scopes}):
            ops = [op for op in OPERATIONS if (app, op) in self.scopes]
            scopes += [app] if len(ops) == len(OPERATIONS) else [f"{app}:{op}" for op in ops]
        return f"{self.name} sha256:{self.digest} {','.join(scopes)}"


def parse_scopes(text: str) -> frozenset[tuple[str, str]]:
    """``digits,spam:feedback,*:predict`` -> {(app, operation)}."""
    scopes: set[tuple[str, str]] = set()
    for item in text.split(","):
        app, colon, operation = item.strip().rpartition(":")
        if not colon:
            app, operation = operation, ""
        if not app:
            raise GatewayConfigError(f"empty app in scope {item!r}")
        if operation and operation not in OPERATIONS:
            raise GatewayConfigError(
                f"unknown operation {operation!r} in scope {item!r} (one of {OPERATIONS})"
            )
        scopes.update((app, op) for op in ([operation] if operation else OPERATIONS))
    return frozenset(scopes)


def make_entry(name: str, token: str, scopes: list[str]) -> TokenEntry:
    if not _NAME.match(name):
        raise GatewayConfigError(f"token name {name!r}: use letters, digits and _ . @ - only")
    if not scopes:
        raise GatewayConfigError("a token needs at least one scope (an app, or '*')")
    return TokenEntry(name, digest(token), parse_scopes(",".join(scopes)))


def parse_entries(text: str, source: str) -> list[TokenEntry]:
    """Every entry in ``text`` (lines or ';'-separated); errors name ``source`` and line."""
    entries = []
    for number, line in enumerate(re.split(r"[;\n]", text), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise GatewayConfigError(
                f"{source}, entry {number}: expected 'NAME sha256:HEX SCOPES', got "
                f"{len(fields)} fields"
            )
        name, hashed, scopes = fields
        found = _DIGEST.match(hashed)
        if not found:
            raise GatewayConfigError(
                f"{source}, entry {number}: the hash must be 'sha256:' and 64 lowercase hex "
                "digits (the gateway never stores a token itself)"
            )
        try:
            entries.append(TokenEntry(name, found.group(1), parse_scopes(scopes)))
        except GatewayConfigError as exc:
            raise GatewayConfigError(f"{source}, entry {number}: {exc}") from None
    return entries


@dataclass(frozen=True)
class Denied:
    """Why a request may not go on: 401 (who are you?) or 403 (not for this app)."""

    status: int
    reason: str

    def headers(self) -> dict[str, str]:
        code = "invalid_token" if self.status == 401 else "insufficient_scope"
        return {"WWW-Authenticate": f'{REALM}, error="{code}"'}


class TokenAuth:
    """The gateway's token check, with the tokens file re-read when it changes."""

    def __init__(self, settings: Settings) -> None:
        if settings.gateway_auth not in MODES:
            raise GatewayConfigError(
                f"CLIPSTREAM_GATEWAY_AUTH must be one of {MODES}, got {settings.gateway_auth!r}"
            )
        self.open = settings.gateway_auth == "open"
        self.path = settings.gateway_tokens_file
        self._inline = parse_entries(settings.gateway_tokens or "", "CLIPSTREAM_GATEWAY_TOKENS")
        if self.open and (self.path or self._inline):
            raise GatewayConfigError(
                "CLIPSTREAM_GATEWAY_AUTH=open but tokens are configured: unset "
                "CLIPSTREAM_GATEWAY_TOKENS(_FILE), or use CLIPSTREAM_GATEWAY_AUTH=tokens"
            )
        self._by_digest: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load(self._read_file())  # a broken file stops the worker at start-up

    @property
    def tokens(self) -> int:
        return len(self._by_digest)

    def describe(self) -> str:
        if self.open:
            return "open: no authentication"
        return f"bearer tokens: {self.tokens}"

    def check(self, operation: str, app: str, authorization: str | None) -> Denied | None:
        """None if the request may go on, else why not."""
        if self.open:
            return None
        self._maybe_reload()
        if not self._by_digest:
            return Denied(
                401,
                "this gateway has no tokens configured, so it refuses every request: set "
                "CLIPSTREAM_GATEWAY_TOKENS_FILE (see docs/security.md)",
            )
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Denied(401, "missing bearer token: send 'Authorization: Bearer TOKEN'")
        # a dict lookup by hash is not a timing oracle for the token: an attacker controls
        # the token, not its hash
        entry = self._by_digest.get(digest(token.strip()))
        if entry is None:
            return Denied(401, "invalid or revoked token")
        if not entry.allows(app, operation):
            return Denied(403, f"token {entry.name!r} may not {operation} for app {app!r}")
        return None

    def _read_file(self) -> list[TokenEntry]:
        if not self.path:
            return []
        try:
            stat = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise GatewayConfigError(f"tokens file {self.path}: {exc}") from None
        self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stat.st_mode & 0o077:
            log.warning("tokens file %s is readable by other users (chmod 600)", self.path)
        return parse_entries(text, self.path)

    def _load(self, from_file: list[TokenEntry]) -> None:
        by_digest = {}
        for entry in [*self._inline, *from_file]:
            if entry.digest in by_digest:
                raise GatewayConfigError(
                    f"tokens {by_digest[entry.digest].name!r} and {entry.name!r} have the same hash"
                )
            by_digest[entry.digest] = entry
        self._by_digest = by_digest

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < RELOAD_INTERVAL_S:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
            if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._stamp:
                return
            self._load(self._read_file())
        except (OSError, GatewayConfigError) as exc:
            # A half-written or broken file must not lock every client out: the tokens read
            # last stay in force until the file is fixed.
            log.error("tokens file not reloaded, the previous tokens stay in force: %s", exc)
            return
        log.warning("tokens file %s reloaded: %d tokens", self.path, self.tokens)


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the gateway's listener, or None to serve plain HTTP."""
    cert, key = settings.gateway_certfile, settings.gateway_keyfile
    if not cert and not key:
        return None
    if not cert or not key:
        raise GatewayConfigError(
            "set both CLIPSTREAM_GATEWAY_CERTFILE and CLIPSTREAM_GATEWAY_KEYFILE for HTTPS"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included
        raise GatewayConfigError(f"gateway certificate {cert} or key {key}: {exc}") from None
    return context
