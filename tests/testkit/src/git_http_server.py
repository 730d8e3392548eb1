"""Serves the git repositories under a directory over smart HTTP (git http-backend) on
127.0.0.1, requiring basic auth with the user and password given (a private git remote for
tests), or none when GIT_HTTP_AUTH is empty. Usage: GIT_HTTP_AUTH=USER:PASSWORD
git_http_server.py ROOT PORT HOST"""
import base64
import http.server
import subprocess
import os
import sys

ROOT, PORT, HOST = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# The credential comes through the environment, never argv (where any process could read it).
AUTH = os.environ.get("GIT_HTTP_AUTH", "")
USER, _, PASSWORD = AUTH.partition(":")
EXPECTED = "Basic " + base64.b64encode(AUTH.encode()).decode() if AUTH else None


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def handle_git(self):
        if EXPECTED and self.headers.get("Authorization") != EXPECTED:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "GIT_PROJECT_ROOT": ROOT,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(length),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": USER,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = handle_git
    do_POST = handle_git


http.server.ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
