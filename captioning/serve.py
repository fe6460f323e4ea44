"""The captioning server: `python -m captioning serve`, FastAPI on uvicorn.

The model, its backbone and the decode settings are loaded once, at start (inference.LoadedCaptioner,
the same object the caption command uses). Requests that arrive together share one forward pass and
one decode (batching.DynamicBatcher). Every input is bounded (ServeLimits) and every refusal is a
JSON `{"error": ...}` with a 4xx status. Pages load nothing from the network: FastAPI's /docs and
/redoc, which pull Swagger UI and ReDoc from a CDN, are turned off.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import socket
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from uvicorn.protocols.utils import get_client_addr

from captioning.batching import DynamicBatcher
from captioning.bundle import with_overrides
from captioning.errors import UserError, clipped
from captioning.fetch import FetchError, fetch_async
from captioning.http_limits import (
    HEAD_MAX,
    OneBodyLength,
    OriginForm,
    ProtocolAccessFormatter,
    WithoutUvicorns400Warning,
    bounded_protocol,
    error_response,
)
from captioning.images import ImageError, ImageTooLarge, load_image
from captioning.inference import LoadedCaptioner
from captioning.serve_limits import ServeLimits

PAGE = Path(__file__).with_name("static") / "index.html"
log = logging.getLogger("captioning.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class BodyLimit:
    """Refuse a request body over `max_bytes`, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is over the limit of {self.max_bytes} bytes (--max-body-mb)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, too_large)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, too_large)
            return message

        await self.app(scope, limited, send)


OVERRIDES = ("beam_size", "method")  # the decode settings one request may change
FIELDS = ("url", *OVERRIDES)  # what a request may send besides its files (multipart field "image")


def _refuse_unknown(names, accepted: tuple[str, ...]) -> None:
    """A field the server does not know is a 400 naming it and the accepted ones: a misspelt option
    ("beam": 5 for beam_size) was ignored without a word, and the request decoded with the defaults."""
    unknown = [name for name in dict.fromkeys(names) if name not in accepted]
    if unknown:
        listed = clipped(", ".join(repr(name) for name in unknown))
        raise ApiError(400, f"unknown field{'s' * (len(unknown) > 1)} {listed}; "
                            f"the accepted ones are {', '.join(accepted)}")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: of a key given twice it kept the last, so {"url": a, "url": b} fetched b
    and dropped a without a word (two 'url' fields of a form are refused too)."""
    repeated = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    if repeated:
        raise ApiError(400, f"the key {clipped(repr(repeated[0]))} is given more than once in a JSON object")
    return dict(pairs)


def _override(value, name: str):
    """A form field or JSON value for beam_size / method, as the type with_overrides checks."""
    if value is None or value == "":
        return None
    if isinstance(value, UploadFile):  # its repr (filename, every part header) made an error of any length
        raise ApiError(400, f"{name} must be a text field, not a file")
    if name == "beam_size" and isinstance(value, str):
        # ASCII digits only: int() also took "1_0" as 10 and other scripts' digits ("٣") as numbers
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            raise ApiError(400, f"beam_size must be a whole number, got {clipped(repr(value))}")
        return int(value)
    return value


def _refuse_query(request: Request) -> None:
    """The fields come in the body only: a query string (`/caption?beam_size=5`, as curl users often write it)
    was ignored without a word, and the request decoded with the model's own settings."""
    if request.query_params:
        names = clipped(", ".join(repr(name) for name in dict.fromkeys(request.query_params.keys())))
        raise ApiError(400, f"the query string is not read (it has {names}); send {', '.join(FIELDS)} as form "
                            "fields or JSON keys")


def _refuse_compressed(request: Request) -> None:
    """A body sent compressed (`Content-Encoding: gzip`) was parsed as it came: "not valid JSON", or a malformed
    multipart body. It is not inflated, as a small gzip body can inflate past --max-body-mb by any factor: a 415
    that says so, with the Accept-Encoding RFC 7694 asks for."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"the body is compressed (Content-Encoding: {clipped(encoding)}); send it uncompressed",
                       {"accept-encoding": "identity"})


async def _read_request(request: Request, limits: ServeLimits) -> tuple[list[tuple[str, bytes]], str | None, dict]:
    """[(name, image bytes)], the image URL (not fetched yet) and the decode overrides, from a multipart
    upload or a JSON {"url": ...}."""
    _refuse_query(request)
    _refuse_compressed(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images, fields = await _multipart_fields(request, limits)
    elif kind == "application/json":
        images, fields = [], await _json_fields(request)
    else:
        raise ApiError(415, "send the image as multipart/form-data (field 'image') or JSON {\"url\": \"https://...\"}")
    url = fields.get("url") or None
    if url is not None and not isinstance(url, str):
        raise ApiError(400, "url must be a string")
    count = len(images) + (url is not None)
    if not count:
        raise ApiError(400, "no image: send files in the multipart field 'image' or a JSON {\"url\": \"https://...\"}")
    if count > limits.max_files:
        raise ApiError(400, f"{count} images in one request; at most {limits.max_files} (--max-files)")
    return images, url, {name: _override(fields.get(name), name) for name in OVERRIDES}


class _EndedMultiPartParser(MultiPartParser):
    """Starlette's parser (what request.form uses), noting whether the body reached its closing boundary."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


