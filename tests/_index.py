"""A package index on localhost for the asset-fetch tests: the PEP 691 JSON listing of ``bigbench``
and its files, served from memory; it can cut a download short or refuse every request."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeIndex:
    """``files``: file name -> bytes. ``truncate``: send only this many bytes of a file, then close."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.truncate: int | None = None
        self.requests: list[str] = []
        self.url = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                index.requests.append(self.path)
                if self.path == "/simple/bigbench/":
                    listing = {"files": [{"filename": n, "url": f"/files/{n}"} for n in index.files]}
                    self._send(json.dumps(listing).encode(), "application/vnd.pypi.simple.v1+json")
                elif self.path.removeprefix("/files/") in index.files:
                    self._send(index.files[self.path.removeprefix("/files/")], "application/octet-stream")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = index.truncate if content_type == "application/octet-stream" else None
                self.wfile.write(body if cut is None else body[:cut])

        return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes]) -> Iterator[FakeIndex]:
    """Run a `FakeIndex` on a free localhost port; its ``url`` is the Simple API root (``.../simple``)."""
    index = FakeIndex(files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), index.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    index.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
