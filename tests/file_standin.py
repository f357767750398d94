"""A stand-in for the servers named datasets come from, on 127.0.0.1: the Hugging Face Hub's file resolver
(`/datasets/<repo>/resolve/<revision>/<path>`, answered with the headers huggingface_hub reads: the commit, an ETag
and the size) and GitHub's raw file host (`/<owner>/<repo>/<commit>/<path>`). It serves the bytes it is given and
records every request."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hub_standin import StandInHub

COMMIT = "c0ffee" + "0" * 34


class StandInFiles:
    def __init__(self, files: dict[str, bytes]):
        self.files = files  # url path -> bytes
        self.requests: list[tuple[str, str]] = []  # (method, path)
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                path = self.path.split("?")[0]
                served.requests.append((self.command, path))
                resolved = re.fullmatch(r"/datasets/(.+?)/resolve/([^/]+)/(.+)", path)
                key = f"/datasets/{resolved[1]}/resolve/main/{resolved[3]}" if resolved else path
                body = served.files.get(key)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                if resolved:
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_GET = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # starting and stopping: the same as the upload stand-in's
    __enter__ = StandInHub.__enter__
    __exit__ = StandInHub.__exit__
