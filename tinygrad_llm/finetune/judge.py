"""A language model as judge, through Ollama's REST API, with the standard library alone.

The book's chapter 7 scores each response with Llama 3 served by Ollama: one POST to
/api/chat per entry, answered as a stream of JSON lines, each holding a piece of the reply
in message.content, the last one with "done": true. `query_model` is that request; unlike
a plain read-until-EOF it tells the ways it can go wrong apart, each with its own message:

- no server listening: JudgeUnavailableError ("is Ollama running?");
- an HTTP error status (an unknown model is a 404): JudgeUnavailableError with the
  server's own error text;
- no complete answer within `timeout` seconds: JudgeError;
- the connection closing before the line with "done": true (a partial answer such as
  "4" of "45" would otherwise pass for a score): JudgeError;
- a line that is not JSON, or an {"error": ...} line in the stream: JudgeError.
"""
import http.client
import json
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://localhost:11434/api/chat"
DEFAULT_MODEL = "llama3"
DEFAULT_TIMEOUT = 300.0  # seconds: loading an 8B model and reading a 2,048-token prompt takes a while on a CPU


class JudgeError(RuntimeError):
    """One request to the judge failed; the message says how."""


class JudgeUnavailableError(JudgeError):
    """The judge cannot answer at all: nothing listens at the URL, or it answers with an HTTP error."""


def query_model(prompt, model=DEFAULT_MODEL, url=DEFAULT_URL, seed=123, num_ctx=2048, timeout=DEFAULT_TIMEOUT):
    """The judge's whole reply to `prompt` (a str), with the book's options: seed 123, temperature 0, num_ctx 2048."""
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}],
               "options": {"seed": seed, "temperature": 0, "num_ctx": num_ctx}}
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _read_stream(response, url, deadline, timeout)
    except urllib.error.HTTPError as error:
        raise JudgeUnavailableError(f"the judge at {url} answered HTTP {error.code}: {_error_text(error)}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise JudgeError(f"the judge at {url} did not answer within {timeout:g} s") from None
        raise JudgeUnavailableError(f"no judge is answering at {url} ({error.reason}): start Ollama "
                                    "(`ollama serve`) or pass the URL of a running one") from None
    except TimeoutError:
        raise JudgeError(f"the judge at {url} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as error:
        raise JudgeError(f"the connection to the judge at {url} broke before the answer was complete "
                         f"({type(error).__name__}: {error})") from None


def _read_stream(response, url, deadline, timeout):
    reply = ""
    while line := response.readline():
        if time.monotonic() > deadline:
            raise TimeoutError
        if not line.strip():
            continue
        try:
            chunk = json.loads(line)
        except json.JSONDecodeError:
            raise JudgeError(f"the judge at {url} sent a line that is not JSON: {line[:200]!r}") from None
        if "error" in chunk:
            raise JudgeError(f"the judge at {url} reported an error: {chunk['error']}")
        reply += chunk.get("message", {}).get("content", "")
        if chunk.get("done"):
            return reply
    raise JudgeError(f"the connection to the judge at {url} closed before the answer was complete "
                     f"(received {reply!r} so far)")


def _error_text(error):
    """Ollama's {"error": "..."} body of an HTTP error, else the status's reason."""
    try:
        return json.loads(error.read().decode("utf-8"))["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return error.reason


def parse_score(reply, low=0, high=100):
    """The integer score in the judge's reply, or None when it is not one integer in [low, high] (the book's int())."""
    try:
        score = int(reply.strip())
    except ValueError:
        return None
    return score if low <= score <= high else None
