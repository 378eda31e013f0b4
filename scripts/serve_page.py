"""Serve the explorer page (web/) and pass its API calls through to TorchServe, from one origin.

python scripts/serve_page.py            # http://127.0.0.1:8000, forwarding to http://127.0.0.1:8080

Why a pass-through: with token authorization on, TorchServe 0.12 refuses a browser's CORS preflight (an OPTIONS
request never carries the token), so a page on another origin cannot send `Authorization`. From one origin there
is no preflight. Only POSTs to /predictions/ and /explanations/ are forwarded, with their body, Content-Type and
Authorization headers; nothing is stored.
"""

from __future__ import annotations

import argparse
import functools
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WEB = Path(__file__).resolve().parent.parent / "web"
FORWARDED = ("/predictions/", "/explanations/")
MAX_BODY = 26 * 1024 * 1024


class PageHandler(SimpleHTTPRequestHandler):
    upstream = "http://127.0.0.1:8080"

    def do_POST(self) -> None:  # noqa: N802 - the http.server naming
        length = int(self.headers.get("Content-Length", 0))
        if not self.path.startswith(FORWARDED) or length > MAX_BODY:
            self.send_error(404 if length <= MAX_BODY else 413)
            return
        headers = {key: self.headers[key] for key in ("Content-Type", "Authorization") if self.headers.get(key)}
        request = urllib.request.Request(self.upstream + self.path, self.rfile.read(length), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, content_type, body = response.status, response.headers.get("Content-Type"), response.read()
        except urllib.error.HTTPError as error:
            status, content_type, body = error.code, error.headers.get("Content-Type"), error.read()
        except urllib.error.URLError as error:
            status, content_type = 502, "application/json"
            body = f'{{"code": 502, "type": "Unreachable", "message": "TorchServe at {self.upstream}: {error.reason}"}}'
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--upstream", default="http://127.0.0.1:8080", help="TorchServe's inference address")
    args = parser.parse_args(argv)
    PageHandler.upstream = args.upstream.rstrip("/")
    server = ThreadingHTTPServer((args.bind, args.port), functools.partial(PageHandler, directory=str(WEB)))
    print(f"explorer page: http://{args.bind}:{args.port}/ (API calls go to {PageHandler.upstream})")
    server.serve_forever()


if __name__ == "__main__":
    main()
