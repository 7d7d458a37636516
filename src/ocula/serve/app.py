"""The FastAPI app: `create_app(models, limits)` is all a test or a server needs; `run` starts uvicorn on it.

Every request is bounded: the body by bytes (read in chunks, so a client cannot stream without end), the image by
pixels (from its header), the prediction by time, and the server by how many predictions it holds at once; past
that it answers 503 with Retry-After instead of queuing without bound. Every error is one line of JSON,
{"error": "..."}, with a 4xx status for anything wrong with the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ocula.errors import OculaError
from ocula.serve.answers import answer
from ocula.serve.decode import BadImage, decode_image
from ocula.serve.models import Served

STATIC = Path(__file__).parent / "static"


def boolean(value) -> bool:
    """A form field or JSON value as a boolean: true/false, 1/0 or yes/no; anything else is refused."""
    text = str(value).lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return text in ("true", "1", "yes")


# Per-request options a client may set, with their types: `stages` shapes the answer, the others go to the task's
# predict, which rejects those it does not take.
OPTIONS = {"stages": boolean, "pixel_size": float, "min_area": int, "cell_diameter": float, "opening": boolean,
           "score_thresh": float}
log = logging.getLogger("ocula.serve")


@dataclass
class Limits:
    max_bytes: int = 10 * 2**20  # one upload
    max_pixels: int = 40_000_000  # a 40-megapixel phone photo; far below what would exhaust memory
    timeout: float = 30.0  # seconds for one prediction
    max_concurrent: int = 32  # predictions held at once (running or waiting for a worker); more get 503
    workers: int = os.cpu_count() or 1  # predictions running at once: one per core


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status, headers=headers)


def create_app(models: dict[str, Served], limits: Limits | None = None, *,
               cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The API and the page for `models` (name -> Served; the first is the default)."""
    limits = limits or Limits()
    default = next(iter(models))
    executor = ThreadPoolExecutor(limits.workers, thread_name_prefix="ocula-predict")

    @asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    # FastAPIOffline serves the Swagger UI at /docs from files in its package; FastAPI's own pulls it from a CDN.
    app = FastAPIOffline(title="ocula", summary="Predict with ocula models: labels, masks and cell counts, boxes.",
                         version=_version(), lifespan=lifespan, redoc_url=None)
    app.state.executor = executor
    app.state.in_flight = 0  # touched only on the event loop
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    if cors_origins:  # off unless asked for: the page is served from the same origin and needs none
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"])

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e.status, str(e), e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, e.detail if isinstance(e.detail, str) else json.dumps(e.detail), e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log, never out
        return error(500, f"internal error ({type(e).__name__}); the server keeps running")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/health", summary="Liveness and load")
    async def health():
        return {"status": "ok", "models": list(models), "in_flight": app.state.in_flight,
                "max_concurrent": limits.max_concurrent}

    @app.get("/v1/models", summary="Each model's task, classes, preprocessing and metrics")
    async def list_models():
        return {"default": default, "models": [m.describe() for m in models.values()], "limits": asdict(limits)}

    @app.post("/v1/predict", summary="Predict one image", openapi_extra=PREDICT_BODY)
    async def predict(request: Request):
        fields = await read_request(request, limits.max_bytes)
        name = fields.pop("model", None) or default
        if not isinstance(name, str) or name not in models:  # JSON may send any type
            raise ApiError(404, f"no model named {name!r}; this server has {', '.join(models)}")
        data = fields.pop("image")
        options = parse_options(fields)
        stages = options.pop("stages", True)
        served = models[name]

        def work():
            start = time.perf_counter()
            image = decode_image(data, max_pixels=limits.max_pixels)
            result = served.model.predict(image, **options)[0]
            return {"model": name, "task": served.model.info.task, "runtime": served.runtime,
                    "width": image.shape[1], "height": image.shape[0],
                    **answer(result, served.model.info.task, list(served.model.info.classes), stages=stages),
                    "milliseconds": round((time.perf_counter() - start) * 1000, 1)}

        return await run_bounded(app, limits, work)

    return app


