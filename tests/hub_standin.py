"""A stand-in for the Hugging Face Hub's upload API on 127.0.0.1, recording every request: what huggingface_hub's
create_repo and upload_folder send, answered the way the Hub answers (every file uploaded inline, "regular" mode,
so no LFS or Xet storage is involved)."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class StandInHub:
    def __init__(self):
        self.requests: list[dict] = []  # method, path, headers, body (bytes)
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "commits": [{"message", "files"}]}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append({"method": self.command, "path": self.path, "headers": headers, "body": body})
                status, payload = hub.answer(self.command, self.path.split("?")[0], body)
                self._reply(status, payload)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization')}/{request['name']}" if request.get("organization") \
                else request["name"]
            private = request.get("private") or request.get("visibility") == "private"
            self.repos.setdefault(repo_id, {"private": bool(private), "commits": []})
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":  # the model card's metadata, checked before a commit
            content = json.loads(body)["content"]
            front = content.split("---")[1] if content.startswith("---") else ""
            if not isinstance(yaml.safe_load(front), dict):
                return 400, {"error": "the card has no YAML metadata block"}
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path)
        if method == "POST" and match:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files], "commitOid": "0" * 40}
        match = re.fullmatch(r"/api/models/(.+)/commit/(.+)", path)
        if method == "POST" and match:
            repo_id = match[1]
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            self.repos[repo_id]["commits"].append({"message": header["summary"], "files": files})
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return 404, {"error": f"the stand-in Hub does not serve {method} {path}"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
