"""The REST gateway's token check (streams/gateway/auth.py), without a broker: scopes, the
401/403 split, the explicit open mode, hashes at rest and reloading the tokens file. The
same checks over real HTTPS against a worker process are in
tests/integration/test_security.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipstream.streams.gateway import auth as gateway_auth
from clipstream.streams.gateway.auth import GatewayConfigError, TokenAuth, make_entry, new_token
from clipstream.streams.ops.cli import main
from clipstream.streams.wire.config import Settings


def settings(**kw: object) -> Settings:
    return Settings(bootstrap="unused:9092", **kw)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_scopes_split_401_from_403() -> None:
    both, predict_only, anything = new_token(), new_token(), new_token()
    lines = [
        make_entry("both", both, ["digits"]).line(),
        make_entry("reader", predict_only, ["digits:predict", "spam:feedback"]).line(),
        make_entry("admin", anything, ["*"]).line(),
    ]
    auth = TokenAuth(settings(gateway_tokens=";".join(lines)))
    assert auth.tokens == 3
    assert auth.check("predict", "digits", bearer(both)) is None
    assert auth.check("feedback", "digits", bearer(both)) is None
    assert auth.check("predict", "digits", bearer(predict_only)) is None
    assert auth.check("feedback", "spam", bearer(predict_only)) is None
    assert auth.check("predict", "other", bearer(anything)) is None

    denied = auth.check("feedback", "digits", bearer(predict_only))
    assert denied is not None and denied.status == 403
    assert "'reader' may not feedback for app 'digits'" in denied.reason
    assert denied.headers()["WWW-Authenticate"].endswith('error="insufficient_scope"')
    assert auth.check("predict", "spam", bearer(both)).status == 403

    for header in (None, "", "Bearer", "Bearer ", f"Basic {both}", both):
        denied = auth.check("predict", "digits", header)
        assert denied is not None and denied.status == 401, header
        assert "missing bearer token" in denied.reason
    denied = auth.check("predict", "digits", bearer(new_token()))
    assert (denied.status, denied.reason) == (401, "invalid or revoked token")
    assert denied.headers()["WWW-Authenticate"].endswith('error="invalid_token"')
    # the scheme is case-insensitive (RFC 7235)
    assert auth.check("predict", "digits", f"bearer {both}") is None


def test_only_hashes_are_stored() -> None:
    token = new_token()
    assert token.startswith("cs_") and len(token) == 46  # 32 random bytes, URL-safe
    line = make_entry("ci", token, ["digits"]).line()
    assert token not in line
    assert line == f"ci sha256:{hashlib.sha256(token.encode()).hexdigest()} digits"
    # a line holding a token instead of its hash is refused, not accepted as a token
    with pytest.raises(GatewayConfigError, match="sha256"):
        TokenAuth(settings(gateway_tokens=f"ci {token} digits"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ci sha256:" + "0" * 64, "expected 'NAME sha256:HEX SCOPES'"),
        ("ci md5:" + "0" * 32 + " digits", "'sha256:' and 64 lowercase hex"),
        ("ci sha256:" + "0" * 64 + " digits:delete", "unknown operation 'delete'"),
        ("ci sha256:" + "0" * 64 + " digits,", "empty app"),
        ("a sha256:" + "0" * 64 + " x\nb sha256:" + "0" * 64 + " y", "same hash"),
    ],
)
def test_broken_entries_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(GatewayConfigError, match=reason):
        TokenAuth(settings(gateway_tokens=text))


def test_without_tokens_every_request_is_refused_unless_open_is_explicit() -> None:
    closed = TokenAuth(settings())  # the default: tokens, none configured
    denied = closed.check("predict", "digits", bearer(new_token()))
    assert denied is not None and denied.status == 401
    assert "no tokens configured" in denied.reason
    assert closed.describe() == "bearer tokens: 0"

    open_ = TokenAuth(settings(gateway_auth="open"))
    assert open_.check("predict", "digits", None) is None
    assert open_.describe() == "open: no authentication"

    entry = make_entry("ci", new_token(), ["digits"]).line()
    with pytest.raises(GatewayConfigError, match="open but tokens are configured"):
        TokenAuth(settings(gateway_auth="open", gateway_tokens=entry))
    with pytest.raises(GatewayConfigError, match="must be one of"):
        TokenAuth(settings(gateway_auth="none"))


def test_the_tokens_file_is_reread_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_auth, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "tokens"
    first, second = new_token(), new_token()
    path.write_text("# REST clients\n" + make_entry("first", first, ["digits"]).line() + "\n")
    auth = TokenAuth(settings(gateway_tokens_file=str(path)))
    assert auth.check("predict", "digits", bearer(first)) is None
    assert auth.check("predict", "digits", bearer(second)).status == 401

    # add the second, revoke the first
    path.write_text(make_entry("second", second, ["digits"]).line() + "\n")
    assert auth.check("predict", "digits", bearer(second)) is None
    assert auth.check("predict", "digits", bearer(first)).status == 401

    # a broken file keeps the last good tokens (a half-written file must not lock out all)
    path.write_text("garbage\n")
    assert auth.check("predict", "digits", bearer(second)) is None

    # at start-up a broken or missing file is an error, not an open gateway
    with pytest.raises(GatewayConfigError, match="expected 'NAME sha256:HEX SCOPES'"):
        TokenAuth(settings(gateway_tokens_file=str(path)))
    with pytest.raises(GatewayConfigError, match="tokens file"):
        TokenAuth(settings(gateway_tokens_file=str(tmp_path / "missing")))


def test_tls_needs_both_files_and_readable_ones(tmp_path: Path) -> None:
    assert gateway_auth.server_ssl_context(settings()) is None
    with pytest.raises(GatewayConfigError, match="both"):
        gateway_auth.server_ssl_context(settings(gateway_certfile="cert.pem"))
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(GatewayConfigError, match="gateway certificate"):
        gateway_auth.server_ssl_context(
            settings(gateway_certfile=str(tmp_path / "cert.pem"), gateway_keyfile="missing.pem")
        )


def test_the_token_command_appends_a_hashed_entry(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    args = ["gateway", "token", "--app", "digits", "--app", "spam:predict", "--name", "ci"]
    result = CliRunner().invoke(main, [*args, "--tokens-file", str(path)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("cs_")
    assert token not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    auth = TokenAuth(settings(gateway_tokens_file=str(path)))
    assert auth.check("feedback", "digits", bearer(token)) is None
    assert auth.check("feedback", "spam", bearer(token)).status == 403

    bad = CliRunner().invoke(main, ["gateway", "token", "--app", "digits", "--name", "a b"])
    assert bad.exit_code == 2 and "token name" in bad.output
