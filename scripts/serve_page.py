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
import json
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from camserve import settings
from camserve.cam import METHODS

WEB = Path(__file__).resolve().parent.parent / "web"
FORWARDED = ("/predictions/", "/explanations/")
MAX_BODY = settings.MAX_REQUEST_BYTES


def served_methods(input_size: int = 224) -> list[dict[str, str]]:
    """The methods an archive built with the default work budget serves, from the registry: those that share the
    forward pass (a perturbation method's scored channels fit the default budget), and those that run apart where
    their passes at ``input_size`` fit it (not SESS's 2 x 122 + 1)."""
    return [
        {"name": record.name, "family": str(record.family), "title": record.title, "needs": record.needs}
        for record in METHODS.values()
        if record.shares_forward_pass or record.apart_passes(input_size) <= settings.MAX_FORWARD_PASSES
    ]


class PageHandler(SimpleHTTPRequestHandler):
    upstream = f"http://127.0.0.1:{settings.INFERENCE_PORT}"

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        if self.path.split("?")[0] != "/methods.json":
            super().do_GET()
            return
        body = json.dumps(served_methods()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
    parser.add_argument("--port", type=int, default=settings.PAGE_PORT, help="(default: %(default)s)")
    parser.add_argument(
        "--upstream", default=PageHandler.upstream, help="TorchServe's inference address (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    PageHandler.upstream = args.upstream.rstrip("/")
    server = ThreadingHTTPServer((args.bind, args.port), functools.partial(PageHandler, directory=str(WEB)))
    print(f"explorer page: http://{args.bind}:{args.port}/ (API calls go to {PageHandler.upstream})")
    server.serve_forever()


if __name__ == "__main__":
    main()
