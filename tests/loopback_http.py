"""A loopback HTTP server for download tests: serves bytes by URL path, with Range support and faults.

Only ever bound to 127.0.0.1 on a free port; the tests never touch the network.
"""

import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Served:
    """What the server holds and what it did: content by URL path, bytes sent per request."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        self.sent: dict[str, list[int]] = defaultdict(list)
        self.ranges: dict[str, list[str | None]] = defaultdict(list)
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before the next GET is cut off
        self.ignore_range = False

    def put(self, public_url: str, data: bytes) -> str:
        path = urlsplit(public_url).path
        self.content[path] = data
        return path


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        served: Served = self.server.served
        path = unquote(urlsplit(self.path).path)
        data = served.content.get(path)
        served.ranges[path].append(self.headers.get("Range"))
        if data is None:
            self.send_error(404)
            return
        start, status = self._range_start(served, len(data))
        if status == 416:
            return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if path in served.drop_after:
            body = body[:served.drop_after.pop(path)]  # then the connection closes mid-body
        self.wfile.write(body)
        served.sent[path].append(len(body))

    def _range_start(self, served: Served, size: int) -> tuple[int, int]:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match is None or served.ignore_range:
            return 0, 200
        start = int(match.group(1))
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return start, 416
        return start, 206

    def log_message(self, *args):
        pass



@contextmanager
def serve() -> Iterator[tuple[str, Served]]:
    """Run a server in a thread; yields (base URL, Served)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.served = Served()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.served
    finally:
        httpd.shutdown()
        httpd.server_close()
