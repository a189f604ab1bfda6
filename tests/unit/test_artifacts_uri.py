"""Model files at a URI (file://, http://; s3:// and gs:// go through the same fsspec call):
the digest is taken at deploy time, checked on download, and the verified file is kept in
the replica's cache under its digest. No broker needed."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from clipstream.models.control import artifacts
from clipstream.models.control.artifacts import ArtifactError
from clipstream.streams.wire.config import Settings


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """A real HTTP server on the loopback, serving ``root``."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def version(uri: str, stored: dict) -> dict:
    return {"version": 1, "path": uri, **stored}


def test_is_uri() -> None:
    assert artifacts.is_uri("s3://bucket/m.onnx") and artifacts.is_uri("file:///m/x.skops")
    assert not artifacts.is_uri("/models/x.skops") and not artifacts.is_uri("C://x")
    assert not artifacts.is_uri("models/x.skops")


def test_file_uri_is_fetched_checked_and_cached(tmp_path) -> None:
    model = tmp_path / "src" / "m.bin"
    model.parent.mkdir()
    model.write_bytes(b"model bytes" * 1000)
    settings = Settings(artifact_cache=str(tmp_path / "cache"))
    stored = artifacts.describe_uri(model.as_uri())
    assert stored["digest"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert stored["size"] == 11_000
    got = artifacts.fetch(settings, version(model.as_uri(), stored))
    assert got == tmp_path / "cache" / stored["digest"]
    assert got.read_bytes() == model.read_bytes()
    model.unlink()  # from now on only the cache has it
    assert artifacts.fetch(settings, version(model.as_uri(), stored)) == got
    assert [p.name for p in got.parent.iterdir()] == [stored["digest"]]  # no temporary files


def test_http_download_with_a_wrong_digest_is_refused_and_not_cached(tmp_path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "m.onnx").write_bytes(b"version one")
    settings = Settings(artifact_cache=str(tmp_path / "cache"))
    with http_server(root) as base:
        uri = f"{base}/m.onnx"
        stored = artifacts.describe_uri(uri)
        (root / "m.onnx").write_bytes(b"version two, swapped behind the registry's back")
        with pytest.raises(ArtifactError, match=f"not the deployed {stored['digest']}"):
            artifacts.fetch(settings, version(uri, stored))
        assert not any((tmp_path / "cache").iterdir())
        # the operator gave the digest: nothing is read at deploy time, it is checked on fetch
        good = hashlib.sha256(b"version two, swapped behind the registry's back").hexdigest()
        given = artifacts.describe_uri(uri, sha256=f"sha256:{good.upper()}")
        assert given == {"digest": good, "size": None, "artifact": None}
        assert artifacts.fetch(settings, version(uri, given)).name == good
        with pytest.raises(ArtifactError, match="cannot read"):
            artifacts.describe_uri(f"{base}/missing.onnx")


def test_unknown_schemes_and_bad_digests_get_a_clear_reason(tmp_path) -> None:
    with pytest.raises(ArtifactError, match=r"cannot read nosuch://x/m\.onnx"):
        artifacts.describe_uri("nosuch://x/m.onnx")
    with pytest.raises(ArtifactError, match="64 hex digits"):
        artifacts.describe_uri("s3://b/m.onnx", sha256="abc")


def test_a_version_from_before_artifacts_loads_from_its_path(tmp_path) -> None:
    settings = Settings(artifact_cache=str(tmp_path / "cache"))
    legacy = {"version": 1, "path": "/models/m.skops", "format": "skops"}
    assert artifacts.fetch(settings, legacy) == Path("/models/m.skops")
    assert not (tmp_path / "cache").exists()
