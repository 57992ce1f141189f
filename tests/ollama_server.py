"""A stand-in for Ollama's /api/chat on 127.0.0.1, for testing the judge without Ollama or a network.

    with serve(lambda request: Answer("85")) as server:
        query_model("...", url=server.url)

The function given to `serve` sees each request's JSON body and returns what the server
does: Answer(text) streams the text as Ollama does (chunked JSON lines of message.content,
then a line with "done": true); Slow(seconds, text) waits first; Drop(text) sends part of
the stream and closes the connection before the "done" line; HttpError(status, message)
answers with Ollama's {"error": ...} body. `server.requests` records the bodies.

Run as a script, it is a demo judge for the offline pipeline: it scores the book's judge
prompt by the token-F1 of the model response against the correct output, times 100.

    python tests/ollama_server.py --port 11435
"""
import argparse
import contextlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    text: str


@dataclass
class Slow:
    seconds: float
    text: str


@dataclass
class Drop:
    text: str


@dataclass
class HttpError:
    status: int
    message: str


class OllamaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reply, port=0):
        super().__init__(("127.0.0.1", port), OllamaHandler)
        self.reply = reply
        self.requests = []
        self.url = f"http://127.0.0.1:{self.server_port}/api/chat"

    def handle_error(self, request, client_address):
        # A client that gave up (a timeout test) closes the socket under a slow answer: expected, quiet.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OllamaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfer, as Ollama streams

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/api/chat":
            return self._error(404, "404 page not found")
        action = self.server.reply(body)
        if isinstance(action, HttpError):
            return self._error(action.status, action.message)
        if isinstance(action, Slow):
            time.sleep(action.seconds)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = [action.text[i:i + 2] for i in range(0, len(action.text), 2)] or [""]
        if isinstance(action, Drop):
            for piece in pieces[:max(1, len(pieces) // 2)]:
                self._chunk(self._line(body, piece, done=False))
            self.close_connection = True  # no "done" line, no final chunk
            return
        for piece in pieces:
            self._chunk(self._line(body, piece, done=False))
        self._chunk(self._line(body, "", done=True))
        self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _line(body, content, done):
        line = {"model": body.get("model"), "created_at": "2024-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": content}, "done": done}
        return (json.dumps(line) + "\n").encode("utf-8")

    def _chunk(self, data):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _error(self, status, message):
        data = json.dumps({"error": message}).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # keep test output quiet


@contextlib.contextmanager
def serve(reply, port=0):
    server = OllamaServer(reply, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# The book's judge prompt: "... and correct output `{output}`, score the model response `{response}` on a scale ..."
BOOK_PROMPT_PARTS = re.compile(r"and correct output `(?P<output>.*)`, score the model response `(?P<response>.*)` "
                               r"on a scale from 0 to 100", re.DOTALL)


def token_f1_judge(request):
    """A demo judge: 100 x the token-F1 of the response against the correct output in the book's prompt."""
    from tinygrad_llm.finetune.instruct import token_f1

    match = BOOK_PROMPT_PARTS.search(request["messages"][-1]["content"])
    if match is None:
        return Answer("I can only score the book's judge prompt.")
    return Answer(str(round(100 * token_f1(match["response"], match["output"]))))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=11435)
    port = parser.parse_args().port
    with serve(token_f1_judge, port) as server:
        print(f"demo judge listening at {server.url} (Ctrl-C stops it)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
