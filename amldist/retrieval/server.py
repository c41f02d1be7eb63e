"""HTTP endpoint for asymmetric search (aiohttp), loopback by default.

    POST /search?k=10&bbx=x1,y1,x2,y2     body: the image file (any Content-Type), or a multipart form whose
                                          `image` field is the file
        200 {"results": [{"rank", "name", "score", "row"}], "k", "seconds"}
        400 {"error": "one line"}  an empty body or not an image, k or bbx malformed, a box outside the image
        413 {"error": ...}         the body exceeds the upload limit
    GET /health -> 200 {"status": "ok", "images", "index", "query_network"}

Queries run in a thread pool (`threads`): the network and faiss release the GIL while they compute.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

from aiohttp import web
from PIL import Image

from amldist.errors import UserError
from amldist.retrieval.query import MAX_K, AsymmetricSearch, check_bbx, parse_bbx

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_THREADS = 2
MAX_UPLOAD_BYTES = 20 << 20
MAX_PIXELS = 50_000_000  # larger uploads are refused before decoding (PIL's own bomb limit is ~179 MP)
SEARCHER = web.AppKey("searcher", AsymmetricSearch)
POOL = web.AppKey("pool", ThreadPoolExecutor)
MAX_UPLOAD = web.AppKey("max_upload", int)


def _refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _decode(data: bytes) -> Image.Image:
    if not data:
        raise UserError("the request body is empty: send the image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise UserError(f"the image has {image.width} x {image.height} pixels, more than "
                                f"{MAX_PIXELS}")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"the body is not a readable image ({str(err).splitlines()[0][:120]})") from None


def _k(text: str | None) -> int:
    try:
        k = int(text) if text is not None else 10
    except ValueError:
        raise UserError(f"k must be a whole number, got {text!r}") from None
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


async def _body(request: web.Request) -> bytes:
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        field = form.get("image")
        if not isinstance(field, web.FileField):
            raise UserError("the multipart form has no `image` file field")
        return field.file.read()
    return await request.read()


async def search_handler(request: web.Request) -> web.Response:
    started = time.perf_counter()
    try:
        k = _k(request.query.get("k"))
        bbx = parse_bbx(request.query["bbx"]) if "bbx" in request.query else None
        image = _decode(await _body(request))
        check_bbx(bbx, image.size)
    except web.HTTPRequestEntityTooLarge:
        return _refuse(413, f"the upload exceeds the limit of {request.app[MAX_UPLOAD]:,} bytes")
    except UserError as err:
        return _refuse(400, str(err))
    searcher = request.app[SEARCHER]
    hits = await asyncio.get_running_loop().run_in_executor(request.app[POOL], searcher.search, image, bbx, k)
    return web.json_response({"results": [h.as_dict() for h in hits], "k": k,
                              "seconds": round(time.perf_counter() - started, 6)})


async def health_handler(request: web.Request) -> web.Response:
    searcher = request.app[SEARCHER]
    return web.json_response({"status": "ok", "images": len(searcher.index),
                              "index": str(searcher.index.path), "query_network": str(searcher.query.path)})


def make_app(searcher: AsymmetricSearch, threads: int = DEFAULT_THREADS,
             max_upload: int = MAX_UPLOAD_BYTES) -> web.Application:
    app = web.Application(client_max_size=max_upload)
    app[SEARCHER] = searcher
    app[POOL] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="search")
    app[MAX_UPLOAD] = max_upload
    app.router.add_post("/search", search_handler)
    app.router.add_get("/health", health_handler)

    async def close_pool(app: web.Application) -> None:
        app[POOL].shutdown(wait=True)

    app.on_cleanup.append(close_pool)
    return app


def serve(searcher: AsymmetricSearch, host: str = LOOPBACK, port: int = DEFAULT_PORT,
          threads: int = DEFAULT_THREADS, max_upload: int = MAX_UPLOAD_BYTES) -> None:
    """Serve until interrupted (Ctrl-C)."""
    web.run_app(make_app(searcher, threads, max_upload), host=host, port=port, print=None,
                access_log=None, handle_signals=True)


@dataclass
class RunningServer:
    """A server on a background thread (tests, the load test's benchmark): `url`, then `stop()`."""

    url: str
    _loop: asyncio.AbstractEventLoop
    _runner: web.AppRunner
    _thread: threading.Thread

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(searcher: AsymmetricSearch, host: str = LOOPBACK, port: int = 0,
                    threads: int = DEFAULT_THREADS, max_upload: int = MAX_UPLOAD_BYTES) -> RunningServer:
    """Start the endpoint on a background thread; port 0 takes a free port."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(searcher, threads, max_upload), access_log=None)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        return f"http://{bound[0]}:{bound[1]}"

    thread = threading.Thread(target=loop.run_forever, name="search-server", daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    return RunningServer(url, loop, runner, thread)
