"""HTTP input faults: client garbage gets a 4xx and never a 500; the host keeps serving."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host import PluginHost
from host.http import create_app
from tests.support import Db

pytestmark = pytest.mark.anyio

PLUGINS = {
    "const": "async def main(ctx, args):\n    return 'ok'\n",
    "echo": "async def main(ctx, args):\n    return {'args': args}\n",
    "bytes": "async def main(ctx, args):\n    return b'raw'\n",
    "nan": "async def main(ctx, args):\n    return float('nan')\n",
    "cycle": "async def main(ctx, args):\n    d = {}\n    d['d'] = d\n    return d\n",
    "obj": "class Thing:\n    pass\nasync def main(ctx, args):\n    return {'t': Thing()}\n",
}
LIMIT = 4096
CLIENT_ERRORS = {404, 405, 413, 415, 422}
JSON = {"content-type": "application/json"}


@pytest.fixture
async def http(db: Db) -> AsyncIterator[tuple[PluginHost, httpx.AsyncClient]]:
    """A ready host and an HTTP client on its app (lifespan included, app errors as 500s)."""
    await db.functions.insert_many([{"_id": k, "source": v} for k, v in PLUGINS.items()])
    async with PluginHost(db) as host:
        app = create_app(host, max_body_bytes=LIMIT)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):
            yield host, client


async def _still_serving(client: httpx.AsyncClient) -> None:
    reply = await client.post("/functions/const/call")
    assert reply.status_code == 200
    assert reply.json()["result"] == "ok"


BAD_JSON = ("BadRequest", 422)
NOT_JSON_TYPED = ("UnsupportedMediaType", 415)


@pytest.mark.parametrize(
    ("content", "headers", "expected"),
    [
        (b"{not json", {"content-type": "application/json"}, BAD_JSON),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}, BAD_JSON),
        (b'{"a": 1', {"content-type": "application/json; charset=utf-8"}, BAD_JSON),
        (b"[1, 2,]", {"content-type": "application/vnd.api+json"}, BAD_JSON),
        (b"\x00" * 100, {"content-type": "APPLICATION/JSON"}, BAD_JSON),
        (b'{"a": 1}', {}, NOT_JSON_TYPED),
        (b"[1, 2,]", {"content-type": "text/plain"}, NOT_JSON_TYPED),
        (b"\x00" * 100, {"content-type": "application/octet-stream"}, NOT_JSON_TYPED),
        (b'"x', {"content-type": "application/x-www-form-urlencoded"}, NOT_JSON_TYPED),
        (b"", {"content-type": "text/plain"}, NOT_JSON_TYPED),
        (b'{"a": 1}', {"content-type": "multipart/form-data; boundary=x"}, NOT_JSON_TYPED),
    ],
)
async def test_bodies_that_are_not_json_are_refused(
    http: tuple[PluginHost, httpx.AsyncClient],
    content: bytes,
    headers: dict[str, str],
    expected: tuple[str, int],
) -> None:
    """Bad JSON is a 422; a body not typed application/json is a 415; the plugin never runs."""
    _, client = http
    reply = await client.post("/functions/echo/call", content=content, headers=headers)
    assert (reply.json()["error"]["type"], reply.status_code) == expected
    await _still_serving(client)


async def test_wrong_content_type_with_json_body_is_not_a_server_error(
    http: tuple[PluginHost, httpx.AsyncClient],
) -> None:
    """A JSON body sent as text/plain or form data is handled (200 or 415), never a 500."""
    _, client = http
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "image/png", ""):
        reply = await client.post(
            "/functions/echo/call", content=b'{"a": 1}', headers={"content-type": content_type}
        )
        assert reply.status_code in (200, 415), (content_type, reply.status_code)


async def test_huge_bodies_are_refused(http: tuple[PluginHost, httpx.AsyncClient]) -> None:
    """Bodies over the limit are 413, declared or streamed without a length; nothing is buffered."""
    _, client = http
    declared = await client.post("/functions/echo/call", content=b"1" * (LIMIT + 1))
    assert declared.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(1000):  # 1000 x 1 KiB, no content-length
            yield b" " * 1024

    streamed = await client.post("/functions/echo/call", content=chunks())
    assert streamed.status_code == 413
    lying = await client.post(
        "/functions/echo/call", content=b"1" * (LIMIT + 10), headers={"content-length": "2"}
    )
    assert lying.status_code < 500
    await _still_serving(client)


async def test_unknown_routes_and_methods(http: tuple[PluginHost, httpx.AsyncClient]) -> None:
    """Unknown routes are JSON 404s, wrong methods JSON 405s, odd plugin names 404 — never 500."""
    _, client = http
    for reply, status, kind in (
        (await client.get("/nope"), 404, "NotFound"),
        (await client.post("/functions"), 405, "MethodNotAllowed"),
        (await client.get("/functions/const/call"), 405, "MethodNotAllowed"),
        (await client.delete("/functions/const"), 405, "MethodNotAllowed"),
        (await client.put("/healthz"), 405, "MethodNotAllowed"),
        (await client.get("/functions/const/call/extra"), 404, "NotFound"),
    ):
        assert reply.status_code == status
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"]["type"] == kind, reply.text
        if status == 405:
            assert reply.headers["allow"]
    for name in ("..%2Fetc", "a%2Fb", "x" * 300, "%00", "%E2%98%83", "%ff"):
        reply = await client.post(f"/functions/{name}/call")
        assert reply.status_code in (404, 422), (name, reply.status_code)
    for timeout in ("soon", "-1", "0", "nan", "inf", "1e999", ""):
        reply = await client.post(f"/functions/const/call?timeout={timeout}")
        assert reply.status_code in (200, 422), (timeout, reply.status_code)
    await _still_serving(client)


@pytest.mark.parametrize("name", ["bytes", "nan", "cycle", "obj"])
async def test_result_not_json_serialisable(
    http: tuple[PluginHost, httpx.AsyncClient], name: str
) -> None:
    """A result JSON cannot express → 500 ResultNotSerializable naming the version; host fine."""
    host, client = http
    reply = await client.post(f"/functions/{name}/call")
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "ResultNotSerializable"
    current = host.current(name)
    assert current is not None
    assert error["version"] == current.version
    await _still_serving(client)


async def test_deeply_nested_json_is_a_client_error(
    http: tuple[PluginHost, httpx.AsyncClient],
) -> None:
    """A body of 2,000 nested arrays is refused as a client error, not a 500."""
    _, client = http
    reply = await client.post(
        "/functions/const/call", content=b"[" * 2000 + b"]" * 2000, headers=JSON
    )
    assert reply.status_code == 422


async def test_non_standard_json_constants_are_refused(
    http: tuple[PluginHost, httpx.AsyncClient],
) -> None:
    """NaN and Infinity are not JSON: a body holding them is a 422, not a 500 later."""
    _, client = http
    reply = await client.post("/functions/echo/call", content=b"[NaN, Infinity]", headers=JSON)
    assert reply.status_code == 422


FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=LIMIT + 64),
    json_values.map(lambda v: httpx.Request("POST", "/", json=v).content),
    st.text(max_size=200).map(str.encode),
)
names = st.one_of(st.sampled_from(sorted(PLUGINS)), st.text(min_size=1, max_size=40))
content_types = st.sampled_from(
    ["application/json", "text/plain", "multipart/form-data; boundary=x", "", "*/*", "\u2603"]
)
timeouts = st.one_of(st.none(), st.text(max_size=8), st.floats().map(str))


async def test_fuzz_call_never_500s_on_client_garbage(
    http: tuple[PluginHost, httpx.AsyncClient],
) -> None:
    """Hypothesis: random names, bodies, content types and timeouts never produce a 500."""
    host, client = http
    seen: list[int] = []

    async def post(name: str, body: bytes, content_type: str, timeout: str | None) -> int:
        url = f"/functions/{quote(name, safe='')}/call"
        params = {"timeout": timeout} if timeout is not None else None
        headers = {b"content-type": content_type.encode("utf-8")}
        reply = await client.post(url, content=body, headers=headers, params=params)
        return reply.status_code

    @FUZZ
    @given(names, bodies, content_types, timeouts)
    def fuzz(name: str, body: bytes, content_type: str, timeout: str | None) -> None:
        if name in ("bytes", "nan", "cycle", "obj"):  # their results are the plugin's bug
            name = "const"
        status = anyio.from_thread.run(post, name, body, content_type, timeout)
        seen.append(status)
        assert status < 500, (name, body[:80], content_type, timeout, status)

    run: Callable[[], Any] = fuzz
    await anyio.to_thread.run_sync(run)
    assert seen
    assert host.is_ready
    await _still_serving(client)


@pytest.mark.parametrize("parser", ["stdlib", "fast"])
@pytest.mark.parametrize(
    "body", [b"[NaN]", b"Infinity", b"[-Infinity]", b"[" * 5000 + b"]" * 5000, b"\xff", b"{"]
)
def test_both_json_parsers_are_strict(parser: str, body: bytes) -> None:
    """The orjson parser and the standard-library fallback refuse the same bad bodies."""
    import host.wire_json

    parse = {"stdlib": host.wire_json._parse_json_stdlib, "fast": host.wire_json._parse_json_fast}[
        parser
    ]
    assert parse(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    with pytest.raises(ValueError, match=r"."):  # JSONDecodeError, UnicodeDecodeError...
        parse(body)
