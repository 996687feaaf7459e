"""A local rest-hook endpoint for the client drivers: records every request (method, path,
body) and answers 200. Shared by driver.py and validate_r4.py."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Endpoint(BaseHTTPRequestHandler):
    received = []
    lock = threading.Lock()

    def _take(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with Endpoint.lock:
            Endpoint.received.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = _take
    do_PUT = _take
    do_DELETE = _take

    def log_message(self, *args):
        pass


def start():
    """Serves the endpoint on a free loopback port: (server, its base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def received():
    """The requests received so far, in order."""
    with Endpoint.lock:
        return list(Endpoint.received)


def wait_for(check, seconds=20):
    """The first request received for which check(request) holds, waiting up to `seconds`;
    None if none came."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [r for r in received() if check(r)]
        if found:
            return found[0]
        time.sleep(0.05)
    return None
