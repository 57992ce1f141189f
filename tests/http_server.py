"""A small HTTP server on 127.0.0.1 for testing downloads without the network.

    with serve({"/file.bin": data}) as server:
        download_file(server.url("/file.bin"), dest)

It serves a dict of path -> bytes (any other path is a 404) and records each request's
path and Range header. Two switches, which a test may flip between requests, simulate
bad servers: `drop_after=n` sends the full Content-Length but closes the connection after
n bytes of the body; `honour_range=False` ignores Range requests and sends the whole file;
`drip_seconds=s` sends the body one byte every s seconds (a server that never quite stalls).
"""
import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files = dict(files)
        self.drop_after = None
        self.honour_range = True
        self.drip_seconds = None
        self.requests = []  # (path, Range header or None)

    def url(self, path):
        return f"http://127.0.0.1:{self.server_port}{path}"


class FileHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        byte_range = self.headers.get("Range")
        server.requests.append((self.path, byte_range))
        if self.path not in server.files:
            self.send_error(404)
            return
        data = server.files[self.path]
        start = 0
        if byte_range and server.honour_range:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:
            self.wfile.write(body[:server.drop_after])
            self.close_connection = True  # the socket closes with the body unfinished
        elif server.drip_seconds is not None:
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(server.drip_seconds)
            except OSError:
                pass  # the client gave up
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass  # keep test output quiet


@contextlib.contextmanager
def serve(files):
    server = FileServer(files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