class SecurityHeaders:
    """Adds the page's policy to every response: it loads nothing from elsewhere, and the browser holds it to
    that. The API docs page starts Swagger UI with an inline script, which only its own policy allows. A plain
    ASGI middleware: cheaper than Starlette's `@app.middleware("http")`, which re-streams every response."""

    POLICY = b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; frame-ancestors 'none'"
    DOCS_POLICY = b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; " \
                  b"img-src 'self' data:; frame-ancestors 'none'"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        policy = self.DOCS_POLICY if scope["path"] == "/docs" else self.POLICY

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", policy),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def run_bounded(app: FastAPI, limits: Limits, work):
    """Run `work` on a worker thread within the time limit, or refuse at once when the server is full. A slot is
    freed when the thread really ends, so timed-out work still counts against the limit while it runs."""
    if app.state.in_flight >= limits.max_concurrent:
        raise ApiError(503, f"the server is busy ({limits.max_concurrent} predictions in progress); retry shortly",
                       {"Retry-After": "1"})
    app.state.in_flight += 1
    future = asyncio.get_running_loop().run_in_executor(app.state.executor, work)
    future.add_done_callback(lambda _: setattr(app.state, "in_flight", app.state.in_flight - 1))
    try:
        return await asyncio.wait_for(asyncio.shield(future), limits.timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"the prediction took longer than the {limits.timeout:g} s limit") from None
    except BadImage as e:
        raise ApiError(e.status, str(e)) from None
    except OculaError as e:  # the library's one-sentence errors are about the input (no ink, unknown option, ...)
        raise ApiError(400, str(e)) from None
    except ValueError as e:
        # A decodable image that a task's preprocessing cannot handle (an all-black photo for the digit recipe):
        # the request's fault as far as the client can act on it; the log keeps the traceback for a fix.
        log.warning("prediction failed on a decoded image", exc_info=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(422, f"the model cannot read this image ({reason})") from None


async def read_request(request: Request, max_bytes: int) -> dict:
    """The request's fields, with the image as bytes under "image": multipart/form-data with an `image` file, or
    JSON {"image": base64 or a data URL, ...}."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_bytes * 4 // 3 + 65536)  # room for base64 and the form's other fields
    if kind == "multipart/form-data":
        fields = await read_form(request, body)
    elif kind == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("image"), str):
            raise ApiError(400, 'send JSON {"image": "<base64 of the image file>"}')
        fields["image"] = decode_base64(fields["image"])
    else:
        raise ApiError(415, "send multipart/form-data with an 'image' file, or JSON with a base64 'image'")
    if len(fields["image"]) > max_bytes:
        raise ApiError(413, f"the image is {len(fields['image']):,} bytes, over the {max_bytes:,}-byte limit")
    return fields


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request is {int(length):,} bytes, over the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds bodies sent without a length (chunked)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request is over the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, body: bytes) -> dict:
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except (HTTPException, ValueError) as e:
        raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "the form has no 'image' file")
    fields["image"] = await upload.read()
    return fields


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser's canvas gives it
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "'image' is not valid base64") from None


def parse_options(fields: dict) -> dict:
    unknown = sorted(set(fields) - set(OPTIONS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; known: image, model, {', '.join(OPTIONS)}")
    options = {}
    for key, value in fields.items():
        try:
            options[key] = OPTIONS[key](value)
        except (TypeError, ValueError):
            raise ApiError(400, f"{key} must be a {OPTIONS[key].__name__}, not {value!r}") from None
        if not 0 <= options[key] < 1e9:
            raise ApiError(400, f"{key} must be zero or positive, not {value!r}")
    return options


def _version() -> str:
    from ocula import __version__

    return __version__


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, GIF, BMP or TIFF"},
        "model": {"type": "string", "description": "a name from /v1/models (default: the first)"},
        "stages": {"type": "boolean", "description": "classify: include the preprocessing stages (default true)"},
        "pixel_size": {"type": "number", "description": "segment: micrometres per pixel"},
        "min_area": {"type": "integer", "description": "segment: smallest object kept, in px"},
        "cell_diameter": {"type": "number", "description": "segment: px a white cell spans (default: as trained)"},
        "opening": {"type": "boolean", "description": "segment: cut thin rims off cells (default false)"},
        "score_thresh": {"type": "number", "description": "detect: smallest score kept"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "the image file as base64 or a data URL"},
        "model": {"type": "string"}, "stages": {"type": "boolean"}}}}}}}