async def _parse_form(request: Request, limits: ServeLimits) -> FormData:
    """request.form(), except that a body cut off before its closing boundary (a client or proxy that stopped
    halfway) is a 400: it parsed without an error, and the part it cut into was dropped without a word (the
    other images were captioned, or the request got "no image")."""
    async with contextlib.aclosing(request.stream()) as stream:
        parser = _EndedMultiPartParser(request.headers, stream, max_files=limits.max_files, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as err:  # request.form's 400 for these: a missing boundary, too many files
            raise ApiError(400, err.message) from None
    if not parser.ended:
        await form.close()
        raise ApiError(400, "the multipart body ends before its closing boundary: it was cut off; send it whole")
    return form


async def _multipart_fields(request: Request, limits: ServeLimits) -> tuple[list[tuple[str, bytes]], dict]:
    form = await _parse_form(request, limits)
    try:
        return await _form_fields(form)
    finally:
        await form.close()  # its files (request.form's are closed with the request)


async def _form_fields(form: FormData) -> tuple[list[tuple[str, bytes]], dict]:
    """The uploaded files of the field 'image', and the one 'url' and the overrides, if sent."""
    _refuse_unknown(form.keys(), ("image", *FIELDS))
    uploads = form.getlist("image")
    if any(not isinstance(upload, UploadFile) for upload in uploads):
        raise ApiError(400, "the field 'image' must hold files, not text")
    if len(form.getlist("url")) > 1:  # form.get keeps the last: the others were dropped without a word
        raise ApiError(400, "one 'url' field per request; send more images as files in the field 'image'")
    # a blank file name (only spaces) named no image in the errors, which then began with ": "
    images = [((upload.filename or "").strip() or f"image {n + 1}", await upload.read())
              for n, upload in enumerate(uploads)]
    return images, {key: form.get(key) for key in FIELDS}


async def _json_fields(request: Request) -> dict:
    try:
        fields = json.loads(await request.body(), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ApiError(400, "the body is not valid JSON; send {\"url\": \"https://...\"}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "send a JSON object: {\"url\": \"https://...\"}")
    _refuse_unknown(fields, FIELDS)
    return fields


def _pixels(name: str, data: bytes, size: int, limits: ServeLimits):
    try:
        return load_image(data, size, limits.max_pixels)
    except ImageTooLarge as err:
        raise ApiError(413, f"{clipped(name)}: {err} (--max-pixels)") from None
    except ImageError as err:
        raise ApiError(422, f"{clipped(name)}: {err}") from None


async def _all_pixels(images: list[tuple[str, bytes]], size: int, limits: ServeLimits) -> list:
    """Every image's pixels, or one error naming every image that cannot be used (the first one's status), as
    the caption command names each: a client sending several learns of them all at once, not one per retry."""
    pixels, refused = [], []
    for name, data in images:
        try:
            pixels.append(await asyncio.to_thread(_pixels, name, data, size, limits))
        except ApiError as err:
            refused.append(err)
    if refused:
        raise ApiError(refused[0].status, "; ".join(map(str, refused)))
    return pixels


async def _disconnected(receive) -> None:
    """Returns once the client has gone (its whole body was read already, so nothing else can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request, work):
    """The result of `work` (the fetching, decoding and captioning of one request), or ClientDisconnect if its
    client leaves first. A client that left had all its images captioned for nobody; now its work is cancelled:
    the URL fetch, the images not yet decoded, and those still waiting for a pass, which the batcher skips."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if task in done or gone.exception() is not None:  # a watcher that failed watches no more: just wait
            return await task
        raise ClientDisconnect("its images were not captioned")
    finally:  # also when the server stops: nothing is left running
        gone.cancel()
        task.cancel()


def _get_and_head(app: FastAPI, path: str, **options):
    """Registers the decorated endpoint for GET and for HEAD (`curl -I` and the health checks of load balancers
    and uptime monitors ask with it), as one route per method: a route's operationId in /openapi.json is one for
    all its methods, so a GET-and-HEAD route gave two operations the same id (FastAPI warned "Duplicate Operation
    ID", and client generators got a broken schema)."""
    def register(endpoint):
        for method in ("GET", "HEAD"):
            app.add_api_route(path, endpoint, methods=[method], **options)
        return endpoint
    return register


def _allowed_methods(app: FastAPI, path: str | None = None) -> str:
    """The methods of every route at `path` (of every route: None), for an Allow header: Starlette's 405 named those
    of the first route that has the path, and GET and HEAD are two routes (_get_and_head)."""
    methods = {method for route in app.routes  # Route: the schema's too, where GET answers; its Allow was empty
               if isinstance(route, Route) and (path is None or route.path_regex.match(path))
               for method in route.methods}
    return ", ".join(sorted(methods))


def _not_found(app: FastAPI, path: str) -> str:
    """A 404's error: the paths served, and the one meant when `path` only adds or lacks a trailing slash. Starlette
    redirected those (307) to a URL built from the client's Host header, so a forged Host made the server answer
    with a redirect to any site; a relative one would still be an empty answer that curl, without -L, shows as
    nothing at all."""
    paths = sorted({route.path for route in app.routes if isinstance(getattr(route, "path", None), str)})
    other = path[:-1] if path.endswith("/") else f"{path}/"
    meant = f"; did you mean {other}?" if other in paths else ""
    return f"no page at {clipped(path)}{meant} (the paths served: {', '.join(paths)})"


class ServerWide:
    """ASGI middleware answering the requests whose target is no path: `OPTIONS *`, which asks about the server as
    a whole (RFC 9110 section 9.3.7), with a 200 and the methods it serves in Allow; and CONNECT (`CONNECT
    host:443`, a proxy's method) with a 501, as this server is no proxy. Both got the routes' JSON 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["method"] == "CONNECT" or scope["raw_path"] == b"*"):
            allow = {"allow": _allowed_methods(scope["app"])}  # the FastAPI app, which Starlette puts in the scope
            if scope["method"] == "OPTIONS":
                response = Response(headers=allow)
            elif scope["method"] == "CONNECT":  # and closed: a client refused its tunnel may send on what was for it
                response = error_response(501, "the server is not a proxy: it does not tunnel (CONNECT); send "
                                               f"{allow['allow']} requests to its own paths",
                                          {**allow, "connection": "close"})
            else:  # RFC 9112 section 3.2.4: the asterisk-form is for OPTIONS only
                response = error_response(400, f"the request target * is for OPTIONS only, not "
                                               f"{clipped(scope['method'])}; send a path such as /health", allow)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(loaded: LoadedCaptioner, limits: ServeLimits | None = None) -> FastAPI:
    """The server's ASGI app: `loaded` answers every request through one DynamicBatcher, within `limits`."""
    limits = limits or ServeLimits()
    batcher = DynamicBatcher(loaded.caption_many, limits.max_batch, limits.max_wait_s)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="Image captioning", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(OriginForm)
    app.add_middleware(ServerWide)
    app.add_middleware(OneBodyLength)
    _add_error_handlers(app)
    _add_routes(app, loaded, batcher, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure answered as JSON `{"error": ...}`; no traceback reaches a client."""
    app.add_exception_handler(ApiError, lambda request, err: error_response(err.status, err, err.headers))
    app.add_exception_handler(FetchError, lambda request, err: error_response(err.status, err))
    app.add_exception_handler(UserError, lambda request, err: error_response(400, err))
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, lambda request, err: error_response(422, err.errors()))
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(ClientDisconnect, _client_left)


async def _http_error(request: Request, err: HTTPException):
    headers, detail = err.headers, err.detail
    if err.status_code == 405:  # Allow, which HTTP requires and which tells the client the methods to use
        allowed = _allowed_methods(request.app, request.url.path)
        headers = {**(headers or {}), "Allow": allowed}
        detail = f"{request.method} is not served at {clipped(request.url.path)}; send {allowed}"
    elif err.status_code == 404:
        detail = _not_found(request.app, request.url.path)
    return error_response(err.status_code, detail, headers)


async def _internal_error(request: Request, err: Exception):
    log.exception("unexpected error answering %s %s", request.method, request.url.path)  # traceback: log only
    return error_response(500, f"internal error ({type(err).__name__}); the server log has the details")


async def _client_left(request: Request, err: ClientDisconnect):
    # The client went away (or was cut off by --request-timeout) before its answer: nobody reads one, and it
    # is no server error (it was logged as one, with two tracebacks). One line says what was dropped.
    client = get_client_addr(request.scope) or "a client"
    log.warning("the connection of %s closed before its answer to %s %s: %s", client, request.method,
                request.url.path, str(err) or "its request had not arrived in full")
    return error_response(400, "the client disconnected")


def _add_routes(app: FastAPI, loaded: LoadedCaptioner, batcher: DynamicBatcher, limits: ServeLimits) -> None:
    """The page, the health check and the caption API (registered in this order, the schema's order)."""
    page = PAGE.read_text(encoding="utf-8")

    @_get_and_head(app, "/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @_get_and_head(app, "/health")
    async def health() -> dict:
        return {"status": "ok", "model": loaded.describe(), "batches": batcher.batches, "images": batcher.items}

    async def caption_all(images: list[tuple[str, bytes]], url: str | None, settings: dict) -> dict:
        # Fetched only once the rest of the request is known good: a bad beam_size or one file too many
        # is the 400 the README promises, not the fetch's outcome, and makes the server fetch nothing.
        if url is not None:
            images.append((url, await fetch_async(url, limits.fetch)))
        pixels = await _all_pixels(images, loaded.image_size, limits)
        decoded = await asyncio.gather(*(batcher.submit(p, settings) for p in pixels))
        return {"model": loaded.describe(), "decode": settings,
                "images": [{"name": name, "caption": d.caption, "beams": d.beams}
                           for (name, _), d in zip(images, decoded, strict=True)]}

    @app.post("/caption")
    async def caption(request: Request) -> dict:
        images, url, overrides = await _read_request(request, limits)
        settings = with_overrides(loaded.settings, **overrides)
        return await _while_connected(request, caption_all(images, url, settings))


KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default, made explicit)
LISTEN_BACKLOG = 2048  # queued connections; uvicorn is given the same value, as it listens on the socket again


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a taken port fails at once with one line; port 0 = any free one.

    The socket listens at once: a client that connects after the "serving" line but before uvicorn's
    event loop has started waits in the kernel's queue instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                        "choose another --port or --host") from None
    return sock


def shutdown_grace_s(limits: ServeLimits) -> float:
    """How long Ctrl-C or SIGTERM waits for requests in progress: long enough for one whose URL is being
    fetched to finish. Without a bound uvicorn waited for them forever, so one client that stopped halfway
    through sending its body kept the server from stopping."""
    return limits.fetch.timeout_s + 5.0


def answered_errors_not_raised(app):
    """The ASGI app `app`, except that an error the app has answered already is not raised on to uvicorn.

    Starlette raises every unexpected error again once its handler has answered it (a JSON 500 here, logged
    with its traceback by `internal`), so that a server may log it: uvicorn logged each a second time
    ("Exception in ASGI application", a second traceback). An error before any answer still goes on to uvicorn,
    which logs it and answers 500."""
    async def wrapped(scope, receive, send):
        answered = False

        async def noting_send(message):
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, noting_send)
        except Exception:
            if not answered:
                raise

    return wrapped


def log_config(access_log: bool = False) -> dict:
    """uvicorn's logging set-up, with this package's log lines and python-multipart's in the same server log.

    Without a handler they went to Python's last-resort one: bare lines on stderr with no level (python-multipart
    wrote "Expected boundary character 121, got 120 at index 4" for a malformed upload). python-multipart's
    warnings only describe a client's malformed body, which the client is told in its 400 and the access log
    shows, so they are left out: errors only. The access lines of the answers the protocol writes itself have
    their own shape (http_limits.ProtocolAccessFormatter); with them on, uvicorn's bare warning about a request it
    cannot parse goes, as the access line of its 400 says more."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["()"] = ProtocolAccessFormatter
    config["loggers"]["captioning"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["python_multipart"] = {"handlers": ["default"], "level": "ERROR", "propagate": False}
    if access_log:
        config["filters"] = {"without_400_warning": {"()": WithoutUvicorns400Warning}}
        config["loggers"]["uvicorn.error"]["filters"] = ["without_400_warning"]
    return config


def serve(model_dir: Path, settings: dict, host: str, port: int, limits: ServeLimits, access_log: bool = False) -> None:
    import uvicorn

    sock = listen(host, port)
    loaded = LoadedCaptioner(model_dir, settings, limits.max_batch)
    loaded.warm_up()
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving {model_dir} on http://{shown_host}:{sock.getsockname()[1]}/ (Ctrl-C or SIGTERM stops it)",
          flush=True)
    config = uvicorn.Config(answered_errors_not_raised(create_app(loaded, limits)), log_level="warning",
                            log_config=log_config(access_log), access_log=access_log,
                            backlog=LISTEN_BACKLOG, timeout_graceful_shutdown=shutdown_grace_s(limits),
                            http=bounded_protocol(limits.request_timeout_s, limits.max_connections,
                                                  limits.min_body_rate),
                            h11_max_incomplete_event_size=HEAD_MAX, timeout_keep_alive=KEEP_ALIVE_S)
    if access_log:
        # uvicorn sets its access logger to log_level and logs each request at INFO: at "warning" alone,
        # --access-log printed nothing at all
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    uvicorn.Server(config).run(sockets=[sock])
