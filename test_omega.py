"""The omega test suite: offline, deterministic, against real local servers.

How it works:
- Every HTTP backend talks to FakeAPI (the `api` fixture): a threaded stdlib HTTP server on
  127.0.0.1 that answers in that API's own wire format, records each request, and on demand
  attacks the client (endless bodies, gzip bombs, trickled headers, streams cut short).
- claude-code runs a fake `claude` executable that each test writes (the `claude` fixture, its
  program FAKE_CLAUDE in Test data): the prompt read from stdin, JSON or stream-json on stdout,
  exit 1 on errors, sessions for --resume, and a plan of what each run does; given
  --mcp-config it starts every server there (omega's bridge too) and calls their tools.
- User MCP servers run FAKE_MCP_SERVER (the `mcp_server` fixture), in a mode: ok, exit,
  garbage, hang.
- The command line runs in-process through the `cli_main` fixture (omega.main with a config
  written as TOML); a real `python omega.py` child (run_cli, start_cli) runs only where the
  process itself is what is tested: pipes, exit status, buffering, signals.
- clean_env (autouse) gives each test no real key, no real config, no proxy, no real waiting
  and a HOME of its own under tmp_path.
- The tests marked real_claude run the real claude CLI against a fake Messages API; they are
  skipped unless `make test-real` installed it.

The sections follow omega.py's own:
    Fakes and fixtures
     1. Data               Context, Message, metadata
     2. Errors             the error classes; error bodies -> typed errors; what is retried
     3. Secrets            keys never shown; clean()
     4. Configuration      files, environment, validation, keys
     5. Attachments        kinds from the bytes, limits, read once
     6. Transports         HTTP: bodies, retries, deadlines, hostile servers, stream framing,
                           TLS, proxies, concurrency; processes: the claude process group
     7. Backends           every backend, then one sub-banner per backend
     8. The backend table
     9. Calling            status timer, routing, fallback, complete() and ask(), stream(), Chat
    10. Tools              schemas from hints, one call's result, the tool loop on every backend,
                           claude-code's bridge, the agent tools, MCP servers
    11. Diagnostics        --check, the first-run hint
    12. Conversation log
    13. Command line       every test of `python omega.py`
    14. The real claude binary (make test-real)
    15. Test data          bodies, captures, OpenAPI fragments, files, fake programs, functions
"""
import base64
import collections
import contextlib
import gzip
import http.server
import io
import itertools
import json
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zlib

from typing import Annotated, Any, List, Literal, Optional

import pytest

import omega

HERE = os.path.dirname(os.path.abspath(__file__))
OMEGA_PY = os.path.join(HERE, "omega.py")
# `python omega.py` as a child: omega.py run as the __main__ module, the same file and entry
# point, but from its cached bytecode (a script is compiled afresh at every start: 0.1 s of
# each of some sixty runs). cli_env puts HERE on PYTHONPATH. The file itself runs in
# test_cli_words_print_the_answer_and_nothing_else and test_an_older_python_is_told_in_one_line.
OMEGA_CLI = (sys.executable, "-m", "omega")
KEY = "sk-test-SECRET-0123456789abcdef"          # never to be seen in any output
ENV_KEY = "sk-env-SECRET-fedcba9876543210"
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "GEMINI_API_KEY",
            "GOOGLE_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "OLLAMA_HOST",
            "OMEGA_CONFIG", "OMEGA_PROVIDER", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN",
            "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy",
            "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "CLAUDECODE",
            "OMEGA_LOG", "OMEGA_LOG_PATH", "MAX_THINKING_TOKENS")
# What clean_env replaces, as omega.py defines it: tests of the real values use these.
REAL_CONFIG_PATHS = omega.config_paths
REAL = {name: getattr(omega, name) for name in (
    "RETRY_BASE_SECS", "RETRY_CAP_SECS", "RETRY_MIN_SECS", "RETRY_AFTER_MAX_SECS",
    "KILL_GRACE_SECS")}


@pytest.fixture(scope="session")
def homes(tmp_path_factory):
    """Where the tests that ask for no tmp_path get a HOME of their own."""
    return tmp_path_factory.mktemp("homes"), itertools.count()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, request, homes):
    """No real keys, no real config, no proxies, no real waiting, and no key
    remembered by an earlier test (each test must make omega learn its own).
    HOME is tmp_path/home, or for a test without tmp_path a fresh path of its own
    (made only if written to: a tmp_path costs every one of a thousand tests)."""
    if "tmp_path" in request.fixturenames:
        root = request.getfixturevalue("tmp_path")
    else:
        root = homes[0] / str(next(homes[1]))
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setattr(omega, "config_paths", lambda: [str(root / "none.toml")])
    monkeypatch.setattr(omega, "RETRY_BASE_SECS", 0.01)
    monkeypatch.setattr(omega, "RETRY_MIN_SECS", 0.01)
    monkeypatch.setattr(omega, "KILL_GRACE_SECS", 0.5)
    monkeypatch.setattr(omega, "_known_secrets", set())
    monkeypatch.setattr(omega, "PAUSED_UNTIL", {})     # no server paused by an earlier test
    omega._local.__dict__.clear()      # every test starts with fresh sessions
    yield


@pytest.fixture(scope="session", autouse=True)
def children_share_their_bytecode(tmp_path_factory):
    """The suite's Python children (a score of them import omega) share one bytecode
    cache, outside the repository: where PYTHONDONTWRITEBYTECODE is set, each of them
    would compile omega.py again."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield                            # they write and read it beside omega.py
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


@pytest.fixture
def real_retry_floor(monkeypatch):
    """The real shortest wait (clean_env shortens it to keep retrying tests fast)."""
    monkeypatch.setattr(omega, "RETRY_MIN_SECS", REAL["RETRY_MIN_SECS"])


# =============================================================================
# Fakes and fixtures
# =============================================================================

# --- a scriptable fake API server --------------------------------------------

class Recorded:
    def __init__(self, method, path, headers, raw):
        self.method, self.path, self.headers, self.raw = method, path, headers, raw
        try:
            self.body = json.loads(raw) if raw else None
        except ValueError:
            self.body = None


class FakeAPI(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64     # the default 5 drops the SYNs of 8-16 threads: 1 s resends

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests, self.replies, self.default = [], [], None
        self.release = threading.Event()     # ends a stalled reply early
        self.lock = threading.Lock()
        self.connections = 0
        self.hangups = 0                     # streams the client left before their end
        self.hung_up = threading.Event()     # set at the first of them

    scheme = "http"

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def reply(self, body=None, status=200, headers=None, action=None, raw=None, delay=0,
              **extra):
        """Queue one answer. action: "close" (hang up before answering), "stall" (wait
        for release or 10 s), "truncate" (send half the promised body, then hang up),
        and the hostile ones (see Handler.hostile): "endless", "endless_close",
        "gzip_bomb", "trickle_head", "pieces". echo=True: "@KEY@" in the body and
        headers becomes the key the request carried (a server that echoes credentials
        back)."""
        self.replies.append(dict(body=body, status=status, headers=headers or {},
                                 action=action, raw=raw, delay=delay, **extra))
        return self

    def last(self):
        return self.requests[-1]

    def handle_error(self, request, client_address):
        """Silent when the client hung up: a thread of an earlier test's server could
        otherwise print that traceback into the stderr a later test captures."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True       # a trickled byte leaves at once

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self):
        self.do_POST()

    def do_HEAD(self):                   # the real claude CLI warms its connection up
        self.server.requests.append(Recorded("HEAD", self.path, dict(self.headers), b""))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                           raw)
        with self.server.lock:
            self.server.requests.append(request)
            spec = self.server.replies.pop(0) if self.server.replies else None
        if spec is None:
            spec = self.server.default(request) if self.server.default else dict(
                body={"error": "no reply queued"}, status=500)
            spec = {"body": None, "headers": {}, "action": None, "raw": None, "delay": 0,
                    "status": 200, **spec}
        if spec["delay"]:
            time.sleep(spec["delay"])
        if spec["action"] == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if spec["action"] == "stall":
            self.server.release.wait(10)
            self.close_connection = True
            return
        data = spec["raw"] if spec["raw"] is not None else json.dumps(spec["body"]).encode()
        headers = {"Content-Type": "application/json", **spec["headers"]}
        if spec.get("echo"):
            key = sent_key(request.headers)
            data = data.replace(b"@KEY@", key.encode())
            headers = {k: v.replace("@KEY@", key) for k, v in headers.items()}
        if spec["action"] in HOSTILE:
            self.close_connection = True
            try:
                self.hostile(spec, headers, data)
            except OSError:                  # the client hung up: what we wanted
                with self.server.lock:
                    self.server.hangups += 1
                self.server.hung_up.set()
            return
        self.send_response(spec["status"])
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if spec["action"] == "truncate":
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(data)

    def hostile(self, spec, headers, data):
        """Replies that attack the client. Every loop ends when the client hangs up
        (OSError) or the test ends (release).
        endless / endless_close: a body that never ends, `chunk` bytes every `every`
        s, chunked or close-delimited (no Content-Length, Connection: close);
        gzip_bomb: 1 GiB of zeros as ~1 MB of Content-Encoding: gzip;
        trickle_head: the status line and headers one byte every 50 ms;
        pieces: `pieces` = [(at_secs, bytes), ...] of a close-delimited body (with
        framing="chunked", chunked; with framing="length", Content-Length: `length`),
        then a stall."""
        action, release, write = spec["action"], self.server.release, self.wfile.write
        chunked = action == "endless" or spec.get("framing") == "chunked"
        if action == "trickle_head":
            head = f"HTTP/1.1 {spec['status']} OK\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in {**headers, "X-Padding": "p" * 200,
                                              "Content-Length": len(data)}.items()) + "\r\n"
            for i in range(len(head)):
                if release.wait(0.05):
                    return
                write(head[i].encode())
            write(data)
            return
        if action == "gzip_bomb":
            bomb = gzip_bomb()
            self.send_head(spec["status"], {**headers, "Content-Encoding": "gzip",
                                            "Content-Length": str(len(bomb))})
            write(bomb)
            return
        framing = {"Transfer-Encoding": "chunked"} if chunked else \
            {"Content-Length": str(spec["length"])} if spec.get("framing") == "length" else {}
        self.send_head(spec["status"], {**headers, "Connection": "close", **framing})

        def send(piece):
            write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if action == "stream":           # data in random slices of 1 to `most` bytes
            rnd, i = random.Random(spec.get("seed", 0)), 0
            while i < len(data):
                n = rnd.randint(1, spec.get("most", 4096))
                if spec.get("hold_at") is not None:
                    n = min(n, spec["hold_at"] - i)          # stop right at hold_at
                send(data[i:i + n])
                i += n
                if spec.get("hold_at") is not None and i >= spec["hold_at"]:
                    spec["hold_at"] = None           # wait once, then finish
                    if spec.get("then") == "cut":
                        return
                    release.wait(10)
            if chunked:
                write(b"0\r\n\r\n")
            if spec.get("linger"):                   # keep the connection after the end
                release.wait(10)
            return
        if action == "pieces":
            started = time.monotonic()
            for at, piece in spec["pieces"]:
                if release.wait(max(0.0, started + at - time.monotonic())):
                    return
                send(piece)
            release.wait(10)
            return
        piece, every = spec.get("piece") or b"x" * spec.get("chunk", 1 << 20), spec.get("every", 0)
        send(spec.get("first", b'{"models": ["'))        # endless / endless_close
        while not release.wait(every):
            send(piece)

    def send_head(self, status, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()


HOSTILE = ("endless", "endless_close", "gzip_bomb", "trickle_head", "pieces", "stream")


def sent_key(headers):
    """The credential a request carried, whichever header each API uses."""
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") or headers.get("x-api-key") or \
        headers.get("x-goog-api-key") or ""


_GZIP_BOMB = []


def gzip_bomb():
    """1 GiB of zeros, gzip level 9, about 1 MB: built once. A full flush after each
    1 MiB block makes every block compress to the same bytes, so one is repeated."""
    if not _GZIP_BOMB:
        import struct
        import zlib
        block, blocks = bytes(1 << 20), 1024
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
        repeat = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
        crc = 0
        for _ in range(blocks):
            crc = zlib.crc32(block, crc)
        _GZIP_BOMB.append(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first
                          + repeat * (blocks - 1) + deflate.flush()
                          + struct.pack("<II", crc, (len(block) * blocks) & 0xFFFFFFFF))
    return _GZIP_BOMB[0]


def serving(server=None):
    """A FakeAPI (or the given one) serving from a thread of its own. It looks for
    shutdown() every 1 ms: over 600 tests stop a server, each waiting that long."""
    server = server or FakeAPI()
    threading.Thread(target=server.serve_forever, args=(0.001,), daemon=True).start()
    return server


def stop_serving(server):
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def api():
    server = serving()
    yield server
    stop_serving(server)


@pytest.fixture
def api2():
    server = serving()
    yield server
    stop_serving(server)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_api(tls_cert):
    """The fake API over HTTPS, with the certificate of tls_cert."""
    import ssl
    server = FakeAPI()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_cert)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.scheme = "https"
    yield serving(server)
    stop_serving(server)


def refused_url():
    """A local port with nothing listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# --- canned answers in each API's real wire format ---------------------------

def openai_ok(text="Hello from OpenAI", **extra):
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "completion_tokens_details": {"reasoning_tokens": 0}}}
    body.update(extra)
    return body


def anthropic_ok(*blocks, usage=None, stop="end_turn"):
    blocks = blocks or ({"type": "text", "text": "Hello from Claude"},)
    return {"id": "msg_01", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-20250514", "content": list(blocks),
            "stop_reason": stop, "stop_sequence": None,
            "usage": usage or {"input_tokens": 10, "output_tokens": 4}}


def gemini_ok(*parts, finish="STOP", usage=None):
    parts = parts or ({"text": "Hello from Gemini"},)
    body = {"candidates": [{"content": {"role": "model", "parts": list(parts)},
                            "finishReason": finish, "index": 0}],
            "modelVersion": "gemini-2.0-flash", "responseId": "resp-1"}
    body["usageMetadata"] = usage if usage is not None else {
        "promptTokenCount": 8, "candidatesTokenCount": 3, "totalTokenCount": 11}
    return body


def ollama_ok(text="Hello from Ollama", **extra):
    body = {"model": "llama3", "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text}, "done": True,
            "done_reason": "stop", "total_duration": 1000, "prompt_eval_count": 7,
            "eval_count": 3}
    body.update(extra)
    return body


OK = {"openai": openai_ok, "openrouter": openai_ok, "anthropic": anthropic_ok,
      "gemini": gemini_ok, "ollama": ollama_ok}
HTTP_NAMES = tuple(OK)


def answer_of(name, text, stop=None):
    """A body of backend `name` whose answer text is `text` (stop: its stop reason)."""
    if name in ("openai", "openrouter"):
        body = openai_ok(text)
        body["choices"][0]["finish_reason"] = stop or "stop"
        return body
    if name == "anthropic":
        return anthropic_ok({"type": "text", "text": text}, stop=stop or "end_turn")
    if name == "gemini":
        return gemini_ok({"text": text}, finish=stop or "STOP")
    return ollama_ok(text, done_reason=stop or "stop")


def openai_error(status, code, message="boom", kind=None):
    return {"error": {"message": message, "type": kind or code, "param": None, "code": code}}


# --- configs and calls aimed at the fake server ------------------------------

def cfg(name, api, **section):
    """A config dict aiming `name` at the fake server."""
    base = api.url if isinstance(api, FakeAPI) else api
    if name in ("openai", "openrouter"):
        base += "/v1"
    section = {"base_url": base, **section}
    if name not in ("ollama",) and "api_key" not in section:
        section["api_key"] = KEY
    return {"provider": {"default": name, name: section}}


def ask_via(name, api, ctx=None, **section):
    return omega.complete(ctx or omega.Context("Say hi"), provider=name, config=cfg(name, api, **section))


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def toml_for(config):
    """Write a config dict as TOML (enough for the tests' flat sections)."""
    lines = []
    for table, section in (("provider", config.get("provider", {})),
                           ("omega", config.get("omega", {}))):
        plain = {k: v for k, v in section.items() if not isinstance(v, dict)}
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in plain.items()]
        for name, sub in section.items():
            if isinstance(sub, dict):
                lines.append(f"[{table}.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def toml_value(value):
    """A value as TOML writes it: JSON's form, but a table inline ({ "k" = v })."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) \
            + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


# --- streams -----------------------------------------------------------------

STREAM_TYPES = {"sse": "text/event-stream", "ndjson": "application/x-ndjson"}

# A close-delimited stream (no chunked encoding), where its pieces must come as they
# arrive: not with urllib3 1.26, which has no read1() and reads such a body 64 KiB at a
# time (the README says so; `make test-compat` runs the suite with it).
CLOSE_DELIMITED_LIVE = pytest.param("close", marks=pytest.mark.skipif(
    not hasattr(__import__("urllib3").HTTPResponse, "read1"),
    reason="urllib3 1.26 reads a close-delimited body 64 KiB at a time"))


def serve_stream(api, body, framing="chunked", seed=0, most=4096, status=200, headers=None,
                 **extra):
    kind = "ndjson" if body.startswith(b"{") and b"\ndata:" not in body else "sse"
    return api.reply(raw=body, status=status, action="stream", framing=framing, seed=seed,
                     most=most, headers={"Content-Type": STREAM_TYPES[kind], **(headers or {})},
                     **extra)


def sse(*events, done=True):
    """An OpenAI-style SSE body from chunk dicts (and the [DONE] line)."""
    lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return b"".join(lines) + (b"data: [DONE]\n\n" if done else b"")


def oa_chunk(content=None, finish=None, **extra):
    delta = {} if content is None else {"content": content}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def stream_via(name, api, ctx=None, **section):
    s = omega.stream(ctx or omega.Context("hi"), name, cfg(name, api, **section))
    pieces = []
    with s:
        for piece in s:
            pieces.append(piece)
    return pieces, s


# --- tool calls in each API's wire format ------------------------------------

# The reasoning of answer_with(..., thought=THOUGHT) and stream_with(), and what
# each API asks to have back with it: Anthropic's signature and a redacted block,
# OpenRouter's signed reasoning_details, Gemini's signature on the call's part.
THOUGHT = "Weigh it: 2 + 2 = 4, ça va."
SIGNATURE = "EqQBCkgIBxABGAIiQL0+7sig/naTure=="
REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/redacted=="}
DETAILS = [{"type": "reasoning.text", "text": THOUGHT, "format": "anthropic-claude-v1",
            "index": 0, "signature": SIGNATURE}]
# Where each backend's answer holds it: the OpenAI wire as DeepSeek sends it.
THOUGHT_KEY = {"openai": "reasoning_content", "openrouter": "reasoning", "ollama": "thinking"}


def answer_with(name, text="", calls=(), thought=None):
    """A body of backend `name`: text, then calls [(id, function, arguments)] when
    given (Gemini's carry no id, as recorded; Ollama's one when given); thought: its
    reasoning first, in the API's shape (see THOUGHT)."""
    if name in ("openai", "openrouter"):
        body = answer_of(name, text, "tool_calls" if calls else None)
        message = body["choices"][0]["message"]
        message["content"] = text or None
        if thought:
            message[THOUGHT_KEY[name]] = thought
            if name == "openrouter":
                message["reasoning_details"] = [{**DETAILS[0], "text": thought}]
        if calls:
            message["tool_calls"] = [{"id": i, "type": "function", "function": {
                "name": f, "arguments": json.dumps(a)}} for i, f, a in calls]
        return body
    if name == "anthropic":
        return anthropic_ok(*[{"type": "thinking", "thinking": thought, "signature": SIGNATURE},
                              REDACTED] * bool(thought),
                            *[{"type": "text", "text": text}] * bool(text),
                            *({"type": "tool_use", "id": i, "name": f, "input": a}
                              for i, f, a in calls), stop="tool_use" if calls else "end_turn")
    if name == "gemini":
        return gemini_ok(*[{"text": thought, "thought": True}] * bool(thought),
                         *[{"text": text}] * bool(text),
                         *({"functionCall": {"name": f, "args": a},
                            **({"thoughtSignature": SIGNATURE} if thought else {})}
                           for _, f, a in calls))
    message = {"role": "assistant", "content": text, **({"thinking": thought} if thought else {})}
    if calls:
        message["tool_calls"] = [{**({"id": i} if i else {}), "function": {
            "name": f, "arguments": a}} for i, f, a in calls]
    return ollama_ok(text, message=message)


def stream_with(name, text="", calls=(), thought=None):
    """The answer of answer_with(), streamed in the API's framing, text and thought
    in two pieces each and each call's arguments (OpenAI, Anthropic) in 4-character
    deltas."""
    half, middle = len(text) // 2, len(thought or "") // 2
    texts = [t for t in (text[:half], text[half:]) if t]
    thoughts = [t for t in (thought[:middle], thought[middle:])] if thought else []
    if name in ("openai", "openrouter"):
        chunks = [oa_chunk() for t in thoughts]
        for chunk, t in zip(chunks, thoughts):
            chunk["choices"][0]["delta"] = {THOUGHT_KEY[name]: t}
            if name == "openrouter":        # as OpenRouter streams them, the signature last
                chunk["choices"][0]["delta"]["reasoning_details"] = [
                    {k: t if k == "text" else v for k, v in DETAILS[0].items() if k != "signature"}]
        if thought and name == "openrouter":
            chunks.append(oa_chunk())
            chunks[-1]["choices"][0]["delta"] = {"reasoning_details": [
                {"type": "reasoning.text", "signature": SIGNATURE, "format": "anthropic-claude-v1",
                 "index": 0}]}
        chunks += [oa_chunk(t) for t in texts]
        for n, (i, f, a) in enumerate(calls):
            arguments = json.dumps(a, ensure_ascii=False)
            chunks.append(oa_chunk())
            chunks[-1]["choices"][0]["delta"] = {"tool_calls": [{
                "index": n, "id": i, "type": "function", "function": {"name": f, "arguments": ""}}]}
            for k in range(0, len(arguments), 4):
                chunks.append(oa_chunk())
                chunks[-1]["choices"][0]["delta"] = {"tool_calls": [{
                    "index": n, "function": {"arguments": arguments[k:k + 4]}}]}
        chunks.append(oa_chunk(finish="tool_calls" if calls else "stop"))
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 5}})
        return b"".join(b"data: " + utf8_json(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    def event(kind, **data):
        return b"event: " + kind.encode() + b"\ndata: " + utf8_json({"type": kind, **data}) + b"\n\n"
    if name == "anthropic":
        out = [event("message_start", message={
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}})]
        blocks = [({"type": "thinking", "thinking": "", "signature": ""},
                   [*(("thinking_delta", "thinking", t) for t in thoughts),
                    ("signature_delta", "signature", SIGNATURE)]),
                  (REDACTED, [])] * bool(thought)
        blocks += [({"type": "text", "text": ""}, [("text_delta", "text", t) for t in texts])] \
            * bool(text)
        for i, f, a in calls:
            arguments = json.dumps(a, ensure_ascii=False)
            blocks.append(({"type": "tool_use", "id": i, "name": f, "input": {}},
                           [("input_json_delta", "partial_json", arguments[k:k + 4])
                            for k in range(0, len(arguments), 4)] or
                           [("input_json_delta", "partial_json", "")]))
        for index, (start, deltas) in enumerate(blocks):
            out.append(event("content_block_start", index=index, content_block=start))
            out += [event("content_block_delta", index=index, delta={"type": kind, key: value})
                    for kind, key, value in deltas]
            out.append(event("content_block_stop", index=index))
        out.append(event("message_delta", delta={"stop_reason": "tool_use" if calls
                                                  else "end_turn"}, usage={"output_tokens": 4}))
        return b"".join(out) + event("message_stop")
    if name == "gemini":
        chunks = [{"candidates": [{"content": {"role": "model", "parts": [part]}, "index": 0}]}
                  for part in [*({"text": t, "thought": True} for t in thoughts),
                               *({"text": t} for t in texts)]]
        chunks.append({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": f, "args": a},
             **({"thoughtSignature": SIGNATURE} if thought else {})}
            for _, f, a in calls] or [{"text": ""}]},
            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 3}})
        return b"".join(b"data: " + utf8_json(c) + b"\r\n\r\n" for c in chunks)
    lines = [{"model": "llama3", "message": {"role": "assistant", "content": "", "thinking": t},
              "done": False} for t in thoughts]
    lines += [{"model": "llama3", "message": {"role": "assistant", "content": t}, "done": False}
              for t in texts]
    if calls:
        lines.append({"model": "llama3", "done": False, "message": {
            "role": "assistant", "content": "", "tool_calls": [
                {**({"id": i} if i else {}), "function": {"name": f, "arguments": a}}
                for i, f, a in calls]}})
    lines.append({"model": "llama3", "message": {"role": "assistant", "content": ""},
                  "done": True, "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 3})
    return b"".join(utf8_json(line) + b"\n" for line in lines)


def utf8_json(value):
    """JSON as servers send it: UTF-8, non-ASCII characters as they are."""
    return json.dumps(value, ensure_ascii=False).encode()


def queue(api, name, streaming, text="", calls=(), thought=None, **extra):
    """Queue the next answer of api: answer_with(), or stream_with() served in slices."""
    if streaming:
        return serve_stream(api, stream_with(name, text, calls, thought), **extra)
    return api.reply(answer_with(name, text, calls, thought), **extra)


def sent_results(name, body):
    """The tool results a request carries, last round's only, in order: (text, error),
    error None where the API has no flag for it (OpenAI, Ollama)."""
    if name == "anthropic":
        return [(b["content"], b.get("is_error", False)) for b in body["messages"][-1]["content"]]
    if name == "gemini":
        return [(p["functionResponse"]["response"].get("result",
                                                       p["functionResponse"]["response"].get("error")),
                 "error" in p["functionResponse"]["response"])
                for p in body["contents"][-1]["parts"]]
    results = []
    for message in reversed(body["messages"]):
        if message["role"] != "tool":
            break
        results.insert(0, (message["content"], None))
    return results


def with_tools(name, api, streaming, tools, prompt="Weather?", section=None, config=None,
               **keywords):
    """complete() or stream() of prompt with tools against api: (reply, pieces or None)."""
    config = config or cfg(name, api, **(section or {}))
    if not streaming:
        return omega.complete(prompt, provider=name, config=config, tools=tools, **keywords), None
    s = omega.stream(prompt, provider=name, config=config, tools=tools, **keywords)
    with s:
        pieces = list(s)
    assert "".join(pieces) == s.text
    return s.reply, pieces


def same(ours, theirs):
    """Equal, and equal as JSON text too: the same keys in the same order."""
    assert ours == theirs
    assert json.dumps(ours) == json.dumps(theirs)


def in_slices(body: bytes, seed: int, most: int = 7) -> list[bytes]:
    """body cut as a transport might read it: random slices of 1 to `most` bytes."""
    rnd, i, pieces = random.Random(seed), 0, []
    while i < len(body):
        n = rnd.randint(1, most)
        pieces.append(body[i:i + n])
        i += n
    return pieces


def ran(functions, calls, limit=65536):
    """calls, each run as the tool loop runs it."""
    by_name = {t.name: t for t in omega.tools_from(functions)}
    return [omega.run_tool(by_name.get(call.name), call, limit) for call in calls]


# --- a fake `claude` executable (its program: FAKE_CLAUDE, in Test data) -----

class FakeClaude:
    def __init__(self, root):
        self.dir = root
        self.command = str(root / "claude")
        (root / "claude").write_text(FAKE_CLAUDE.replace("PYTHON", sys.executable))
        (root / "claude").chmod(0o755)

    def plan(self, *steps):
        (self.dir / "plan.json").write_text(json.dumps(list(steps)))

    def mcp(self):
        """What it saw of its MCP servers: config, tools, answers, exits (FAKE_CLAUDE)."""
        return json.loads((self.dir / "mcp.json").read_text())

    def calls(self):
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def config(self, **section):
        """A config for it, with a 20 s deadline: a run that hangs fails, not the suite."""
        return {"provider": {"default": "claude-code", "claude-code": {
            "command": self.command, "resume_delay_secs": 0, "timeout_secs": 20, **section}}}


@pytest.fixture
def claude(tmp_path, monkeypatch):
    root = tmp_path / "fakeclaude"
    root.mkdir()
    monkeypatch.setenv("FAKE_CLAUDE_DIR", str(root))
    return FakeClaude(root)


def cc(claude, ctx=None, on_status=None, **section):
    return omega.complete(ctx or omega.Context("Say hi"), "claude-code", claude.config(**section),
                          on_status=on_status)


# --- a user's MCP server (its program: FAKE_MCP_SERVER, in Test data) ------

@pytest.fixture
def mcp_server(tmp_path):
    """mcp_server(mode): an mcp_servers entry running FAKE_MCP_SERVER in that mode."""
    path = tmp_path / "mcp_server.py"
    path.write_text(FAKE_MCP_SERVER)
    return lambda mode, name="docs": {"name": name, "command": sys.executable,
                                      "args": ["-S", str(path), mode,
                                               str(tmp_path / f"{name}.pid")],
                                      "env": {"DOCS_TAG": name}}


# --- processes ---------------------------------------------------------------

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:          # a zombie is as good as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def read_pids(path, within=15):
    """The two pids a fake claude wrote (itself and its grandchild)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            parent, grandchild = map(int, path.read_text().split())
            return parent, grandchild
        except (OSError, ValueError):
            time.sleep(0.02)
    raise AssertionError(f"the fake claude never wrote {path}")


def gone(*pids, within=3):
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(alive(p) for p in pids)


def running_with(text):
    """The live processes whose command line holds text."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read() and alive(int(entry)):
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def kill_leftovers(*pids):
    """After a failing run: no process of ours outlives the test."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def unshared(script, tmp_path):
    """script in a shell that is root of its own user and mount namespaces (to mount a
    tiny or a read-only file system), or a skip where this machine does not allow it."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a user and mount namespace here (unshare -Urm)")
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=HERE, text=True,
                          capture_output=True, timeout=60, env=cli_env(tmp_path))


# --- the command line --------------------------------------------------------

def cli_env(tmp_path, **extra):
    # As in a user's shell: no PYTHONUNBUFFERED, so stdout to a pipe is block-buffered.
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS + ("PYTHONUNBUFFERED",)}
    env.update(HOME=str(tmp_path / "home"), OMEGA_CONFIG=str(tmp_path / "cli.toml"),
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")])))
    env.update(extra)
    if not os.path.exists(env["OMEGA_CONFIG"]):
        (tmp_path / "cli.toml").write_text("")
    return env


def run_cli(tmp_path, *args, config=None, input=None, timeout=30, as_file=False, **env):
    """omega's command line in a child (as_file: `python omega.py` itself)."""
    if config is not None:
        (tmp_path / "cli.toml").write_text(toml_for(config))
    command = (sys.executable, OMEGA_PY) if as_file else OMEGA_CLI
    return subprocess.run([*command, *args], cwd=tmp_path, capture_output=True,
                          text=True, input=input, timeout=timeout, env=cli_env(tmp_path, **env),
                          stdin=None if input is not None else subprocess.DEVNULL)


@pytest.fixture
def cli_main(tmp_path):
    """cli_main(config, *args): omega.main in-process, config written as TOML in tmp_path."""
    def run(config, *args):
        path = tmp_path / "cli-main.toml"
        path.write_text(toml_for(config))
        return omega.main(["-c", str(path), *args])
    return run


# --- attachments, request bodies, leaked keys --------------------------------

# The test files of Test data by name (all three when none is named), as Attachments.
def files(*names):

    known = {"red.png": PNG, "hello.pdf": PDF, "notes.txt": NOTES}
    return [omega.Attachment(known[name], name=name) for name in names or known]


def wire(body):
    """A request body as the server reads it (attachments written as base64)."""
    payload = omega.json_payload(body)
    return json.loads(payload if isinstance(payload, bytes) else b"".join(payload))


def leaks(text, key=KEY):
    """True when text holds 12 or more consecutive characters of key."""
    text = "" if text is None else str(text)
    return any(key[i:i + 12] in text for i in range(len(key) - 11))


# =============================================================================
# 1. Data
# =============================================================================

def test_to_api_messages_merges_drops_and_folds_system():
    ctx = omega.Context("and now?", system_prompt="Be brief", history=(
        omega.Message("user", "one"), {"role": "user", "content": "two"},
        {"role": "system", "content": "Answer in French"},
        omega.Message("assistant", ""), omega.Message("assistant", "ok"),
        {"role": "user", "content": "three"}))
    system, messages = ctx.to_api_messages()
    assert system == "Be brief\n\nAnswer in French"
    assert messages == [{"role": "user", "content": "one\n\ntwo"},
                        {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "three\n\nand now?"}]


def test_to_api_messages_rejects_unknown_role():
    with pytest.raises(ValueError, match="'tool'"):
        omega.Context("x", history=[{"role": "tool", "content": "y"}]).to_api_messages()


@pytest.mark.parametrize("ctx, prompt", [
    (omega.Context("What next?", system_prompt="Be brief",
                   history=[omega.Message("user", "Hi"), omega.Message("assistant", "Hello")]),
     "[System]\nBe brief\n\n[User]\nHi\n\n[Assistant]\nHello\n\n[User]\nWhat next?"),
    (omega.Context("What next?", system_prompt="Be brief", session_id="s1",
                   history=[omega.Message("user", "Hi")]),
     "[User]\nBe brief\n\nWhat next?"),
    (omega.Context("Q", session_id="s1"), "[User]\nQ"),
], ids=["blocks", "session-drops-history", "session-without-system"])
def test_to_prompt_string_blocks_and_session_form(ctx, prompt):
    assert ctx.to_prompt_string() == prompt


def test_metadata_sums_tokens_only_when_both_known_and_to_dict_is_json():
    assert omega.MessageMetadata(input_tokens=3, output_tokens=4).tokens_used == 7
    assert omega.MessageMetadata(input_tokens=3).tokens_used is None
    reply = omega.OutgoingMessage("hi", omega.MessageMetadata(provider_used="x", fallbacks=["a"]))
    data = json.loads(json.dumps(reply.to_dict()))
    assert data["text"] == "hi" and data["metadata"]["provider_used"] == "x"
    assert data["metadata"]["fallbacks"] == ["a"] and data["metadata"]["cost_usd"] is None


def test_metadata_cache_counts_are_unknown_unless_said_and_only_counts_stay():
    meta = omega.MessageMetadata()
    assert (meta.cache_read_tokens, meta.cache_write_tokens) == (None, None)
    meta = omega.MessageMetadata(input_tokens=1100, cache_read_tokens=1000, cache_write_tokens=-1)
    assert (meta.cache_read_tokens, meta.cache_write_tokens) == (1000, None)
    assert {"cache_read_tokens", "cache_write_tokens"} <= set(
        omega.OutgoingMessage("hi", meta).to_dict()["metadata"])


def test_a_stopped_call_has_no_time_left_and_its_waits_end_at_once():
    stop = threading.Event()
    call = omega.Call.starting_now(60)
    assert call.stop is None and call.left() > 59
    stopped = omega.Call(time.monotonic() + 60, 60, stop=stop)
    started = time.monotonic()
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(KeyboardInterrupt):
        stopped.sleep(30)
    assert time.monotonic() - started < 10 and stopped.left() < 0
    with pytest.raises(KeyboardInterrupt):          # interrupted, not timed out
        omega.timed_out({"name": "openai"}, stopped)


def test_tool_calls_are_data_and_a_reply_carries_them():
    call = omega.tool_call("call_1", "get_weather", '{"city": "Par')
    assert repr(call) == "ToolCall(id='call_1', name='get_weather', arguments={}, result=None, " \
                         "error=False)"
    done = omega.ToolCall("c", "now", {}, "noon")
    reply = omega.OutgoingMessage("It is noon.", omega.MessageMetadata(), tool_calls=[done, call])
    assert reply.to_dict()["tool_calls"] == [
        {"id": "c", "name": "now", "arguments": {}, "result": "noon", "error": False},
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Par', "result": None,
         "error": False}]
    assert "tool_calls" not in omega.OutgoingMessage("hi", omega.MessageMetadata()).to_dict()
    json.dumps(reply.to_dict())


# =============================================================================
# 2. Errors
# =============================================================================

# --- the error classes -------------------------------------------------------

def test_every_error_class_derives_from_provider_and_omega_error():
    for cls in (omega.AuthError, omega.RateLimitError, omega.ProviderTimeout,
                omega.EmptyResponse, omega.ProviderUnavailable):
        assert issubclass(cls, omega.ProviderError) and issubclass(cls, omega.OmegaError)
    assert issubclass(omega.ConfigError, omega.OmegaError)
    assert not issubclass(omega.ConfigError, omega.ProviderError)
    codes = [c.exit_code for c in (omega.ProviderError, omega.ConfigError, omega.AuthError,
                                   omega.RateLimitError, omega.ProviderTimeout,
                                   omega.EmptyResponse, omega.ProviderUnavailable)]
    assert codes == [1, 2, 3, 4, 5, 6, 7]


def test_provider_error_takes_all_its_context_in_the_constructor():
    e = omega.ProviderError("boom", "openai", 503, "server_error", "req_1", retry_after=1.5,
                            retryable=True, reason="connection refused", not_set_up=True,
                            session_id="s-1", partial_text="half", fallbacks=("anthropic: 401 no",))
    assert (e.message, e.provider, e.status, e.code, e.request_id) == \
        ("boom", "openai", 503, "server_error", "req_1")
    assert (e.retry_after, e.retryable, e.reason, e.not_set_up, e.session_id, e.partial_text) == \
        (1.5, True, "connection refused", True, "s-1", "half")
    assert list(e.fallbacks) == ["anthropic: 401 no"]
    assert str(e).startswith("openai: 503 server_error: boom") and "\n" not in str(e)
    plain = omega.ProviderError("x")
    assert list(plain.fallbacks) == [] and plain.not_set_up is False and plain.retryable is False


def test_an_error_carries_the_tool_calls_that_ran():
    ran_before = [omega.ToolCall("c", "now", {}, "noon")]
    error = omega.ProviderTimeout("late", "openai", tool_calls=ran_before, partial_text="Hm.")
    again = error.with_context(message="later")
    assert type(again) is omega.ProviderTimeout and again.tool_calls == ran_before
    assert again.partial_text == "Hm." and omega.ProviderError("x").tool_calls == []


# --- error bodies become typed errors ----------------------------------------

# Every error body shape gives the provider's own message.
ERROR_BODIES = {
    "openai": (404, {"error": {"message": "The model `gpt-9` does not exist or you do not have "
                                          "access to it.", "type": "invalid_request_error",
                               "param": None, "code": "model_not_found"}},
               "404 model_not_found: The model `gpt-9` does not exist"),
    "anthropic": (404, {"type": "error", "error": {"type": "not_found_error",
                                                  "message": "model: claude-9"},
                        "request_id": "req_011"},
                  "404 not_found_error: model: claude-9 (request_id=req_011)"),
    "gemini": (404, {"error": {"code": 404, "message": "models/gem-9 is not found for API "
                               "version v1beta", "status": "NOT_FOUND"}},
               "404 NOT_FOUND: models/gem-9 is not found"),
    "ollama": (404, {"error": "model 'llama9' not found"}, "404: model 'llama9' not found"),
    "openrouter": (400, {"error": {"code": 400, "message": "Invalid model id"}, "user_id": "u1"},
                   "400: Invalid model id"),
}


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_error_bodies_give_the_providers_own_message(api, name):
    status, body, expected = ERROR_BODIES[name]
    api.reply(body, status=status)
    with pytest.raises(omega.ProviderError) as err:
        ask_via(name, api)
    assert type(err.value) is omega.ProviderError and str(err.value).startswith(f"{name}: ")
    assert expected in str(err.value) and err.value.status == status
    assert len(api.requests) == 1                                  # 4xx: no retry


def test_request_id_from_headers(api):
    api.reply({"error": {"message": "bad", "type": "invalid_request_error", "param": None,
                         "code": None}}, status=400, headers={"x-request-id": "req_abc"})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    assert err.value.request_id == "req_abc" and str(err.value) == \
        "openai: 400 invalid_request_error: bad (request_id=req_abc)"
    api.reply(anthropic_ok(), headers={"request-id": "req_xyz"})
    assert ask_via("anthropic", api).metadata.request_id == "req_xyz"


def test_html_502_gives_a_short_clean_message(api):
    page = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</html>"
    for _ in range(3):
        api.reply(raw=page, status=502, headers={"Content-Type": "text/html"})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    assert str(err.value) == "openai: 502: the server sent an HTML page, not JSON"
    assert len(api.requests) == 3


@pytest.mark.parametrize("reply, error, message", [
    (dict(raw=b'{"choices": [{"message": {"content": "Hel'), omega.ProviderError,
     "the server sent malformed data, not JSON"),
    (dict(raw=b""), omega.ProviderError, "the server sent an empty body, not JSON"),
    (dict(body={"unexpected": True}), omega.EmptyResponse, "no answer text (no choices)"),
    (dict(body={"choices": "nonsense"}), omega.ProviderError,
     "the answer did not have the expected shape"),
], ids=["cut-json", "empty-body", "no-choices", "wrong-shape"])
def test_garbage_200_is_provider_error_without_the_body(api, reply, error, message):
    api.reply(**reply)
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    assert type(err.value) is error and err.value.message == message
    assert "Hel" not in str(err.value) and len(api.requests) == 1


@pytest.mark.parametrize("name, status, body", [
    ("openai", 401, openai_error(401, "invalid_api_key", "Incorrect API key provided: sk-…cdef")),
    ("anthropic", 401, {"type": "error", "error": {"type": "authentication_error",
                                                   "message": "invalid x-api-key"}}),
    ("anthropic", 403, {"type": "error", "error": {"type": "permission_error", "message": "no"}}),
    ("gemini", 400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid "
                               "API key.", "status": "INVALID_ARGUMENT", "details": [
                                   {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                    "reason": "API_KEY_INVALID",
                                    "domain": "googleapis.com"}]}}),
    ("openrouter", 401, {"error": {"code": 401, "message": "No auth credentials found"}}),
])
def test_rejected_keys_are_auth_errors(api, name, status, body):
    api.reply(body, status=status)
    with pytest.raises(omega.AuthError):
        ask_via(name, api)
    assert len(api.requests) == 1


@pytest.mark.parametrize("name, status, body", [
    ("openai", 429, openai_error(429, "insufficient_quota", "You exceeded your current quota")),
    ("openrouter", 402, {"error": {"code": 402, "message": "Insufficient credits"}}),
    ("anthropic", 400, {"type": "error", "error": {"type": "invalid_request_error", "message":
                        "Your credit balance is too low to access the Anthropic API."}}),
    ("anthropic", 402, {"type": "error", "error": {"type": "billing_error", "message": "Pay"}}),
    ("anthropic", 429, {"type": "error", "error": {"type": "rate_limit_error", "message": "cap",
                        "details": {"error_code": "enforced_spend_limit_reached"}}}),
])
def test_quota_exhaustion_is_rate_limit_error_never_retried(api, name, status, body):
    api.reply(body, status=status, headers={"Retry-After": "0"})
    with pytest.raises(omega.RateLimitError):
        ask_via(name, api)
    assert len(api.requests) == 1


def test_a_status_repeated_as_its_code_is_shown_once(api):
    api.reply({"error": {"message": "Bad request", "type": "invalid_request_error",
                         "code": "400"}}, status=400)                   # as LiteLLM sends it
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api, max_retries=0)
    assert str(err.value) == "openai: 400: Bad request" and err.value.code == "400"
    api.reply({"error": {"message": "Slow down", "type": "rate_limit", "code": "429"}},
              status=429)
    with pytest.raises(omega.RateLimitError) as err:
        ask_via("openai", api, max_retries=0)
    assert str(err.value) == "openai: 429: Slow down"
    assert omega.failure_label(err.value) == "rate-limited (429)"


def test_an_answer_too_large_is_not_an_http_status(api):
    api.reply(openai_ok("x" * 5000))
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api, max_response_bytes=1000)
    assert str(err.value).startswith("openai: answer larger than 1,000 bytes")
    assert err.value.status is None
    api.reply(raw=b"y" * 5000, status=500, headers={"Content-Type": "text/plain"})
    with pytest.raises(omega.ProviderError) as err:       # an error's own status stays
        ask_via("openai", api, max_response_bytes=1000, max_retries=0)
    assert str(err.value).startswith("openai: 500: answer larger than") and err.value.status == 500


def test_a_plain_text_error_body_is_shown_redacted_on_one_line(api):
    api.reply(raw=b"Internal Server Error", status=500, headers={"Content-Type": "text/plain"})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api, max_retries=0)
    assert str(err.value) == "openai: 500: Internal Server Error"
    hostile = f"upstream said\n\x1b[2Jno to {KEY} " + "word " * 200
    api.reply(raw=hostile.encode(), status=502,
              headers={"Content-Type": "text/plain; charset=utf-8"})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api, max_retries=0)
    text = str(err.value)
    assert text.startswith("openai: 502: upstream said no to …") and not leaks(text)
    assert "\n" not in text and "\x1b" not in text and len(err.value.message) <= 300
    api.reply(raw=b"<html><body>Bad Gateway</body></html>", status=502,
              headers={"Content-Type": "text/html"})
    with pytest.raises(omega.ProviderError, match="the server sent an HTML page, not JSON"):
        ask_via("openai", api, max_retries=0)


# --- what is retried, and when: Retry-After ----------------------------------

@pytest.mark.parametrize("status", [408, 409, 429, 500, 503, 529, 599])
def test_retryable_statuses_are_retried(api, status):
    api.reply({"error": {"message": "try again", "type": "transient"}}, status=status)
    api.reply(openai_ok())
    reply = ask_via("openai", api)
    assert reply.text == "Hello from OpenAI" and reply.metadata.attempts == 2
    assert len(api.requests) == 2


@pytest.mark.parametrize("status", [400, 404, 410, 422, 499, 600])
def test_other_statuses_are_not_retried(api, status):
    api.reply({"error": {"message": "no", "type": "invalid_request_error"}}, status=status)
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    assert err.value.status == status and err.value.retryable is False
    assert len(api.requests) == 1


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_503_three_times_gives_provider_error_after_retries(api, name):
    for _ in range(3):
        api.reply({"error": {"code": 503, "message": "The model is overloaded.",
                             "status": "UNAVAILABLE"}}, status=503)
    with pytest.raises(omega.ProviderError) as err:
        ask_via(name, api)
    assert type(err.value) is omega.ProviderError and err.value.status == 503
    assert "The model is overloaded." in str(err.value) and len(api.requests) == 3


def test_anthropic_529_overloaded_is_retried(api):
    api.reply({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
               "request_id": None}, status=529)
    api.reply(anthropic_ok())
    assert ask_via("anthropic", api).metadata.attempts == 2


def test_x_should_retry_false_is_respected(api):
    api.reply({"type": "error", "error": {"type": "api_error", "message": "no"}},
              status=500, headers={"x-should-retry": "false"})
    with pytest.raises(omega.ProviderError):
        ask_via("anthropic", api)
    assert len(api.requests) == 1


def test_429_with_retry_after_is_retried_and_announced(api, real_retry_floor):
    api.reply(openai_error(429, "rate_limit_exceeded", "Rate limit reached for gpt-4o"),
              status=429, headers={"Retry-After": "0"})
    api.reply(openai_ok())
    statuses = []
    reply = omega.complete(omega.Context("hi"), "openai", cfg("openai", api),
                           on_status=statuses.append)
    assert reply.text == "Hello from OpenAI" and reply.metadata.attempts == 2
    assert statuses == ["openai: 429, retrying in 0.1 s (2/3)"]     # at least 0.1 s
    assert len(api.requests) == 2 and api.requests[0].body == api.requests[1].body


@pytest.mark.parametrize("headers", [{"retry-after-ms": "200"}, {"Retry-After": "0.2"},
                                     {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}])
def test_retry_after_forms_are_honoured(api, monkeypatch, headers, real_retry_floor):
    waits = []
    monkeypatch.setattr(omega.time, "sleep", waits.append)
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429, headers=headers)
    api.reply(openai_ok())
    assert ask_via("openai", api).metadata.attempts == 2
    in_the_past = "GMT" in str(headers)
    assert waits == ([0.1] if in_the_past else [0.2])       # never less than 0.1 s


def test_long_retry_after_is_not_retried(api):
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429, headers={"Retry-After": "120"})
    with pytest.raises(omega.RateLimitError) as err:
        ask_via("openai", api)
    assert err.value.retry_after == 120 and len(api.requests) == 1


def test_gemini_retry_info_in_the_body(api, monkeypatch):
    waits = []
    monkeypatch.setattr(omega.time, "sleep", waits.append)
    quota = {"error": {"code": 429, "message": "Resource has been exhausted", "status":
                       "RESOURCE_EXHAUSTED", "details": [
                           {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                            "violations": [{"quotaMetric": "m", "quotaId": "q"}]},
                           {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": "1.5s"}]}}
    api.reply(quota, status=429)
    api.reply(gemini_ok())
    assert ask_via("gemini", api).metadata.attempts == 2 and waits == [1.5]
    quota["error"]["details"][1]["retryDelay"] = "61s"
    api.reply(quota, status=429)
    with pytest.raises(omega.RateLimitError, match="RESOURCE_EXHAUSTED") as err:
        ask_via("gemini", api)
    assert err.value.retry_after == 61 and len(api.requests) == 3


# =============================================================================
# 3. Secrets
# =============================================================================

def test_keys_stay_out_of_errors_logs_and_reprs(api, caplog, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", ENV_KEY)
    echo = f"Incorrect API key provided: {KEY}. And {ENV_KEY}."
    api.reply(openai_error(401, "invalid_api_key", echo), status=401)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(omega.AuthError) as err:
        ask_via("openai", api)
    api.reply({"error": {"code": 401, "message": f"Bad key {ENV_KEY}"}}, status=401)
    with pytest.raises(omega.AuthError) as err2:
        omega.complete(omega.Context("hi"), "openrouter", {"provider": {"openrouter": {
            "base_url": api.url + "/v1", "api_key_env": "OPENROUTER_API_KEY"}}})
    settings = omega.provider_settings(cfg("openai", api), "openai")
    seen = " ".join([str(err.value), repr(err.value), str(err2.value), repr(err2.value),
                     caplog.text, repr(settings), str(settings),
                     repr(omega.load_config(cfg("openai", api))), str(err.value.args)])
    assert KEY not in seen and ENV_KEY not in seen
    assert "…cdef" in str(err.value)            # masked, still recognisable
    assert "POST" in caplog.text                  # the log did record the calls


def test_secret_values_are_never_echoed_by_validation(tmp_path):
    path = write(tmp_path / "bad.toml", f'[provider.openai]\napi_key = ["{KEY}"]\n')
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(path)
    assert KEY not in str(err.value) and "api_key: expected a string" in str(err.value)


@pytest.mark.parametrize("name, header, value", [
    ("openai", "Authorization", f"Bearer {KEY}"), ("openrouter", "Authorization", f"Bearer {KEY}"),
    ("anthropic", "x-api-key", KEY), ("gemini", "x-goog-api-key", KEY)])
def test_request_headers_mask_the_key_in_repr(name, header, value):
    settings = omega.provider_settings({"provider": {name: {"api_key": KEY}}}, name)
    url, headers, body = omega.PROVIDERS[name].request(omega.Context("hi"), settings)
    assert not leaks(repr(headers)) and not leaks(str(headers))
    assert headers[header] == value                                  # still sent in full


ECHOES = {   # "@KEY@" becomes the key the request carried
    "error.code": ("openai", dict(status=400, body={"error": {
        "message": "bad key", "type": "invalid_request_error", "param": None, "code": "@KEY@"}})),
    "x-request-id": ("openai", dict(status=400, body=openai_error(400, "invalid_request_error"),
                                    headers={"x-request-id": "@KEY@"})),
    "body-request_id": ("anthropic", dict(status=400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad"}, "request_id": "@KEY@"})),
    "openrouter-metadata.raw": ("openrouter", dict(body={"error": {
        "code": 502, "message": "Provider returned error", "metadata": {
            "provider_name": "DeepInfra", "raw": "upstream: " + "u" * 275 + "@KEY@ rejected"}}})),
    "across-char-500": ("openai", dict(status=400, body=openai_error(
        400, "invalid_request_error", "x" * 485 + "@KEY@ is not a valid key"))),
}


# A variable no rule of omega's knows: only the key omega read from it can redact it.
UNIQUE_VAR, UNIQUE_KEY = "MY_UNIQUE_LLM_KEY", "my-unique-llm-key-3141592653589"


@pytest.mark.parametrize("source", ["api_key", "api_key_env"])
@pytest.mark.parametrize("where", list(ECHOES))
def test_a_key_echoed_back_never_shows(api, capsys, monkeypatch, where, source, cli_main):
    name, reply = ECHOES[where]
    config, key = cfg(name, api, max_retries=0), KEY
    if source == "api_key_env":                     # the key comes from $MY_UNIQUE_LLM_KEY
        assert UNIQUE_VAR not in omega.SECRET_ENV
        monkeypatch.setenv(UNIQUE_VAR, UNIQUE_KEY)
        del config["provider"][name]["api_key"]
        config["provider"][name]["api_key_env"], key = UNIQUE_VAR, UNIQUE_KEY
    api.default = lambda request: {**reply, "echo": True}
    with pytest.raises(omega.ProviderError) as err:
        omega.complete(omega.Context("hi"), name, config)
    assert sent_key(api.last().headers) == key          # the server did get it, and echoed it
    e = err.value
    for shown in (str(e), repr(e), e.code, e.request_id, e.message):
        assert not leaks(shown, key), shown
    assert "\n" not in str(e) and len(e.message) <= 500
    assert cli_main(config, "hi") == e.exit_code
    stderr = capsys.readouterr().err
    assert not leaks(stderr, key) and stderr.count("\n") == 1


OAUTH_TOKEN = "sk-ant-oat01-UNIQUE-oauth-2718281828"


@pytest.mark.parametrize("source", ["config", "environment"])
@pytest.mark.parametrize("step", [
    {"set": {"is_error": True, "result": "OAuth token @TOKEN@ has expired · Please run /login"}},
    {"set": {"subtype": "error_during_execution", "is_error": True, "result": None,
             "errors": ["request with @TOKEN@ failed"], "session_id": "s-@TOKEN@"}},
    {"raw": "", "exit": 1, "stderr": "fatal: CLAUDE_CODE_OAUTH_TOKEN=@TOKEN@ rejected\n"},
], ids=["json-result", "json-errors-and-session", "stderr"])
def test_claude_oauth_token_never_shows(claude, monkeypatch, capsys, cli_main, step, source):
    if source == "config":
        config = claude.config(oauth_token=OAUTH_TOKEN, max_resume_attempts=0)
    else:
        assert "CLAUDE_CODE_OAUTH_TOKEN" in omega.SECRET_ENV
        monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", OAUTH_TOKEN)
        config = claude.config(max_resume_attempts=0)
    claude.plan(step, step)
    with pytest.raises(omega.ProviderError) as err:
        omega.complete(omega.Context("hi"), config=config)
    assert claude.calls()[0]["env"]["CLAUDE_CODE_OAUTH_TOKEN"] == OAUTH_TOKEN   # it had it
    e = err.value
    for shown in (str(e), repr(e), e.message, e.session_id, e.args):
        assert not leaks(shown, OAUTH_TOKEN), shown
    assert cli_main(config, "hi") == e.exit_code
    assert not leaks(capsys.readouterr().err, OAUTH_TOKEN)


def test_claude_oauth_token_is_masked_wherever_settings_show(claude, capsys, monkeypatch,
                                                            cli_main):
    monkeypatch.setenv("OLLAMA_HOST", refused_url())
    config = claude.config(oauth_token=OAUTH_TOKEN)
    settings = omega.provider_settings(config, "claude-code")
    assert settings["oauth_token"] == OAUTH_TOKEN                   # still usable
    for shown in (repr(settings), str(settings), repr(omega.load_config(config))):
        assert not leaks(shown, OAUTH_TOKEN) and "'…1828'" in shown
    assert cli_main(config, "--check") == 0
    assert not leaks(capsys.readouterr().out, OAUTH_TOKEN)


# --- clean(): no forged lines, no terminal escapes, short --------------------

FORGED = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\nomega: all good\x1b[0m\x9b1m"


def control_chars(text):
    return [c for c in text or "" if ord(c) < 32 or 127 <= ord(c) < 160]


def test_server_text_cannot_forge_lines_or_send_terminal_escapes(api, capsys, cli_main):
    api.default = lambda request: {
        "status": 400, "headers": {"x-request-id": "req\x1b]52;c;eA==\x07"},
        "body": {"error": {"message": "bad " + FORGED, "type": "x", "param": None,
                           "code": "c" + FORGED}}}
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    e = err.value
    for shown in (str(e), e.message, e.code, e.request_id):
        assert control_chars(shown) == [], repr(shown)
    assert cli_main(cfg("openai", api), "hi") == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and control_chars(stderr) == ["\n"]


def test_claude_session_id_cannot_forge_lines_or_send_terminal_escapes(claude):
    claude.plan({"set": {"subtype": "error_max_turns", "is_error": True,
                         "session_id": "s-1" + FORGED}, "drop": ["result"]})
    with pytest.raises(omega.ProviderError) as err:
        cc(claude, max_resume_attempts=0)
    for shown in (str(err.value), err.value.message, err.value.session_id):
        assert control_chars(shown) == [], repr(shown)


@pytest.mark.parametrize("text, limit, short", [
    ("alpha beta gamma", 16, "alpha beta gamma"),
    ("alpha beta gamma", 15, "alpha beta…"),
    ("alpha beta gamma delta", 12, "alpha beta…"),
    ("alphabetagammadelta", 10, "alphabeta…"),
    ("a bcdefghijklmnop", 10, "a bcdefgh…"),        # no space in the second half: cut
])
def test_shorten_cuts_at_a_word_boundary(text, limit, short):
    assert omega.shorten(text, limit) == short and len(short) <= limit


# =============================================================================
# 4. Configuration
# =============================================================================

# --- where it comes from: files, the environment, defaults -------------------

def test_defaults_without_any_file():
    config = omega.load_config()
    assert config["_file"] is None
    assert config["provider"]["default"] == "claude-code"
    models = {n: config["provider"][n]["model"] for n in omega.NAMES}
    assert models == {"claude-code": "claude-sonnet-4-6", "ollama": "llama3", "openai": "gpt-4o",
                      "anthropic": "claude-sonnet-4-20250514",
                      "openrouter": "anthropic/claude-sonnet-4", "gemini": "gemini-2.0-flash"}
    assert config["provider"]["claude-code"]["model_complex"] == "claude-opus-4-6"
    assert config["provider"]["claude-code"]["timeout_secs"] == 3600
    assert config["provider"]["openai"]["timeout_secs"] == 600
    assert config["provider"]["anthropic"]["max_tokens"] == 8192
    assert config["omega"]["status"]["delay_secs"] == 15


@pytest.mark.parametrize("searched, env, explicit, expected", [
    (["missing", "beside", "home"], False, False, "beside"),
    (["missing", "home"], False, False, "home"),
    (["missing", "beside", "home"], True, False, "env"),
    (["missing", "beside", "home"], True, True, "explicit"),
], ids=["beside-before-home", "home-when-nothing-beside", "OMEGA_CONFIG-before-both",
        "explicit-before-OMEGA_CONFIG"])
def test_search_order(tmp_path, monkeypatch, searched, env, explicit, expected):
    files = {name: write(tmp_path / f"{name}.toml", f'[provider]\ndefault = "{provider}"\n')
             for name, provider in (("beside", "ollama"), ("home", "gemini"), ("env", "openai"),
                                    ("explicit", "anthropic"))}
    monkeypatch.setattr(omega, "config_paths",
                        lambda: [files.get(name, str(tmp_path / name)) for name in searched])
    if env:
        monkeypatch.setenv("OMEGA_CONFIG", files["env"])
    config = omega.load_config(files["explicit"] if explicit else None)
    assert config["_file"] == files[expected]
    assert config["provider"]["default"] == {"beside": "ollama", "home": "gemini",
                                             "env": "openai", "explicit": "anthropic"}[expected]


def test_default_paths_are_beside_the_module_and_in_home(tmp_path):
    # The real function, with HOME still the test's own (clean_env set it).
    assert REAL_CONFIG_PATHS() == [os.path.join(HERE, "config.toml"),
                                   os.path.join(str(tmp_path / "home"), ".omega", "config.toml")]


def test_explicit_missing_file_is_config_error(tmp_path, monkeypatch):
    with pytest.raises(omega.ConfigError, match="not found"):
        omega.load_config(str(tmp_path / "nope.toml"))
    monkeypatch.setenv("OMEGA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(omega.ConfigError, match="nope.toml"):
        omega.load_config()


@pytest.mark.parametrize("env, provider, expected", [
    ({"OMEGA_PROVIDER": "gemini"}, None, {"default": "gemini"}),
    ({"GOOGLE_API_KEY": "g-key-0123456789"}, "gemini",
     {"api_key": "g-key-0123456789", "source": "env GOOGLE_API_KEY"}),
    ({"GOOGLE_API_KEY": "g-key-0123456789", "GEMINI_API_KEY": "gem-key-0123456789"}, "gemini",
     {"api_key": "gem-key-0123456789", "source": "env GEMINI_API_KEY"}),
    # An env base URL comes with the env key (the SDKs' convention).
    ({"OPENAI_API_KEY": ENV_KEY, "OPENAI_BASE_URL": "http://proxy.local:9000/v1/"}, "openai",
     {"base_url": "http://proxy.local:9000/v1", "api_key": ENV_KEY,
      "source": "env OPENAI_API_KEY", "base_url_source": "env OPENAI_BASE_URL"}),
    ({"ANTHROPIC_API_KEY": ENV_KEY, "ANTHROPIC_BASE_URL": "http://gw.local:8080"}, "anthropic",
     {"base_url": "http://gw.local:8080", "api_key": ENV_KEY,
      "base_url_source": "env ANTHROPIC_BASE_URL"}),
    ({"OLLAMA_HOST": "gpu-box"}, "ollama",
     {"base_url": "http://gpu-box:11434", "base_url_source": "env OLLAMA_HOST"}),
], ids=["OMEGA_PROVIDER", "GOOGLE_API_KEY", "GEMINI_API_KEY-before-GOOGLE_API_KEY",
        "OPENAI_BASE_URL-with-OPENAI_API_KEY", "ANTHROPIC_BASE_URL-with-ANTHROPIC_API_KEY",
        "OLLAMA_HOST"])
def test_env_fallbacks_for_provider_keys_and_urls(monkeypatch, env, provider, expected):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    p = omega.load_config()["provider"]
    section = p[provider] if provider else {}
    seen = {"default": p["default"], "api_key": section.get("api_key"),
            "source": section.get("_sources", {}).get("api_key"),
            "base_url": section.get("base_url"),
            "base_url_source": section.get("_sources", {}).get("base_url")}
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("name, var", [("openai", "OPENAI_BASE_URL"),
                                       ("anthropic", "ANTHROPIC_BASE_URL"),
                                       ("ollama", "OLLAMA_HOST")])
def test_config_file_base_url_wins_over_the_environment(api, tmp_path, monkeypatch, name, var):
    """README, Configuration: "Resolution, highest first: command-line flag or keyword
    argument, config file, environment variable, built-in default"."""
    monkeypatch.setenv(var, refused_url())               # would fail at once if it were used
    path = write(tmp_path / "c.toml", toml_for(cfg(name, api)))
    api.reply(OK[name]())
    reply = omega.complete(omega.Context("hi"), name, path)
    assert reply.metadata.provider_used == name and len(api.requests) == 1
    config = omega.load_config(path)["provider"][name]
    expected = api.url + ("/v1" if name == "openai" else "")
    assert (config["base_url"], config["_sources"]["base_url"]) == (expected, "file")


@pytest.mark.parametrize("value, url", [
    ("gpu-box", "http://gpu-box:11434"), ("gpu-box:8080", "http://gpu-box:8080"),
    ("https://ollama.example.com", "https://ollama.example.com:11434"),
    ("http://10.0.0.2:11434/", "http://10.0.0.2:11434"), ("[::1]", "http://[::1]:11434"),
    ("[::1]:8080", "http://[::1]:8080"), ("h", "http://h:11434"), ("h:1234", "http://h:1234"),
    ("p", "http://p:11434"), ("t:80", "http://t:80")])
def test_ollama_host_gets_scheme_and_port(monkeypatch, value, url):
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert omega.provider_settings({}, "ollama")["base_url"] == url


def test_shipped_config_example_changes_nothing_and_documents_valid_keys():
    import re
    import tomllib
    text = open(os.path.join(HERE, "config.toml")).read()
    assert omega.load_config(os.path.join(HERE, "config.toml"))["provider"] == \
        omega.load_config({})["provider"]
    uncommented = tomllib.loads(re.sub(r"(?m)^# (\w+ = )", r"\1", text))
    omega.validate(uncommented, "config.toml")         # every documented key is a real key
    documented = {k for section in uncommented["provider"].values() if isinstance(section, dict)
                  for k in section}
    assert documented == {k for schema in omega.SCHEMA.values() for k in schema}


def test_a_host_applications_config_keeps_its_own_tables(api, tmp_path, monkeypatch):
    path = write(tmp_path / "config.toml", HOST_TABLES + f"""
[provider]
default = "ollama"

[provider.ollama]
base_url = "{api.url}"
max_retries = 10

[omega.status]
delay_secs = 0.1
repeat_secs = 0.1

[omega.log]
enabled = false
path = "omega-log.db"
""")
    assert omega.load_config(path)["provider"]["default"] == "ollama"
    api.reply(ollama_ok())
    assert omega.complete(omega.Context("hi"), config=path).text == "Hello from Ollama"
    monkeypatch.setattr(omega, "config_paths", lambda: [path])     # beside omega.py
    assert omega.load_config()["provider"]["default"] == "ollama"


@pytest.mark.parametrize("extra, fragment", [
    ("[provider]\ncolour = 1", "unknown key provider.colour"),
    ("[provider.openai]\ncolour = 1", "unknown key provider.openai.colour"),
    ("[omega.status]\ncolour = 1", "unknown key omega.status.colour"),
    ("[omega.log]\ncolour = 1", "unknown key omega.log.colour"),
    ('[omega.log]\nenabled = "yes"', "omega.log.enabled: expected true or false"),
    ("[omega.log]\npath = 1", "omega.log.path: expected a string"),
    ("provider = 1", "provider: expected a table"),
], ids=["provider", "provider-section", "status", "log", "log-enabled", "log-path",
        "provider-not-a-table"])
def test_omegas_own_tables_stay_strict_in_a_shared_file(tmp_path, extra, fragment):
    bad = write(tmp_path / "bad.toml", extra + "\n" + HOST_TABLES)
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(bad)
    assert fragment in str(err.value) and bad in str(err.value)


# --- validation: one line naming the file and the key ------------------------

@pytest.mark.parametrize("text, fragment", [
    ('[provider\ndefault = "x"', "malformed TOML"),
    ('[provider]\ndefault = "nope"', "provider.default: unknown provider 'nope'"),
    ('[provider.openai]\ncolour = "red"', "unknown key provider.openai.colour"),
    ('[provider.mystery]\nmodel = "x"', "unknown key provider.mystery"),
    ('[provider.openai]\ntimeout_secs = "ten"', "provider.openai.timeout_secs: expected a number"),
    ('[provider.openai]\ntimeout_secs = 0', "timeout_secs: expected a number greater than 0"),
    ('[provider.openai]\ntimeout_secs = -5', "greater than 0"),
    ('[provider.openai]\nmax_retries = true', "max_retries: expected an integer"),
    ('[provider.claude-code]\nallowed_tools = "Read"', "allowed_tools: expected a list"),
    ('[provider.claude-code]\nallowed_tools = [1]', "expected a list of strings"),
    ('[provider.ollama]\nbase_url = "localhost:11434"', "base_url: expected an http"),
    ('[provider]\nfallback = ["openai", "nope"]', "provider.fallback: unknown provider"),
    ('[omega.status]\ndelay_secs = "soon"', "omega.status.delay_secs: expected a number"),
    ('[provider]\ncolour = 1', "unknown key provider.colour"),
    ('[provider.anthropic]\nthinking = "auto"',
     'provider.anthropic.thinking: expected "enabled" or "adaptive"'),
    ('[provider.openai]\nthinking = "adaptive"', "unknown key provider.openai.thinking"),
])
def test_bad_config_is_one_line_config_error(tmp_path, text, fragment):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(path)
    message = str(err.value)
    assert fragment in message and path in message and "\n" not in message


def test_malformed_toml_names_the_line(tmp_path):
    path = write(tmp_path / "bad.toml", '[provider]\ndefault = "openai"\nmodel = \n')
    with pytest.raises(omega.ConfigError, match="line 3"):
        omega.load_config(path)


def test_toml_that_is_not_utf8_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[provider.openai]\nmodel = "caf\xe9"\n')
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, key", [
    ("[provider.openai]\nmax_retries = 11", "max_retries"),
    ("[provider.openai]\ntimeout_secs = nan", "timeout_secs"),
    ("[provider.claude-code]\ntimeout_secs = inf", "timeout_secs"),
    ("[provider.anthropic]\ntemperature = nan", "temperature"),
    ("[provider.claude-code]\nresume_delay_secs = inf", "resume_delay_secs"),
    ("[omega.status]\ndelay_secs = inf", "delay_secs"),
    ("[omega.status]\nrepeat_secs = 1e-9", "repeat_secs"),
    ("[omega.status]\ndelay_secs = 0.05", "delay_secs"),
])
def test_numbers_out_of_range_or_not_finite_are_config_errors(tmp_path, text, key):
    path = write(tmp_path / "c.toml", text + "\n")
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(path)
    message = str(err.value)
    assert key in message and path in message and "\n" not in message


def test_max_response_bytes_is_a_setting_of_every_provider(tmp_path):
    assert all(omega.load_config({})["provider"][n]["max_response_bytes"] == 32 * 1024 * 1024
               for n in omega.NAMES)
    text = "".join(f"[provider.{n}]\nmax_response_bytes = 65536\n" for n in omega.NAMES)
    config = omega.load_config(write(tmp_path / "ok.toml", text))
    assert all(config["provider"][n]["max_response_bytes"] == 65536 for n in omega.NAMES)


@pytest.mark.parametrize("bad, expected", [
    ("0", "expected a number greater than 0, got 0"),
    ("-1", "expected a number greater than 0, got -1"),
    ('"big"', "expected an integer, got str"), ("1.5", "expected an integer, got 1.5")])
def test_bad_max_response_bytes_is_config_error(tmp_path, bad, expected):
    path = write(tmp_path / "bad.toml", f"[provider.openai]\nmax_response_bytes = {bad}\n")
    with pytest.raises(omega.ConfigError, match="provider.openai.max_response_bytes: " +
                       re.escape(expected)):
        omega.load_config(path)


def test_empty_claude_command_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = write(tmp_path / "c.toml", '[provider.claude-code]\ncommand = ""\n')
    with pytest.raises(omega.ConfigError, match="command"):
        omega.complete(omega.Context("hi"), "claude-code", path)


def test_disabled_provider_is_config_error_naming_the_file(tmp_path):
    path = write(tmp_path / "c.toml", '[provider.openai]\nenabled = false\n')
    with pytest.raises(omega.ConfigError, match=r"c\.toml.*openai is disabled"):
        omega.complete(omega.Context("hi"), "openai", path)


def test_load_config_output_is_a_valid_config_and_hides_keys_in_repr(api):
    config = omega.load_config(cfg("openai", api))
    assert KEY not in repr(config) and KEY not in str(config)
    assert config["provider"]["openai"]["api_key"] == KEY         # still usable
    api.reply(openai_ok())
    assert omega.complete(omega.Context("hi"), config=config).text == "Hello from OpenAI"
    assert api.last().headers["authorization"] == f"Bearer {KEY}"


def test_omega_reads_its_own_tables_and_leaves_a_hosts_log_and_status_alone(api, tmp_path):
    path = write(tmp_path / "config.toml", HOST_TABLES + f"""
[omega.status]
delay_secs = 0.5

[omega.log]
enabled = false

[log]
level = "info"

[status]
code = 3

[provider]
default = "ollama"

[provider.ollama]
base_url = "{api.url}"
""")
    config = omega.load_config(path)
    assert config["omega"]["status"]["delay_secs"] == 0.5
    assert config["omega"]["log"] == {"enabled": False}
    api.reply(ollama_ok("hi"))
    assert omega.complete(omega.Context("hi"), config=path).text == "hi"
    for extra, fragment in (("[omega.log]\nlevel = 1", "unknown key omega.log.level"),
                            ("[omega.status]\ncode = 1", "unknown key omega.status.code"),
                            ("[omega]\nlog = 1", "omega.log: expected a table")):
        bad = write(tmp_path / "bad.toml", extra + "\n")
        with pytest.raises(omega.ConfigError) as err:
            omega.load_config(bad)
        assert fragment in str(err.value) and bad in str(err.value)


def test_check_points_out_tables_an_older_omega_read(tmp_path, capsys):
    old = write(tmp_path / "old.toml", '[log]\nenabled = false\npath = "x.db"\n'
                                       '[status]\ndelay_secs = 1\n')
    host = write(tmp_path / "host.toml", '[log]\nlevel = "info"\n[status]\ncode = 1\n')
    omega.check(old, print)
    lines = [line for line in capsys.readouterr().out.splitlines() if "omega reads" in line]
    assert lines == [f"note: omega reads [omega.status] and [omega.log] now; [status] and "
                     f"[log] in {old} are left to your application"]
    omega.check(host, print)
    assert "omega reads" not in capsys.readouterr().out


def test_a_config_beside_omega_that_sets_nothing_does_not_hide_the_home_one(tmp_path,
                                                                          monkeypatch):
    beside, home = tmp_path / "vendored" / "config.toml", tmp_path / "home" / ".omega"
    beside.parent.mkdir()
    shutil.copy(os.path.join(HERE, "config.toml"), beside)     # the shipped one: all comments
    home.mkdir(parents=True)
    (home / "config.toml").write_text('[provider]\ndefault = "openai"\n')
    monkeypatch.setattr(omega, "config_paths", lambda: [str(beside), str(home / "config.toml")])
    config = omega.load_config()
    assert (config["_file"], config["provider"]["default"]) == (str(home / "config.toml"),
                                                                "openai")
    beside.write_text('[provider]\ndefault = "ollama"\n')         # one that sets something
    config = omega.load_config()
    assert (config["_file"], config["provider"]["default"]) == (str(beside), "ollama")


def test_values_python_cannot_use_are_config_errors(api, tmp_path):
    config = cfg("openai", api)
    cases = [
        (lambda: omega.complete("hi", "openai", config, timeout=10 ** 400),
         "timeout: expected a number, got 1000"),
        (lambda: omega.Chat(history=[{"role": "bot"}]), "history entry 1: unknown role 'bot'"),
        (lambda: omega.Chat(history=[{"role": "user", "content": "a"}, {"role": "user"}]),
         "history entry 2: no content"),
        (lambda: omega.complete(omega.Context("hi", history=[{"role": "user"}]), "openai",
                                config), "history entry 1: no content"),
        (lambda: omega.ask("hi", "openai", config=config, history=[("user", "x")]),
         "history entry 1: expected a Message"),
        (lambda: omega.load_config(write(tmp_path / "big.toml", "[provider.openai]\n"
                                         f"timeout_secs = {10 ** 400}\n")),
         "provider.openai.timeout_secs: expected a number, got 1000"),
    ]
    for call, message in cases:
        with pytest.raises(omega.ConfigError) as err:
            call()
        assert message in str(err.value), err.value
    assert api.requests == []


@pytest.mark.parametrize("prices, message", [
    ('"gpt-4o" = [2.5]', 'provider.openai.prices."gpt-4o": expected [input, output]'),
    ('"gpt-4o" = [1, 2, 3, 4, 5]', "(2 to 4 numbers 0 or more), got [1, 2, 3, 4, 5]"),
    ('"gpt-4o" = [1, -2]', "got [1, -2]"),
    ('"gpt-4o" = [1, nan]', "got [1, nan]"),
    ('"gpt-4o" = ["1", "2"]', "got ['1', '2']"),
    ('"gpt-4o" = 3', "got 3"),
], ids=["one", "five", "negative", "nan", "text", "a-number"])
def test_prices_are_checked_strictly_naming_the_model(tmp_path, prices, message):
    path = write(tmp_path / "c.toml", f"[provider.openai.prices]\n{prices}\n")
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(path)
    assert message in str(err.value) and str(err.value).startswith(path)


def test_prices_take_two_to_four_numbers_for_any_provider(tmp_path):
    path = write(tmp_path / "c.toml", """
        [provider.openai.prices]
        "gpt-4o" = [2.5, 10]
        "gpt-4o-mini" = [0.15, 0.6, 0.075]
        [provider.anthropic]
        prices = { "claude-sonnet-4-20250514" = [3, 15, 0.3, 3.75] }
        [provider.claude-code.prices]
        sonnet = [0, 0]
        """)
    loaded = omega.load_config(path)["provider"]
    assert loaded["openai"]["prices"]["gpt-4o-mini"] == [0.15, 0.6, 0.075]
    assert loaded["anthropic"]["prices"] == {"claude-sonnet-4-20250514": [3, 15, 0.3, 3.75]}
    with pytest.raises(omega.ConfigError, match="provider.openai.prices: expected a table"):
        omega.load_config({"provider": {"openai": {"prices": [1, 2]}}})


@pytest.mark.parametrize("key, bad", [("max_turns", 0), ("max_tool_result_bytes", 0),
                                      ("max_tool_result_bytes", "big"), ("max_turns", 1.5)])
def test_the_tool_loops_keys_are_checked(key, bad):
    with pytest.raises(omega.ConfigError, match=f"provider.openai.{key}"):
        omega.load_config({"provider": {"openai": {key: bad}}})
    for name in ("ollama", "openai", "anthropic", "openrouter", "gemini"):
        assert (omega.DEFAULTS[name]["max_turns"],
                omega.DEFAULTS[name]["max_tool_result_bytes"]) == (10, 65536)


# --- keys --------------------------------------------------------------------

@pytest.mark.parametrize("name, section, sent", [
    ("openai", {}, None),                 # an OpenAI-compatible local server: none sent
    ("anthropic", {}, omega.AuthError),   # no key for it: an error before any request
    ("openai", {"api_key_env": "TOGETHER_API_KEY"}, "together-0123456789"),
], ids=["openai-sends-none", "anthropic-is-auth-error", "api_key_env-names-the-variable"])
def test_custom_base_url_in_file_never_gets_the_environment_key(monkeypatch, api, name,
                                                                 section, sent):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, ENV_KEY)
    monkeypatch.setenv("TOGETHER_API_KEY", "together-0123456789")
    api.default = lambda request: {"body": OK[name]()}
    config = {"provider": {name: {"base_url": api.url + ("/v1" if name == "openai" else ""),
                                  **section}}}
    if sent is omega.AuthError:
        with pytest.raises(omega.AuthError, match="api_key_env") as err:
            omega.complete(omega.Context("hi"), name, config)
        assert api.requests == [] and not leaks(str(err.value), ENV_KEY)
        return
    omega.complete(omega.Context("hi"), name, config)
    headers = api.last().headers
    assert ("authorization" not in headers) if sent is None else \
        headers["authorization"] == f"Bearer {sent}"


@pytest.mark.parametrize("name, url", [("openai", "https://api.openai.com/v1/"),
                                       ("anthropic", "https://api.anthropic.com")])
def test_the_official_base_url_written_out_still_gets_the_environment_key(monkeypatch, name, url):
    monkeypatch.setenv(omega.BACKENDS[name].key_env[0], ENV_KEY)
    settings = omega.provider_settings({"provider": {name: {"base_url": url}}}, name)
    assert settings["api_key"] == ENV_KEY


def test_empty_api_key_counts_as_unset(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    s = omega.provider_settings({"provider": {"openai": {"api_key": ""}}}, "openai")
    assert s["api_key"] == ENV_KEY and s["sources"]["api_key"] == "env OPENAI_API_KEY"


@pytest.mark.parametrize("name, var", [("openai", "OPENAI_API_KEY"),
                                       ("anthropic", "ANTHROPIC_API_KEY"),
                                       ("openrouter", "OPENROUTER_API_KEY"),
                                       ("gemini", "GEMINI_API_KEY")])
def test_missing_key_is_auth_error_before_any_request(name, var):
    with pytest.raises(omega.AuthError) as err:
        omega.complete(omega.Context("hi"), name, {})
    assert f"provider.{name}.api_key" in str(err.value) and var in str(err.value)


@pytest.mark.parametrize("name, section, env, sent", [
    ("openai", {"api_key": KEY + "\n"}, {}, KEY),                 # a key read from a file
    ("anthropic", {"api_key": f"\t{KEY} \r\n"}, {}, KEY),
    ("openai", None, {"OPENAI_API_KEY": f" {ENV_KEY}\n"}, ENV_KEY),
    ("gemini", None, {"GEMINI_API_KEY": f"{ENV_KEY}\r\n"}, ENV_KEY),
], ids=["file-newline", "file-tabs-and-crlf", "env-spaces", "env-crlf"])
def test_keys_are_stripped_of_surrounding_whitespace(api, monkeypatch, name, section, env, sent):
    api.default = lambda request: {"body": OK[name]()}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if section is None:              # the official base_url, but the fake server answers it
        monkeypatch.setenv("OPENAI_BASE_URL", api.url + "/v1")
        config = {"provider": {name: {}}}
        if name == "gemini":         # a base_url in the file gets only api_key_env's key
            config = {"provider": {name: {"base_url": api.url, "api_key_env": "GEMINI_API_KEY"}}}
        omega.complete(omega.Context("hi"), name, config)
    else:
        ask_via(name, api, **section)
    assert sent_key(api.last().headers) == sent


@pytest.mark.parametrize("name, section, env, setting", [
    ("openai", {"api_key": "sk-\x01" + KEY}, {}, "provider.openai.api_key"),
    ("openai", {}, {"OPENAI_API_KEY": ENV_KEY[:10] + "\n" + ENV_KEY[10:]}, "OPENAI_API_KEY"),
    ("anthropic", {"api_key": "sk-ключ-" + KEY}, {}, "provider.anthropic.api_key"),
    ("openrouter", {"title": "My ☕ App"}, {}, "provider.openrouter.title"),
    ("openrouter", {"referer": "https://a.example\r\nX-Evil: 1"}, {},
     "provider.openrouter.referer"),
    ("claude-code", {"oauth_token": "oauth-" + KEY + "\x1b"}, {},
     "provider.claude-code.oauth_token"),
], ids=["control-char-in-file-key", "newline-inside-env-key", "non-latin1-key", "title-emoji",
        "referer-crlf", "oauth-token-escape"])
def test_bad_character_in_a_key_or_header_is_config_error_naming_the_setting(
        api, claude, monkeypatch, name, section, env, setting):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("OPENAI_BASE_URL", api.url + "/v1")   # nothing can go far
    config = claude.config(**section) if name == "claude-code" else \
        {"provider": {name: {}}} if env else cfg(name, api, **section)
    with pytest.raises(omega.ConfigError) as err:
        omega.complete(omega.Context("hi"), name, config)
    message = str(err.value)
    assert setting in message and "\n" not in message
    assert not leaks(message) and not leaks(message, ENV_KEY) and not leaks(repr(err.value))
    assert api.requests == [] and claude.calls() == []


# =============================================================================
# 5. Attachments
# =============================================================================

def test_the_kind_comes_from_the_bytes_not_the_name(tmp_path):
    (tmp_path / "scan.png").write_bytes(PDF)              # a .png that is a PDF
    (tmp_path / "notes.md").write_bytes(b"\xef\xbb\xbf# Title\n")
    items = [str(tmp_path / "scan.png"), b"GIF89a" + bytes(10), b"\xff\xd8\xff\xe0" + bytes(10),
             omega.Attachment(b"RIFF\x10\x00\x00\x00WEBPVP8 ", mime="image/png"),
             tmp_path / "notes.md", omega.Attachment("a,b\n", mime="text/csv", name="t.csv"),
             bytearray(PNG)]
    settings = omega.provider_settings(cfg("openai", "http://h"), "openai")
    got = omega.attachments_of(omega.Context("x", attachments=items), settings)
    assert [(a.mime, a.name) for a in got] == [
        ("application/pdf", "scan.png"), ("image/gif", "attachment-2"),
        ("image/jpeg", "attachment-3"), ("image/webp", "attachment-4"),
        ("text/plain", "notes.md"), ("text/csv", "t.csv"), ("image/png", "attachment-7")]
    assert "bytes" in repr(got[0]) and "%PDF" not in repr(got[0])
    one = omega.Context("x", attachments=str(tmp_path / "scan.png"))      # one, not a list
    assert len(omega.attachments_of(one, settings)) == 1
    body = wire(omega.openai_request(omega.Context("x", attachments=got[:1] + got[4:5]),
                                     settings)[2])
    assert body["messages"][0]["content"][1]["file"] == {
        "filename": "scan.png", "file_data": "data:application/pdf;base64," + PDF_B64}
    assert body["messages"][0]["content"][2]["text"] == '<file name="notes.md">\n# Title\n</file>'


def test_what_cannot_be_sent_is_a_one_line_config_error_naming_the_file(api, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = [([tmp_path / "latin1.txt"], "latin1.txt: not an image (PNG, JPEG, GIF, WebP), a "
                                         "PDF or UTF-8 text, so omega cannot send it"),
             ([omega.Attachment(b"\x00\x01\x02", name="blob.bin")], "blob.bin: not an image"),
             ([omega.Attachment(b"hello", mime="image/png", name="fake.png")],
              "fake.png: said to be image/png, but its bytes are not"),
             ([str(tmp_path / "none.png")], f"attachment {tmp_path / 'none.png'}: no such file"),
             ([str(tmp_path)], f"attachment {tmp_path}: cannot read it"),
             ([42], "attachment 1: expected a file path, bytes or an Attachment, got int"),
             ([omega.Attachment(None)], "attachment 1: its data must be bytes, got NoneType")]
    for items, message in cases:
        with pytest.raises(omega.ConfigError) as err:
            omega.complete(omega.Context("x", attachments=items), "openai", cfg("openai", api))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert api.requests == []


def test_documented_limits_fail_before_any_request(api, monkeypatch):
    for name, size, limit in (("anthropic", 4 * 1024 * 1024, "an image as base64 may be at "
                                                              "most 5,242,880 bytes"),
                              ("openai", 21 * 1024 * 1024, "an image may be at most "
                                                           "20,971,520 bytes")):
        with pytest.raises(omega.ConfigError, match=f"{name}: cannot send photo.png: {limit}"):
            omega.complete(omega.Context("x", attachments=[omega.Attachment(
                PNG + bytes(size), name="photo.png")]), name, cfg(name, api))
    monkeypatch.setattr(omega, "MIB", 64)        # "megabytes" of 64 bytes: tiny files suffice
    gif = omega.Attachment(b"GIF89a" + bytes(10), name="anim.gif")
    big = omega.Attachment(PNG + bytes(400), name="big.png")
    cases = [
        ("anthropic", [big], "anthropic: cannot send big.png: an image as base64 may be at most "
                             "320 bytes, this is 632"),
        ("openai", [omega.Attachment(PNG + bytes(1300), name="huge.png")],
         "openai: cannot send huge.png: an image may be at most 1,280 bytes, this is 1,373"),
        ("openai", [big] * 8, "openai: cannot send big.png, big.png, big.png …: images may be "
                              "at most 3,200 bytes in one request, these are 3,784"),
        ("gemini", [gif], "gemini: cannot send anim.gif: Gemini takes PNG, JPEG and WebP "
                          "images, not GIF"),
        ("gemini", [omega.Attachment(PDF + bytes(3000), name="long.pdf")],
         "gemini: cannot send long.pdf: a PDF sent inline may be at most 3,200 bytes"),
        ("ollama", files("hello.pdf"), "ollama: cannot send hello.pdf: Ollama's /api/chat "
                                       "takes images and text files, not PDFs")]
    for name, items, message in cases:
        with pytest.raises(omega.ConfigError) as err:
            omega.complete(omega.Context("x", attachments=items), name, cfg(name, api))
        assert str(err.value).startswith(message), str(err.value)
    assert api.requests == []
    assert omega.complete(omega.Context("x", attachments=[big]), "openrouter",  # no limits there
                          cfg("openrouter", api.reply(openai_ok()))).text == "Hello from OpenAI"


def test_a_file_over_max_attachment_bytes_is_refused_before_it_is_read(api, tmp_path):
    huge = tmp_path / "huge.pdf"
    with open(huge, "wb") as f:
        f.truncate(20 * 1024 ** 3)          # 20 GB, sparse: reading it would take minutes
    started = time.monotonic()
    with pytest.raises(omega.ConfigError) as err:
        omega.complete(omega.Context("x", attachments=[huge]), "gemini", cfg("gemini", api))
    assert str(err.value).startswith(f"gemini: {huge} is 21,474,836,480 bytes, more than "
                                     "max_attachment_bytes (33,554,432)")
    assert time.monotonic() - started < 2
    with pytest.raises(omega.ConfigError, match=r"openai: hello.pdf is 387 bytes, more than "
                                                r"max_attachment_bytes \(100\)"):
        omega.complete(omega.Context("x", attachments=files("hello.pdf")), "openai",
                       cfg("openai", api, max_attachment_bytes=100))
    assert api.requests == []


def test_files_are_read_once_and_base64_written_once_per_request(api, api2, tmp_path,
                                                                monkeypatch):
    path = tmp_path / "red.png"
    path.write_bytes(PNG)
    reads, encodes = [], []
    real_read, real_b64 = omega.read_attachment, omega.binascii.b2a_base64
    monkeypatch.setattr(omega, "read_attachment", lambda *a: reads.append(a) or real_read(*a))
    monkeypatch.setattr(omega.binascii, "b2a_base64",
                        lambda *a, **k: encodes.append(1) or real_b64(*a, **k))
    for _ in range(3):
        api.reply(openai_error(503, "server_error"), status=503)
    api2.reply(anthropic_ok())
    config = cfg("openai", api)
    config["provider"].update(fallback=["anthropic"], anthropic={"base_url": api2.url,
                                                                 "api_key": KEY})
    reply = omega.complete(omega.Context('"x:0"', attachments=[path]), config=config)
    assert reply.metadata.provider_used == "anthropic"
    assert len(reads) == 1 and len(encodes) == 2          # three tries to openai, one encoding
    assert len({r.raw for r in api.requests}) == 1
    assert api.requests[0].body["messages"][0]["content"][0]["text"] == '"x:0"'
    assert api2.last().body["messages"][0]["content"][0]["source"]["data"] == PNG_B64
    # the payload holds the encoded bytes once, as bytes: never a JSON string of them
    pieces = omega.json_payload(omega.openai_request(
        omega.Context("x", attachments=[path]), omega.provider_settings(config, "openai"))[2])
    assert [p for p in pieces if PNG_B64.encode() in p] == [PNG_B64.encode()]


def test_an_attachment_that_is_not_a_regular_file_is_refused_unread(api, tmp_path, cli_main,
                                                                   capsys):
    fifo, sock = tmp_path / "pipe", tmp_path / "sock"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)        # a writer that never writes
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        for path, what in ((fifo, "a named pipe (FIFO)"), (sock, "a socket"),
                           ("/dev/zero", "a device")):
            outcome = bounded(lambda: cli_main(cfg("openai", api), "--timeout", "2",
                                               "-a", str(path), "hi"), within=10)
            err = capsys.readouterr().err
            assert outcome == {"value": 2} and err.count("\n") == 1, err
            assert err.startswith(f"omega: attachment {path}: cannot read it: it is {what}, "
                                  "not a regular file")
    finally:
        os.close(holder)
        server.close()
    assert api.requests == []


def test_error_lines_show_an_attachment_path_cleaned(api, tmp_path, cli_main, capsys):
    forged = str(tmp_path / "x\nomega: all good\x1b[32m")
    assert cli_main(cfg("openai", api), "-a", forged, "hi") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert err.endswith("x omega: all good : no such file\n") and api.requests == []


# =============================================================================
# 6. Transports
# =============================================================================

# --- HTTP: bodies ------------------------------------------------------------

def test_import_does_no_io_and_starts_no_thread():
    code = ("import sys, threading, os; before = dict(os.environ); import omega; "
            "assert threading.active_count() == 1; assert dict(os.environ) == before; "
            "assert 'requests' not in sys.modules and 'tomllib' not in sys.modules; "
            "import logging; assert not logging.getLogger().handlers; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


LONG_ANSWER = "a long answer " * 20000       # 280 kB: several READ_SIZE pieces


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("GZip ", gzip.compress),
    ("deflate", zlib.compress),                                       # zlib-wrapped (RFC)
    ("deflate", lambda data: (lambda c: c.compress(data) + c.flush())(
        zlib.compressobj(6, zlib.DEFLATED, -15))),                    # raw deflate
    ("identity", lambda data: data), ("", lambda data: data),
], ids=["gzip", "x-gzip", "gzip-case-and-space", "deflate-zlib", "deflate-raw", "identity",
        "empty"])
def test_compressed_answers_are_read(api, encoding, compress):
    api.reply(raw=compress(json.dumps(openai_ok(LONG_ANSWER)).encode()),
              headers={"Content-Encoding": encoding})
    assert ask_via("openai", api).text == LONG_ANSWER
    assert api.last().headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("encoding, raw, message", [
    ("gzip", b"\x1f\x8b\x08\x00 this is not gzip", "the server sent a broken gzip body"),
    ("deflate", b"\x78\x9c not deflate either", "the server sent a broken deflate body"),
    ("br", b"\x0b\x02\x80{}\x03", "the server sent a body in 'br' encoding, which omega "
                                "does not read (it asks for gzip or deflate)"),
], ids=["broken-gzip", "broken-deflate", "brotli"])
def test_undecodable_answers_are_provider_errors(api, encoding, raw, message):
    api.reply(raw=raw, headers={"Content-Encoding": encoding})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openai", api)
    assert type(err.value) is omega.ProviderError and err.value.message == message
    assert len(api.requests) == 1


@pytest.mark.parametrize("status", [200, 400])
def test_deeply_nested_json_is_a_provider_error(api, capsys, status, cli_main):
    api.default = lambda request: {"raw": b"[" * 100000, "status": status}
    with pytest.raises(omega.ProviderError):
        ask_via("openai", api, max_retries=0)
    assert cli_main(cfg("openai", api, max_retries=0), "hi") == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("omega: openai: ") and "internal error" not in stderr


# --- HTTP: connections that fail ---------------------------------------------

@pytest.mark.parametrize("name", HTTP_NAMES)
def test_closed_socket_is_retried(api, name):
    api.reply(action="close")
    api.reply(action="truncate", body=OK[name]())
    api.reply(OK[name]())
    assert ask_via(name, api).metadata.attempts == 3


def test_closed_socket_every_time_is_unavailable(api):
    for _ in range(3):
        api.reply(action="close")
    with pytest.raises(omega.ProviderUnavailable, match="connection closed"):
        ask_via("openai", api)
    assert len(api.requests) == 3


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_refused_port_is_unavailable(name):
    with pytest.raises(omega.ProviderUnavailable, match="connection refused"):
        ask_via(name, refused_url())


def test_unknown_host_is_unavailable():
    with pytest.raises(omega.ProviderUnavailable, match="host not found"):
        ask_via("ollama", "http://no-such-host.invalid:11434", max_retries=0)


# --- HTTP: retries wait 0.5 s x 2^n, at least 0.1 s, within the deadline -----

def test_backoff_grows_and_is_capped(api, monkeypatch):
    waits = []
    monkeypatch.setattr(omega.time, "sleep", waits.append)        # no real waiting
    monkeypatch.setattr(omega, "RETRY_BASE_SECS", REAL["RETRY_BASE_SECS"])
    for _ in range(8):
        api.reply({"error": "busy"}, status=503)
    with pytest.raises(omega.ProviderError):
        ask_via("ollama", api, max_retries=7)
    assert len(waits) == 7 and len(api.requests) == 8
    for wait, full in zip(waits, (0.5, 1, 2, 4, 8, 8, 8), strict=True):
        assert 0.75 * full <= wait <= full


@pytest.mark.parametrize("attempt, full", [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (6, 8),
                                           (10, 8)])
@pytest.mark.parametrize("bound", ["low", "high"])
def test_retry_wait_doubles_from_half_a_second_to_the_8_s_cap(monkeypatch, attempt, full, bound):
    """README: "0.5 s × 2ⁿ, capped at 8 s, times a random factor 0.75–1"."""
    monkeypatch.setattr(omega, "RETRY_BASE_SECS", REAL["RETRY_BASE_SECS"])
    asked = []

    def uniform(low, high):
        asked.append((low, high))
        return low if bound == "low" else high
    monkeypatch.setattr(omega.random, "uniform", uniform)
    error = omega.ProviderError("busy", "ollama", 503, retryable=True)
    wait = omega.retry_wait(error, attempt, {"name": "ollama", "max_retries": 10},
                            omega.Call.starting_now(3600))
    assert wait == pytest.approx(full * (0.75 if bound == "low" else 1))
    assert asked == [(0.75, 1)]


@pytest.mark.parametrize("retry_after, left, wait", [
    (None, 3600, 0.5), (0, 3600, 0.1), (0.05, 3600, 0.1), (60, 3600, 60), (61, 3600, None),
    (5, 4, None), (None, 0.4, None),
], ids=["backoff", "asks-0", "asks-less-than-0.1", "asks-60", "asks-61", "past-the-deadline",
        "backoff-past-the-deadline"])
def test_retry_wait_bounds(monkeypatch, retry_after, left, wait, real_retry_floor):
    monkeypatch.setattr(omega, "RETRY_BASE_SECS", REAL["RETRY_BASE_SECS"])
    monkeypatch.setattr(omega.random, "uniform", lambda low, high: high)
    error = omega.RateLimitError("slow down", "openai", 429, retry_after=retry_after,
                                 retryable=True)
    settings = {"name": "openai", "max_retries": 2}
    assert omega.retry_wait(error, 1, settings, omega.Call.starting_now(left)) == wait
    assert omega.retry_wait(error, 3, settings, omega.Call.starting_now(3600)) is None


def test_a_retry_waits_at_least_a_tenth_of_a_second(api, real_retry_floor):
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429,
              headers={"retry-after-ms": "0"})
    api.reply(openai_ok())
    statuses = []
    reply = omega.complete(omega.Context("hi"), "openai", cfg("openai", api),
                           on_status=statuses.append)
    assert reply.metadata.attempts == 2
    assert len(statuses) == 1 and "retrying in 0.1 s" in statuses[0]


def test_deadline_covers_retries_and_waits(api, monkeypatch):
    slept = []
    monkeypatch.setattr(omega.time, "sleep", slept.append)
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429, headers={"Retry-After": "5"})
    with pytest.raises(omega.RateLimitError):
        ask_via("openai", api, timeout_secs=1)
    assert slept == [] and len(api.requests) == 1       # a wait past the deadline is not taken


# --- HTTP: a 429's Retry-After pauses every thread's requests to that server --

def test_a_429_with_retry_after_pauses_every_worker_not_only_its_own(api):
    """Four map() workers: the first request gets a 429 asking for 0.2 s while the
    other three are in flight. Nothing reaches the server in those 0.2 s, from
    any worker; then every item is answered, the limited one after its retry."""
    lock, arrived, replied = threading.Lock(), [], {}
    all_four, paused = threading.Event(), threading.Event()

    def reply(request):
        with lock:
            arrived.append(time.monotonic())
            n = len(arrived)
        if n == 4:
            all_four.set()
        if n == 1:
            all_four.wait(10)               # the other three workers' requests are in
            replied["429"] = time.monotonic()
            return {"status": 429, "body": openai_error(429, "rate_limit_exceeded"),
                    "headers": {"retry-after-ms": "200"}}
        if n <= 4:
            paused.wait(10)                 # answered once the client knows of the pause
        return {"body": openai_ok(request.body["messages"][-1]["content"])}
    api.default = reply
    statuses = []

    def heard(message):
        statuses.append(message)
        paused.set()
    results = omega.map([f"p{n}" for n in range(8)], workers=4, provider="openai",
                        config=cfg("openai", api), on_status=heard)
    assert [r.text for r in results] == [f"p{n}" for n in range(8)]
    assert statuses == ["openai: 429, retrying in 0.2 s (2/3)"]
    later = arrived[4:]                     # each sent after the pause began
    assert len(later) == 5 and min(later) >= replied["429"] + 0.2


def test_a_pause_longer_than_the_deadline_fails_at_once_without_a_request(api):
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429,
              headers={"Retry-After": "0.3"})
    api.reply(openai_ok())
    other = {}

    def in_another_thread(message):       # while the first call waits out its 0.3 s
        def call():
            try:
                omega.complete("hi", "openai", cfg("openai", api), timeout=0.1)
            except omega.OmegaError as e:
                other["error"] = e
        thread = threading.Thread(target=call)
        thread.start()
        thread.join(10)
        other["requests"] = len(api.requests)
    reply = omega.complete("hi", "openai", cfg("openai", api), on_status=in_another_thread)
    assert reply.metadata.attempts == 2 and len(api.requests) == 2
    assert isinstance(other["error"], omega.RateLimitError) and other["requests"] == 1
    assert re.search(r"pause of 0\.\d s more \(Retry-After\), past this call's deadline",
                     str(other["error"]))


# --- HTTP: deadlines against stalls and trickles -----------------------------

def test_stall_past_the_deadline_is_provider_timeout(api):
    api.reply(action="stall")
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout, match="within 0.1 s"):
        ask_via("openai", api, timeout_secs=0.1)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("framing", ["length", "close", "chunked"],
                         ids=["content-length", "close-delimited", "chunked"])
def test_slow_body_cannot_stretch_the_deadline(api, framing):
    """Headers at once, then a byte every 0.05 s for 10 s: no single read waits longer
    than the 0.2 s timeout, so only the call's own deadline can stop it."""
    pieces = [(0, b'{"choices": ')] + [(0.05 * i, b" ") for i in range(1, 200)]
    api.reply(action="pieces", pieces=pieces, framing=framing, length=100000)
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout, match="within 0.2 s"):
        ask_via("openai", api, timeout_secs=0.2)
    assert time.monotonic() - started < 1.5
    assert len(api.requests) == 1


def test_trickled_status_line_and_headers_cannot_stretch_the_deadline(api):
    api.reply(action="trickle_head", body=openai_ok())      # ~15 s at 50 ms a byte
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout):
        ask_via("openai", api, timeout_secs=0.3)
    assert time.monotonic() - started < 2.5


def test_a_deadline_that_passes_while_connecting_sends_nothing(api, monkeypatch):
    """The deadline fires before the socket exists (a slow DNS answer here): the socket
    is shut as soon as it is handed over, and the watchdog keeps guarding later calls."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "slow-dns.test":          # answers once the call's deadline has fired
            watch, waited = omega.WATCHDOG.sending.watch, time.monotonic() + 5
            while not watch.fired and time.monotonic() < waited:
                time.sleep(0.01)
            host = "127.0.0.1"
        return real_getaddrinfo(host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    api.default = lambda request: {"body": openai_ok()}
    with pytest.raises(omega.ProviderTimeout):
        ask_via("openai", f"http://slow-dns.test:{api.server_address[1]}", timeout_secs=0.1)
    assert api.requests == []
    api.default = lambda request: {"action": "pieces", "framing": "length", "length": 1000,
                                   "pieces": [(0.05 * i, b" ") for i in range(200)]}
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout):
        ask_via("openai", api, timeout_secs=0.2)
    assert time.monotonic() - started < 1.5


def test_a_stream_the_collector_closes_leaves_other_requests_guarded(api, api2, monkeypatch):
    """Nothing of one request reaches another: a stream that the garbage collector
    finalises in the middle of another call (here, while that call resolves its host,
    before its socket exists) ends its own guard only. The call under way keeps its
    deadline, and the abandoned stream's connection is closed."""
    import gc
    api.reply(action="endless", framing="chunked", every=0.01,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("more"), done=False),
              headers={"Content-Type": "text/event-stream"})
    s = omega.stream("hi", "openai", cfg("openai", api))
    assert next(s) == "first"
    cycle = [s]
    cycle.append(cycle)                    # only the collector can free it now
    del s, cycle
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "collect-here.test":
            gc.collect()
            host = "127.0.0.1"
        return real_getaddrinfo(host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    api2.reply(action="pieces", framing="length", length=1000,
               pieces=[(0.05 * i, b" ") for i in range(200)])
    url = f"http://collect-here.test:{api2.server_address[1]}"
    outcome = bounded(lambda: ask_via("openai", url, timeout_secs=0.2), within=5)
    assert isinstance(outcome.get("error"), omega.ProviderTimeout), outcome
    deadline = time.monotonic() + 3
    while api.hangups == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.hangups == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_the_deadline_holds_mid_stream(api, framing):
    first = sse(oa_chunk("early"), done=False)
    api.reply(action="pieces", framing=framing, pieces=[(0, first)],
              headers={"Content-Type": "text/event-stream"})
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout) as err:
        stream_via("openai", api, timeout_secs=0.3)
    assert time.monotonic() - started < 1.5
    assert err.value.partial_text == "early"


def test_finished_requests_do_not_pile_up_in_the_watchdog(api):
    """Each call's deadline (600 s here) stays queued until it passes, unless the next
    call clears the finished ones: many calls must not grow the queue."""
    api.default = echo_default
    for i in range(20):
        ask_via("openai", api)
    with omega.WATCHDOG.lock:
        assert len(omega.WATCHDOG.queue) <= 2


# --- HTTP: endless bodies and gzip bombs stop at max_response_bytes ----------

@pytest.mark.parametrize("action", ["endless", "endless_close", "gzip_bomb"])
def test_endless_body_or_gzip_bomb_stops_at_the_default_cap(api, tmp_path, action):
    api.reply(action=action)
    out = subprocess.run([sys.executable, "-c", CAPPED_CHILD, HERE,
                          json.dumps(cfg("openai", api, timeout_secs=20))],
                         capture_output=True, text=True, timeout=60, env=cli_env(tmp_path))
    assert out.stdout, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["error"] == "ProviderError", result
    assert "answer larger than" in result["message"] and result["status"] is None  # not HTTP's
    assert len(api.requests) == 1                     # not retried
    assert result["peak_mb"] < 400, result            # about 32 MiB, not the whole body


@pytest.mark.parametrize("reply", [dict(body=openai_ok("x" * 5000)), dict(action="endless"),
                                   dict(action="endless_close")],
                         ids=["content-length", "chunked-endless", "close-delimited-endless"])
def test_body_over_max_response_bytes_is_a_provider_error_not_retried(api, reply):
    api.reply(**reply)
    with pytest.raises(omega.ProviderError, match="answer larger than") as err:
        ask_via("openai", api, max_response_bytes=1000)
    assert type(err.value) is omega.ProviderError and err.value.status is None
    assert len(api.requests) == 1


# --- HTTP: what is held stays a small multiple of the bytes read -------------

MiB = 1 << 20


def hostile_cases():
    """(what, max_response_bytes, server reply (claude-code: what its stdout holds),
    provider, streamed, with a file, expected error class or answer text): answers cut
    into millions of tiny pieces,
    each within max_response_bytes, that a reader which keeps a list of them turns
    into 15-50 x their size. The limits keep the line-by-line cases quick."""
    def objects(limit):
        return b"[" + b"{}," * (limit // 3 - 100) + b"{}]"
    streamed = {"action": "stream", "framing": "chunked", "most": 65536}
    sse_type = {"Content-Type": "text/event-stream"}
    return [
        ("SSE lines that are no field", 4 * MiB,
         dict(streamed, raw=b"12\n" * (4 * MiB // 3), headers=sse_type),
         "openai", True, False, "ProviderUnavailable"),
        ("an SSE event of tiny data lines", 8 * MiB,
         dict(streamed, raw=b"data:xy\n" * (8 * MiB // 8), headers=sse_type),
         "openai", True, False, "ProviderError"),
        ("an SSE event of tiny JSON objects", 8 * MiB,
         dict(streamed, raw=b"data: " + objects(8 * MiB) + b"\n\n", headers=sse_type),
         "openai", True, False, "ProviderError"),
        ("an NDJSON stream of tiny objects", 1 * MiB,
         dict(streamed, raw=b"{}\n" * (MiB // 3), headers={"Content-Type": "application/x-ndjson"}),
         "ollama", True, False, "ProviderUnavailable"),
        ("a JSON body of tiny objects", 8 * MiB, {"raw": objects(8 * MiB)}, "openai", False, False,
         "ProviderError"),
        ("claude stdout of tiny JSON lines, with a file", 1 * MiB, "lines", "claude-code",
         False, True, "still answered"),
        ("a claude stdout line of tiny JSON objects, with a file", 1 * MiB, "array",
         "claude-code", False, True, "ProviderError"),
    ]


def test_millions_of_tiny_pieces_cost_a_small_multiple_of_their_bytes(tmp_path):
    """Each case runs in a child of its own whose address space may grow by 4 x
    max_response_bytes (and 16 MiB) at most: a reader that holds a list of millions
    of small objects (15-50 x their bytes) dies there of MemoryError. The children
    run at once (each with a server of its own): most of their time is start-up."""
    script = tmp_path / "json-lines-claude"
    script.write_text(JSON_LINES_CLAUDE.replace("PYTHON", sys.executable))
    script.chmod(0o755)
    runs = []
    try:
        for what, limit, reply, name, streamed, with_file, expected in hostile_cases():
            api = serving()
            runs.append([what, expected, api, None])
            api.reply(openai_ok("warm"))
            if name == "claude-code":
                config = {"provider": {"default": name, name: {
                    "command": f"{script} {(limit - 1000) // 3} {reply}",
                    "max_response_bytes": limit}}}
            else:
                api.reply(**reply)
                config = cfg(name, api, max_response_bytes=limit, max_retries=0)
            case = {"provider": name, "config": config, "stream": streamed, "file": with_file,
                    "allowance": 4 * limit + 16 * MiB, "warm_up": cfg("openai", api)}
            runs[-1][3] = subprocess.Popen(
                [sys.executable, "-c", MEMORY_CHILD, HERE, json.dumps(case)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=cli_env(tmp_path, MALLOC_ARENA_MAX="1"))
        for what, expected, api, child in runs:
            out, err = child.communicate(timeout=60)
            assert out, (what, err[-2000:])
            outcome = json.loads(out)
            assert outcome.get("error", outcome.get("text")) == expected, (what, outcome)
            if expected == "ProviderError":
                assert "larger than" in outcome["message"] or "more objects than" in \
                    outcome["message"], (what, outcome)
    finally:
        for what, expected, api, child in runs:
            if child is not None:
                child.kill()
                child.communicate()
            stop_serving(api)


# --- HTTP: stream framing (SSE, NDJSON, chunked) -----------------------------

# The settings the framing readers take: a limit, and a name for their errors.
FRAMING = {"name": "openai", "max_response_bytes": 1 << 20}

# The framing traps: each body, cut at every possible place into two reads.
SSE_CASES = {
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"a", b"b"]),
    "cr-only": (b"data: a\r\rdata: b\r\r", [b"a", b"b"]),
    "comments-and-unknown-fields": (b": keep-alive\n\nid: 7\nretry: 5\ndata: a\n\nid: 8\n\n",
                                    [b"a"]),
    "multi-line-data": (b"data: {\"a\":\ndata: 1}\n\n", [b"{\"a\":\n1}"]),
    "no-space-after-colon": (b"data:a\n\n", [b"a"]),
    "no-final-blank-line": (b"data: a\n\ndata: [DONE]", [b"a", b"[DONE]"]),
    "utf8-and-u2028": ("data: \"é – \u2028 ✓\"\n\n".encode(), ["\"é – \u2028 ✓\"".encode()]),
    "bom": (b"\xef\xbb\xbfdata: a\n\n", [b"a"]),
    "event-names": (b"event: ping\ndata: {}\n\nevent: message_stop\ndata: x\n\n",
                    [b"{}", b"x"]),
    # field names that are not letters only are unknown fields too, not an error
    "unknown-fields-of-any-name": (b"keep-alive: 1\nx-request-id: 5\ndata: a\n\n", [b"a"]),
    # a field whose name begins with a space (a real OpenRouter stream): unknown
    "field-name-with-a-leading-space": (b' data: {"x": 1}\n\ndata: b\n\n', [b"b"]),
    # Gemini's bare JSON error object, indented or not, comes back whole
    "bare-json-object": (b'{\n  "error": {\n    "code": 499\n  }\n}\n\n',
                         [b'{\n  "error": {\n    "code": 499\n  }\n}']),
    "bare-json-array-indented": (b'  [{"error": 1}]\n\n', [b'  [{"error": 1}]']),
}


@pytest.mark.parametrize("case", sorted(SSE_CASES))
def test_sse_framing_survives_every_split(case):
    body, expected = SSE_CASES[case]
    for cut in range(len(body) + 1):
        events = list(omega.sse_events(iter([body[:cut], body[cut:]]), FRAMING))
        assert [data for _, data in events] == expected, cut
    singles = list(omega.sse_events(iter([body[i:i + 1] for i in range(len(body))]), FRAMING))
    assert [data for _, data in singles] == expected


@pytest.mark.parametrize("body, expected", [
    (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"a", b"b"]),
    (b"data: a\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n", [b"a\nb", b"c", b"d"]),
], ids=["crlf-events", "crlf-cr-lf-mixed"])
def test_sse_line_ends_survive_every_split_into_three_reads(body, expected):
    """A CR that ends one read and the LF that begins a later one (with an empty read
    between them, or not) are one line end: the events stay apart, lines stay whole."""
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            reads = [body[:i], body[i:j], body[j:]]
            events = [data for _, data in omega.sse_events(iter(reads), FRAMING)]
            assert events == expected, reads


def test_sse_ignores_lines_that_are_no_known_field_in_a_real_stream(api):
    """Unknown fields, whatever their name, and a line that begins with a space (the
    first line of a real OpenRouter stream) are ignored: the answer comes through."""
    body = (OPENROUTER_SPACED_LINE + b"\n\nkeep-alive: 1\nx-request-id: 5\n\n"
            + sse(oa_chunk("Hello"), oa_chunk(" there", finish="stop")))
    serve_stream(api, body)
    pieces, s = stream_via("openrouter", api)
    assert pieces == ["Hello", " there"] and s.reply.text == "Hello there"
    gemini = STREAM_BODIES["gemini/normal_with_usage.GE-FIX.sse"]
    serve_stream(api, b"x-request-id: 5\r\nkeep-alive: 1\r\n\r\n" + gemini)
    pieces, s = stream_via("gemini", api)
    assert s.reply.text == "The capital of Wyoming is **Cheyenne**.\n"


@pytest.mark.parametrize("framing", ["chunked", CLOSE_DELIMITED_LIVE])
def test_a_stream_piece_comes_as_soon_as_its_bytes_do(api, framing):
    body = sse(oa_chunk("first"), oa_chunk(" and the rest"), oa_chunk(finish="stop"))
    serve_stream(api, body, framing, hold_at=body.index(b"\n\n") + 2, most=1 << 20)
    s = omega.stream("hi", "openai", cfg("openai", api))
    assert bounded(lambda: next(s), within=5)["value"] == "first"     # the server holds the rest
    api.release.set()
    assert list(s) == [" and the rest"] and s.reply.text == "first and the rest"


def test_ndjson_lines_survive_every_split():
    body = b'{"a": 1}\r\n\n{"b": "\xc3\xa9"}\n{"c": 3}'
    for cut in range(len(body) + 1):
        lines = [json.loads(x) for x in omega.ndjson_lines(iter([body[:cut], body[cut:]]),
                                                           FRAMING)]
        assert lines == [{"a": 1}, {"b": "é"}, {"c": 3}]


@pytest.mark.parametrize("raw", [b"zz\r\ndata: x\r\n", b"-5\r\nhello\r\n"],
                         ids=["not-hex", "negative"])
def test_a_malformed_chunk_size_is_a_broken_connection(api, raw):
    serve_stream(api, raw, framing="raw", hold_at=len(raw), then="cut",
                 headers={"Transfer-Encoding": "chunked"})
    with pytest.raises(omega.ProviderUnavailable, match="connection closed"):
        stream_via("openai", api, max_retries=0)


# --- HTTP: TLS and proxies ---------------------------------------------------

@pytest.mark.parametrize("var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_https_with_the_ca_bundle_from_the_environment(tls_api, tls_cert, monkeypatch, var):
    monkeypatch.setenv(var, tls_cert[0])
    tls_api.reply(openai_ok("over TLS"))
    assert ask_via("openai", tls_api).text == "over TLS"
    assert tls_api.last().path == "/v1/chat/completions"


def test_https_with_an_untrusted_certificate_is_unavailable(tls_api):
    with pytest.raises(omega.ProviderUnavailable) as err:
        ask_via("openai", tls_api, max_retries=0)
    assert err.value.reason == "TLS error" and tls_api.requests == []


def test_https_slow_body_cannot_stretch_the_deadline(tls_api, tls_cert, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_cert[0])
    tls_api.reply(action="pieces", framing="length", length=1000,
                  pieces=[(0.05 * i, b" ") for i in range(200)])
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout):
        ask_via("openai", tls_api, timeout_secs=0.2)
    assert time.monotonic() - started < 1.5


def test_proxy_environment_is_honoured(api, monkeypatch):
    """HTTP_PROXY sends the request to the proxy (here: the fake server itself)."""
    api.reply(ollama_ok("via proxy"))
    monkeypatch.setenv("HTTP_PROXY", api.url)
    reply = ask_via("ollama", "http://model-host.example:11434")
    assert reply.text == "via proxy"
    assert api.last().path == "http://model-host.example:11434/api/chat"
    monkeypatch.setenv("NO_PROXY", "model-host.example")
    omega._local.__dict__.clear()
    with pytest.raises(omega.ProviderUnavailable):
        ask_via("ollama", "http://model-host.example:11434", max_retries=0)


def test_proxy_cannot_stretch_the_deadline_either(api, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", api.url)
    api.reply(action="pieces", framing="length", length=1000,
              pieces=[(0.05 * i, b" ") for i in range(200)])
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout):
        ask_via("ollama", "http://model-host.example:11434", timeout_secs=0.2)
    assert time.monotonic() - started < 1.5
    assert api.last().path == "http://model-host.example:11434/api/chat"


# --- HTTP: connection reuse and concurrency ----------------------------------

def echo_default(request):
    return {"body": openai_ok("echo " + request.body["messages"][-1]["content"])}


def test_sixteen_threads_get_their_own_answers(api):
    api.default = echo_default
    config = cfg("openai", api)
    answers, errors = {}, []

    def worker(i):
        try:
            for j in range(5):
                text = omega.complete(omega.Context(f"q{i}-{j}"), "openai", config).text
                answers[(i, j)] = text
        except Exception as e:            # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert answers == {(i, j): f"echo q{i}-{j}" for i in range(16) for j in range(5)}


def test_connections_are_reused(api):
    api.default = echo_default
    for i in range(10):
        ask_via("openai", api)
    assert len(api.requests) == 10 and api.connections == 1


# --- HTTP: requests ended early (close(), break, the garbage collector) -------

def test_abandoned_streams_never_hang_and_are_hung_up(tmp_path):
    """`for piece in omega.stream(...): break`, again and again, in one thread and in
    sixteen, with plain calls between, each stream left in a reference cycle of the
    caller's, while a garbage collection runs inside the connection pool's lock at
    every get and put (where one that closed an abandoned stream by handing its
    connection back to the pool would wait forever on its own thread's lock): nothing
    hangs, no collection returns a connection to a pool, and the server sees every
    abandoned stream's connection closed."""
    try:
        out = subprocess.run([sys.executable, "-c", COLLECTING_CHILD, HERE, "100"],
                             capture_output=True, text=True, timeout=60, env=cli_env(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("closing abandoned streams hung the program")
    assert out.stdout, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result == {"streams": 260, "hung_up": 260, "puts_in_gc": 0}, result


# --- processes: the claude process group -------------------------------------

def bounded(function, within):
    """function() in a thread: what it returned or raised, or an AssertionError once it
    has run for `within` seconds (a hung call fails the test instead of hanging it)."""
    box = {}

    def run():
        try:
            box["value"] = function()
        except BaseException as e:       # handed to the test
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s"
    return box


@pytest.fixture
def signals_sent(monkeypatch):
    """Every signal omega sends to a process group (not the 0 of a liveness probe)."""
    sent, real_killpg = [], os.killpg

    def killpg(pgid, sig):
        real_killpg(pgid, sig)
        if sig:
            sent.append(signal.Signals(sig).name)
    monkeypatch.setattr(os, "killpg", killpg)
    return sent


def test_claude_code_hang_kills_the_whole_group_at_the_deadline(claude, signals_sent):
    claude.plan({"hang": True})
    started = time.monotonic()
    outcome = bounded(lambda: cc(claude, timeout_secs=0.3), within=10)
    assert isinstance(outcome.get("error"), omega.ProviderTimeout), outcome
    assert "within 0.3 s" in str(outcome["error"]) and time.monotonic() - started < 5
    pids = read_pids(claude.dir / "pids")
    try:
        assert gone(*pids) and signals_sent[0] == "SIGTERM"
    finally:
        kill_leftovers(*pids)


def test_claude_that_ignores_sigterm_gets_sigkill(claude, signals_sent, monkeypatch):
    monkeypatch.setattr(omega, "KILL_GRACE_SECS", 0.2)
    claude.plan({"hang": True, "ignore_term": True})
    started = time.monotonic()
    outcome = bounded(lambda: cc(claude, timeout_secs=0.3), within=10)
    pids = read_pids(claude.dir / "pids")
    try:
        assert isinstance(outcome.get("error"), omega.ProviderTimeout), outcome
        assert signals_sent == ["SIGTERM", "SIGKILL"]
        assert gone(*pids, within=1)                  # the child and its grandchild
        assert time.monotonic() - started < 5          # deadline 0.3 s + grace 0.2 s
    finally:
        kill_leftovers(*pids)


def test_claude_gets_its_grace_period_to_exit_cleanly(claude, signals_sent):
    claude.plan({"hang": True, "term_cleanup": 0.2})
    outcome = bounded(lambda: cc(claude, timeout_secs=0.3), within=10)
    pids = read_pids(claude.dir / "pids")
    try:
        assert isinstance(outcome.get("error"), omega.ProviderTimeout), outcome
        assert (claude.dir / "cleaned").exists()       # not killed in the middle of it
        assert signals_sent[0] == "SIGTERM" and gone(*pids)
    finally:
        kill_leftovers(*pids)


def test_claude_child_that_exits_while_a_grandchild_holds_stdout(claude):
    claude.plan({"linger": True, "result": "the answer"})
    try:
        reply = cc(claude, timeout_secs=8)
        returned = time.time()
        assert reply.text == "the answer"
        # Once the CLI has exited, nothing waits on the pipe the grandchild holds open
        # (that takes ~0.1 s; a 1 s wait for more output would be a regression).
        assert returned - float((claude.dir / "exited").read_text()) < 0.8
        assert gone(*read_pids(claude.dir / "pids"))
    finally:
        kill_leftovers(*read_pids(claude.dir / "pids"))


def test_closing_a_claude_stream_stops_the_process_group(claude):
    claude.plan({"lines": [{"start": "A"}, {"delta": "first"}, "HANG"]})
    s = omega.stream("hi", "claude-code", claude.config())
    assert next(s) == "first"
    deadline = time.monotonic() + 5
    while not (claude.dir / "pids").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = [int(p) for p in (claude.dir / "pids").read_text().split()]
    s.close()
    for pid in pids:
        assert not alive(pid)


def test_claude_that_stops_reading_its_prompt_costs_no_cpu(claude, tmp_path):
    """omega stops writing at the first EPIPE; it does not spin on a dead pipe while
    the CLI works (0.5 s here)."""
    script = tmp_path / "closes-stdin"
    script.write_text(CLOSES_STDIN.replace("PYTHON", sys.executable))
    script.chmod(0o755)
    cpu = time.process_time()
    reply = cc(claude, omega.Context("x" * (1024 * 1024)), command=str(script))
    assert reply.text == "answered without reading"
    assert time.process_time() - cpu < 0.25


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_claude_output_over_max_response_bytes_is_a_provider_error(claude, stream):
    claude.plan({"flood": 4 << 20, "to": stream})
    with pytest.raises(omega.ProviderError, match="answer larger than"):
        cc(claude, max_response_bytes=65536, timeout_secs=20)


def test_claude_ignoring_sigterm_ends_within_a_second_of_the_deadline(claude, monkeypatch):
    monkeypatch.setattr(omega, "KILL_GRACE_SECS", REAL["KILL_GRACE_SECS"])    # 2 s, not 0.5
    claude.plan({"hang": True, "ignore_term": True})
    started = time.monotonic()
    outcome = bounded(lambda: cc(claude, timeout_secs=0.5), within=15)
    took = time.monotonic() - started
    pids = read_pids(claude.dir / "pids")
    try:
        assert isinstance(outcome.get("error"), omega.ProviderTimeout), outcome
        assert took < 1.5, took                                # the deadline + 1 s
        assert gone(*pids, within=1)
    finally:
        kill_leftovers(*pids)


# =============================================================================
# 7. Backends
# =============================================================================

# --- every HTTP backend ------------------------------------------------------

CTX = omega.Context("What is 2+2?", system_prompt="Be brief",
                    history=[omega.Message("user", "Hi"), omega.Message("assistant", "Hello")],
                    max_tokens=50, temperature=0.3)


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_unset_limits_are_left_out(api, name):
    api.reply(OK[name]())
    ask_via(name, api, omega.Context("hi"))
    body = api.last().body
    flat = json.dumps(body)
    assert "temperature" not in flat and "num_predict" not in flat
    assert "maxOutputTokens" not in flat and "max_completion_tokens" not in flat
    assert ("max_tokens" in body) == (name == "anthropic")


@pytest.mark.parametrize("ctx, section, model", [
    (omega.Context("hi", model="gpt-4.1-mini", complex=True), {"model_complex": "o3"},
     "gpt-4.1-mini"),
    (omega.Context("hi", complex=True), {"model_complex": "o3"}, "o3"),
    (omega.Context("hi", complex=True), {}, "gpt-4o"),
    (omega.Context("hi"), {"model_complex": "o3", "model": "gpt-4.1"}, "gpt-4.1"),
], ids=["request-model-wins", "complex-picks-model_complex", "complex-without-model_complex",
        "simple-picks-model"])
def test_model_override_and_complex_model(api, ctx, section, model):
    api.reply(openai_ok())
    ask_via("openai", api, ctx, **section)
    assert api.last().body["model"] == model


def test_base_url_without_a_host_is_config_error():
    with pytest.raises(omega.ConfigError, match="invalid base_url"):
        ask_via("ollama", "http://")


def test_trailing_slash_on_base_url_is_ignored(api):
    api.reply(ollama_ok())
    ask_via("ollama", api, base_url=api.url + "/")
    assert api.last().path == "/api/chat"


@pytest.mark.parametrize("name, body", [
    ("openai", openai_ok(choices=[{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": 42}}])),
    ("anthropic", anthropic_ok({"type": "text", "text": ["a"]})),
    ("gemini", gemini_ok({"text": {"a": 1}})),
    ("ollama", ollama_ok(message={"role": "assistant", "content": {"a": 1}})),
], ids=["openai", "anthropic", "gemini", "ollama"])
def test_answer_text_that_is_not_a_string_is_a_provider_error(api, name, body):
    api.reply(body)
    with pytest.raises(omega.ProviderError) as err:
        ask_via(name, api)
    assert type(err.value) is omega.ProviderError and "expected shape" in str(err.value)


CACHE_USAGE = {
    "openai": openai_ok(usage={"prompt_tokens": 1200, "completion_tokens": 5,
                               "prompt_tokens_details": {"cached_tokens": 1024}}),
    "openrouter": openai_ok(usage={"prompt_tokens": 1200, "completion_tokens": 5, "cost": 0.001,
                                   "prompt_tokens_details": {"cached_tokens": 1000,
                                                             "cache_write_tokens": 150}}),
    "anthropic": anthropic_ok(usage={"input_tokens": 10, "cache_creation_input_tokens": 100,
                                     "cache_read_input_tokens": 1000, "output_tokens": 4}),
    "gemini": gemini_ok(usage={"promptTokenCount": 1200, "cachedContentTokenCount": 1024,
                               "candidatesTokenCount": 3}),
}


@pytest.mark.parametrize("name, body, counts", [
    ("openai", CACHE_USAGE["openai"], (1200, 1024, None)),
    ("openai", openai_ok(), (12, None, None)),
    ("openrouter", CACHE_USAGE["openrouter"], (1200, 1000, 150)),
    ("anthropic", CACHE_USAGE["anthropic"], (1110, 1000, 100)),
    ("anthropic", anthropic_ok(), (10, None, None)),
    ("gemini", CACHE_USAGE["gemini"], (1200, 1024, None)),
    ("gemini", gemini_ok(), (8, 0, None)),
    ("gemini", gemini_ok(usage={}), (None, None, None)),
    ("ollama", ollama_ok(), (7, None, None)),
], ids=["openai", "openai-unsaid", "openrouter", "anthropic", "anthropic-unsaid", "gemini",
        "gemini-zero-left-out", "gemini-no-usage", "ollama"])
def test_cache_reads_and_writes_as_each_backend_says_them(api, name, body, counts):
    """Inside input_tokens, as each API counts them; None where it does not say."""
    api.reply(body)
    m = ask_via(name, api).metadata
    assert (m.input_tokens, m.cache_read_tokens, m.cache_write_tokens) == counts


def test_cache_counts_of_streamed_answers(api):
    usage = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
             "usage": CACHE_USAGE["openai"]["usage"]}
    serve_stream(api, sse(oa_chunk("Hi"), oa_chunk(finish="stop"), usage))
    m = stream_via("openai", api)[1].reply.metadata
    assert (m.input_tokens, m.cache_read_tokens, m.cache_write_tokens) == (1200, 1024, None)

    def event(kind, **data):
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
    serve_stream(api, b"".join([
        event("message_start", message={"id": "m", "model": "claude-sonnet-4-20250514",
                                        "usage": CACHE_USAGE["anthropic"]["usage"]}),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 9}),
        event("message_stop")]))
    m = stream_via("anthropic", api)[1].reply.metadata
    assert (m.input_tokens, m.output_tokens, m.cache_read_tokens, m.cache_write_tokens) == \
        (1110, 9, 1000, 100)


# --- every HTTP backend, streamed --------------------------------------------

# What each of STREAM_BODIES (Test data) must give: (pieces, text or None, (input, output,
# stop, cost) or the error class, its status and whether it may be retried).
STREAM_EXPECTED = {
    "openai/normal.sse": (["Hello", "!", " How can I help?"], "Hello! How can I help?",
                          (None, None, "stop", None)),
    "openai/usage.sse": (["Hello", "!", " How can I help?"], "Hello! How can I help?",
                         (19, 9, "stop", None)),
    "openai/refusal.sse": (["I'm sorry, I can't help with that."],
                           "I'm sorry, I can't help with that.", (None, None, "refusal", None)),
    "openai/error_midstream.sse": (["The answer", " is"], None, (omega.ProviderError, 500, True)),
    "openrouter/normal_usage_cost.sse": (["Hello", "!", " How can I help?"],
                                         "Hello! How can I help?", (13, 9, "stop", 7.35e-06)),
    "openrouter/error_midstream.sse": (["The answer", " is"], None,
                                       (omega.ProviderError, 502, True)),
    "anthropic/normal_docs_example.sse": (["Hello", "!"], "Hello!", (25, 15, "end_turn", None)),
    "anthropic/thinking_docs_example.sse": (
        ["The greatest common divisor of 1071 and 462 is **21**."],
        "The greatest common divisor of 1071 and 462 is **21**.", (None, None, "end_turn", None)),
    "anthropic/refusal.sse": (["Hello.."], "Hello..", (472, 4, "refusal", None)),
    "anthropic/error_midstream_overloaded.sse": (["The answer"], None,
                                                 (omega.ProviderError, 529, True)),
    "gemini/normal_with_usage.GE-FIX.sse": (
        ["The", " capital of Wyoming", " is **Cheyenne**.\n"],
        "The capital of Wyoming is **Cheyenne**.\n", (7, 10, "STOP", None)),
    "gemini/thinking_thought_parts.GE-FIX.sse": (
        ["The sky is blue because tiny gas molecules in Earth's atmosphere scatter blue light "
         "from the sun more efficiently than other colors.",
         " Blue light has shorter, smaller wavelengths, causing it to be scattered in all "
         "directions, making the sky appear blue to our eyes."], None, (10, 588, "STOP", None)),
    "gemini/blocked_prompt.GE-FIX.sse": ([], None, (omega.EmptyResponse, None, False)),
    "gemini/error_midstream.GE-FIX.sse": (["First ", "Second "], None,
                                          (omega.ProviderError, 499, False)),
    "ollama/normal_with_usage.ndjson": (["The", " sky", " is blue."], "The sky is blue.",
                                        (26, 282, "stop", None)),
    "ollama/error_midstream.ndjson": ([" Yes", "."], None, (omega.ProviderError, 500, True)),
}


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize("fixture", sorted(STREAM_EXPECTED))
def test_stream_bodies_in_random_slices(api, fixture, framing):
    name = fixture.split("/")[0]
    pieces, text, outcome = STREAM_EXPECTED[fixture]
    text = text or "".join(pieces)
    body = STREAM_BODIES[fixture]
    for seed, most in ((1, 1), (2, 7), (3, 4096)):          # byte by byte, small, whole
        serve_stream(api, body, framing, seed, most)
        got = []
        s = omega.stream("hi", name, cfg(name, api, max_retries=0))
        if isinstance(outcome[0], type):
            with pytest.raises(outcome[0]) as err:
                for piece in s:
                    got.append(piece)
            assert type(err.value) is outcome[0]
            assert (err.value.status, err.value.retryable) == outcome[1:]
            assert err.value.partial_text == ("".join(pieces) or None)
            assert s.reply is None
        else:
            got = list(s)
            m = s.reply.metadata
            assert s.reply.text == text == s.text
            assert (m.input_tokens, m.output_tokens, m.stop_reason, m.cost_usd) == outcome
            assert (m.provider_used, m.attempts) == (name, 1)
            assert s.reasoning == s.reply.reasoning       # the thinking, never among the pieces
            assert bool(s.reasoning) == ("thinking" in fixture), s.reasoning
        assert got == pieces


@pytest.mark.parametrize("name, status, body, error", [
    ("openai", 429, {"error": {"message": "Rate limit reached for gpt-4o in organization "
                               "org-xxxx on tokens per min (TPM): Limit 30000, Used 29123, "
                               "Requested 1243. Please try again in 2.502s.", "type": "tokens",
                               "param": None, "code": "rate_limit_exceeded"}},
     omega.RateLimitError),
    ("ollama", 404, {"error": "model 'llama9' not found"}, omega.ProviderError),
], ids=["openai-429", "ollama-404"])
def test_errors_before_the_stream_are_http_errors(api, name, status, body, error):
    api.reply(body, status=status)
    with pytest.raises(error) as err:
        stream_via(name, api, max_retries=0)
    assert err.value.status == status and err.value.partial_text is None
    assert (body["error"] if name == "ollama" else "Rate limit reached") in str(err.value)


def test_stream_requests_say_stream_in_each_apis_way(api):
    bodies = {"openai": sse(oa_chunk("a"), oa_chunk(finish="stop")),
              "openrouter": sse(oa_chunk("a"), oa_chunk(finish="stop")),
              "anthropic": STREAM_BODIES["anthropic/normal_docs_example.sse"],
              "gemini": STREAM_BODIES["gemini/normal_with_usage.GE-FIX.sse"],
              "ollama": STREAM_BODIES["ollama/normal_with_usage.ndjson"]}
    for name, body in bodies.items():
        serve_stream(api, body)
        stream_via(name, api)
        sent = api.last()
        assert sent.headers["accept-encoding"] == "identity"
        if name == "gemini":
            assert sent.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
            assert "stream" not in sent.body
        else:
            assert sent.body["stream"] is True
        if name in ("openai", "openrouter"):
            assert sent.body["stream_options"] == {"include_usage": True}
    serve_stream(api, bodies["openai"])
    stream_via("openai", api, stream_usage=False)             # a server that rejects it
    assert "stream_options" not in api.last().body and api.last().body["stream"] is True


def test_stream_reply_equals_what_complete_returns(api):
    serve_stream(api, STREAM_BODIES["anthropic/normal_docs_example.sse"],
                 headers={"Content-Type": "text/event-stream", "request-id": "req_9"})
    _, s = stream_via("anthropic", api)
    api.reply(anthropic_ok({"type": "text", "text": "Hello!"}, stop="end_turn",
                           usage={"input_tokens": 25, "output_tokens": 15}),
              headers={"request-id": "req_9"})
    whole = omega.complete("hi", "anthropic", cfg("anthropic", api))
    same = ("text", "provider_used", "input_tokens", "output_tokens", "tokens_used",
            "stop_reason", "request_id", "attempts", "fallbacks")
    streamed = {**s.reply.to_dict()["metadata"], "text": s.reply.text}
    complete = {**whole.to_dict()["metadata"], "text": whole.text}
    assert {k: streamed[k] for k in same} == {k: complete[k] for k in same}
    assert s.reply.metadata.model == "claude-opus-5"           # from message_start
    assert s.reply.metadata.processing_time_ms is not None


def test_stream_of_a_plain_json_answer_is_one_piece(api):
    api.reply(openai_ok("all at once"))                         # a gateway that does not stream
    pieces, s = stream_via("openai", api)
    assert pieces == ["all at once"] and s.reply.metadata.output_tokens == 5


def marked_stream(name):
    """An answer of a backend that has an end marker (Gemini's ends with its body)."""
    return {"openai": sse(oa_chunk("Hello"), oa_chunk("!", finish="stop")),
            "anthropic": STREAM_BODIES["anthropic/normal_docs_example.sse"],
            "ollama": STREAM_BODIES["ollama/normal_with_usage.ndjson"]}[name]


@pytest.mark.parametrize("framing", ["chunked", CLOSE_DELIMITED_LIVE])
@pytest.mark.parametrize("name", ["anthropic", "ollama", "openai"])
def test_reading_ends_at_the_end_marker(api, name, framing):
    """A server that holds the connection open after the end marker (no last chunk,
    no hang-up) neither delays nor loses the answer: that connection is closed
    instead of waited on, and the next call opens another."""
    kind = "ndjson" if name == "ollama" else "sse"
    api.reply(action="pieces", framing=framing, pieces=[(0, marked_stream(name))],
              headers={"Content-Type": STREAM_TYPES[kind]})
    outcome = bounded(lambda: stream_via(name, api, timeout_secs=20), within=5)
    pieces, s = outcome["value"]
    assert pieces and "".join(pieces) == s.reply.text and s.reply.metadata.attempts == 1
    api.reply(raw=marked_stream(name), headers={"Content-Type": STREAM_TYPES[kind]})
    assert stream_via(name, api)[1].reply.text == s.reply.text
    assert api.connections == 2


def test_a_stream_that_ends_with_its_body_keeps_the_connection(api):
    """The usual server: the body ends right after the end marker, and the connection
    goes back to the pool for the next call."""
    for _ in range(3):
        api.reply(raw=marked_stream("openai"), headers={"Content-Type": "text/event-stream"})
        assert stream_via("openai", api)[1].reply.text == "Hello!"
    assert api.connections == 1


# --- every HTTP backend: files and a schema, by the official OpenAPI specs ---

def test_each_backend_sends_files_and_schema_in_its_own_shape(api):
    sent = {}
    for name in HTTP_NAMES:
        api.reply(answer_of(name, ANSWER))
        names = ("red.png", "notes.txt") if name == "ollama" else ()
        reply = omega.complete(omega.Context(QUESTION, attachments=files(*names), schema=SCHEMA),
                               name, cfg(name, api))
        assert reply.data == {"colour": "red", "confidence": 0.97} and reply.text.strip()
        sent[name] = api.last().body
    for name in ("openai", "openrouter"):
        assert sent[name]["messages"] == [{"role": "user", "content": OPENAI_PARTS}]
        assert sent[name]["response_format"] == OPENAI_RESPONSE_FORMAT
    assert sent["openrouter"]["provider"] == {"require_parameters": True}
    assert "provider" not in sent["openai"] and "plugins" not in sent["openrouter"]
    assert sent["anthropic"]["messages"] == [
        {"role": "user", "content": [*ANTHROPIC_BLOCKS, {"type": "text", "text": QUESTION}]}]
    assert sent["anthropic"]["output_config"] == {"format": {"type": "json_schema",
                                                             "schema": SCHEMA}}
    assert sent["gemini"]["contents"] == [{"role": "user", "parts": GEMINI_PARTS}]
    assert sent["gemini"]["generationConfig"] == {"responseMimeType": "application/json",
                                                  "responseJsonSchema": SCHEMA}
    assert sent["ollama"]["messages"] == [OLLAMA_MESSAGE] and sent["ollama"]["format"] == SCHEMA
    assert sent["ollama"]["stream"] is False


def spec_errors(value, schema, spec, path="$"):
    """What is wrong with value against an OpenAPI schema fragment: $ref, type (one
    or a list; nullable), enum, minimum, maximum, maxLength, required, properties,
    additionalProperties, items, minItems, oneOf (exactly one), anyOf, allOf."""
    if "$ref" in schema:
        return spec_errors(value, spec[schema["$ref"].rsplit("/", 1)[1]], spec, path)
    if value is None and schema.get("nullable"):
        return []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(of_json_type(value, kind) for kind in kinds):
            return [f"{path}: expected {'/'.join(kinds)}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            errors.append(f"{path}: {value} out of range")
    if isinstance(value, str) and len(value) > schema.get("maxLength", math.inf):
        errors.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, dict):
        errors += [f"{path}: {key} missing" for key in schema.get("required", ())
                   if key not in value]
        listed, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if listed and key in listed:
                errors += spec_errors(item, listed[key], spec, f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += spec_errors(item, extra, spec, f"{path}.{key}")
            elif extra is False or extra is None and listed is not None:
                errors.append(f"{path}.{key}: not in the spec")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        for index, item in enumerate(value if "items" in schema else ()):
            errors += spec_errors(item, schema["items"], spec, f"{path}[{index}]")
    if "oneOf" in schema:
        fits = [s for s in schema["oneOf"] if not spec_errors(value, s, spec, path)]
        if len(fits) != 1:
            errors.append(f"{path}: fits {len(fits)} of the oneOf alternatives, not 1")
    if "anyOf" in schema and all(spec_errors(value, s, spec, path) for s in schema["anyOf"]):
        errors.append(f"{path}: fits none of the anyOf alternatives")
    for part in schema.get("allOf", ()):
        errors += spec_errors(value, part, spec, path)
    return errors


def of_json_type(value, kind):
    if kind in ("integer", "number"):
        return isinstance(value, int if kind == "integer" else (int, float)) \
            and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list,
                              "null": type(None)}[kind])


@pytest.mark.parametrize("name", ["ollama", "openai", "openrouter"])   # SPECS, in Test data
def test_bodies_with_files_and_schema_conform_to_the_official_openapi_spec(api, name):
    spec, root = SPECS[name]
    names = ("red.png", "notes.txt") if name == "ollama" else ()
    ctx = omega.Context(QUESTION, system_prompt="Be brief", attachments=files(*names),
                        history=[{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}],
                        schema=SCHEMA, max_tokens=100, temperature=0.2)
    api.reply(answer_of(name, ANSWER))
    omega.complete(ctx, name, cfg(name, api, num_ctx=4096) if name == "ollama" else
                   cfg(name, api))
    assert spec_errors(api.last().body, spec[root], spec) == []
    # earlier turns stay plain text: only the current message carries the files
    assert all(isinstance(m["content"], str) for m in api.last().body["messages"][:-1])
    settings = omega.provider_settings(cfg(name, api), name)
    streamed = wire(omega.BACKENDS[name].request(ctx, settings, streaming=True)[2])
    assert streamed["stream"] is True and spec_errors(streamed, spec[root], spec) == []


def test_the_spec_check_catches_wrong_shapes():
    good = wire(omega.openai_request(omega.Context("x", attachments=files("red.png")),
                                     omega.provider_settings(cfg("openai", "http://h"),
                                                             "openai"))[2])
    spec, root = SPECS["openai"]
    assert spec_errors(good, spec[root], spec) == []
    bad = json.loads(json.dumps(good))
    bad["messages"][0]["content"][1]["image_url"] = bad["messages"][0]["content"][1][
        "image_url"]["url"]                               # Ollama's OpenAI-compatible form
    bad["response_fromat"] = {"type": "json_object"}
    errors = spec_errors(bad, spec[root], spec)
    assert any("fits 0 of the oneOf" in e for e in errors)
    assert "$.response_fromat: not in the spec" in errors
    spec, root = SPECS["ollama"]
    assert spec_errors({"model": "m", "messages": [{"role": "user", "content": ["x"]}],
                        "format": "yaml"}, spec[root], spec) != []


def test_a_model_without_vision_gives_its_own_message_not_retried_not_fallen_back(api, api2):
    cases = [("ollama", 500, {"error": "Failed to create new sequence: failed to process "
                                       "inputs: this model is missing data required for image "
                                       "input"}),
             ("openai", 400, {"error": {"message": "Invalid content type. image_url is only "
                                                   "supported by certain models.",
                                        "type": "invalid_request_error",
                                        "param": "messages.[0].content.[1].type", "code": None}}),
             ("openrouter", 404, {"error": {"message": "No endpoints found that support image "
                                                       "input", "code": 404}})]
    for name, status, body in cases:
        api.requests.clear()
        api.reply(body, status=status)
        config = cfg(name, api)
        config["provider"].update(fallback=["anthropic"], anthropic={"base_url": api2.url,
                                                                     "api_key": KEY})
        with pytest.raises(omega.ProviderError) as err:
            omega.complete(omega.Context("What is it?", attachments=files("red.png")),
                           config=config)
        assert type(err.value) is omega.ProviderError and err.value.status == status
        assert "image" in err.value.message and not err.value.retryable
        assert len(api.requests) == 1 and api2.requests == []


# --- every backend: JSON answers ---------------------------------------------

def test_schemas_are_fitted_to_each_api_without_touching_the_callers():
    loose = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Colours",
             "type": "object", "properties": {"items": {"type": "array", "items": {
                 "type": "object", "properties": {"name": {"type": "string"}}}}}}
    before = json.dumps(loose)
    ctx = omega.Context("x", schema=loose)
    openai = omega.openai_request(ctx, omega.provider_settings(cfg("openai", "http://h"), "openai"))
    assert openai[2]["response_format"]["json_schema"] == {"name": "Colours", "schema": loose,
                                                           "strict": False}   # not strict-ready
    anthropic = omega.anthropic_request(ctx, omega.provider_settings(cfg("anthropic", "http://h"),
                                                                     "anthropic"))[2]
    fitted = anthropic["output_config"]["format"]["schema"]
    assert fitted["additionalProperties"] is False        # every object closed, as it requires
    assert fitted["properties"]["items"]["items"]["additionalProperties"] is False
    gemini = omega.gemini_request(ctx, omega.provider_settings(cfg("gemini", "http://h"),
                                                               "gemini"))[2]
    assert "$schema" not in gemini["generationConfig"]["responseJsonSchema"]
    assert json.dumps(loose) == before
    assert omega.strict_ready(SCHEMA) and not omega.strict_ready({"type": "array"})
    argv = omega.claude_code_argv(ctx, omega.provider_settings({}, "claude-code"), None)
    assert json.loads(argv[argv.index("--json-schema") + 1]) == loose


def test_bad_schemas_are_config_errors_before_anything_is_sent(api):
    for schema, words in [([{"type": "object"}], "expected a JSON Schema object, got list"),
                          ({"type": "nonsense"}, "unknown type 'nonsense'"),
                          ({"properties": {"a": {"type": "text"}}}, "unknown type 'text'"),
                          ({"type": "number", "maximum": math.inf}, "not JSON data")]:
        with pytest.raises(omega.ConfigError, match=re.escape(words)):
            omega.complete(omega.Context("x", schema=schema), "openai", cfg("openai", api))
    assert api.requests == []


def refused_openai():
    body = openai_ok(None)
    body["choices"][0]["message"]["refusal"] = "I'm sorry, I can't help with that request."
    return body


JSON_FAILURES = [
    ("openai", openai_ok("Sure! It is red."), omega.ProviderError, "the answer is not JSON"),
    ("openai", answer_of("openai", '{"colour": "re', "length"), omega.ProviderError,
     "the JSON answer was cut off (stop_reason=length)"),
    ("openai", openai_ok('["red"]'), omega.ProviderError,
     "the JSON answer is an array, the schema asks for object"),
    ("openai", refused_openai(), omega.EmptyResponse, "the model refused (stop_reason=refusal): "
                                                      "I'm sorry, I can't help"),
    ("openrouter", openai_ok("```json\n{}\n```"), omega.ProviderError, "the answer is not JSON"),
    ("anthropic", answer_of("anthropic", '{"colour":', "max_tokens"), omega.ProviderError,
     "cut off (stop_reason=max_tokens)"),
    ("anthropic", answer_of("anthropic", "I can't.", "refusal"), omega.EmptyResponse,
     "the model refused"),
    ("gemini", answer_of("gemini", '{"col', "MAX_TOKENS"), omega.ProviderError,
     "cut off (stop_reason=MAX_TOKENS)"),
    ("gemini", answer_of("gemini", "No.", "SAFETY"), omega.EmptyResponse, "the model refused"),
    ("ollama", answer_of("ollama", '{"colour"', "length"), omega.ProviderError,
     "cut off (stop_reason=length)"),
    ("ollama", answer_of("ollama", "NaN"), omega.ProviderError, "the answer is not JSON"),
]


def test_json_answer_failures_are_typed_and_never_retried(api):
    for name, body, error, words in JSON_FAILURES:
        api.requests.clear()
        api.reply(body)
        with pytest.raises(omega.ProviderError) as err:
            omega.complete(omega.Context("Colour?", schema=SCHEMA), name, cfg(name, api))
        assert type(err.value) is error and words in str(err.value), (name, str(err.value))
        assert str(err.value).startswith(f"{name}: ") and len(api.requests) == 1
        if error is omega.ProviderError:
            assert err.value.code == "invalid_json" and err.value.partial_text


def test_streamed_json_answer_with_a_file(api):
    pieces = ['{"colour":', ' "red", "confidence": 1}']
    serve_stream(api, sse(oa_chunk(pieces[0]), oa_chunk(pieces[1]), oa_chunk(finish="stop")))
    got, s = stream_via("openai", api, omega.Context("Colour?", attachments=files("red.png"),
                                                     schema=SCHEMA))
    assert got == pieces and s.reply.text == "".join(pieces)
    assert s.reply.data == {"colour": "red", "confidence": 1}
    assert api.last().body["stream"] is True
    assert api.last().body["messages"][0]["content"][1]["image_url"]["url"].endswith(PNG_B64)
    serve_stream(api, sse(oa_chunk('{"colour": "re'), oa_chunk(finish="length")))
    with pytest.raises(omega.ProviderError) as err:
        stream_via("openai", api, omega.Context("Colour?", schema=SCHEMA))
    assert err.value.code == "invalid_json" and err.value.partial_text == '{"colour": "re'


# --- every backend: model lists ----------------------------------------------

def test_models_lists_every_page_of_every_api(api, claude):
    def listed(name, *pages, **section):
        api.requests.clear()
        for page in pages:
            api.reply(page)
        return omega.models(name, cfg(name, api, **section)), [r.path for r in api.requests]
    assert listed("openai", {"object": "list", "data": [
        {"id": "gpt-4o", "object": "model", "created": 1, "owned_by": "openai"},
        {"id": "o3", "object": "model", "created": 2, "owned_by": "openai"}]}) == (
        ["gpt-4o", "o3"], ["/v1/models"])
    assert api.last().headers["authorization"] == f"Bearer {KEY}"
    assert listed("openrouter", {"data": [{"id": "openai/gpt-4o"}], "links": {
        "next": "/v1/models?offset=1"}}, {"data": [{"id": "x-ai/grok"}], "links": {
            "next": None}}) == (["openai/gpt-4o", "x-ai/grok"], ["/v1/models",
                                                                 "/v1/models?offset=1"])
    assert listed("anthropic", {"data": [{"id": "claude-a"}], "has_more": True,
                                "first_id": "claude-a", "last_id": "claude-a"},
                  {"data": [{"id": "claude-b"}], "has_more": False, "first_id": "claude-b",
                   "last_id": "claude-b"}) == (["claude-a", "claude-b"], [
                       "/v1/models?limit=1000", "/v1/models?limit=1000&after_id=claude-a"])
    assert listed("gemini", {"models": [
        {"name": "models/gemini-2.5-flash", "supportedGenerationMethods": ["generateContent"]},
        {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]}],
        "nextPageToken": "Ch5tb2Rl"}, {"models": [
            {"name": "models/gemini-2.5-pro", "supportedGenerationMethods": [
                "generateContent", "countTokens"]}]}) == (
        ["gemini-2.5-flash", "gemini-2.5-pro"],
        ["/v1beta/models?pageSize=1000", "/v1beta/models?pageSize=1000&pageToken=Ch5tb2Rl"])
    assert listed("ollama", {"models": [{"name": "gemma3:4b", "capabilities": ["vision"]},
                                        {"name": "llama3.2:latest"}]}) == (
        ["gemma3:4b", "llama3.2:latest"], ["/api/tags"])
    assert omega.models("claude-code", claude.config(model="claude-x")) == [
        "sonnet", "opus", "haiku", "claude-x", "claude-opus-4-6"]


def test_models_failures_are_typed_and_the_key_stays_home(api, api2):
    api.reply({"data": [{"id": "a"}], "links": {"next": api2.url + "/v1/models?offset=1"}})
    with pytest.raises(omega.ProviderError, match="next page is on another server"):
        omega.models("openrouter", cfg("openrouter", api))
    assert api2.requests == []
    api.reply(openai_error(401, "invalid_api_key"), status=401)
    with pytest.raises(omega.AuthError):
        omega.models("openai", cfg("openai", api))
    api.reply({"models": "none"})
    with pytest.raises(omega.ProviderError, match="expected shape"):
        omega.models("ollama", cfg("ollama", api))
    with pytest.raises(omega.AuthError, match="no API key"):
        omega.models("gemini", {"provider": {"gemini": {"base_url": api.url}}})


# --- every HTTP backend: tool calls, by recorded exchanges -------------------

# Each backend, complete and stream: round 1 is a recorded answer that asks for tools
# (Test data), round 2 must carry the first request with the model's turn exactly as it
# came and the results in the API's shape (the second-round request a correct client
# sends, recorded or built), then the answer. (round 1, its tools, what round 2 appends,
# the calls, round 1's (input, output, cost)).

def recorded_tool(name, result, parameters=None):
    """A tool named as in a recording, whose function gives the recorded result."""
    return omega.Tool(name, lambda **arguments: result, parameters=parameters or {
        "type": "object"})


def tool_round_trip(name, streaming):
    if name == "openai" and not streaming:
        calls = [("call_fdNz3vOBKYgOIpMdWotB9MjY", "GetWeatherArgs",
                  {"city": "Edinburgh", "country": "GB", "units": "c"},
                  "12 degrees c and rain in Edinburgh"),
                 ("call_h1DWI1POMJLb0KwIyQHWXD4p", "get_stock_price",
                  {"ticker": "AAPL", "exchange": "NASDAQ"}, '{"price": 227.52, "currency": "USD"}')]
        return (OPENAI_PARALLEL, [GetWeatherArgs, get_stock_price],
                OPENAI_ROUND2_PARALLEL["messages"][2:], calls, (149, 60, None))
    if name == "openai":
        ids = ("call_JMW1whyEaYG438VE1OIflxA2", "call_DNYTawLBoN8fj3KN6qU9N1Ou")
        appended = json.loads(json.dumps(OPENAI_ROUND2_PARALLEL["messages"][2:]))
        for call, result, id_ in zip(appended[0]["tool_calls"], appended[1:], ids):
            call["id"] = result["tool_call_id"] = id_
        return (OPENAI_STREAM_PARALLEL, [GetWeatherArgs, get_stock_price], appended,
                [(ids[0], "GetWeatherArgs", {"city": "Edinburgh", "country": "GB", "units": "c"},
                  "12 degrees c and rain in Edinburgh"),
                 (ids[1], "get_stock_price", {"ticker": "AAPL", "exchange": "NASDAQ"},
                  '{"price": 227.52, "currency": "USD"}')], (149, 60, None))
    if name == "openrouter" and not streaming:         # reasoning_details go back as they came
        return (OPENROUTER_REASONING_CALL,
                [recorded_tool("get_weather", "12 degrees celsius and rain")],
                OPENROUTER_ROUND2["messages"][1:],
                [("toolu_01ESed5hCdyBEf6xWqtpMKwH", "get_weather", {"city": "Paris"},
                  "12 degrees celsius and rain")], (610, 92, 0.00321))
    if name == "openrouter":                  # id and name repeated, no finish reason, no args
        return (OPENROUTER_STREAM_A, [llm_version],
                [{"role": "assistant", "content": None, "tool_calls": [
                    {"id": "0", "type": "function", "function": {"name": "llm_version",
                                                                 "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "0", "content": "0.27"}],
                [("0", "llm_version", {}, "0.27")], (57, 17, 7.159e-05))
    if name == "anthropic" and not streaming:
        result = ANTHROPIC_ROUND2["messages"][2]["content"][0]["content"]
        tool = recorded_tool("get_weather", result, ANTHROPIC_REQUEST_TOOLS["tools"][0]["input_schema"])
        appended = [{"role": "assistant", "content": ANTHROPIC_SINGLE_CALL["content"]},
                    ANTHROPIC_ROUND2["messages"][2]]
        assert appended == ANTHROPIC_ROUND2["messages"][1:]    # the SDK's keys, in its order
        return (ANTHROPIC_SINGLE_CALL, [tool], appended,
                [("toolu_016xm9m1i3NcGW5xFMMZJTqY", "get_weather",
                  {"location": "San Francisco, CA", "units": "f"}, result)], (656, 74, None))
    if name == "anthropic":                    # the thinking block and its signature go back
        turn = json.loads(json.dumps(ANTHROPIC_ROUND2_THINKING["messages"][1]))
        turn["content"][1]["caller"] = {"type": "direct"}      # llm-anthropic dropped it
        return (ANTHROPIC_STREAM_THINKING, [fixed_version],
                [turn, ANTHROPIC_ROUND2_THINKING["messages"][2]],
                [("toolu_01825dXWLSoJwCst1qTsiWdb", "fixed_version", {}, "0.32a0")],
                (598, 92, None))
    if name == "gemini" and not streaming:      # thoughtSignature on its part, finishReason STOP
        return (GEMINI_THINKING_CALL, [now], GEMINI_ROUND2["contents"][1:],
                [(None, "now", {}, "2025-10-26T09:00:00Z")], (38, 509, None))
    if name == "gemini":
        chunks = [json.loads(line[6:]) for line in GEMINI_STREAM.split(b"\n") if line]
        thoughts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks[:2]]
        return (GEMINI_STREAM.replace(b"\n", b"\r\n"), [now],
                [{"role": "model", "parts": [{"text": "".join(thoughts), "thought": True},
                                             chunks[2]["candidates"][0]["content"]["parts"][0]]},
                 {"role": "user", "parts": [{"functionResponse": {
                     "name": "now", "response": {"result": "2025-10-26T09:00:00Z"}}}]}],
                [(None, "now", {}, "2025-10-26T09:00:00Z")], (38, 174, None))
    if name == "ollama" and not streaming:       # ids, thinking, two calls
        results = [f"12 degrees celsius and rain in {city}" for city in ("Paris", "Tokyo")]
        return (OLLAMA_PARALLEL, [get_weather],
                [OLLAMA_PARALLEL["message"], *({"role": "tool", "content": result,
                                                 "tool_name": "get_weather", "tool_call_id": id_}
                                                for result, id_ in zip(results, ("call_k3v9x0qa",
                                                                                 "call_7m2pd4zt")))],
                [("call_k3v9x0qa", "get_weather", {"city": "Paris"}, results[0]),
                 ("call_7m2pd4zt", "get_weather", {"city": "Tokyo"}, results[1])], (182, 61, None))
    return (OLLAMA_STREAM, [get_weather],                                  # no ids
            [{"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
             {"role": "tool", "content": "12 degrees celsius and rain in Tokyo",
              "tool_name": "get_weather"}],
            [(None, "get_weather", {"city": "Tokyo"}, "12 degrees celsius and rain in Tokyo")],
            (169, 15, None))


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_a_tool_round_trip_sends_the_models_turn_as_it_came(api, name, streaming):
    first, tools, appended, calls, (tokens_in, tokens_out, cost) = \
        tool_round_trip(name, streaming)
    for seed, most in ((1, 1), (2, 7), (3, 4096)) if streaming else ((0, 0),):
        if streaming:
            serve_stream(api, first, seed=seed, most=most)
        else:
            api.reply(first)
        queue(api, name, streaming, "It rains: take an umbrella.")
        reply, pieces = with_tools(name, api, streaming, tools,
                                   section={"max_tokens": 100, "temperature": 0.5})
        one, two = api.requests[-2:]
        assert (two.method, two.path) == (one.method, one.path)
        assert two.headers == {**one.headers, "content-length": two.headers["content-length"]}
        body = json.loads(json.dumps(one.body))        # round 2 = round 1 + the turn + results
        body[omega.BACKENDS[name].turns] += appended
        assert two.body == body
        assert json.dumps(two.body[omega.BACKENDS[name].turns][-len(appended):]) == \
            json.dumps(appended)                       # the same keys in the same order
        assert one.body["tools"] == omega.BACKENDS[name].tools(omega.tools_from(tools))
        assert reply.text == "It rains: take an umbrella."
        assert [(c.id, c.name, c.arguments, c.result, c.error) for c in reply.tool_calls] == \
            [(*c, False) for c in calls]
        m = reply.metadata
        second = {"ollama": (7, 3), "gemini": (8, 3), "anthropic": (10, 4)}.get(name, (12, 5))
        assert (m.input_tokens, m.output_tokens) == (tokens_in + second[0], tokens_out + second[1])
        assert (m.cost_usd, m.attempts, m.num_turns) == (cost, 2, 2)
        if streaming:                            # round 1 wrote no text: no blank line
            assert len(pieces) == 2 and "".join(pieces) == reply.text


def test_openai_declarations_and_a_recorded_single_call():
    assert omega.openai_tools(omega.tools_from([lookup_population, can_have_dragons])) == \
        OPENAI_REQUEST_TWO_TOOLS["tools"]                 # (llm sorted the schema's keys)
    calls = ran([lookup_population], omega.openai_calls(OPENAI_SINGLE_CALL))
    turn, result = omega.openai_round(OPENAI_SINGLE_CALL, calls)
    same(result, OPENAI_ROUND2["messages"][2])
    # The recorded client (simonw/llm) re-serialized the arguments and left content
    # out; the model's own text goes back here, as it came.
    same(turn, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_TTY8UFNo7rNCaOBUNtlRSvMG", "type": "function", "function": {
            "name": "lookup_population", "arguments": '{"country":"Crumpet"}'}}]})


def test_deepseek_reasoning_content_goes_back():
    turn = DEEPSEEK_ROUND2["messages"][1]
    data = {"choices": [{"message": {**turn, "refusal": None, "annotations": []}}]}
    calls = omega.openai_calls(data)
    assert calls == [omega.ToolCall("call_00_aB3dE5fG7hJ9kL1mN3pQ5rS7", "get_date", {})]
    calls[0].result = "2026-08-21"
    same(omega.openai_round(data, calls), DEEPSEEK_ROUND2["messages"][1:])


def test_llamacpp_call_and_empty_arguments_go_back_as_an_object():
    calls = omega.openai_calls(LLAMACPP_CALL)
    assert calls == [omega.ToolCall("a0b2a9fb4", "get_current_weather",
                                    {"location": "Istanbul, Turkey."})]
    calls[0].result = "sunny"
    same(omega.openai_round(LLAMACPP_CALL, calls)[0]["tool_calls"], [
        {"id": "a0b2a9fb4", "type": "function", "function": {
            "name": "get_current_weather", "arguments": '{"location":"Istanbul, Turkey."}'}}])
    data = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "llm_version", "arguments": ""}}]}}]}
    calls = ran([llm_version], omega.openai_calls(data))
    assert calls == [omega.ToolCall("0", "llm_version", {}, "0.27")]
    assert omega.openai_round(data, calls)[0]["tool_calls"][0]["function"]["arguments"] == "{}"
    answer = {"choices": [{"message": {"role": "assistant", "content": "Hi"}}]}
    assert omega.openai_calls(answer) == [] == omega.openai_calls({"choices": []})


@pytest.mark.parametrize("body, calls", [
    ("OPENAI_STREAM_SINGLE", [("call_1EYWDzueHEp8OsB8jJSEp7WB", "multiply", {"a": 1231, "b": 2331})]),
    ("OPENAI_STREAM_PARALLEL", [
        ("call_JMW1whyEaYG438VE1OIflxA2", "GetWeatherArgs",
         {"city": "Edinburgh", "country": "GB", "units": "c"}),
        ("call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price", {"ticker": "AAPL", "exchange": "NASDAQ"})]),
    ("LLAMACPP_STREAM", [("Kq9wZ3xT0bY7nL2mR5vC8dF1gH4jP6sA", "get_weather", {"city": "Paris"})]),
    ("OPENROUTER_STREAM_A", [("0", "llm_version", {})]),            # id, name repeated
    ("OPENROUTER_STREAM_C", [("llm_version:0", "llm_version", {})]),  # no arguments key
    ("OPENROUTER_STREAM_D", [("0", "llm_version", {})]),            # arguments null
])
def test_openai_streamed_calls_read_at_any_cut(body, calls):
    body = globals()[body]
    for seed in range(20):                               # the transport's reads, any size
        data = omega.drain(omega.openai_events(in_slices(body, seed), FRAMING))
        assert omega.openai_calls(data) == [omega.ToolCall(*c) for c in calls]
    turn = omega.openai_round(data, omega.openai_calls(data))[0]
    assert all(list(c) == ["id", "type", "function"] for c in turn["tool_calls"])  # no index


ARGUMENTS = '{"city": "Zürich — 東京", "days": 3}'


def openai_delta_calls(*deltas):
    """The calls OpenAI-style deltas give, each delta in a chunk of its own."""
    calls = []
    for delta in deltas:
        omega.openai_tool_deltas(calls, [delta])
    return omega.openai_calls({"choices": [{"message": {"tool_calls": omega.streamed_calls(calls)}}]})


def test_openai_argument_deltas_cut_at_every_position():
    for i in range(len(ARGUMENTS) + 1):
        for j in range(i, len(ARGUMENTS) + 1):
            assert openai_delta_calls(
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": ""}},
                {"index": 0, "function": {"arguments": ARGUMENTS[:i]}},
                {"index": 0, "id": "call_1", "function": {"name": "weather",
                                                         "arguments": ARGUMENTS[i:j]}},
                {"index": 0, "type": "function", "function": {"arguments": ARGUMENTS[j:]}}) == \
                [omega.ToolCall("call_1", "weather", {"city": "Zürich — 東京", "days": 3})]


def test_openai_utf8_cut_inside_a_character_by_the_transport():
    body = ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": ARGUMENTS}}]}}]}, ensure_ascii=False)
        + "\n\ndata: [DONE]\n\n").encode()
    for cut in range(1, len(body)):
        data = omega.drain(omega.openai_events(iter([body[:cut], body[cut:]]), FRAMING))
        assert omega.openai_calls(data) == [
            omega.ToolCall("call_1", "weather", {"city": "Zürich — 東京", "days": 3})]


DELTA_VARIANTS = [
    # index null, then missing: the last call
    ([{"index": None, "id": "a", "function": {"name": "now", "arguments": "{"}},
      {"index": None, "function": {"arguments": "}"}}, {"function": {"arguments": " "}}],
     [("a", "now", {})]),
    # index 0, then null and missing (openai-python #2806, any-llm #1148): still call 0
    ([{"index": 0, "id": "a", "function": {"name": "weather", "arguments": '{"city"'}},
      {"index": None, "function": {"arguments": ': "Par'}}, {"function": {"arguments": 'is"}'}}],
     [("a", "weather", {"city": "Paris"})]),
    # several calls on index 0, told apart by their ids (smolagents #1958)
    ([{"index": 0, "id": "a", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
      {"index": 0, "id": "b", "function": {"name": "weather", "arguments": '{"city":'}},
      {"index": 0, "function": {"arguments": ' "Rome"}'}}],
     [("a", "weather", {"city": "Paris"}), ("b", "weather", {"city": "Rome"})]),
    # llama.cpp before May 2025: the id in function.id, the name in every delta, no type
    ([{"index": 0, "function": {"id": "x", "name": "weather", "arguments": '{"ci'}},
      {"index": 0, "function": {"id": "x", "name": "weather", "arguments": 'ty": "Oslo"}'}}],
     [("x", "weather", {"city": "Oslo"})]),
    # a new index without an id starts a call; arguments never sent, or "{}", are {}
    ([{"index": 0, "id": "a", "function": {"name": "now"}},
      {"index": 1, "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
      {"index": 0, "function": {"arguments": None}},
      {"index": 2, "id": "c", "function": {"name": "now", "arguments": "{}"}}],
     [("a", "now", {}), (None, "weather", {"city": "Oslo"}), ("c", "now", {})]),
]


@pytest.mark.parametrize("deltas, calls", DELTA_VARIANTS)
def test_openai_delta_variants(deltas, calls):
    assert openai_delta_calls(*deltas) == [omega.ToolCall(*c) for c in calls]
    state = []
    omega.openai_tool_deltas(state, None)                  # a delta without tool_calls
    omega.openai_tool_deltas(state, ["junk", 3])
    assert state == []


@pytest.mark.parametrize("case", range(5), ids=["index-null-then-missing",
                                                "index-0-then-null", "several-on-index-0",
                                                "llamacpp-id-in-function", "no-arguments"])
def test_streamed_call_variants_against_a_server(api, case):
    """test_openai_delta_variants' deltas, each in a chunk, served byte by byte, then
    the round that goes back: ids, names and arguments whole, empty arguments as {}."""
    deltas, calls = DELTA_VARIANTS[case]
    body = b"".join(b"data: " + utf8_json({"choices": [{"index": 0, "delta": {
        "tool_calls": [delta]}}]}) + b"\n\n" for delta in deltas) + b"data: [DONE]\n\n"
    serve_stream(api, body, most=1)
    queue(api, "openai", True, "ok")
    tools = [weather, now]
    reply, _ = with_tools("openai", api, True, tools)
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == calls
    turn = api.last().body["messages"][-1 - len(calls)]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in turn["tool_calls"]] == calls


def test_anthropic_declarations_and_an_error_result():
    tool = omega.tool_from(omega.Tool("get_weather", get_weather,
                                      ANTHROPIC_REQUEST_TOOLS["tools"][0]["description"],
                                      ANTHROPIC_REQUEST_TOOLS["tools"][0]["input_schema"]))
    same(omega.anthropic_tools([tool]), ANTHROPIC_REQUEST_TOOLS["tools"])
    data = {"content": ANTHROPIC_ROUND2_IS_ERROR["messages"][1]["content"]}
    calls = omega.anthropic_calls(data)
    calls[0].result, calls[0].error = "RuntimeError('Unexpected error, try again')", True
    same(omega.anthropic_round(data, calls), ANTHROPIC_ROUND2_IS_ERROR["messages"][1:])
    # The SDK re-ordered the block's keys; the blocks go back in the order they came.
    calls = omega.anthropic_calls(ANTHROPIC_SINGLE_CALL)
    same(omega.anthropic_round(ANTHROPIC_SINGLE_CALL, calls)[0]["content"],
         ANTHROPIC_SINGLE_CALL["content"])


def test_anthropic_streams_give_every_block_at_any_cut():
    for body in (ANTHROPIC_STREAM_PARALLEL, ANTHROPIC_STREAM_SINGLE):
        whole = omega.drain(omega.anthropic_events(iter([body]), FRAMING))
        for seed in range(20):
            assert omega.drain(omega.anthropic_events(in_slices(body, seed), FRAMING)) == whole
    parallel = omega.drain(omega.anthropic_events(iter([ANTHROPIC_STREAM_PARALLEL]), FRAMING))
    assert [(c.id, c.arguments) for c in omega.anthropic_calls(parallel)] == [
        ("toolu_01LtHJmixrs9NcWQkK8hu8hj", {}), ("toolu_01N8a4jWyf116qKTMqKKmjyt", {})]
    single = omega.drain(omega.anthropic_events(iter([ANTHROPIC_STREAM_SINGLE]), FRAMING))
    same(single["content"], [{"type": "tool_use", "id": "toolu_01TJoxvFknVdnV9XpWFPaRmY",
                              "name": "get_weather", "input": {"location": "San Francisco, CA",
                                                               "units": "f"},
                              "caller": {"type": "direct"}}])


def anthropic_fold(*events):
    content, growing = [], collections.defaultdict(list)
    for event in events:
        omega.anthropic_block_event(content, growing, event)
    return omega.anthropic_blocks(content, growing)


def test_anthropic_partial_json_cut_at_every_position():
    for i in range(len(ARGUMENTS) + 1):
        same(anthropic_fold(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                         "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                                 "text": "Let me look."}},
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                                 "partial_json": ""}},
            {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": ARGUMENTS[:i]}},
            {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": ARGUMENTS[i:]}}),
            [{"type": "text", "text": "Let me look."},
             {"type": "tool_use", "id": "toolu_1", "name": "weather",
              "input": {"city": "Zürich — 東京", "days": 3}}])


def test_anthropic_redacted_thinking_and_input_that_is_not_json():
    assert anthropic_fold({"type": "content_block_start", "index": 0, "content_block": {
        "type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}}) == \
        [{"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}]
    data = {"content": anthropic_fold(
        {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                             "partial_json": '{"city": '}})}
    calls = ran([weather], omega.anthropic_calls(data))
    assert calls[0].error and calls[0].result == 'the arguments are not a JSON object: {"city": '
    assert omega.anthropic_round(data, calls)[0]["content"][0]["input"] == {}


def test_gemini_declarations_parallel_calls_and_an_error():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"q": {"type": ["string", "null"]}}, "additionalProperties": False}
    sent = omega.gemini_tools([omega.tool_from(omega.Tool("search", None, "", schema))])
    assert sent[0]["functionDeclarations"][0]["parametersJsonSchema"] == {
        "type": "object", "properties": {"q": {"type": ["string", "null"]}},
        "additionalProperties": False}
    assert "$schema" in schema                            # the caller's dict is left alone
    calls = omega.gemini_calls(GEMINI_PARALLEL)
    assert calls == [omega.ToolCall(None, "sum", {"y": 1, "x": 2}),
                     omega.ToolCall(None, "multiply", {"y": 3, "x": 4}),
                     omega.ToolCall(None, "subtract", {"y": 5, "x": 6})]
    for call, result in zip(calls, ("3", "12", "ZeroDivisionError: oops")):
        call.result, call.error = result, result.startswith("Zero")
    model, results = omega.gemini_round(GEMINI_PARALLEL, calls)
    same(model, {"role": "model", "parts": GEMINI_PARALLEL["candidates"][0]["content"]["parts"]})
    same(results, {"role": "user", "parts": [
        {"functionResponse": {"name": "sum", "response": {"result": "3"}}},
        {"functionResponse": {"name": "multiply", "response": {"result": "12"}}},
        {"functionResponse": {"name": "subtract", "response": {"error": "ZeroDivisionError: oops"}}}]})


def test_gemini_call_without_args_and_with_an_id():
    assert omega.gemini_calls(GEMINI_ARGS_ABSENT) == [omega.ToolCall(None, "current_time", {})]
    data = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "now", "args": {}, "id": "call_27db"}}]}}]}
    calls = ran([now], omega.gemini_calls(data))
    same(omega.gemini_round(data, calls)[1], {"role": "user", "parts": [{"functionResponse": {
        "name": "now", "response": {"result": "2025-10-26T09:00:00Z"}, "id": "call_27db"}}]})


def test_gemini_streams_keep_every_part_at_any_cut():
    body = GEMINI_STREAM.replace(b"\n", b"\r\n")          # as recorded: CRLF
    whole = omega.drain(omega.gemini_events(iter([body]), FRAMING))
    for seed in range(20):
        assert omega.drain(omega.gemini_events(in_slices(body, seed), FRAMING)) == whole
    gemini3 = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in GEMINI3_STREAM_ARRAY)
    data = omega.drain(omega.gemini_events(iter([gemini3]), FRAMING))
    calls = omega.gemini_calls(data)
    assert calls == [omega.ToolCall(None, "multiply", {"y": 3, "x": 5})]
    calls[0].result = "15"
    model, results = omega.gemini_round(data, calls)
    recorded = GEMINI3_ROUND2["contents"][1]["parts"]     # llm-gemini: text first, snake_case
    assert model["parts"] == [{"functionCall": recorded[1]["function_call"],
                               "thoughtSignature": recorded[1]["thoughtSignature"]}, recorded[0]]
    assert results["parts"][0]["functionResponse"]["response"] == {"result": "15"}


def test_gemini_text_pieces_join_but_signed_parts_stay():
    parts = [{"text": "It "}, {"text": "rains", "thoughtSignature": "S1"}, {"text": "."},
             {"text": "!"}, {"text": "hm", "thought": True}, {"text": "m", "thought": True},
             {"text": ""}]
    assert omega.gemini_turn(parts) == [
        {"text": "It "}, {"text": "rains", "thoughtSignature": "S1"}, {"text": ".!"},
        {"text": "hmm", "thought": True}, {"text": ""}]
    assert omega.gemini_turn([]) == []


def test_ollama_declarations_and_the_documented_round():
    same(omega.openai_tools(omega.tools_from([get_weather])), OLLAMA_ROUND2["tools"])
    assert omega.ollama_calls(OLLAMA_CALL) == [omega.ToolCall(None, "get_weather",
                                                              {"city": "Tokyo"})]
    data = {"message": OLLAMA_ROUND2["messages"][1]}     # the docs' round 2 asks about Toronto
    calls = omega.ollama_calls(data)
    calls[0].result = "11 degrees celsius"
    same(omega.ollama_round(data, calls), OLLAMA_ROUND2["messages"][1:])
    for seed in range(10):
        data = omega.drain(omega.ollama_events(in_slices(OLLAMA_STREAM, seed), FRAMING))
        assert omega.ollama_calls(data) == [omega.ToolCall(None, "get_weather", {"city": "Tokyo"})]


# --- every backend: reasoning, its knob and its text -------------------------

# What each reasoning value becomes in a backend's request (the README's table), for
# (model, section, reasoning): the request's reasoning fields (see sent_knob).
KNOBS = {
    "openai": [("gpt-5.1", {}, None, {}), ("gpt-5.1", {}, "off", {"reasoning_effort": "none"}),
               ("gpt-5", {}, "off", {"reasoning_effort": "minimal"}),
               ("o4-mini", {}, "off", {"reasoning_effort": "low"}),
               ("gpt-4o", {}, "off", {}), ("gpt-5.1", {}, "low", {"reasoning_effort": "low"}),
               ("gpt-5.1", {}, "medium", {"reasoning_effort": "medium"}),
               ("gpt-5.1", {}, "high", {"reasoning_effort": "high"}),
               ("gpt-5.1", {}, 2048, {"reasoning_effort": "low"}),
               ("gpt-5.1", {}, 3000, {"reasoning_effort": "medium"}),
               ("gpt-5.1", {}, 100000, {"reasoning_effort": "high"}),
               ("deepseek-chat", {}, "high", {"reasoning_effort": "high",
                                              "thinking": {"type": "enabled"}}),
               ("deepseek-chat", {}, "off", {"thinking": {"type": "disabled"}})],
    "openrouter": [("x/y", {}, None, {}), ("x/y", {}, "off", {"reasoning": {"effort": "none"}}),
                   ("x/y", {}, "low", {"reasoning": {"effort": "low"}}),
                   ("x/y", {}, 5000, {"reasoning": {"max_tokens": 5000}})],
    "anthropic": [
        ("claude-x", {}, None, {"max_tokens": 8192}),
        ("claude-x", {}, "off", {"thinking": {"type": "disabled"}, "max_tokens": 8192}),
        ("claude-x", {}, "low", {"thinking": {"type": "enabled", "budget_tokens": 1024,
                                              "display": "summarized"}, "max_tokens": 8192}),
        ("claude-x", {}, "high", {"thinking": {"type": "enabled", "budget_tokens": 16384,
                                               "display": "summarized"}, "max_tokens": 24576}),
        ("claude-x", {"max_tokens": 2000}, 500, {"thinking": {
            "type": "enabled", "budget_tokens": 1024, "display": "summarized"}, "max_tokens": 2000}),
        ("claude-x", {"thinking": "adaptive"}, "medium", {
            "thinking": {"type": "adaptive", "display": "summarized"},
            "output_config": {"effort": "medium"}, "max_tokens": 8192}),
        ("claude-x", {"thinking": "adaptive"}, 20000, {
            "thinking": {"type": "adaptive", "display": "summarized"},
            "output_config": {"effort": "high"}, "max_tokens": 8192}),
        ("claude-x", {"thinking": "adaptive"}, "off", {"max_tokens": 8192})],
    "gemini": [("gemini-2.5-flash", {}, None, {}),
               ("gemini-2.5-flash", {}, "off", {"thinkingBudget": 0}),
               ("gemini-2.5-flash", {}, "low", {"thinkingBudget": 1024, "includeThoughts": True}),
               ("gemini-flash-latest", {}, 3000, {"thinkingBudget": 3000, "includeThoughts": True}),
               ("gemini-2.5-pro", {}, "off", {"thinkingBudget": 128}),
               ("gemini-3-pro-preview", {}, "high", {"thinkingLevel": "HIGH",
                                                     "includeThoughts": True}),
               ("gemini-3-pro-preview", {}, "off", {"thinkingLevel": "LOW"}),
               ("gemini-3-flash", {}, "off", {"thinkingLevel": "MINIMAL"}),
               ("gemini-2.0-flash", {}, "high", {})],
    "ollama": [("qwen3", {}, None, {}), ("qwen3", {}, "off", {"think": False}),
               ("gpt-oss:20b", {}, "off", {"think": "low"}),
               ("qwen3", {}, "medium", {"think": "medium"}),
               ("qwen3", {}, 20000, {"think": "high"})],
}


def sent_knob(name, body):
    """The reasoning fields of a request body (see KNOBS)."""
    if name == "gemini":
        return body.get("generationConfig", {}).get("thinkingConfig", {})
    keys = {"openai": ("reasoning_effort", "thinking"), "openrouter": ("reasoning",),
            "anthropic": ("thinking", "output_config", "max_tokens"), "ollama": ("think",)}[name]
    return {k: body[k] for k in keys if k in body}


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_each_reasoning_value_becomes_the_backends_own_knob(api, name):
    for model, section, reasoning, knob in KNOBS[name]:
        for streaming in (False, True):
            queue(api, name, streaming, "Four.")
            config = cfg(name, api, model=model, **section)
            if streaming:
                with omega.stream("2+2?", name, config, reasoning=reasoning) as s:
                    list(s)
            else:
                omega.complete(omega.Context("2+2?", reasoning=reasoning), name, config)
            assert sent_knob(name, api.last().body) == knob, (model, section, reasoning)


@pytest.mark.parametrize("where", ["context", "section"])
def test_anthropic_refuses_a_temperature_with_thinking_before_sending(api, where):
    config = cfg("anthropic", api, **({"temperature": 0.5} if where == "section" else {}))
    ctx = omega.Context("hi", temperature=0.5 if where == "context" else None, reasoning=4096)
    with pytest.raises(omega.ConfigError, match="temperature cannot go with reasoning"):
        omega.complete(ctx, "anthropic", config)
    api.reply(anthropic_ok())
    assert omega.complete(ctx, "anthropic", config, reasoning="off").text
    assert len(api.requests) == 1 and api.last().body["temperature"] == 0.5


@pytest.mark.parametrize("streaming", [False, True, "one body"],
                         ids=["complete", "stream", "stream-answered-whole"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_reasoning_text_comes_apart_from_the_answer(api, name, streaming):
    queue(api, name, streaming is True, "Four.", thought=THOUGHT)    # "one body": a gateway's
    ctx = omega.Context("2+2?", reasoning="high")
    if streaming:
        pieces, s = stream_via(name, api, ctx)
        assert "".join(pieces) == s.text == "Four." and s.reasoning == THOUGHT
        reply = s.reply
    else:
        reply = ask_via(name, api, ctx)
    assert reply.text == "Four." and reply.reasoning == THOUGHT
    assert reply.to_dict()["reasoning"] == THOUGHT
    queue(api, name, streaming is True, "Four.")          # none: None, and no key
    reply = stream_via(name, api)[1].reply if streaming else ask_via(name, api)
    assert reply.reasoning is None and "reasoning" not in reply.to_dict()



@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_an_answer_of_reasoning_alone_says_what_to_do(api, name, streaming):
    """A thinking model that spent max_tokens thinking: the empty-answer error says
    so, and what to change."""
    queue(api, name, streaming, "", thought=THOUGHT)
    with pytest.raises(omega.EmptyResponse) as err:
        if streaming:
            stream_via(name, api, omega.Context("2+2?", reasoning="high"))
        else:
            ask_via(name, api, omega.Context("2+2?", reasoning="high"))
    assert f"; only reasoning came, {len(THOUGHT):,} characters: raise max_tokens or ask " \
           "for less reasoning)" in str(err.value)          # (none came: the exact
    # messages of the empty-answer tests, which say nothing of reasoning)

def test_vllm_and_openrouter_reasoning_fields_are_read_too():
    assert omega.chat_reasoning({"content": "x", "reasoning": "vLLM"}) == "vLLM"
    assert omega.chat_reasoning({"reasoning_details": [
        {"type": "reasoning.summary", "summary": "A"}, {"type": "reasoning.encrypted", "data": "z"},
        {"type": "reasoning.text", "text": "B"}]}) == "AB"
    held = {}                         # the encrypted item stays its own, after the signed one
    for items in ([{**DETAILS[0], "signature": None}], [{"type": "reasoning.encrypted",
                                                         "data": "z", "index": 0}]):
        omega.chat_reasoning_fold(held, {"reasoning_details": items})
    assert [d["type"] for d in held["reasoning_details"]] == ["reasoning.text",
                                                              "reasoning.encrypted"]


def echoed_reasoning(name, turn):
    """What of a model's turn, sent back in the next round, is its reasoning."""
    if name == "anthropic":
        return turn["content"]
    if name == "gemini":
        return turn["parts"]
    return turn["reasoning_details"] if name == "openrouter" else turn[THOUGHT_KEY[name]]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_reasoning_goes_back_exactly_within_the_tool_loop(api, name, streaming):
    calls = [("call_1", "get_weather", {"city": "Paris"})]
    queue(api, name, streaming, "", calls, thought=THOUGHT)
    queue(api, name, streaming, "It rains.", thought="Then: an umbrella.")
    reply, pieces = with_tools(name, api, streaming, [get_weather], reasoning="low")
    turn = api.last().body[omega.BACKENDS[name].turns][-2]
    came = answer_with(name, "", calls, THOUGHT)    # what a whole answer holds, byte for byte
    came = came if name == "anthropic" else came["candidates"][0]["content"] if name == "gemini" \
        else came["message"] if name == "ollama" else came["choices"][0]["message"]
    same(echoed_reasoning(name, turn), echoed_reasoning(name, came))
    assert reply.reasoning == THOUGHT + "\n\nThen: an umbrella." and reply.text == "It rains."
    assert sent_knob(name, api.requests[0].body) == sent_knob(name, api.last().body)


def test_a_fallback_sends_none_of_the_first_providers_reasoning(api, api2):
    api.reply({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
              status=529)
    api2.reply(answer_with("openai", "Four.", thought=THOUGHT))
    config = {"provider": {"default": "anthropic", "fallback": ["openai"],
                           "anthropic": cfg("anthropic", api, max_retries=0)["provider"]["anthropic"],
                           "openai": cfg("openai", api2)["provider"]["openai"]}}
    reply = omega.complete("2+2?", config=config, reasoning="high")
    assert reply.metadata.provider_used == "openai" and reply.reasoning == THOUGHT
    assert api.last().body["thinking"]["budget_tokens"] == 16384
    sent = api2.last().body
    assert sent["reasoning_effort"] == "high" and "thinking" not in sent
    # Reasoning once shown is shown: a stream that breaks after it goes nowhere else.
    serve_stream(api, thought_then_overloaded())
    s = omega.stream("2+2?", config=config, reasoning="high")
    with pytest.raises(omega.ProviderError, match="Overloaded"):
        list(s)
    assert s.reasoning == THOUGHT and s.text == "" and len(api2.requests) == 1


# --- OpenAI and compatible servers -------------------------------------------

def test_openai_request_on_the_wire(api):
    api.reply(openai_ok())
    reply = ask_via("openai", api, CTX)
    sent = api.last()
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["user-agent"] == f"omega/{omega.__version__}"
    assert sent.body == {"model": "gpt-4o", "max_tokens": 50, "temperature": 0.3, "messages": [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2+2?"}]}
    assert reply.text == "Hello from OpenAI"
    m = reply.metadata
    assert (m.provider_used, m.model, m.input_tokens, m.output_tokens, m.tokens_used) == \
        ("openai", "gpt-4o-2024-08-06", 12, 5, 17)
    assert m.stop_reason == "stop" and m.attempts == 1 and m.processing_time_ms >= 0


def test_openai_official_endpoint_gets_max_completion_tokens():
    settings = omega.provider_settings({"provider": {"openai": {"api_key": KEY}}}, "openai")
    url, headers, body = omega.openai_request(CTX, settings)
    assert url == "https://api.openai.com/v1/chat/completions"
    assert body["max_completion_tokens"] == 50 and "max_tokens" not in body


def test_openai_refusal_missing_usage_and_several_choices(api):
    api.reply(openai_ok(choices=[{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}}],
        usage=None))
    reply = ask_via("openai", api)
    assert reply.text == "I can't help with that." and reply.metadata.stop_reason == "refusal"
    assert reply.metadata.input_tokens is None and reply.metadata.tokens_used is None
    api.reply(openai_ok(choices=[
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "first"}},
        {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "second"}}]))
    assert ask_via("openai", api).text == "first"


def test_openai_empty_content_is_empty_response(api):
    api.reply(openai_ok(choices=[{"index": 0, "finish_reason": "content_filter",
                                  "message": {"role": "assistant", "content": None}}]))
    with pytest.raises(omega.EmptyResponse, match="content_filter"):
        ask_via("openai", api)
    api.reply(openai_ok(choices=[]))
    with pytest.raises(omega.EmptyResponse, match="no choices"):
        ask_via("openai", api)


@pytest.mark.parametrize("body, status, retryable", [
    # vLLM: the error, then [DONE] anyway; its code is the HTTP status
    (sse(oa_chunk("x"), {"error": {"message": "bad", "type": "BadRequestError", "code": 400}}),
     400, False),
    # old llama.cpp: an `error:` field that a standard parser would drop
    (sse(oa_chunk("x"), done=False) + b'error: {"code":400,"message":"the request exceeds the '
     b'available context size","type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n', 400, False),
    # current llama.cpp: data with an error, then the end
    (sse(oa_chunk("x"), {"error": {"code": 500, "message": "oops", "type": "server_error"}},
         done=False), 500, True),
    # old vLLM: the error object unwrapped
    (sse(oa_chunk("x"), {"object": "error", "message": "engine dead", "code": 503}, done=False),
     500, True),
    # no end at all: ended early
    (sse(oa_chunk("x"), done=False), None, True),
], ids=["vllm", "llamacpp-legacy", "llamacpp-current", "vllm-old", "eof"])
def test_in_stream_errors_of_compatible_servers(api, body, status, retryable):
    serve_stream(api, body)
    with pytest.raises(omega.ProviderError) as err:
        stream_via("openai", api, max_retries=0)
    assert (err.value.status, err.value.retryable, err.value.partial_text) == \
        (status, retryable, "x")
    if status is None:
        assert isinstance(err.value, omega.ProviderUnavailable)
        assert "ended early" in str(err.value)


def test_a_stream_reads_choice_0_only(api):
    """A second choice (n=2: chunks of `index: 1`, alone or beside choice 0, first or
    not) is not this answer: like complete(), the stream reads choice 0, by its index."""
    def chunk(*choices):
        return {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
                "choices": [{"index": i, "delta": {"content": text} if text else {},
                             "finish_reason": finish} for i, text, finish in choices]}
    serve_stream(api, sse(chunk((0, "A0", None)), chunk((1, "B1", None)),
                          chunk((1, "b", None), (0, "a", None)), chunk((1, None, "length")),
                          chunk((0, None, "stop"))))
    pieces, s = stream_via("openai", api)
    assert pieces == ["A0", "a"] and s.reply.text == "A0a"
    assert s.reply.metadata.stop_reason == "stop"


def test_done_without_a_finish_reason_ends_the_stream_well(api):
    """Some compatible servers (and a real OpenRouter stream) send no finish reason
    before [DONE]: the answer is complete all the same."""
    for name in ("openai", "openrouter"):
        serve_stream(api, sse(oa_chunk("The answer"), oa_chunk(" is 4")))
        pieces, s = stream_via(name, api)
        assert pieces == ["The answer", " is 4"] and s.reply.text == "The answer is 4"
        assert s.reply.metadata.stop_reason is None


# --- OpenRouter --------------------------------------------------------------

def test_openrouter_headers_cost_and_max_tokens(api):
    api.reply(openai_ok("routed", provider="OpenAI", usage={
        "prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6, "cost": 0.00042}))
    reply = ask_via("openrouter", api, CTX, referer="https://myapp.example", title="My App")
    sent = api.last()
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["http-referer"] == "https://myapp.example"
    assert sent.headers["x-openrouter-title"] == "My App"
    assert sent.body["max_tokens"] == 50 and "max_completion_tokens" not in sent.body
    assert reply.metadata.cost_usd == 0.00042 and reply.metadata.provider_used == "openrouter"


def test_openrouter_error_inside_a_200(api):
    api.reply({"error": {"code": 502, "message": "Provider returned error",
                         "metadata": {"provider_name": "DeepInfra", "raw": "upstream exploded"}}})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openrouter", api, max_retries=0)
    assert err.value.status == 502 and "upstream exploded" in str(err.value)
    api.reply(openai_ok(choices=[{"index": 0, "finish_reason": "error", "message": {
        "role": "assistant", "content": ""}, "error": {"code": 429, "message": "Rate limited"}}]))
    with pytest.raises(omega.RateLimitError, match="Rate limited"):
        ask_via("openrouter", api)


def test_openrouter_moderation_403_is_empty_response(api):
    api.reply({"error": {"code": 403, "message": "Input was flagged", "metadata": {
        "reasons": ["violence"], "flagged_input": "...", "provider_name": "OpenAI",
        "model_slug": "openai/gpt-4o"}}}, status=403)
    with pytest.raises(omega.EmptyResponse, match="violence"):
        ask_via("openrouter", api)


def test_openrouter_moderation_keeps_the_providers_own_message(api):
    own = 'openai/gpt-4o requires moderation on OpenAI. Your input was flagged for "violence"'
    api.reply({"error": {"code": 403, "message": own, "metadata": {
        "reasons": ["violence", "harassment"], "flagged_input": "...", "provider_name": "OpenAI",
        "model_slug": "openai/gpt-4o"}}}, status=403)
    with pytest.raises(omega.EmptyResponse) as err:
        ask_via("openrouter", api)
    assert own in err.value.message and "harassment" in err.value.message


def test_openrouters_generation_id_is_the_request_id(api):
    api.reply(openai_ok(), headers={"X-Generation-Id": "gen-1744-abc"})
    assert ask_via("openrouter", api).metadata.request_id == "gen-1744-abc"
    serve_stream(api, sse(oa_chunk("hi"), oa_chunk(finish="stop")),
                 headers={"X-Generation-Id": "gen-1744-def"})
    answer = omega.stream(omega.Context("hi"), "openrouter", cfg("openrouter", api))
    assert "".join(answer) == "hi" and answer.reply.metadata.request_id == "gen-1744-def"
    api.reply(openai_error(400, "bad_request"), status=400,
              headers={"X-Generation-Id": "gen-1744-ghi"})
    with pytest.raises(omega.ProviderError) as err:
        ask_via("openrouter", api)
    assert err.value.request_id == "gen-1744-ghi"


# --- Anthropic ---------------------------------------------------------------

def test_anthropic_request_on_the_wire(api):
    api.reply(anthropic_ok())
    reply = ask_via("anthropic", api, CTX)
    sent = api.last()
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body == {"model": "claude-sonnet-4-20250514", "max_tokens": 50,
                         "temperature": 0.3, "system": "Be brief", "messages": [
                             {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "What is 2+2?"}]}
    assert reply.text == "Hello from Claude" and reply.metadata.stop_reason == "end_turn"
    api.reply(anthropic_ok())
    ask_via("anthropic", api)
    assert api.last().body["max_tokens"] == 8192 and "system" not in api.last().body


def test_anthropic_blocks_and_cache_usage(api):
    api.reply(anthropic_ok({"type": "thinking", "thinking": "hmm", "signature": "x"},
                           {"type": "text", "text": "Part one. "},
                           {"type": "tool_use", "id": "t1", "name": "calc", "input": {}},
                           {"type": "redacted_thinking", "data": "..."},
                           {"type": "text", "text": "Part two."},
                           usage={"input_tokens": 10, "cache_creation_input_tokens": 100,
                                  "cache_read_input_tokens": 1000, "output_tokens": 7}))
    reply = ask_via("anthropic", api)
    assert reply.text == "Part one. Part two."
    assert (reply.metadata.input_tokens, reply.metadata.output_tokens) == (1110, 7)
    assert reply.metadata.tokens_used == 1117


def test_anthropic_refusal_without_text_is_empty_response(api):
    body = anthropic_ok(stop="refusal")
    body["content"], body["stop_details"] = [], {"type": "refusal", "category": "cyber"}
    api.reply(body)
    with pytest.raises(omega.EmptyResponse, match="refusal.*cyber"):
        ask_via("anthropic", api)


# --- Gemini ------------------------------------------------------------------

def test_gemini_request_on_the_wire(api):
    api.reply(gemini_ok())
    reply = ask_via("gemini", api, CTX, model="models/gemini 2.5/pro")
    sent = api.last()
    assert sent.path == "/v1beta/models/gemini%202.5%2Fpro:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY and KEY not in sent.path
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]},
                     {"role": "model", "parts": [{"text": "Hello"}]},
                     {"role": "user", "parts": [{"text": "What is 2+2?"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief"}]},
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.3}}
    assert reply.text == "Hello from Gemini"
    assert (reply.metadata.input_tokens, reply.metadata.output_tokens) == (8, 3)


def test_gemini_thoughts_are_not_text_but_count_as_output(api):
    api.reply(gemini_ok({"text": "Let me think", "thought": True}, {"text": "4"},
                        usage={"promptTokenCount": 14, "candidatesTokenCount": 2,
                               "thoughtsTokenCount": 24, "totalTokenCount": 40}))
    reply = ask_via("gemini", api)
    assert reply.text == "4" and reply.metadata.output_tokens == 26
    assert reply.metadata.tokens_used == 40


@pytest.mark.parametrize("body, empty", [
    ({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
      "usageMetadata": {"promptTokenCount": 5}}, "prompt blocked: SAFETY"),
    ({"promptFeedback": {"blockReason": "OTHER", "blockReasonMessage": "Blocked by policy"}},
     "prompt blocked: OTHER: Blocked by policy"),
    ({"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]}]},
     "finishReason=SAFETY"),
    (gemini_ok({"text": "Partial answer"}, finish="SAFETY"), None),
    ({"candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}],
      "usageMetadata": {"promptTokenCount": 9, "thoughtsTokenCount": 100}},
     "finishReason=MAX_TOKENS"),
    ({"candidates": [{"finishReason": "OTHER", "finishMessage": "Unable to answer"}]},
     "finishReason=OTHER: Unable to answer"),
], ids=["prompt-blocked", "prompt-blocked-with-message", "safety-stop-without-text",
        "safety-stop-with-text", "thoughts-only", "finish-message"])
def test_gemini_blocked_prompt_and_safety_stops(api, body, empty):
    api.reply(body)
    if empty is None:
        reply = ask_via("gemini", api)
        assert reply.text == "Partial answer" and reply.metadata.stop_reason == "SAFETY"
        return
    with pytest.raises(omega.EmptyResponse) as err:
        ask_via("gemini", api)
    assert err.value.message == f"no answer text ({empty})" and len(api.requests) == 1


def test_gemini_partial_and_missing_usage(api):
    api.reply(gemini_ok(usage={"promptTokenCount": 6}))
    m = ask_via("gemini", api).metadata
    assert (m.input_tokens, m.output_tokens, m.tokens_used) == (6, 0, 6)
    body = gemini_ok()
    del body["usageMetadata"]
    api.reply(body)
    m = ask_via("gemini", api).metadata
    assert (m.input_tokens, m.output_tokens, m.tokens_used) == (None, None, None)


# --- Ollama ------------------------------------------------------------------

def test_ollama_request_on_the_wire(api):
    api.reply(ollama_ok(message={"role": "assistant", "content": "4",
                                 "thinking": "two plus two"}))
    reply = ask_via("ollama", api, CTX, num_ctx=8192, keep_alive="5m")
    sent = api.last()
    assert sent.path == "/api/chat" and "authorization" not in sent.headers
    assert sent.body == {"model": "llama3", "stream": False, "keep_alive": "5m",
                         "options": {"num_predict": 50, "temperature": 0.3, "num_ctx": 8192},
                         "messages": [{"role": "system", "content": "Be brief"},
                                      {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "What is 2+2?"}]}
    assert reply.text == "4" and reply.metadata.stop_reason == "stop"
    assert (reply.metadata.input_tokens, reply.metadata.output_tokens) == (7, 3)


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": ""},
    {"role": "assistant", "content": "", "thinking": "Let me think about it at length"},
    None,
], ids=["empty-content", "thinking-only", "no-message"])
def test_ollama_empty_answer_is_empty_response(api, message):
    api.reply(ollama_ok(message=message, done_reason="length"))
    with pytest.raises(omega.EmptyResponse) as err:
        ask_via("ollama", api)
    assert type(err.value) is omega.EmptyResponse and err.value.provider == "ollama"
    said = "; only reasoning came, 31 characters: raise max_tokens or ask for less " \
           "reasoning" if message and message.get("thinking") else ""
    assert err.value.message == f"no answer text (done_reason=length{said})"
    assert len(api.requests) == 1                               # not retried


def test_ollama_omitted_counts(api):
    body = ollama_ok()
    del body["prompt_eval_count"]
    api.reply(body)
    m = ask_via("ollama", api).metadata
    assert (m.input_tokens, m.output_tokens) == (0, 3)
    body = ollama_ok()
    del body["prompt_eval_count"], body["eval_count"]
    api.reply(body)
    m = ask_via("ollama", api).metadata
    assert (m.input_tokens, m.output_tokens) == (None, None)


# --- claude-code, through the fake `claude` ----------------------------------

def test_claude_code_prompt_on_stdin_and_flags(claude, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAUDECODE", "1")
    work = tmp_path / "work"
    work.mkdir()
    reply = cc(claude, omega.Context("Fix the bug", system_prompt="Be careful"),
               allowed_tools=["Read", "Bash(git log:*)"], working_dir=str(work),
               oauth_token="oauth-SECRET-token-0123456789", skip_permissions=True)
    call = claude.calls()[0]
    assert call["stdin"] == "[System]\nBe careful\n\n[User]\nFix the bug"
    assert call["argv"] == ["-p", "--output-format", "json", "--max-turns", "25", "--model",
                            "claude-sonnet-4-6", "--dangerously-skip-permissions",
                            "--allowedTools", "Read,Bash(git log:*)"]
    assert call["cwd"] == str(work)
    assert call["env"] == {"CLAUDECODE": None,
                           "CLAUDE_CODE_OAUTH_TOKEN": "oauth-SECRET-token-0123456789"}
    assert reply.text == "echo: [System]\nBe careful\n\n[User]\nFix the bug"
    m = reply.metadata
    assert (m.provider_used, m.model, m.input_tokens, m.output_tokens, m.tokens_used) == \
        ("claude-code", "claude-sonnet-4-6", 1105, 20, 1125)
    assert (m.cost_usd, m.num_turns, m.attempts, m.stop_reason) == (0.0125, 1, 1, "end_turn")
    assert (m.input_tokens, m.cache_read_tokens, m.cache_write_tokens) == (1105, 1000, 100)
    assert (claude.dir / "sessions" / m.session_id).exists()     # the CLI's own session id


def test_claude_code_defaults_model_override_and_request_max_turns(claude):
    cc(claude, omega.Context("hi", model="opus", max_turns=3, allowed_tools=[]),
       allowed_tools=["Read"])
    argv = claude.calls()[0]["argv"]
    assert argv == ["-p", "--output-format", "json", "--max-turns", "3", "--model", "opus"]


def test_claude_code_megabyte_prompt(claude):
    prompt = "x" * (1024 * 1024)
    reply = cc(claude, omega.Context(prompt))
    assert claude.calls()[0]["stdin"] == "[User]\n" + prompt
    assert reply.text.endswith("x" * 20)


def test_claude_code_resume_session(claude):
    first = cc(claude, omega.Context("Remember 42"))
    sid = first.metadata.session_id
    reply = cc(claude, omega.Context("What did I say?", system_prompt="Be brief", session_id=sid,
                                     history=[omega.Message("user", "Remember 42")]))
    call = claude.calls()[1]
    assert call["argv"][call["argv"].index("--resume") + 1] == sid
    assert call["stdin"] == "[User]\nBe brief\n\nWhat did I say?"
    assert reply.text.startswith("turn 2:") and reply.metadata.session_id == sid


def test_claude_code_unknown_session_gives_the_cli_message(claude):
    with pytest.raises(omega.ProviderError, match="No conversation found with session ID: nope"):
        cc(claude, omega.Context("hi", session_id="nope"))


def test_claude_code_array_output_uses_last_result(claude):
    claude.plan({"array": True, "result": "from the array"})
    reply = cc(claude)
    assert reply.text == "from the array" and reply.metadata.num_turns == 1


def test_claude_code_non_json_output(claude, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)        # the child has it: it may echo it
    claude.plan({"raw": "Plain text answer\n", "exit": 0})
    assert cc(claude).text == "Plain text answer"
    claude.plan({"raw": "Traceback-ish garbage", "exit": 2,
                 "stderr": f"line one\nfatal: token {KEY} rejected\n"})
    (claude.dir / "calls.jsonl").unlink()
    with pytest.raises(omega.ProviderError) as err:
        cc(claude)
    assert "fatal: token" in str(err.value) and KEY not in str(err.value)


def test_claude_code_empty_result_is_empty_response(claude):
    claude.plan({"result": ""})
    with pytest.raises(omega.EmptyResponse):
        cc(claude)


@pytest.mark.parametrize("status, result, error", [
    (529, "API Error: 529 Overloaded. This is a server-side issue", omega.ProviderError),
    (429, "API Error: Request rejected (429) · Rate limited", omega.RateLimitError),
    (401, "Failed to authenticate. API Error: 401 invalid x-api-key", omega.AuthError),
    (400, "API Error: 400 prompt is too long", omega.ProviderError),
    (None, "Invalid API key · Please run /login", omega.AuthError),
    (None, "Credit balance is too low", omega.RateLimitError),
])
def test_claude_code_errors_exit_1_with_json(claude, status, result, error):
    claude.plan({"set": {"is_error": True, "result": result, "api_error_status": status,
                         "stop_reason": "stop_sequence", "total_cost_usd": 0}})
    with pytest.raises(error) as err:
        cc(claude)
    assert type(err.value) is error and err.value.status == status
    assert result in str(err.value) and str(err.value).startswith("claude-code: ")


@pytest.mark.parametrize("step", [
    {"set": {"is_error": True, "result": "Invalid API key · Please run /login"}},
    {"set": {"is_error": True, "result": "Not logged in · Please run /login"}},
    {"raw": "", "exit": 1, "stderr": "Invalid API key · Please run /login\n"},
    {"raw": "", "exit": 1, "stderr": "Error: Not logged in. Run claude and log in first.\n"},
], ids=["json-invalid-api-key", "json-not-logged-in", "stderr-invalid-api-key",
        "stderr-not-logged-in"])
def test_logged_out_claude_is_auth_error(claude, cli_main, capsys, step):
    claude.plan(step, step)
    with pytest.raises(omega.AuthError) as err:
        cc(claude)
    assert type(err.value) is omega.AuthError and err.value.provider == "claude-code"
    assert ("/login" in err.value.message) or ("Not logged in" in err.value.message)
    assert len(claude.calls()) == 1                        # not resumed, not retried
    assert cli_main(claude.config(), "hi") == 3
    assert capsys.readouterr().err.startswith("omega: claude-code: ")


def test_logged_out_claude_with_plain_text_on_stdout_is_auth_error(claude):
    claude.plan({"raw": "Invalid API key · Please run /login\n", "exit": 1})
    with pytest.raises(omega.AuthError, match="/login"):
        cc(claude)


def test_claude_code_missing_cli(claude, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(omega.ProviderUnavailable, match="'claude' not found on PATH.*npm install"):
        omega.complete(omega.Context("hi"), "claude-code", {})
    with pytest.raises(omega.ProviderUnavailable):
        cc(claude, command=str(tmp_path / "nope" / "claude"))


def test_claude_code_not_executable_is_unavailable(claude, tmp_path):
    plain = tmp_path / "claude-not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(omega.ProviderUnavailable, match="not executable"):
        cc(claude, command=str(plain))


def test_claude_code_bad_working_dir_is_config_error(claude, tmp_path):
    with pytest.raises(omega.ConfigError, match="working_dir"):
        cc(claude, working_dir=str(tmp_path / "missing"))


def test_claude_code_auto_resume_after_max_turns(claude):
    turns_error = {"set": {"subtype": "error_max_turns", "is_error": True, "num_turns": 26,
                           "errors": ["Reached maximum number of turns (25)"],
                           "terminal_reason": "max_turns"}, "drop": ["result"]}
    claude.plan(turns_error, turns_error, {"result": "All done."})
    statuses = []
    reply = cc(claude, on_status=statuses.append)
    calls = claude.calls()
    assert len(calls) == 3 and reply.text == "All done."
    sid = reply.metadata.session_id
    assert "--resume" not in calls[0]["argv"]
    for call in calls[1:]:
        assert call["argv"][call["argv"].index("--resume") + 1] == sid
        assert call["stdin"] == omega.RESUME_PROMPT
    m = reply.metadata
    assert (m.attempts, m.num_turns, m.output_tokens, m.input_tokens) == (3, 53, 60, 3315)
    assert m.cost_usd == pytest.approx(0.0375)
    assert statuses == ["claude-code: reached max turns, resuming (1/5)",
                        "claude-code: reached max turns, resuming (2/5)"]


def test_claude_code_resume_joins_texts_and_waits_with_backoff(claude, monkeypatch):
    waits, real_sleep = [], time.sleep
    # subprocess polls with short sleeps of its own: only the resume waits are recorded.
    monkeypatch.setattr(omega.time, "sleep",
                        lambda s: waits.append(s) if s >= 1 else real_sleep(s))
    partial = {"set": {"subtype": "error_max_turns", "is_error": True}, "drop": ["result"]}
    claude.plan(partial, partial, partial, {"result": "final"})
    cc(claude, resume_delay_secs=2)
    assert waits == [2, 4, 8]
    # Whatever text a stopped run did return is kept and joined with the rest.
    (claude.dir / "calls.jsonl").unlink()
    claude.plan({"set": {"subtype": "error_max_turns", "is_error": True, "result": "part 1"}},
                {"result": "part 2"})
    assert cc(claude).text == "part 1\n\n---\n\npart 2"


def test_claude_code_no_auto_resume_when_request_sets_max_turns_or_attempts_run_out(claude):
    turns_error = {"set": {"subtype": "error_max_turns", "is_error": True,
                           "errors": ["Reached maximum number of turns (2)"]}, "drop": ["result"]}
    claude.plan(turns_error)
    with pytest.raises(omega.ProviderError, match="error_max_turns: Reached maximum number"):
        cc(claude, omega.Context("hi", max_turns=2))
    assert len(claude.calls()) == 1
    claude.plan(*[turns_error] * 5)
    (claude.dir / "calls.jsonl").unlink()
    with pytest.raises(omega.ProviderError, match="error_max_turns"):
        cc(claude, max_resume_attempts=2)
    assert len(claude.calls()) == 3


def test_claude_code_keeps_partial_text_when_it_cannot_resume(claude):
    claude.plan({"set": {"subtype": "error_max_turns", "is_error": True, "result": "half done"}})
    with pytest.raises(omega.ProviderError) as err:
        cc(claude, max_resume_attempts=0)
    assert err.value.partial_text == "half done" and err.value.session_id
    assert f"session_id={err.value.session_id}" in str(err.value)


# --- claude-code, streamed (stream-json) -------------------------------------

def cc_stream(claude, ctx=None, **section):
    s = omega.stream(ctx or omega.Context("Say hi"), "claude-code", claude.config(**section))
    with s:
        pieces = list(s)
    return pieces, s


def test_claude_code_streams_with_stream_json_and_replies_as_complete(claude):
    claude.plan({"result": "Hello from the fake."}, {"result": "Hello from the fake."})
    pieces, s = cc_stream(claude)
    assert pieces == ["Hello from", " the fake."] and s.reply.text == "Hello from the fake."
    assert claude.calls()[0]["argv"][:6] == ["-p", "--output-format", "stream-json", "--verbose",
                                            "--include-partial-messages", "--max-turns"]
    whole = cc(claude)
    streamed, complete = s.reply.to_dict()["metadata"], whole.to_dict()["metadata"]
    for key in ("model", "input_tokens", "output_tokens", "cost_usd", "num_turns", "stop_reason"):
        assert streamed[key] == complete[key], key


def assistant(mid, text, model="claude-opus-4-8", **extra):
    return {"type": "assistant", "parent_tool_use_id": None, **extra,
            "message": {"id": mid, "model": model, "content": [{"type": "text", "text": text}]}}


@pytest.mark.parametrize("lines, result, pieces", [
    # The CLI abandons a streamed message after an overload and sends it again whole.
    ([{"start": "A"}, {"delta": "Hello from"},
      {"type": "system", "subtype": "api_retry", "attempt": 1, "error": "overloaded"},
      assistant("B", "Hello from the fake.")],
     "Hello from the fake.", ["Hello from", " the fake."]),
    # ... and when the new text does not extend what was shown: a blank line, then all of it.
    ([{"start": "A"}, {"delta": "Hi th"}, assistant("B", "Hello there.")],
     "Hello there.", ["Hi th", "\n\nHello there."]),
    # An earlier turn's text (before a tool call), then the next turn's, after a blank line.
    ([{"start": "A"}, {"delta": "Let me run a tool."}, assistant("A", "Let me run a tool."),
      {"type": "user", "message": {"content": [{"type": "tool_result"}]}},
      {"start": "B"}, {"delta": "Done."}, assistant("B", "Done.")],
     "Done.", ["Let me run a tool.", "\n\nDone."]),
    # A subagent's text, debug lines and tool input are not the answer.
    ([{"start": "A"}, {"delta": "sub", "parent": "toolu_1"}, "[SandboxDebug] hello",
      {"type": "stream_event", "parent_tool_use_id": None, "event": {
          "type": "content_block_delta", "delta": {"type": "input_json_delta",
                                                   "partial_json": "{}"}}},
      {"delta": "main"}],
     "main", ["main"]),
], ids=["resent-whole", "resent-different", "tool-turns", "only-main-text"])
def test_claude_code_stream_shows_each_text_once(claude, lines, result, pieces):
    claude.plan({"lines": lines, "result": result})
    got, s = cc_stream(claude)
    assert got == pieces and s.reply.text == result


@pytest.mark.parametrize("lines, result, pieces", [
    ([], "Hello there.", ["Hello there."]),                  # a CLI that streams no deltas
    ([{"start": "A"}, {"delta": "Hello"}], "Hello world.", ["Hello", " world."]),
    ([{"start": "A"}, {"delta": "Hi"}], "Bye.", ["Hi", "\n\nBye."]),
], ids=["result-only", "result-extends-the-deltas", "result-is-another-text"])
def test_claude_code_stream_shows_the_result_text_it_did_not_stream(claude, lines, result,
                                                                   pieces):
    """Nothing of the answer goes unshown: the result's text that was not streamed
    comes when the result line does (what extends the text shown, or a blank line and
    all of it), so the screen and s.reply.text agree."""
    claude.plan({"lines": lines, "result": result})
    got, s = cc_stream(claude)
    assert got == pieces and s.reply.text == result


def test_cli_prints_the_answer_of_a_claude_that_streams_no_deltas(claude, cli_main, capsys):
    claude.plan({"lines": [], "result": "Hi from an older CLI."})
    assert cli_main(claude.config(), "Say hi") == 0
    assert capsys.readouterr().out == "Hi from an older CLI.\n"


def test_claude_code_reading_ends_at_the_result_line(claude):
    """A CLI that prints its result and does not exit neither delays nor loses the
    answer: its process group is stopped."""
    result = {"type": "result", "subtype": "success", "is_error": False,
              "result": "Hello there.", "session_id": "s-1"}
    claude.plan({"lines": [{"start": "A"}, {"delta": "Hello there."}, result, "HANG"],
                 "no_result": True})
    outcome = bounded(lambda: cc_stream(claude), within=8)
    pieces, s = outcome["value"]
    pids = read_pids(claude.dir / "pids")
    try:
        assert pieces == ["Hello there."] and s.reply.text == "Hello there."
        assert gone(*pids)
    finally:
        kill_leftovers(*pids)


@pytest.mark.parametrize("capture, pieces, outcome", [
    ("stream_json_basic", ["Hello from the fake."], "Hello from the fake."),
    ("stream_json_partial", ["Hello from", " the fake."], "Hello from the fake."),
    ("max_turns_1_tool_use_partial", ["Let me ru", "n a tool."], omega.ProviderError),
    ("api_error_401", [], omega.AuthError),
])
def test_claude_code_stream_reads_what_the_real_cli_printed(claude, capture, pieces, outcome):
    code, lines = CLAUDE_STREAM_CAPTURES[capture]
    claude.plan({"raw": "\n".join(lines) + "\n", "exit": code})
    s = omega.stream(omega.Context("hi", max_turns=1), "claude-code", claude.config())
    got = []
    if isinstance(outcome, str):
        got = list(s)
        assert s.reply.text == outcome and s.reply.metadata.session_id
    else:
        with pytest.raises(outcome) as err:
            for piece in s:
                got.append(piece)
        assert err.value.partial_text == ("".join(pieces) or None)
    assert got == pieces


def test_claude_code_stream_errors_are_typed_and_synthetic_text_is_not_shown(claude):
    claude.plan({"lines": [assistant("x", "Failed to authenticate. API Error: 401", "<synthetic>",
                                     error="authentication_failed")],
                 "set": {"is_error": True, "api_error_status": 401,
                         "result": "Failed to authenticate. API Error: 401"}})
    s = omega.stream("hi", "claude-code", claude.config())
    with pytest.raises(omega.AuthError):
        list(s)
    assert s.text == ""


def test_claude_code_stream_auto_resumes_after_a_separator(claude):
    claude.plan({"lines": [{"start": "A"}, {"delta": "Let me run a tool."}],
                 "set": {"subtype": "error_max_turns", "is_error": True, "result": None}},
                {"result": "All done."})
    pieces, s = cc_stream(claude)
    assert pieces == ["Let me run a tool.", "\n\n---\n\n", "All ", "done."]
    assert s.reply.text == "All done." and s.reply.metadata.attempts == 2
    assert "--resume" in claude.calls()[1]["argv"]


@pytest.mark.parametrize("step, error, message", [
    ({"lines": [{"start": "A"}], "no_result": True, "exit": 1, "stderr": "Error: not logged in"},
     omega.AuthError, "not logged in"),
    ({"lines": [{"start": "A"}], "no_result": True, "exit": 0}, omega.ProviderUnavailable,
     "ended early"),
], ids=["stderr", "nothing"])
def test_claude_code_stream_without_a_result_line(claude, step, error, message):
    claude.plan(step)
    with pytest.raises(error, match=message):
        cc_stream(claude)


def test_claude_code_stream_error_after_text_keeps_the_partial_text(claude):
    claude.plan({"lines": [{"start": "A"}, {"delta": "Hello from"}],
                 "set": {"is_error": True, "api_error_status": 529, "result": "API Error: 529"}})
    with pytest.raises(omega.ProviderError) as err:
        cc_stream(claude)
    assert err.value.partial_text == "Hello from" and err.value.status == 529


# --- claude-code: files through stream-json, --json-schema -------------------

def test_claude_code_sends_files_as_one_stream_json_message(claude):
    claude.plan({"result": "A red square, a PDF and notes."})
    reply = cc(claude, omega.Context("What are these?", attachments=files()))
    assert reply.text == "A red square, a PDF and notes."
    call = claude.calls()[-1]
    assert call["argv"][:7] == ["-p", "--input-format", "stream-json", "--output-format",
                                "stream-json", "--verbose", "--max-turns"]
    assert call["raw"].endswith("\n") and call["raw"].count("\n") == 1
    assert json.loads(call["raw"]) == {
        "type": "user", "parent_tool_use_id": None, "session_id": "",
        "message": {"role": "user", "content": [
            *ANTHROPIC_BLOCKS, {"type": "text", "text": "[User]\nWhat are these?"}]}}


def test_claude_code_files_stream_and_go_only_with_the_first_run(claude):
    claude.plan({"result": "Streamed answer."})
    got, s = [], omega.stream(omega.Context("Look", attachments=files("red.png")),
                              "claude-code", claude.config())
    with s:
        got = list(s)
    assert "".join(got) == s.reply.text == "Streamed answer."
    argv = claude.calls()[-1]["argv"]
    assert "--include-partial-messages" in argv and "--input-format" in argv
    turns_error = {"set": {"subtype": "error_max_turns", "is_error": True,
                           "errors": ["Reached maximum number of turns (25)"]}, "drop": ["result"]}
    claude.plan({}, turns_error, {"result": "Done."})
    reply = cc(claude, omega.Context("Do it", attachments=files("hello.pdf")))
    first, resumed = claude.calls()[1:]
    assert reply.text == "Done." and first["blocks"][0]["title"] == "hello.pdf"
    assert "--input-format" not in resumed["argv"] and resumed["raw"] is None   # the session
    assert resumed["stdin"] == omega.RESUME_PROMPT                              # has the file


def test_claude_code_json_schema_gives_structured_output(claude):
    claude.plan({"structured": {"colour": "red", "confidence": 0.97}},
                {"structured": {"colour": "red", "confidence": 1}})
    reply = cc(claude, omega.Context("Colour?", schema=SCHEMA))
    argv = claude.calls()[-1]["argv"]
    assert json.loads(argv[argv.index("--json-schema") + 1]) == SCHEMA
    assert argv[argv.index("--output-format") + 1] == "json"
    assert reply.data == {"colour": "red", "confidence": 0.97} and json.loads(reply.text) == \
        reply.data
    s = omega.stream(omega.Context("Colour?", schema=SCHEMA, attachments=files("red.png")),
                     "claude-code", claude.config())         # streamed: whole, at the end
    with s:
        assert list(s) == ['{"colour":"red","confidence":1}']
    assert s.reply.data == {"colour": "red", "confidence": 1}
    assert "--include-partial-messages" not in claude.calls()[-1]["argv"]


@pytest.mark.parametrize("step, words", [
    ({"no_structured": True, "result": "It is red."},
     "no structured_output (the model answered in text: 'It is red.')"),
    ({"set": {"subtype": "error_max_structured_output_retries", "is_error": True,
              "errors": ["Failed to provide valid structured output after 5 attempts"]},
      "drop": ["result", "structured_output"]},
     "invalid_json: Failed to provide valid structured output after 5 attempts"),
    ({"structured": "red"}, "the JSON answer is a string, the schema asks for object"),
])
def test_claude_code_json_schema_failures_are_typed(claude, step, words):
    claude.plan(step)
    with pytest.raises(omega.ProviderError) as err:
        cc(claude, omega.Context("Colour?", schema=SCHEMA))
    assert type(err.value) is omega.ProviderError and err.value.code == "invalid_json"
    assert words in str(err.value) and len(claude.calls()) == 1


def test_claude_code_refuses_a_schema_longer_than_one_argument_may_be(claude, api):
    most = 32 * 4096 - 1              # Linux's MAX_ARG_STRLEN, the closing NUL included

    def schema(size):
        value = {"type": "object", "description": ""}
        value["description"] = "d" * (size - len(json.dumps(value, separators=(",", ":"))))
        return value
    reply = cc(claude, omega.Context("hi", schema=schema(most)))    # the real limit holds it
    argv = claude.calls()[0]["argv"]
    assert reply.data == {"colour": "red"} and len(argv[argv.index("--json-schema") + 1]) == most
    config = claude.config()
    config["provider"]["openai"] = cfg("openai", api)["provider"]["openai"]
    with pytest.raises(omega.ConfigError) as err:
        omega.complete(omega.Context("hi", schema=schema(most + 1)), "claude-code", config,
                       fallback=["openai"])
    assert str(err.value) == ("claude-code: the schema is 131,072 bytes as JSON; the claude "
                              "CLI takes it as one command-line argument, which may be at "
                              "most 131,071 bytes (an HTTP provider takes more)")
    assert len(claude.calls()) == 1 and api.requests == []        # nothing ran, no fallback


# --- claude-code: reasoning (--effort, MAX_THINKING_TOKENS, thinking blocks) --

def cli_thinking(streamed):
    """The lines of a stream-json run that thinks: message m1 (thinking, then its answer,
    as the real CLI writes them, one block a line), a subagent's thinking, and message m2
    (thinking only); streamed: with m1's partial messages first."""
    def assistant(mid, block, parent=None):
        return {"type": "assistant", "session_id": "s-1", "parent_tool_use_id": parent,
                "message": {"id": mid, "model": "claude-opus-4-8", "content": [block]}}

    def event(inner):
        return {"type": "stream_event", "event": inner, "parent_tool_use_id": None}
    half = len(THOUGHT) // 2
    lines = [event({"type": "message_start", "message": {"id": "m1", "content": []}}),
             event({"type": "content_block_start", "index": 0, "content_block": {
                 "type": "thinking", "thinking": "", "signature": ""}}),
             *(event({"type": "content_block_delta", "index": 0, "delta": {
                 "type": "thinking_delta", "thinking": t}}) for t in (THOUGHT[:half], THOUGHT[half:])),
             event({"type": "content_block_delta", "index": 0, "delta": {
                 "type": "signature_delta", "signature": SIGNATURE}}),
             event({"type": "content_block_delta", "index": 1, "delta": {
                 "type": "text_delta", "text": "Four."}})] * streamed
    return lines + [assistant("m1", {"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}),
                    assistant("m1", {"type": "text", "text": "Four."}),
                    assistant("m9", {"type": "thinking", "thinking": "Not mine."}, "toolu_1"),
                    assistant("m2", {"type": "thinking", "thinking": "Checked."})]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
def test_claude_code_reasoning_comes_from_its_thinking_blocks(claude, streaming):
    claude.plan({"lines": cli_thinking(streaming), "result": "Four."})
    config = claude.config(allowed_tools=["Read"])
    if streaming:
        s = omega.stream("2+2?", "claude-code", config, reasoning="high")
        with s:
            assert "".join(s) == "Four."
        reply = s.reply
        assert s.reasoning == reply.reasoning
    else:
        reply = omega.complete("2+2?", "claude-code", config, reasoning="high")
    assert reply.text == "Four." and reply.reasoning == THOUGHT + "\n\nChecked."
    (call,) = claude.calls()
    argv = call["argv"]
    assert argv[argv.index("--output-format") + 1] == "stream-json" and "--verbose" in argv
    assert argv[argv.index("--effort") + 1] == "high" and call["thinking"] == "16384"
    assert argv.index("--effort") < argv.index("--allowedTools")   # that flag takes the rest


def test_claude_code_gets_an_effort_and_a_budget_or_zero_for_off(claude):
    for reasoning, effort, budget in ((None, None, None), ("off", None, "0"),
                                      ("low", "low", "1024"), (3000, "medium", "3000")):
        omega.complete("hi", "claude-code", claude.config(), reasoning=reasoning)
        call = claude.calls()[-1]
        argv = call["argv"]
        assert (argv[argv.index("--effort") + 1] if "--effort" in argv else None,
                call["thinking"]) == (effort, budget), reasoning
        assert (argv[argv.index("--output-format") + 1] == "json") == (effort is None)


# =============================================================================
# 8. The backend table
# =============================================================================

def test_request_and_response_functions_are_plain_and_separate():
    settings = omega.provider_settings({"provider": {"gemini": {"api_key": KEY}}}, "gemini")
    url, headers, body = omega.gemini_request(omega.Context("hi"), settings)
    assert url.endswith("/v1beta/models/gemini-2.0-flash:generateContent")
    assert omega.gemini_response(gemini_ok(), settings).text == "Hello from Gemini"
    assert omega.PROVIDERS["gemini"].request is omega.gemini_request
    assert set(omega.PROVIDERS) == set(omega.NAMES)


# =============================================================================
# 9. Calling
# =============================================================================

# --- the status timer --------------------------------------------------------

def test_status_timer_reports_then_repeats_then_stops(api):
    statuses, twice = [], threading.Event()

    def heard(message):
        statuses.append(message)
        if len(statuses) == 2:
            twice.set()

    def reply(request):                   # the answer once the timer has spoken twice
        twice.wait(10)
        return {"body": openai_ok()}
    api.default = reply
    config = cfg("openai", api)
    config["omega"] = {"status": {"delay_secs": 0.1, "repeat_secs": 0.1, "message": "slow...",
                                  "repeat_message": "still..."}}
    omega.complete(omega.Context("hi"), "openai", config, on_status=heard)
    seen = list(statuses)
    assert seen[0] == "slow..." and set(seen[1:]) == {"still..."} and 2 <= len(seen) <= 5
    time.sleep(0.25)
    assert statuses == seen                     # nothing after the call returned


def test_status_timer_stops_on_failure_and_makes_no_thread_without_callback(api):
    before = threading.active_count()
    stop = omega.start_status_timer(None, omega.STATUS_DEFAULTS)
    assert threading.active_count() == before and stop() is None
    statuses, said = [], threading.Event()

    def heard(message):
        statuses.append(message)
        said.set()

    def reply(request):                   # the error once the timer has spoken
        said.wait(10)
        return {"status": 400, "body": openai_error(400, "bad")}
    api.default = reply
    config = cfg("openai", api)
    config["omega"] = {"status": {"delay_secs": 0.1, "repeat_secs": 0.1}}
    with pytest.raises(omega.ProviderError):
        omega.complete(omega.Context("hi"), "openai", config, on_status=heard)
    count = len(statuses)
    assert count >= 1 and statuses[0] == omega.STATUS_DEFAULTS["message"]
    time.sleep(0.25)
    assert len(statuses) == count and threading.active_count() <= before + 1


class FakeTimer:
    """threading.Timer that never runs by itself: the test fires it."""
    made = []

    def __init__(self, delay, function, args):
        self.delay, self.function, self.args, self.cancelled = delay, function, args, False
        self.daemon = False
        FakeTimer.made.append(self)

    def start(self):
        pass

    def cancel(self):
        self.cancelled = True

    def fire(self):
        self.function(*self.args)


def test_status_timer_schedule_and_a_timer_that_fires_as_it_is_stopped(monkeypatch):
    monkeypatch.setattr(FakeTimer, "made", [])
    monkeypatch.setattr(omega.threading, "Timer", FakeTimer)
    said = []
    stop = omega.start_status_timer(said.append, {**omega.STATUS_DEFAULTS, "delay_secs": 3,
                                                  "repeat_secs": 7})
    first = FakeTimer.made[0]
    assert (first.delay, first.daemon, said) == (3, True, [])
    first.fire()                                     # the first report, then every 7 s
    second = FakeTimer.made[1]
    assert said == [omega.STATUS_DEFAULTS["message"]] and second.delay == 7
    second.fire()
    assert said[-1] == omega.STATUS_DEFAULTS["repeat_message"] and len(FakeTimer.made) == 3
    stop()
    assert FakeTimer.made[2].cancelled
    FakeTimer.made[2].fire()                         # it was already running when stopped
    assert len(said) == 2 and len(FakeTimer.made) == 3   # nothing said, nothing scheduled


def test_status_timer_works_for_claude_code(claude):
    claude.plan({"raw": "", "hang": True})
    statuses = []
    config = claude.config(timeout_secs=0.3)
    config["omega"] = {"status": {"delay_secs": 0.1, "repeat_secs": 10}}
    with pytest.raises(omega.ProviderTimeout):
        omega.complete(omega.Context("hi"), config=config, on_status=statuses.append)
    assert statuses == [omega.STATUS_DEFAULTS["message"]]


def test_the_status_timer_stops_at_the_first_piece(api):
    body = sse(oa_chunk("a"), done=False)
    rest = sse(oa_chunk("b"), oa_chunk(finish="stop"))
    config = {**cfg("openai", api), "omega": {"status": {"delay_secs": 0.2, "repeat_secs": 5}}}
    api.reply(action="pieces", pieces=[(0, body), (0.5, rest)], release_after=True,
              framing="chunked", headers={"Content-Type": "text/event-stream"})
    said = []
    s = omega.stream("hi", "openai", config, on_status=said.append)
    assert next(s) == "a"
    time.sleep(0.3)                       # past delay_secs after the first piece: no message
    assert said == []
    s.close()
    api.reply(action="pieces", pieces=[(0.5, body + rest)], framing="chunked",
              headers={"Content-Type": "text/event-stream"})
    s = omega.stream("hi", "openai", config, on_status=said.append)
    assert next(s) == "a" and said == ["This is taking a moment..."]
    s.close()


# --- routing: model_complex, classify, route, auto_route ---------------------

def model_sent(name, request):
    if name == "gemini":
        return request.path.split("/models/")[1].split(":")[0]
    return request.body["model"]


@pytest.mark.parametrize("ctx, expected", [
    (omega.Context("hi", complex=True), "big-model"),
    (omega.Context("hi", complex=True, model="chosen"), "chosen"),
    (omega.Context("hi"), None),
], ids=["complex", "request-model-wins", "simple"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_model_complex_for_every_http_provider(api, name, ctx, expected):
    api.default = lambda r: {"body": OK[name]()}
    ask_via(name, api, ctx, model_complex="big-model")
    assert model_sent(name, api.last()) == (expected or omega.DEFAULTS[name]["model"])


def test_model_complex_for_claude_code_and_metadata_model(claude):
    reply = cc(claude, omega.Context("hi", complex=True))
    argv = claude.calls()[-1]["argv"]
    assert argv[argv.index("--model") + 1] == "claude-opus-4-6"
    assert reply.metadata.model == "claude-opus-4-6"


def classifier_server(api, answer):
    """The first request is the classifier's; later ones are answered plainly."""
    api.default = lambda r: {"body": openai_ok(answer if "DIRECT" in
                                               r.body["messages"][-1]["content"] else "done")}


@pytest.mark.parametrize("answer, verdict", [
    ("DIRECT", False), ("direct\n", False),
    ("1. Read the code\n2. Change three files\n3. Run the tests", True),
    ("Plan:\n  1) design\n  2) build", True),
    ("9. one\n10. two\n11. three", True),
    ("1. Just answer it", False),
    ("I think this is easy enough.", False),
    ("DIRECT\n1. a\n2. b", True),
])
def test_classify_answers(api, answer, verdict):
    classifier_server(api, answer)
    ctx = omega.Context("Refactor the whole auth module")
    assert omega.classify(ctx, cfg("openai", api, model_complex="o3")) is verdict
    sent = api.last().body
    assert len(api.requests) == 1 and sent["model"] == "gpt-4o"
    assert "DIRECT" in sent["messages"][-1]["content"]
    assert sent["messages"][-1]["content"].endswith("Refactor the whole auth module")
    assert "tools" not in sent


def test_classify_failure_means_not_complex(api):
    api.reply({"error": {"message": "bad", "type": "invalid_request_error"}}, status=400)
    assert omega.classify(omega.Context("x"), cfg("openai", api)) is False
    assert omega.classify(omega.Context("x"), cfg("ollama", refused_url(), max_retries=0)) is False


def test_classify_with_claude_code_is_one_turn_without_tools(claude, mcp_server):
    claude.plan({"result": "1. a\n2. b"})
    assert omega.classify(omega.Context("Build an app"), claude.config(
        allowed_tools=["Bash"], mcp_servers=[mcp_server("ok")]))
    argv = claude.calls()[0]["argv"]
    assert argv[argv.index("--max-turns") + 1] == "1" and "--allowedTools" not in argv
    assert "--mcp-config" not in argv                  # the configured MCP servers neither
    assert argv[argv.index("--model") + 1] == "claude-sonnet-4-6"


@pytest.mark.parametrize("ctx, answer, model, classified", [
    (omega.Context("Build a compiler"), "1. a\n2. b", "o3", True),
    (omega.Context("Build a compiler"), "DIRECT", "gpt-4o", True),
    (omega.Context("Build a compiler", model="mine"), "1. a\n2. b", "mine", False),
    (omega.Context("Build a compiler", complex=True), "DIRECT", "o3", False),
], ids=["complex", "simple", "model-already-chosen", "complex-already-decided"])
def test_route_sets_the_model_and_respects_what_is_decided(api, ctx, answer, model, classified):
    classifier_server(api, answer)
    routed = omega.route(ctx, cfg("openai", api, model_complex="o3"))
    assert routed.model == model and len(api.requests) == int(classified)
    assert routed.current_message == ctx.current_message and ctx.model in (None, "mine")


@pytest.mark.parametrize("auto_route, ctx, cli_args, models", [
    (False, omega.Context("Build a compiler"), None, ["gpt-4o"]),
    (True, omega.Context("Build a compiler"), None, ["gpt-4o", "o3"]),
    (True, omega.Context("Build a compiler", complex=True), None, ["o3"]),
    (True, omega.Context("Build a compiler", model="pinned"), None, ["pinned"]),
    (False, None, ["--auto-route", "Build a compiler"], ["gpt-4o", "o3"]),
    (False, None, ["--auto-route", "-m", "pinned", "Build it"], ["pinned"]),
    (True, None, ["--complex", "Build a compiler"], ["o3"]),
], ids=["off", "config", "config-complex-already-decided", "config-model-chosen", "cli-flag",
        "cli-flag-model-chosen", "config-cli-complex"])
def test_auto_route_is_opt_in_and_costs_one_call(api, cli_main, auto_route, ctx, cli_args,
                                                 models):
    """The models of the requests made, in order: the classifier's (the fast model)
    only when auto-routing has something to decide."""
    classifier_server(api, "1. plan\n2. build\n3. test")
    config = cfg("openai", api, model_complex="o3")
    if auto_route:
        config["provider"]["auto_route"] = True
    if cli_args is None:
        omega.complete(ctx, config=config)
    else:
        assert cli_main(config, "-q", *cli_args) == 0
    assert [r.body["model"] for r in api.requests] == models
    assert ("DIRECT" in api.requests[0].body["messages"][-1]["content"]) == (len(models) == 2)


# --- the fallback chain ------------------------------------------------------

def chain(first, second, fallback=("anthropic",), **first_section):
    """openai (first) falls back to anthropic (second)."""
    config = cfg("openai", first, **first_section)
    config["provider"]["anthropic"] = cfg("anthropic", second)["provider"]["anthropic"]
    config["provider"]["fallback"] = list(fallback)
    return config


def test_fallback_past_a_refused_port(api2):
    api2.reply(anthropic_ok())
    statuses = []
    reply = omega.complete(omega.Context("hi", model="gpt-4.1"), config=chain(refused_url(), api2),
                           on_status=statuses.append)
    assert reply.text == "Hello from Claude" and reply.metadata.provider_used == "anthropic"
    assert len(reply.metadata.fallbacks) == 1
    assert reply.metadata.fallbacks[0].startswith("openai: ") and "refused" in reply.metadata.fallbacks[0]
    assert statuses[-1] == "openai unavailable (connection refused), trying anthropic"
    assert api2.last().body["model"] == "claude-sonnet-4-20250514"   # not gpt-4.1


def test_fallback_after_503_retries_and_after_a_missing_key(api, api2):
    for _ in range(3):
        api.reply({"error": {"message": "down", "type": "server_error"}}, status=503)
    api2.reply(anthropic_ok())
    reply = omega.complete(omega.Context("hi"), config=chain(api, api2))
    assert reply.metadata.provider_used == "anthropic" and len(api.requests) == 3
    assert "503" in reply.metadata.fallbacks[0]
    api2.reply(anthropic_ok())
    config = chain(api, api2)
    config["provider"]["gemini"] = {}
    config["provider"]["fallback"] = ["gemini", "anthropic"]
    reply = omega.complete(omega.Context("hi"), "openai", {**config, "provider": {
        **config["provider"], "openai": {}}}, fallback=["gemini", "anthropic"])
    assert reply.metadata.provider_used == "anthropic"
    assert [f.split(":")[0] for f in reply.metadata.fallbacks] == ["openai", "gemini"]


@pytest.mark.parametrize("reply", [
    dict(body={"error": {"message": "bad", "type": "invalid_request_error"}}, status=400),
    dict(body={"error": {"message": "no", "type": "x", "code": "model_not_found"}}, status=404),
    dict(body=openai_ok(choices=[])),
])
def test_no_fallback_after_a_request_error_or_empty_response(api, api2, reply):
    api.reply(**reply)
    with pytest.raises(omega.ProviderError) as err:
        omega.complete(omega.Context("hi"), config=chain(api, api2))
    assert api2.requests == [] and err.value.provider == "openai"
    assert list(err.value.fallbacks) == []


def test_all_failing_raises_the_first_error_with_the_others(api2):
    api2.reply({"type": "error", "error": {"type": "authentication_error",
                                           "message": "invalid x-api-key"}}, status=401)
    with pytest.raises(omega.ProviderUnavailable) as err:
        omega.complete(omega.Context("hi"), config=chain(refused_url(), api2))
    assert err.value.provider == "openai"
    assert list(err.value.fallbacks) == ["anthropic: 401 authentication_error: invalid x-api-key"]


def test_disabled_fallback_is_skipped(api2):
    api2.reply(anthropic_ok())
    config = chain(refused_url(), api2, max_retries=0)
    config["provider"]["gemini"] = {"enabled": False}
    config["provider"]["fallback"] = ["gemini", "anthropic"]
    reply = omega.complete(omega.Context("hi"), config=config)
    assert reply.metadata.provider_used == "anthropic"


@pytest.mark.parametrize("provider, fallback, from_env, used", [
    ("openai", None, False, None),                 # chosen explicitly: stays put
    ("openai", ["anthropic"], False, "anthropic"),  # with an explicit chain: moves on
    (None, None, True, "anthropic"),               # default from $OMEGA_PROVIDER: chain applies
    (None, None, False, "anthropic"),              # default from the file: chain applies
], ids=["explicit-provider", "explicit-chain", "OMEGA_PROVIDER", "configured-default"])
def test_an_explicit_provider_is_not_fallen_back_from_without_an_explicit_chain(
        api2, monkeypatch, provider, fallback, from_env, used):
    api2.default = lambda request: {"body": anthropic_ok()}
    config = chain(refused_url(), api2)          # openai, then the configured anthropic
    if from_env:
        del config["provider"]["default"]
        monkeypatch.setenv("OMEGA_PROVIDER", "openai")
    if used is None:
        with pytest.raises(omega.ProviderUnavailable) as err:
            omega.complete(omega.Context("hi"), provider, config, fallback=fallback)
        assert api2.requests == [] and list(err.value.fallbacks) == []
        return
    reply = omega.complete(omega.Context("hi"), provider, config, fallback=fallback)
    assert reply.metadata.provider_used == used and len(api2.requests) == 1
    assert reply.metadata.fallbacks[0].startswith("openai: ")


@pytest.mark.parametrize("failure", ["refused", "unknown-host"])
def test_refused_or_unknown_host_moves_to_the_next_provider_at_once(api2, monkeypatch, failure):
    first = refused_url() if failure == "refused" else "http://no-such-host.invalid:11434"
    host, port = first.split("//")[1].split(":")
    real_getaddrinfo, attempts = socket.getaddrinfo, []

    def getaddrinfo(name, service, *args, **kwargs):      # counts connection attempts
        if (name, str(service)) == (host, port):
            attempts.append(name)
            if failure == "unknown-host":                   # no real resolver is asked
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(name, service, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    api2.reply(anthropic_ok())
    statuses = []
    reply = omega.complete(omega.Context("hi"), config=chain(first, api2),
                           on_status=statuses.append)
    assert reply.metadata.provider_used == "anthropic" and len(attempts) == 1
    assert not any("retrying" in s for s in statuses)
    assert len(statuses) == 1 and statuses[0].startswith("openai unavailable (")
    assert statuses[0].endswith(", trying anthropic")


def test_one_deadline_for_the_whole_chain(api, cli_main):
    api.default = lambda request: {"action": "stall"}
    names = ["openai", "anthropic", "openrouter", "gemini", "ollama"]
    config = {"provider": {"default": names[0], "fallback": names[1:]}}
    for name in names:
        config["provider"][name] = cfg(name, api)["provider"][name]
    started = time.monotonic()
    assert cli_main(config, "--timeout", "0.3", "hi") == 5
    assert time.monotonic() - started < 3
    assert len(api.requests) == 1          # the first used it all: no time left for the rest


def test_the_final_error_names_every_provider_tried(api2, cli_main, capsys):
    api2.default = lambda request: {"status": 401, "body": {"type": "error", "error": {
        "type": "authentication_error", "message": "invalid x-api-key"}}}
    config = chain(refused_url(), api2, fallback=("anthropic", "gemini"))
    config["provider"]["gemini"] = {}                        # no key: not set up
    with pytest.raises(omega.ProviderUnavailable) as err:
        omega.complete(omega.Context("hi"), config=config)
    e = err.value
    assert e.provider == "openai"
    assert [f.split(":")[0] for f in e.fallbacks] == ["anthropic", "gemini"]
    assert all(name in str(e) for name in ("openai", "anthropic", "gemini")), str(e)
    capsys.readouterr()
    code = cli_main(config, "-q", "hi")
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 7 and all(n in last for n in ("openai", "anthropic", "gemini"))


def cut_words(line, text):
    """Words of line that are only a piece of a longer word of text (cut mid-word)."""
    whole = set(re.findall(r"[\w$]+", text))
    return [w for w in re.findall(r"[\w$]+", line) if w not in whole and w in text]


def test_fallback_status_lines_are_never_cut_mid_word(api):
    api.reply(openai_ok())
    config = cfg("openai", api)
    config["provider"].update(default="anthropic", fallback=["openai"], anthropic={})
    statuses = []
    reply = omega.complete(omega.Context("hi"), config=config, on_status=statuses.append)
    assert reply.metadata.provider_used == "openai" and len(statuses) == 1
    line, story = statuses[0], reply.metadata.fallbacks[0]     # "anthropic: no API key: ..."
    assert line.startswith("anthropic ") and line.endswith(", trying openai")
    reason = line[line.find("(") + 1:line.rfind(")")] if "(" in line else line
    assert cut_words(reason, story) == [], line


def test_a_fallback_with_a_config_error_is_reported_not_skipped(api2, claude, tmp_path):
    api2.reply(anthropic_ok())
    config = chain(refused_url(), api2, fallback=("claude-code", "anthropic"))
    config["provider"]["claude-code"] = {"command": claude.command,
                                         "working_dir": str(tmp_path / "missing")}
    reply = omega.complete(omega.Context("hi"), config=config)
    assert reply.metadata.provider_used == "anthropic"
    fallbacks = reply.metadata.fallbacks
    assert [f.split(":")[0] for f in fallbacks] == ["openai", "claude-code"]
    assert "working_dir" in fallbacks[1] and claude.calls() == []


# --- the keywords every call takes (Options) ---------------------------------

def answering_json(api, text):
    """Every request to api answered with text, streamed or not, in OpenAI's shape."""
    api.default = lambda r: dict(raw=sse(oa_chunk(text), oa_chunk(finish="stop")),
                                 action="stream", framing="chunked", most=1 << 20,
                                 headers={"Content-Type": "text/event-stream"}) \
        if r.body.get("stream") else {"body": openai_ok(text)}


def read_through(s):
    """A Stream read to its end; its reply's data."""
    assert "".join(s) == s.reply.text
    return s.reply.data


# Each public way to call, given the keywords (and the prompt "hi"), to the JSON answer.
CALL_WAYS = {
    "complete": lambda kw: omega.complete("hi", **kw).data,
    "stream": lambda kw: read_through(omega.stream("hi", **kw)),
    "ask": lambda kw: omega.ask("hi", **kw),
    "Chat": lambda kw: json.loads(omega.Chat(**kw).ask("hi")),
    "Chat.stream": lambda kw: read_through(omega.Chat(**kw).stream("hi")),
    "a Chat turn": lambda kw: json.loads(omega.Chat().ask("hi", **{
        k: v for k, v in kw.items() if k != "history"})),
}


@pytest.mark.parametrize("way", CALL_WAYS)
def test_every_way_to_call_takes_the_same_keywords(api, tmp_path, way):
    answering_json(api, '{"a": 1}')
    (tmp_path / "notes.txt").write_bytes(NOTES)
    statuses, call_key = [], "sk-call-0123456789abcdef0123"
    keywords = dict(provider="openai", config=cfg("openai", refused_url()), model="m-given",
                    system="Be brief", history=[{"role": "user", "content": "earlier"},
                                                {"role": "assistant", "content": "noted"}],
                    attachments=[str(tmp_path / "notes.txt")], schema={"type": "object"},
                    max_tokens=7, temperature=0.5, timeout=20, base_url=api.url + "/v1",
                    api_key=call_key, max_retries=0, on_status=statuses.append, fallback=[],
                    reasoning="low")
    assert CALL_WAYS[way](keywords) == {"a": 1}
    body, sent = api.last().body, api.last().headers
    assert body["reasoning_effort"] == "low"
    assert sent["authorization"] == "Bearer " + call_key
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("m-given", 7, 0.5)
    assert body["response_format"]["type"] == "json_schema"
    assert body["messages"][0] == {"role": "system", "content": "Be brief"}
    assert [p["text"] for p in body["messages"][-1]["content"]] == ["hi", NOTES_BLOCK]
    earlier = [m["content"] for m in body["messages"][1:-1]]
    assert earlier == ([] if way == "a Chat turn" else ["earlier", "noted"])


def test_the_old_positional_arguments_still_work(api):
    answering_json(api, "ok")
    config, heard = cfg("openai", api), []
    assert omega.complete(omega.Context("hi"), "openai", config, heard.append).text == "ok"
    assert "".join(omega.stream(omega.Context("hi"), "openai", config, heard.append)) == "ok"
    assert omega.ask("hi", "openai", "m-pos", "Be brief", config) == "ok"
    assert api.last().body["model"] == "m-pos"
    assert api.last().body["messages"][0] == {"role": "system", "content": "Be brief"}
    chat = omega.Chat("openai", "Be terse", config, "m-chat", heard.append,
                      [{"role": "user", "content": "earlier"}, omega.Message("assistant", "ok")])
    assert chat.ask("hi") == "ok" and api.last().body["model"] == "m-chat"
    assert [m["content"] for m in api.last().body["messages"]] == ["Be terse", "earlier", "ok",
                                                                   "hi"]


def test_a_keyword_wins_over_the_contexts_field_and_the_rest_stay(api):
    answering_json(api, "ok")
    ctx = omega.Context("hi", system_prompt="from ctx", model="ctx-model", max_tokens=5)
    omega.complete(ctx, "openai", cfg("openai", api), model="kw-model", temperature=0.1)
    body = api.last().body
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("kw-model", 5, 0.1)
    assert body["messages"][0] == {"role": "system", "content": "from ctx"}
    omega.stream(ctx, "openai", cfg("openai", api), system="from kw").close()   # nothing sent
    assert "".join(omega.stream(ctx, "openai", cfg("openai", api), system="from kw")) == "ok"
    assert api.last().body["messages"][0] == {"role": "system", "content": "from kw"}
    assert ctx.model == "ctx-model"                                  # the caller's ctx as it was


def test_the_other_context_fields_stay_reachable(api, claude):
    api.reply(openai_ok("ok"))
    config = cfg("openai", api, model_complex="the-big-one")
    assert omega.ask("hi", provider="openai", config=config, complex=True) == "ok"
    assert api.last().body["model"] == "the-big-one"
    omega.ask("hi", provider="claude-code", config=claude.config(), max_turns=3,
              allowed_tools=["Read"])
    argv = claude.calls()[-1]["argv"]
    assert argv[argv.index("--max-turns") + 1] == "3" and "Read" in argv
    chat = omega.Chat(provider="openai", config=config)
    api.reply(openai_ok("ok"))
    assert chat.ask("hi", complex=True, model=None) == "ok"
    assert api.last().body["model"] == "the-big-one"


@pytest.mark.parametrize("value", [True, 0, -1, 1.5, "max", "High", "", "none"])
def test_a_bad_reasoning_value_is_one_config_error_before_anything_is_sent(api, value):
    for ctx, keywords in ((omega.Context("hi", reasoning=value), {}), ("hi", {"reasoning": value})):
        with pytest.raises(omega.ConfigError) as err:
            omega.complete(ctx, "openai", cfg("openai", api), **keywords)
        assert str(err.value).startswith('reasoning: expected "off", "low", "medium", "high" or '
                                         'a number of tokens above 0, not ')
        assert "\n" not in str(err.value) and api.requests == []
    with pytest.raises(omega.ConfigError, match="^reasoning: expected "):    # PROVIDERS too
        omega.PROVIDERS["openai"](omega.Context("hi", reasoning=value),
                                  omega.provider_settings(cfg("openai", api), "openai"))
    assert api.requests == []


@pytest.mark.parametrize("name, call", [
    ("complete", lambda: omega.complete("hi", bogus=1)),
    ("stream", lambda: omega.stream("hi", bogus=1)),
    ("ask", lambda: omega.ask("hi", bogus=1)),
    ("Chat", lambda: omega.Chat(bogus=1)),
    ("Chat.ask", lambda: omega.Chat().ask("hi", bogus=1)),
    ("Chat.stream", lambda: omega.Chat().stream("hi", bogus=1)),
    ("models", lambda: omega.models(bogus=1))], ids=lambda x: x if isinstance(x, str) else "")
def test_an_unknown_keyword_is_a_type_error_naming_it(name, call):
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value) == f"{name}() got an unexpected keyword argument 'bogus'"


def test_a_chat_keeps_its_own_history_and_models_takes_what_applies():
    with pytest.raises(TypeError, match=r"^Chat.ask\(\) got an unexpected keyword argument "
                                        r"'history'$"):
        omega.Chat().ask("hi", history=[])
    with pytest.raises(TypeError, match=r"^models\(\) got an unexpected keyword argument "
                                        r"'schema'$"):
        omega.models(schema={"type": "object"})


def test_models_takes_base_url_api_key_and_timeout(api):
    api.reply({"object": "list", "data": [{"id": "m-1", "object": "model"}]})
    call_key = "sk-call-0123456789abcdef0123"
    names = omega.models("openai", cfg("openai", refused_url()), base_url=api.url + "/v1",
                         api_key=call_key, timeout=5, max_retries=0)
    assert names == ["m-1"] and api.last().headers["authorization"] == "Bearer " + call_key
    api.reply(action="stall")
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout, match=r"within 0\.1 s"):
        omega.models("openai", cfg("openai", api), timeout=0.1)
    assert time.monotonic() - started < 2
    with pytest.raises(omega.ConfigError, match="timeout"):
        omega.models("openai", cfg("openai", api), timeout=0)


def test_the_options_record_is_public_frozen_and_its_repr_shows_no_key():
    assert "Options" in omega.__all__ and "timeout" in omega.Options.__doc__
    options = omega.Options(api_key=KEY, config=cfg("openai", "http://x", api_key=KEY),
                            attachments=[PNG], model="m")
    assert not leaks(repr(options)) and "PNG" not in repr(options) and "model='m'" in repr(options)
    assert not leaks(repr(omega.Chat(api_key=KEY).options))
    with pytest.raises(AttributeError):
        options.model = "other"
    with pytest.raises(omega.ConfigError, match="timeout"):
        omega.Options(timeout=-1)


def test_a_chat_says_it_belongs_to_one_thread_at_a_time():
    assert "one thread at a time" in " ".join(omega.Chat.__doc__.split())


def test_tools_and_approve_are_keywords_of_every_call_and_a_chat_sends_them_every_turn(api):
    asked = []

    def approve(call):
        asked.append(call.name)
        return True

    def answer_or_call(request):
        if request.body["messages"][-1]["role"] == "tool" or request.body["messages"][-1][
                "content"] == "And now?":
            return {"body": openai_ok("Noon.")}
        return {"body": answer_with("openai", calls=[("c1", "now", {})])}
    api.default = answer_or_call
    config = cfg("openai", api)
    ways = {"complete": lambda: omega.complete("hi", "openai", config, tools=[now],
                                               approve=approve).text,
            "stream": lambda: "".join(omega.stream("hi", "openai", config, tools=[now],
                                                   approve=approve)),
            "ask": lambda: omega.ask("hi", "openai", config=config, tools=[now], approve=approve),
            "Chat": lambda: omega.Chat("openai", config=config, tools=[now],
                                       approve=approve).ask("hi"),
            "a Chat turn": lambda: omega.Chat("openai", config=config).ask(
                "hi", tools=[now], approve=approve)}
    for way, call in ways.items():
        assert call() == "Noon.", way
        assert api.last().body["tools"][0]["function"]["name"] == "now"
        assert asked.pop() == "now" and asked == []
    chat = omega.Chat("openai", config=config, tools=[now])
    assert chat.ask("hi") == "Noon." and chat.ask("And now?") == "Noon."
    assert api.last().body["tools"][0]["function"]["name"] == "now"      # every turn
    assert [m["role"] for m in api.last().body["messages"]] == ["user", "assistant", "user"]
    assert chat.replies[0].tool_calls[0].result == "2025-10-26T09:00:00Z"
    assert "tools=<1>" in repr(omega.Options(tools=[now]))


# --- complete() and ask() ----------------------------------------------------

def test_ask_returns_the_text_and_passes_everything_on(api):
    api.reply(ollama_ok("Hi!"))
    config = cfg("ollama", api)
    config["provider"]["default"] = "openai"                  # provider= wins over it
    statuses = []
    text = omega.ask("Say hi", provider="ollama", model="qwen3", system="Be brief",
                     config=config, history=[omega.Message("user", "Hello?"),
                                             omega.Message("assistant", "Hello.")],
                     max_tokens=5, temperature=0.2, timeout=30, fallback=[],
                     on_status=statuses.append)
    assert text == "Hi!" and type(text) is str
    assert api.last().path == "/api/chat" and api.last().body == {
        "model": "qwen3", "stream": False, "options": {"num_predict": 5, "temperature": 0.2},
        "messages": [{"role": "system", "content": "Be brief"},
                     {"role": "user", "content": "Hello?"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Say hi"}]}


def test_ask_uses_the_configured_default_provider_and_the_timeout(api, tmp_path):
    path = write(tmp_path / "c.toml", toml_for(cfg("anthropic", api)))
    api.reply(anthropic_ok())
    assert omega.ask("hi", config=path) == "Hello from Claude"
    assert api.last().path == "/v1/messages"
    api.reply(action="stall")
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout, match=r"no answer within 0\.[0-9]+ s"):
        omega.ask("hi", config=path, timeout=0.1)
    assert time.monotonic() - started < 2                  # not anthropic's 600 s


def test_timeout_error_names_the_timeout_that_was_asked_for(api):
    api.reply(action="stall")
    with pytest.raises(omega.ProviderTimeout, match=r"within 0\.1 s"):
        omega.complete(omega.Context("hi"), "openai", cfg("openai", api), timeout=0.1)


def test_ask_returns_the_parsed_value_and_to_dict_carries_it(api, tmp_path):
    (tmp_path / "notes.txt").write_bytes(NOTES)
    api.reply(answer_of("gemini", '["red", "green"]'))
    colours = omega.ask("Two colours", "gemini", config=cfg("gemini", api),
                        schema={"type": "array", "items": {"type": "string"}},
                        attachments=[str(tmp_path / "notes.txt")])
    assert colours == ["red", "green"]
    assert api.last().body["contents"][0]["parts"][0] == {"text": NOTES_BLOCK}
    api.reply(answer_of("gemini", "7"))
    reply = omega.complete(omega.Context("A number", schema={"type": "integer"}), "gemini",
                           cfg("gemini", api))
    assert reply.to_dict()["data"] == 7 and "data" not in omega.OutgoingMessage(
        "hi", omega.MessageMetadata()).to_dict()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1])
def test_a_temperature_that_is_not_a_finite_number_0_or_more_is_refused(api, cli_main, capsys,
                                                                       value):
    with pytest.raises(omega.ConfigError, match="temperature: expected a number"):
        omega.complete(omega.Context("hi", temperature=value), "openai", cfg("openai", api))
    assert cli_main(cfg("openai", api), "--temperature", str(value), "hi") == 2
    assert capsys.readouterr().err.startswith("omega: --temperature: expected a number")
    assert api.requests == []


# --- stream() and Stream -----------------------------------------------------

def test_stream_is_public_and_documented():
    assert "stream" in omega.__all__ and "Stream" in omega.__all__
    assert omega.stream.__doc__ and omega.Stream.__doc__


def test_nothing_is_sent_before_the_first_piece_is_asked_for(api):
    serve_stream(api, sse(oa_chunk("a"), oa_chunk(finish="stop")))
    s = omega.stream("hi", "openai", cfg("openai", api))
    time.sleep(0.05)
    assert api.requests == [] and s.reply is None and s.text == ""
    assert next(s) == "a" and len(api.requests) == 1
    with pytest.raises(omega.ConfigError):                       # checked when called
        omega.stream("hi", "nope")


@pytest.mark.parametrize("first", [
    b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\","
    b"\"message\":\"Overloaded\"}}\n\n",
    b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}\n\n",
], ids=["overloaded-first-event", "ended-before-text"])
def test_failures_before_the_first_piece_are_retried(api, first):
    serve_stream(api, first)
    serve_stream(api, STREAM_BODIES["anthropic/normal_docs_example.sse"])
    statuses = []
    s = omega.stream("hi", "anthropic", cfg("anthropic", api), on_status=statuses.append)
    assert list(s) == ["Hello", "!"] and s.reply.metadata.attempts == 2
    assert len(api.requests) == 2 and "retrying" in statuses[0]


def test_failures_after_the_first_piece_are_not_retried_nor_sent_elsewhere(api):
    other = FakeAPI()
    threading.Thread(target=other.serve_forever, args=(0.005,), daemon=True).start()
    try:
        serve_stream(api, STREAM_BODIES["anthropic/error_midstream_overloaded.sse"])
        config = cfg("anthropic", api)
        config["provider"]["openai"] = {"base_url": other.url + "/v1", "api_key": KEY}
        s = omega.stream("hi", "anthropic", config, fallback=["openai"])
        with pytest.raises(omega.ProviderError) as err:
            list(s)
        assert err.value.partial_text == "The answer" and err.value.status == 529
        assert len(api.requests) == 1 and other.requests == []
        # Before any piece, the same failure goes on to the fallback.
        serve_stream(api, STREAM_BODIES["anthropic/error_midstream_overloaded.sse"]
                     .split(b"event: content_block_delta")[0] + b"event: error\ndata: "
                     b"{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n")
        serve_stream(other, sse(oa_chunk("from the fallback"), oa_chunk(finish="stop")))
        config["provider"]["anthropic"]["max_retries"] = 0
        s = omega.stream("hi", "anthropic", config, fallback=["openai"])
        assert list(s) == ["from the fallback"]
        assert s.reply.metadata.provider_used == "openai"
        assert "overloaded" in s.reply.metadata.fallbacks[0]
    finally:
        other.release.set()
        other.shutdown()
        other.server_close()


def test_a_chunked_stream_cut_short_is_retried_before_the_first_piece_only(api):
    def cut(body):                       # chunks sent, then the connection closed, no last chunk
        serve_stream(api, body, hold_at=len(body), then="cut")
    cut(b": nothing yet\n\n")
    serve_stream(api, sse(oa_chunk("whole"), oa_chunk(finish="stop")))
    pieces, s = stream_via("openai", api)
    assert pieces == ["whole"] and s.reply.metadata.attempts == 2
    cut(sse(oa_chunk("half"), done=False))
    with pytest.raises(omega.ProviderUnavailable) as err:
        stream_via("openai", api)
    assert err.value.partial_text == "half" and len(api.requests) == 3


def test_close_hangs_up_at_once_and_leaves_nothing_behind(api):
    api.reply(action="endless", framing="chunked", every=0.01,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("more"), done=False),
              headers={"Content-Type": "text/event-stream"})
    threads = threading.active_count()
    s = omega.stream("hi", "openai", cfg("openai", api))
    assert next(s) == "first"
    s.close()
    s.close()                                                     # twice is harmless
    deadline = time.monotonic() + 3
    while api.hangups == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.hangups == 1 and s.reply is None
    assert threading.active_count() <= threads + 1               # at most the watchdog
    with pytest.raises(StopIteration):
        next(s)


def test_break_then_garbage_collection_closes_the_stream(api):
    import gc
    api.reply(action="endless", framing="chunked", every=0.01,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("more"), done=False),
              headers={"Content-Type": "text/event-stream"})
    s = omega.stream("hi", "openai", cfg("openai", api))
    for piece in s:
        break
    del s, piece
    gc.collect()
    deadline = time.monotonic() + 3
    while api.hangups == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.hangups == 1


def test_leaving_a_with_block_closes_the_stream(api):
    api.reply(action="endless", framing="close", every=0.01,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("more"), done=False),
              headers={"Content-Type": "text/event-stream"})
    with omega.stream("hi", "openai", cfg("openai", api)) as s:
        for piece in s:
            break
    deadline = time.monotonic() + 3
    while api.hangups == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.hangups == 1


def test_an_abandoned_stream_is_closed_by_reference_counting_not_the_collector(api):
    import gc
    import weakref
    api.reply(action="endless", framing="chunked", every=0.01,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("more"), done=False),
              headers={"Content-Type": "text/event-stream"})
    api.reply(openai_ok("the next call"))
    gc.disable()                          # only reference counting may close it
    try:
        s = omega.stream("hi", "openai", cfg("openai", api))
        stream_alive = weakref.ref(s)
        for piece in s:
            break
        del s
        assert stream_alive() is None                # nothing refers back to it: no cycle
        assert api.hung_up.wait(3)                   # the server saw the disconnect ...
        assert omega.complete("hi", "openai", cfg("openai", api)).text == "the next call"
    finally:                                         # ... before the next call
        gc.enable()


def test_abandoning_streams_in_a_loop_never_hangs(api, tmp_path):
    """The README's idiom, `for piece in omega.stream(...): break`, 1,000 times, then
    from 16 threads, then a plain complete() after each abandoned stream. With a
    cycle between a Stream and its generator the collector closed them, at times
    inside urllib3's pool lock, which closing needs too: the program hung (the
    collecting child above provokes that moment at will; this is the user's loop)."""
    answering_json(api, "ok")
    try:
        out = subprocess.run([sys.executable, "-c", ABANDONING_CHILD, HERE,
                              json.dumps(cfg("openai", api))],
                             capture_output=True, text=True, timeout=90, env=cli_env(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("abandoned streams hung the program")
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr[-2000:]


# --- Chat and per-call settings ----------------------------------------------

def first_exchange_as_sent(name, body):
    """The earlier turns of a request body, in that API's own shape, as (role, text)."""
    if name == "gemini":
        return [(c["role"], c["parts"][0]["text"]) for c in body["contents"]]
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_chat_sends_the_earlier_turns_in_each_apis_shape(api, name):
    api.reply(OK[name]())
    api.reply(OK[name]())
    chat = omega.Chat(provider=name, system="Be brief", config=cfg(name, api))
    first = chat.ask("Name a colour")
    assert chat.ask("Another one") == first
    assistant_role = "model" if name == "gemini" else "assistant"
    assert first_exchange_as_sent(name, api.last().body) == [
        ("user", "Name a colour"), (assistant_role, first), ("user", "Another one")]
    assert [m.role for m in chat.history] == ["user", "assistant"] * 2
    assert len(chat.replies) == 2 and chat.replies[0].text == first


def test_a_failed_chat_turn_adds_nothing_and_stream_turns_count(api):
    chat = omega.Chat(provider="openai", config=cfg("openai", api, max_retries=0),
                      history=[{"role": "user", "content": "earlier"},
                               {"role": "assistant", "content": "noted"}])
    api.reply(openai_error(400, "invalid_request_error"), status=400)
    with pytest.raises(omega.ProviderError):
        chat.ask("this fails")
    assert len(chat.history) == 2 and chat.replies == []
    serve_stream(api, sse(oa_chunk("streamed"), oa_chunk(finish="stop")))
    assert "".join(chat.stream("go on")) == "streamed"
    assert [m.content for m in chat.history] == ["earlier", "noted", "go on", "streamed"]
    assert first_exchange_as_sent("openai", api.last().body)[:2] == [
        ("user", "earlier"), ("assistant", "noted")]


def test_chat_with_claude_code_resumes_the_session_and_sends_only_the_new_message(claude):
    chat = omega.Chat(provider="claude-code", config=claude.config())
    chat.ask("Remember 42")
    chat.ask("What did I say?")
    first, second = claude.calls()
    session = chat.replies[0].metadata.session_id
    assert "--resume" not in first["argv"]
    assert second["argv"][second["argv"].index("--resume") + 1] == session
    assert second["stdin"] == "[User]\nWhat did I say?"


def test_per_call_settings_win_and_the_key_stays_with_its_call(api, api2):
    config = cfg("openai", refused_url(), api_key="sk-file-key-000000000000")
    config["provider"]["anthropic"] = cfg("anthropic", api2)["provider"]["anthropic"]
    api.reply(openai_error(500, "server_error"), status=500)
    api2.reply(anthropic_ok())
    call_key = "sk-call-SECRET-4242424242424242"
    reply = omega.complete("hi", "openai", config, fallback=["anthropic"], timeout=5,
                           base_url=api.url + "/v1", api_key=call_key, max_retries=0)
    assert reply.metadata.provider_used == "anthropic" and len(api.requests) == 1
    assert api.last().headers["authorization"] == "Bearer " + call_key
    assert call_key not in json.dumps(api2.last().headers) and api2.last().headers[
        "x-api-key"] == KEY
    api.reply(openai_ok("ok"))
    assert omega.ask("hi", provider="openai", config=config, base_url=api.url + "/v1",
                     timeout=5) == "ok"                  # no TypeError, and no file key sent
    assert "authorization" not in api.last().headers
    with pytest.raises(omega.ConfigError, match="max_retries"):
        omega.complete("hi", "openai", config, max_retries=99)


# --- cost: what the backend says, else the configured prices -----------------

@pytest.mark.parametrize("name, body, prices, cost", [
    ("openai", openai_ok(), {"gpt-4o": [2.5, 10]}, (12 * 2.5 + 5 * 10) / 1e6),
    ("openai", openai_ok(), {"gpt-4o-2024-08-06": [1, 1], "gpt-4o": [2.5, 10]}, 17 / 1e6),
    ("openai", CACHE_USAGE["openai"], {"gpt-4o": [2, 8, 0.5]},
     (176 * 2 + 1024 * 0.5 + 5 * 8) / 1e6),
    ("anthropic", CACHE_USAGE["anthropic"], {"claude-sonnet-4-20250514": [3, 15, 0.3, 3.75]},
     (10 * 3 + 1000 * 0.3 + 100 * 3.75 + 4 * 15) / 1e6),
    ("anthropic", CACHE_USAGE["anthropic"], {"claude-sonnet-4-20250514": [3, 15]},
     (1110 * 3 + 4 * 15) / 1e6),
    ("openrouter", CACHE_USAGE["openrouter"], {"anthropic/claude-sonnet-4": [3, 15]}, 0.001),
    ("openai", openai_ok(), {"gpt-4.1": [2, 8]}, None),
    ("openai", openai_ok(usage=None), {"gpt-4o": [2.5, 10]}, None),
    ("ollama", ollama_ok(), None, None),
], ids=["asked-model", "served-model-first", "cache-reads", "cache-reads-and-writes",
        "cache-at-input-price", "backend-says-it", "no-price-for-it", "no-counts", "no-prices"])
def test_cost_is_the_backends_else_from_prices_else_unknown(api, name, body, prices, cost):
    api.reply(body)
    m = ask_via(name, api, **({"prices": prices} if prices else {})).metadata
    assert m.cost_usd == (pytest.approx(cost) if cost is not None else None)


def test_a_fallback_is_priced_by_its_own_table(api, api2):
    api.reply(openai_error(503, "overloaded"), status=503)
    api2.reply(ollama_ok())
    config = {"provider": {"default": "openai", "fallback": ["ollama"],
                           "openai": {**cfg("openai", api, max_retries=0)["provider"]["openai"],
                                      "prices": {"llama3": [100, 100]}},
                           "ollama": {"base_url": api2.url, "prices": {"llama3": [1, 2]}}}}
    m = omega.complete("hi", config=config).metadata
    assert m.provider_used == "ollama" and m.cost_usd == pytest.approx((7 * 1 + 3 * 2) / 1e6)


# --- map(): many prompts at once ---------------------------------------------

def echoing(api, hold=None):
    """Each request answered with its own prompt; a prompt with "bad" gets a 400, one
    with "slow" waits until hold (an Event) is set."""
    def reply(request):
        prompt = request.body["messages"][-1]["content"]
        if "bad" in prompt:
            return {"status": 400, "body": openai_error(400, "invalid_request_error",
                                                        f"no {prompt}")}
        if "slow" in prompt:
            hold.wait(10)
        return {"body": openai_ok(prompt)}
    api.default = reply


def test_map_answers_in_input_order_with_each_error_in_its_place(api):
    first_done = threading.Event()
    echoing(api, hold=first_done)
    seen = []

    def progress(done, failed, total):
        seen.append((done, failed, total))
        first_done.set()                # the slow first item ends after the others began
    prompts = ["slow 0", "p1", "bad 2", "p3", "p4", "bad 5", "p6"]
    results = omega.map(prompts, workers=3, provider="openai",
                        config=cfg("openai", api, max_retries=0), on_progress=progress)
    assert isinstance(results, list) and len(results) == 7
    assert [r.text if isinstance(r, omega.OutgoingMessage) else type(r) for r in results] == [
        "slow 0", "p1", omega.ProviderError, "p3", "p4", omega.ProviderError, "p6"]
    assert "no bad 5" in str(results[5]) and results.failed == 2
    assert [done for done, _, _ in seen] == list(range(1, 8)) and seen[-1] == (7, 2, 7)
    assert {total for _, _, total in seen} == {7}


def test_map_takes_a_function_as_pythons_map_does(api):
    echoing(api)
    config = cfg("openai", api)
    as_python = omega.map(lambda row: omega.Context(f"row {row}"), range(3), provider="openai",
                          config=config)
    keyword = omega.map((r for r in "ab"), fn=lambda row: f"row {row}", config=config)
    totals = []
    plain = omega.map((f"p{n}" for n in range(2)), config=config,
                      on_progress=lambda *seen: totals.append(seen[2]))
    assert [r.text for r in as_python] == ["row 0", "row 1", "row 2"]
    assert [r.text for r in keyword] == ["row a", "row b"]
    assert [r.text for r in plain] == ["p0", "p1"] and totals == [None, None]  # length unknown
    assert omega.map([], config=config) == []


def test_map_reads_its_input_as_the_work_goes(api):
    go = threading.Event()
    echoing(api, hold=go)
    read = []

    def prompts():
        for n in range(100):
            read.append(n)
            yield f"slow {n}"
    done = {}
    thread = threading.Thread(target=lambda: done.update(results=omega.map(
        prompts(), workers=3, provider="openai", config=cfg("openai", api))))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while (len(read) < 6 or len(api.requests) < 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(api.requests) == 3 and len(read) == 6     # 3 at work, 3 read ahead
    finally:
        go.set()
        thread.join(30)
    assert [r.text for r in done["results"]] == [f"slow {n}" for n in range(100)]


def test_map_keeps_at_most_workers_requests_in_flight(api):
    lock, state = threading.Lock(), {"n": 0, "now": 0, "most": 0}
    together = threading.Barrier(3, timeout=10)

    def reply(request):
        with lock:
            state["n"] += 1
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            n = state["n"]
        if n <= 3:
            together.wait()             # the first three are in flight at once
        time.sleep(0.01)                # a fourth sent meanwhile would be counted
        with lock:
            state["now"] -= 1
        return {"body": openai_ok()}
    api.default = reply
    results = omega.map(["hi"] * 12, workers=3, provider="openai", config=cfg("openai", api))
    assert results.failed == 0 and len(api.requests) == 12 and state["most"] == 3


def test_a_bug_or_an_error_of_fn_stops_the_map_and_is_raised(api):
    echoing(api)
    config = cfg("openai", api)

    def fn(row):
        if row == 5:
            raise ValueError("row 5 is broken")
        return f"row {row}"
    with pytest.raises(ValueError, match="row 5 is broken"):
        omega.map(fn, range(50), workers=2, config=config)
    assert len(api.requests) < 50
    with pytest.raises(TypeError, match="a prompt is a str or a Context, not int"):
        omega.map([1], config=config)
    before = threading.active_count()
    with pytest.raises(omega.ConfigError, match="unknown provider 'nope'"):
        omega.map(["hi"], provider="nope", config=config)      # before anything is sent
    with pytest.raises(omega.ConfigError, match="workers: expected a whole number 1 or more"):
        omega.map(["hi"], workers=0, config=config)
    with pytest.raises(TypeError, match="iterable of prompts"):
        omega.map("hi", config=config)
    with pytest.raises(TypeError, match="unexpected keyword argument 'jobs'"):
        omega.map(["hi"], jobs=2, config=config)
    assert threading.active_count() == before and len(api.requests) < 50


def test_map_results_add_up_the_known_costs_and_count_the_failures(api):
    echoing(api)
    results = omega.map(["a", "bad b", "c"], config=cfg("openai", api, max_retries=0,
                                                         prices={"gpt-4o": [1000, 1000]}))
    assert results.failed == 1 and results.cost_usd == pytest.approx(2 * 17 * 1000 / 1e6)
    assert sum(r.metadata.cost_usd or 0 for r in results if isinstance(r, omega.OutgoingMessage)
               ) == pytest.approx(results.cost_usd)
    assert omega.map(["a"], config=cfg("openai", api)).cost_usd is None      # no price: unknown


MAP_CTRL_C = r'''
import json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import omega
read, stopped = [0], {}

def endless():
    while True:
        read[0] += 1
        yield f"prompt {read[0]}"

def interrupted(signum, frame):
    stopped["at"] = time.monotonic()
    raise KeyboardInterrupt
signal.signal(signal.SIGINT, interrupted)
try:
    omega.map(endless(), workers=4, config=json.loads(sys.argv[2]))
except KeyboardInterrupt:
    took = time.monotonic() - stopped["at"]
    sockets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            sockets += [fd] if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") else []
        except OSError:
            pass
    print(json.dumps({"took": took, "read": read[0], "sockets": len(sockets), "threads": [
        t.name for t in threading.enumerate() if t.name.startswith("omega-map")]}))
'''


def test_ctrl_c_stops_a_map_of_an_endless_input_within_a_second_leaving_nothing_open(
        api, tmp_path):
    """A real SIGINT while four calls wait on a server that never answers: the map
    raises KeyboardInterrupt within a second, its workers gone, no socket left open,
    the endless input read no further than the work needed."""
    api.default = lambda request: {"action": "stall"}
    child = subprocess.Popen([sys.executable, "-c", MAP_CTRL_C, HERE,
                              json.dumps(cfg("openai", api))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    try:
        deadline = time.monotonic() + 15
        while len(api.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(api.requests) == 4
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=15)
    finally:
        child.kill()
    assert child.returncode == 0, err
    found = json.loads(out)
    assert found["took"] < 1.5, found                   # 1 s, and some slack for a busy machine
    assert found == {**found, "read": 8, "sockets": 0, "threads": []}
    assert len(api.requests) == 4


def test_omega_never_calls_its_own_map_and_star_imports_leave_pythons_alone():
    """omega.map shadows Python's map inside omega.py: a call to map() there would
    send prompts. And `from omega import *` does not take Python's map away."""
    import ast
    tree = ast.parse(open(OMEGA_PY, encoding="utf-8").read())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "map"]
    assert calls == [] and "map" not in omega.__all__ and "Results" in omega.__all__


# =============================================================================
# 10. Tools
# =============================================================================

# --- a tool: schemas from type hints and docstrings --------------------------

@pytest.mark.parametrize("hint, schema", [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (list, {"type": "array"}),
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (List[str], {"type": "array", "items": {"type": "string"}}),
    (dict, {"type": "object"}),
    (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
    (Literal["c", "f"], {"type": "string", "enum": ["c", "f"]}),
    (Literal[1, "one"], {"type": ["integer", "string"], "enum": [1, "one"]}),
    (str | None, {"type": ["string", "null"]}),
    (Optional[int], {"type": ["integer", "null"]}),
    (Optional[Literal["c", "f"]], {"type": ["string", "null"], "enum": ["c", "f", None]}),
    (list[str] | None, {"type": ["array", "null"], "items": {"type": "string"}}),
    (list[bool | None], {"type": "array", "items": {"type": ["boolean", "null"]}}),
    (Annotated[str, "extra"], {"type": "string"}),
    (Any, {}),
    (Any | None, {}),
])
def test_schema_of_each_hint(hint, schema):
    assert omega.hint_schema(hint) == schema

    def f(x: hint):                                       # through tool_from, as a user writes it
        pass
    assert omega.tool_from(f).parameters == {"type": "object", "properties": {"x": schema},
                                             "required": ["x"]}


def test_a_function_becomes_a_tool():
    def forecast(city: str, days: int = 1, unit: Literal["c", "f"] | None = None, extra=None):
        """The weather for the next days
        in a city.

        Longer text that is not the description.

        city: the city's name, e.g. "Paris"
        days: how many days,
            counted from today
        unit: "c" or "f"
        """
    tool = omega.tool_from(forecast)
    assert tool.name == "forecast" and tool.fn is forecast
    assert tool.description == "The weather for the next days in a city."
    same(tool.parameters, {"type": "object", "properties": {
        "city": {"type": "string", "description": 'the city\'s name, e.g. "Paris"'},
        "days": {"type": "integer", "description": "how many days, counted from today"},
        "unit": {"type": ["string", "null"], "enum": ["c", "f", None], "description": '"c" or "f"'},
        "extra": {}}, "required": ["city"]})
    assert omega.tool_from(llm_version) == omega.Tool("llm_version", llm_version, "",
                                                      {"type": "object", "properties": {}})


@pytest.mark.parametrize("doc", [
    'Find a city.\n\n:param city: the name\n:param int days: how many\n:type city: str\n',
    'Find a city.\n\nArgs:\n    city (str): the name\n    days: how\n        many\n\nReturns:\n    text\n',
    'Find a city.\ncity: the name\ndays: how many',
    'Find a city.\nArgs:\n    city: the name\n    days: how many\n',
])
def test_parameter_descriptions_in_three_styles(doc):
    def find(city: str, days: int):
        pass
    find.__doc__ = doc
    tool = omega.tool_from(find)
    assert tool.description == "Find a city."
    assert tool.parameters["properties"]["city"]["description"] == "the name"
    assert tool.parameters["properties"]["days"]["description"] == "how many"


def test_hints_written_as_text_are_resolved_in_the_functions_module():
    namespace = {}
    exec('from __future__ import annotations\nfrom typing import Literal\n'
         'def forecast(city: str, unit: Literal["c", "f"] | None = None, n: list[int] = ()):\n'
         '    """Forecast."""\n', namespace)
    assert omega.tool_from(namespace["forecast"]).parameters == {
        "type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": ["string", "null"],
                                                 "enum": ["c", "f", None]},
            "n": {"type": "array", "items": {"type": "integer"}}}, "required": ["city"]}


def test_a_tool_by_hand():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    tool = omega.tool_from(omega.Tool("search", get_weather, parameters=schema))
    assert tool == omega.Tool("search", get_weather, "Get the weather in a given city", schema)
    assert omega.tool_from(omega.Tool("search", None, "Search", schema)) == \
        omega.Tool("search", None, "Search", schema)
    assert omega.tool_from(omega.Tool("w", get_weather, "Mine")).description == "Mine"
    assert omega.tool_from(omega.Tool("_" + "a" * 63, now)).name == "_" + "a" * 63


def positional_only(city, /):
    pass


def star_args(*cities):
    pass


def star_kwargs(**options):
    pass


def odd_hint(when: complex):
    pass


def union_hint(x: int | str):
    pass


def int_keys(x: dict[int, str]):
    pass


def tuple_hint(x: tuple[int, int]):
    pass


def enum_literal(x: Literal[complex(1, 2)]):
    pass


def a_city(name: str) -> str:
    return name


@pytest.mark.parametrize("item, words", [
    (lambda city: city, ["'<lambda>'", "name"]),
    (omega.Tool("get.weather", a_city), ["'get.weather'", "name"]),
    (omega.Tool("1weather", a_city), ["'1weather'"]),
    (omega.Tool("-weather", a_city), ["'-weather'"]),
    (omega.Tool("w" * 65, a_city), ["w" * 60]),
    (omega.Tool("", a_city), ["''"]),
    (omega.Tool("a b", a_city), ["'a b'"]),
    (star_args, ["star_args", "*cities", "variadic positional"]),
    (star_kwargs, ["star_kwargs", "**options", "variadic keyword"]),
    (positional_only, ["positional_only", "city", "positional-only"]),
    (odd_hint, ["odd_hint", "when", "complex"]),
    (union_hint, ["union_hint", "int | str"]),
    (int_keys, ["int_keys", "dict[int, str]"]),
    (tuple_hint, ["tuple_hint", "tuple[int, int]"]),
    (enum_literal, ["enum_literal", "Literal"]),
    (omega.Tool("search", None), ["search", "function or parameters"]),
    (omega.Tool("search", None, parameters={"type": "array"}), ["search", "object"]),
    (omega.Tool("search", None, parameters={"type": "thing"}), ["search", "unknown type 'thing'"]),
    ("get_weather", ["'get_weather'", "neither a function nor a Tool"]),
], ids=lambda x: x if isinstance(x, str) else getattr(x, "__name__", None))
def test_bad_definitions_are_config_errors_naming_the_function_before_anything_is_sent(
        api, item, words):
    with pytest.raises(omega.ConfigError) as e:
        omega.tools_from([item])
    for word in words:
        assert word in str(e.value)
    with pytest.raises(omega.ConfigError) as again:
        omega.complete("hi", "openai", cfg("openai", api), tools=[get_weather, item])
    assert str(again.value) == str(e.value) and api.requests == []


def test_a_name_used_twice_or_no_list():
    with pytest.raises(omega.ConfigError, match="two tools are named 'get_weather'"):
        omega.tools_from([get_weather, omega.Tool("get_weather", now)])
    assert [t.name for t in omega.tools_from([get_weather, omega.Tool("other", get_weather)])] \
        == ["get_weather", "other"]
    with pytest.raises(omega.ConfigError, match="expected a list of functions or Tools"):
        omega.tools_from(get_weather)


def test_a_hint_that_cannot_be_resolved_is_named():
    namespace = {}
    exec("from __future__ import annotations\ndef where(city: Cityy) -> str: ...\n", namespace)
    with pytest.raises(omega.ConfigError, match=r"tool where: a type hint cannot be resolved .*Cityy"):
        omega.tool_from(namespace["where"])


# --- one call: results and error results -------------------------------------

@pytest.mark.parametrize("arguments, result, error", [
    ({"city": "Paris"}, "12 degrees celsius and rain in Paris", False),
    ({"city": "Paris", "unit": "fahrenheit", "days": 3.0, "ratio": 2, "when": None},
     "12 degrees fahrenheit and rain in Paris", False),
    ({"city": "Atlantis"}, "ValueError: no such city", True),
    ({"city": "Nowhere"}, "RuntimeError", True),
    ({"city": "Refused"}, "Refused is not a city I may look up", True),      # ToolFailed: as is
    ({"city": "Data"}, '{"city": "Data", "temperature": "12°C", "days": [1, 2], '
                       '"when": "<class \'omega.Message\'>"}', False),
    ({"city": "Nothing"}, "null", False),
    ({}, "invalid arguments for weather: missing required city", True),
    ({"city": "Paris", "country": "FR"}, "invalid arguments for weather: unknown country "
                                         "(the parameters are: city, unit, days, ratio, when)", True),
    ({"city": 3}, "invalid arguments for weather: city must be string, not integer", True),
    ({"city": "Paris", "days": True}, "invalid arguments for weather: days must be integer, "
                                      "not boolean", True),
    ({"city": "Paris", "days": 1.5}, "invalid arguments for weather: days must be integer, "
                                     "not number", True),
    ({"city": "Paris", "when": 1}, "invalid arguments for weather: when must be string or "
                                   "null, not integer", True),
    ({"city": "Paris", "unit": "kelvin"}, 'invalid arguments for weather: unit must be one of '
                                          '["celsius", "fahrenheit"]', True),
])
def test_run_tool(arguments, result, error):
    call = omega.run_tool(omega.tool_from(weather), omega.ToolCall("c", "weather", arguments),
                          65536)
    assert (call.result, call.error) == (result, error) and call.arguments == arguments


def test_run_tool_arguments_not_json_unknown_tools_and_schemas_that_allow_more():
    def run(tool, call, limit=65536):
        done = omega.run_tool(tool, call, limit)
        return done.result, done.error
    assert run(omega.tool_from(weather), omega.tool_call("c", "weather", '{"city": "Par')) == \
        ('the arguments are not a JSON object: {"city": "Par', True)
    assert run(None, omega.ToolCall("c", "wether", {})) == \
        ("there is no tool named 'wether' that can run", True)
    declared = omega.tool_from(omega.Tool("search", None, "", {"type": "object"}))
    assert run(declared, omega.ToolCall("c", "search", {}))[1] is True

    def search(**options):
        return json.dumps(options)
    tool = omega.Tool("search", search, "", {"type": "object", "properties": {
        "q": {"type": "string"}}, "additionalProperties": True})
    assert run(tool, omega.ToolCall("c", "search", {"q": "x", "n": 2})) == ('{"q": "x", "n": 2}',
                                                                           False)
    open_tool = omega.Tool("search", search, "", {"type": "object"})
    assert run(open_tool, omega.ToolCall("c", "search", {"n": 2})) == ('{"n": 2}', False)


@pytest.mark.parametrize("arguments", [None, "", "  ", {}, "{}"])
def test_no_arguments_mean_an_empty_object(arguments):
    assert omega.tool_call("c", "now", arguments) == omega.ToolCall("c", "now", {})


@pytest.mark.parametrize("arguments, raw", [
    ('{"city": "Par', '{"city": "Par'), ("[1, 2]", "[1, 2]"), ("null", "null"),
    ('"Paris"', '"Paris"'), ([1, 2], "[1, 2]"), (3, "3")])
def test_arguments_that_are_no_object_keep_their_text(arguments, raw):
    call = omega.tool_call("c", "get_weather", arguments)
    assert call.raw_arguments == raw and call.to_dict()["arguments"] == raw
    assert "raw_arguments" not in repr(call)


def test_results_over_the_limit_are_cut_at_a_character_boundary():
    def big() -> str:
        return "é" * 100                             # 200 bytes
    tool = omega.tool_from(big)
    assert omega.run_tool(tool, omega.ToolCall(None, "big", {}), 200).result == "é" * 100
    for limit in range(0, 200):
        call = omega.run_tool(tool, omega.ToolCall(None, "big", {}), limit)
        kept, note = call.result.split("\n", 1)
        assert kept == "é" * (limit // 2) and not call.error
        assert note == f"[cut: the result was 200 bytes, only the first {limit:,} are here]"

    def fail():
        raise ValueError("x" * 1000)
    call = omega.run_tool(omega.tool_from(fail), omega.ToolCall(None, "fail", {}), 20)
    assert call.error and call.result.startswith("ValueError: xxxxxxxx\n[cut: the result was 1,012")


@pytest.mark.parametrize("error", [KeyboardInterrupt, omega.ProviderTimeout("late", "mcp")])
def test_an_interruption_or_a_deadline_is_not_a_result(error):
    def stop():
        raise error
    with pytest.raises(type(error) if not isinstance(error, type) else error):
        omega.run_tool(omega.tool_from(stop), omega.ToolCall(None, "stop", {}), 100)


def test_approve_is_asked_only_for_a_call_that_would_run():
    asked, ran_with = [], []

    def approve(call):
        asked.append(call)
        return call.arguments["city"] != "Rome"

    def city(city: str) -> str:
        ran_with.append(city)
        return city
    tool = omega.tool_from(city)
    calls = [omega.run_tool(tool, omega.ToolCall("1", "city", {"city": c}), 100, approve)
             for c in ("Paris", "Rome")]
    assert [(c.result, c.error) for c in calls] == [("Paris", False),
                                                    ("the user declined this call", True)]
    assert ran_with == ["Paris"] and [c.arguments for c in asked] == [{"city": "Paris"},
                                                                      {"city": "Rome"}]
    omega.run_tool(tool, omega.ToolCall("3", "city", {}), 100, approve)          # bad arguments
    omega.run_tool(None, omega.ToolCall("4", "nope", {}), 100, approve)          # unknown
    assert len(asked) == 2


# --- the loop, on every HTTP backend ------------------------------------------

@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_parallel_calls_run_in_order_and_every_failure_is_a_result(api, name, streaming):
    order = []

    def weather_logged(**arguments):
        order.append(arguments.get("city"))
        return weather(**arguments)
    tool = omega.Tool("weather", weather_logged, parameters=omega.tool_from(weather).parameters)
    queue(api, name, streaming, calls=[
        ("c1", "weather", {"city": "Paris"}), ("c2", "weather", {"city": "Atlantis"}),
        ("c3", "wether", {"city": "Oslo"}), ("c4", "weather", {"city": 3}),
        ("c5", "weather", {"city": "Data"}), ("c6", "weather", {"city": "Refused"})])
    queue(api, name, streaming, "Rain in Paris.")
    reply, _ = with_tools(name, api, streaming, [tool])
    assert reply.text == "Rain in Paris." and order == ["Paris", "Atlantis", "Data", "Refused"]
    flag = name in ("anthropic", "gemini")                # the APIs that mark an error result
    assert sent_results(name, api.last().body) == [
        ("12 degrees celsius and rain in Paris", False if flag else None),
        ("ValueError: no such city", True if flag else None),
        ("there is no tool named 'wether' that can run", True if flag else None),
        ("invalid arguments for weather: city must be string, not integer", True if flag else None),
        ('{"city": "Data", "temperature": "12°C", "days": [1, 2], '
         '"when": "<class \'omega.Message\'>"}', False if flag else None),
        ("Refused is not a city I may look up", True if flag else None)]
    assert [c.error for c in reply.tool_calls] == [False, True, True, True, False, True]
    assert len(api.requests) == 2


def test_arguments_that_are_not_json_are_an_error_result(api):
    body = answer_with("openai", calls=[("c1", "weather", {})])
    body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city": "Par'
    api.reply(body)
    api.reply(openai_ok("Sorry."))
    reply = omega.complete("hi", "openai", cfg("openai", api), tools=[weather])
    assert sent_results("openai", api.last().body) == [
        ('the arguments are not a JSON object: {"city": "Par', None)]
    echoed = api.last().body["messages"][-2]["tool_calls"][0]["function"]["arguments"]
    assert echoed == '{"city": "Par' and reply.tool_calls[0].to_dict()["arguments"] == echoed


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_results_over_max_tool_result_bytes_are_cut_with_a_note(api, name):
    def long_text() -> str:
        return "ab" * 100
    queue(api, name, False, calls=[("c1", "long_text", {})])
    queue(api, name, False, "ok")
    with_tools(name, api, False, [long_text], section={"max_tool_result_bytes": 50})
    assert sent_results(name, api.last().body)[0][0] == \
        "ab" * 25 + "\n[cut: the result was 200 bytes, only the first 50 are here]"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_a_503_in_round_2_is_retried_with_the_same_results_and_no_tool_runs_twice(
        api, name, streaming):
    runs = []

    def counted(city: str) -> str:
        runs.append(city)
        return f"sunny in {city}"
    queue(api, name, streaming, calls=[("c1", "counted", {"city": "Paris"})])
    api.reply(openai_error(503, "overloaded"), status=503)
    queue(api, name, streaming, "Sunny.")
    reply, _ = with_tools(name, api, streaming, [counted])
    first, failed, retried = api.requests
    assert runs == ["Paris"] and failed.raw == retried.raw and reply.text == "Sunny."
    assert sent_results(name, retried.body)[0][0] == "sunny in Paris"
    assert (reply.metadata.attempts, reply.metadata.num_turns) == (3, 2)


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_after_a_tool_ran_a_failure_is_never_sent_to_a_fallback(api, api2, name, streaming):
    other = "ollama" if name != "ollama" else "openai"
    config = cfg(name, api, max_retries=0)
    config["provider"][other] = cfg(other, api2)["provider"][other]
    runs = []

    def counted(city: str) -> str:
        runs.append(city)
        return "sunny"
    # Streamed, round 1 writes no text: only the tool that ran keeps the call here.
    text = "" if streaming else "Let me look."
    queue(api, name, streaming, text, calls=[("c1", "counted", {"city": "Paris"})])
    api.reply(openai_error(500, "server_error"), status=500)
    with pytest.raises(omega.ProviderError) as err:
        with_tools(name, api, streaming, [counted], section={"max_retries": 0},
                   fallback=[other], config=config)
    assert api2.requests == [] and runs == ["Paris"] and err.value.status == 500
    assert err.value.partial_text == (text or None) and err.value.fallbacks == []
    assert [(c.name, c.result) for c in err.value.tool_calls] == [("counted", "sunny")]
    api.reply(openai_error(500, "server_error"), status=500)    # no tool ran yet: it may
    queue(api2, other, False, "From the fallback.")
    reply, _ = with_tools(name, api, False, [counted], fallback=[other], config=config)
    assert reply.text == "From the fallback." and runs == ["Paris"]
    assert "counted" in json.dumps(api2.last().body["tools"])


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", HTTP_NAMES)
def test_max_turns_ends_after_exactly_that_many_rounds(api, name, streaming):
    runs = []

    def again(n: int) -> str:
        runs.append(n)
        return "ask again"
    def ask_again(request):
        text, calls = f"Round {len(api.requests)}.", [("c", "again", {"n": len(runs)})]
        if not streaming:
            return {"body": answer_with(name, text, calls)}
        return {"raw": stream_with(name, text, calls), "action": "stream", "framing": "chunked",
                "headers": {"Content-Type": STREAM_TYPES["ndjson" if name == "ollama" else "sse"]}}
    api.default = ask_again
    for rounds, section, keywords in ((3, {"max_turns": 3}, {}), (2, {}, {"max_turns": 2})):
        del api.requests[:], runs[:]
        with pytest.raises(omega.ProviderError) as err:
            with_tools(name, api, streaming, [again], section=section, **keywords)
        assert err.value.code == "max_turns" and len(api.requests) == rounds
        assert runs == list(range(rounds - 1))             # the last round's calls never run
        assert [c.result for c in err.value.tool_calls] == ["ask again"] * (rounds - 1)
        assert err.value.partial_text == "\n\n".join(f"Round {n}." for n in range(1, rounds + 1))
        assert f"after {rounds} rounds" in str(err.value)
    assert omega.DEFAULTS[name]["max_turns"] == 10


def test_a_tool_that_runs_past_the_deadline_ends_the_call(api):
    passed = threading.Event()

    def slow() -> str:
        passed.wait(0.4)                                  # the call's deadline is 0.2 s
        return "late"
    api.reply(answer_with("openai", calls=[("c1", "slow", {}), ("c2", "slow", {})]))
    started = time.monotonic()
    with pytest.raises(omega.ProviderTimeout) as err:
        omega.complete("hi", "openai", cfg("openai", api), tools=[slow], timeout=0.2)
    assert "slow ran past it" in str(err.value) and len(api.requests) == 1
    assert [c.result for c in err.value.tool_calls] == ["late"]    # the second never ran
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_streamed_rounds_show_answer_text_only_with_a_blank_line_between(api, name):
    queue(api, name, True, "Let me look.", calls=[("c1", "weather", {"city": "SECRET-ARG"})])
    queue(api, name, True, "It rains.")
    reply, pieces = with_tools(name, api, True, [weather])
    assert "".join(pieces) == "Let me look.\n\nIt rains." and reply.text == "It rains."
    assert not any("SECRET" in piece for piece in pieces)


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_arguments_split_inside_a_character_are_whole(api, name):
    city = "Zürich — 東京"
    queue(api, name, True, calls=[("c1", "weather", {"city": city})], most=1)
    queue(api, name, True, "Rain.")
    reply, _ = with_tools(name, api, True, [weather])
    assert reply.tool_calls[0].arguments == {"city": city}
    assert sent_results(name, api.last().body)[0][0] == f"12 degrees celsius and rain in {city}"


@pytest.mark.parametrize("name", ["openai", "gemini", "anthropic"])
def test_tools_with_a_schema_the_final_answer_follows_it(api, name):
    queue(api, name, False, calls=[("c1", "now", {})])
    queue(api, name, False, '{"days": 66}')
    reply, _ = with_tools(name, api, False, [now], schema={"type": "object"})
    assert reply.data == {"days": 66} and len(api.requests) == 2


def test_a_server_without_tool_support_is_one_provider_error(api):
    api.reply({"error": "registry.ollama.ai/library/gemma3:4b does not support tools"}, status=400)
    with pytest.raises(omega.ProviderError) as err:
        omega.complete("hi", "ollama", cfg("ollama", api), tools=[now])
    assert "does not support tools" in str(err.value) and err.value.status == 400
    assert len(api.requests) == 1 and err.value.tool_calls == []


def test_approve_false_sends_declined_and_the_loop_goes_on(api):
    asked = []

    def approve(call):
        asked.append((call.name, call.arguments))
        return False
    queue(api, "anthropic", False, calls=[("t1", "weather", {"city": "Paris"})])
    queue(api, "anthropic", False, "Declined, fine.")
    reply = omega.complete("hi", "anthropic", cfg("anthropic", api), tools=[weather],
                           approve=approve)
    assert asked == [("weather", {"city": "Paris"})] and reply.text == "Declined, fine."
    assert sent_results("anthropic", api.last().body) == [("the user declined this call", True)]


def test_each_call_is_one_status_line(api):
    heard = []
    queue(api, "openai", False, calls=[("c1", "weather", {"city": "Paris"}),
                                       ("c2", "weather", {"city": "Atlantis"})])
    queue(api, "openai", False, "ok")
    omega.complete("hi", "openai", cfg("openai", api), tools=[weather], on_status=heard.append)
    assert heard == ['weather(city="Paris") -> 12 degrees celsius and rain in Paris',
                     'weather(city="Atlantis") -> failed: ValueError: no such city']


# --- claude-code: the user's functions through the MCP bridge ----------------

def test_claude_code_runs_the_functions_through_the_bridge(claude):
    claude.plan({"mcp": [["omega", "weather", {"city": "Paris"}],
                         ["omega", "weather", {"city": "Atlantis"}], ["omega", "now", {}],
                         ["omega", "nope", {}]], "intruder": True})
    heard = []
    reply = omega.complete("hi", "claude-code", claude.config(), tools=[weather, now],
                           approve=lambda call: call.name != "now", on_status=heard.append)
    seen, argv = claude.mcp(), claude.calls()[0]["argv"]
    bridge = seen["config"]["mcpServers"]["omega"]
    secret = bridge["env"]["OMEGA_BRIDGE_SECRET"]
    assert bridge["args"][:2] == [OMEGA_PY, "--mcp-bridge"] and len(secret) >= 32
    assert secret not in json.dumps(argv) and seen["mode"] == "0o700"
    at = argv.index("--mcp-config")
    assert argv[at + 2] == "--strict-mcp-config" and not os.path.exists(argv[at + 1])
    assert seen["allowed"] == ["mcp__omega__weather", "mcp__omega__now"]
    assert [t["name"] for t in seen["tools"]["omega"]] == ["weather", "now"]
    assert seen["tools"]["omega"][1]["inputSchema"] == {"type": "object", "properties": {}}
    assert [a.get("result", a) if isinstance(a, dict) else a for a in seen["answers"]] == [
        {"content": [{"type": "text", "text": "12 degrees celsius and rain in Paris"}],
         "isError": False},
        {"content": [{"type": "text", "text": "ValueError: no such city"}], "isError": True},
        {"content": [{"type": "text", "text": "the user declined this call"}], "isError": True},
        "denied"]                                          # not in --allowedTools
    assert seen["intruder"] == "" and seen["exits"] == [0]        # hung up on, nothing ran
    assert seen["second"][:2] == [1, ""] and "refused" in seen["second"][2]
    assert [(c.id, c.name, c.arguments, c.error) for c in reply.tool_calls] == [
        ("toolu_2", "weather", {"city": "Paris"}, False),
        ("toolu_3", "weather", {"city": "Atlantis"}, True), ("toolu_4", "now", {}, True)]
    assert heard[0] == 'weather(city="Paris") -> 12 degrees celsius and rain in Paris'


def test_claude_code_streams_with_tools_and_mcp_servers(claude, mcp_server):
    claude.plan({"mcp": [["omega", "now", {}], ["docs", "echo", {"text": "hi"}]],
                 "result": "It is noon."})
    s = omega.stream("hi", "claude-code", claude.config(mcp_servers=[mcp_server("ok")]),
                     tools=[now])
    with s:
        pieces = list(s)
    seen = claude.mcp()
    assert "".join(pieces) == s.reply.text == "It is noon." and len(pieces) == 2
    assert [c.result for c in s.reply.tool_calls] == ["2025-10-26T09:00:00Z"]
    assert seen["allowed"] == ["mcp__omega__now", "mcp__docs"]
    assert list(seen["config"]["mcpServers"]) == ["docs", "omega"] and seen["exits"][1] == 0
    assert seen["answers"][1]["result"]["content"][0]["text"] == "echo: hi (docs)"
    assert seen["config"]["mcpServers"]["docs"]["env"] == {"DOCS_TAG": "docs"}


@pytest.mark.parametrize("line, code, message", [
    (b"{", -32700, "Parse error"),
    (b"[" * 100000, -32700, "Parse error"),                 # too deep for Python's parser
    (b"[1]", -32600, "Invalid Request"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', -32600, "Invalid Request"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "resources/list"}', -32601,
     "Method not found: resources/list"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "rm"}}', -32602,
     "Unknown tool: rm"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "now", '
     b'"arguments": [1]}}', -32602, "arguments: expected an object"),
], ids=["not-json", "too-deep", "not-an-object", "method-not-text", "unknown-method",
        "unknown-tool", "arguments-not-an-object"])
def test_the_bridge_answers_a_bad_line_with_a_json_rpc_error_and_runs_nothing(line, code,
                                                                                message):
    call = omega.Call.starting_now(5)
    with omega.serve_tools(omega.tools_from([now]), None, call, 1000) as server:
        answer = omega.mcp_reply(server, line)
        assert answer["error"] == {"code": code, "message": message}
        assert answer["id"] == (1 if code > -32700 and line.startswith(b"{") else None)
        assert server.calls == []


def test_a_bridge_that_stops_reading_holds_the_answer_no_longer_than_the_deadline(
        monkeypatch):
    """The CLI stops reading its bridge mid-answer: sending the answer gives up at the
    call's deadline (here 0.3 s), not after MCP_ANSWER_SECS."""
    monkeypatch.setattr(omega, "MCP_ANSWER_SECS", 600.0)

    def big() -> str:
        """A tool whose listing fills the socket's buffer."""
    big.__doc__ = "x" * (8 * 1024 * 1024)
    ours, theirs = socket.socketpair()
    call = omega.Call.starting_now(0.3)
    with ours, theirs, omega.serve_tools(omega.tools_from([big]), None, call, 1000) as server:
        server.peers[ours] = bytearray()
        ask = server.secret + b'\n{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}\n'
        outcome = bounded(lambda: omega.answer_lines(server, ours, ask), within=10)
    assert isinstance(outcome.get("error"), OSError), outcome


def test_claude_code_with_mcp_servers_alone_gets_no_bridge(claude, mcp_server, monkeypatch):
    """Without tools= the MCP config holds the user's servers only, and no socket waits
    for a bridge that nothing would start."""
    claude.plan({"mcp": [["docs", "echo", {"text": "hi"}]], "result": "ok"})
    real, folders = omega.serve_tools, []

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with real(*args, **kwargs) as server:
            folders.append((sorted(os.listdir(os.path.dirname(server.config))),
                            server.listener))
            yield server
    monkeypatch.setattr(omega, "serve_tools", watched)
    reply = omega.complete("hi", "claude-code", claude.config(mcp_servers=[mcp_server("ok")]))
    seen = claude.mcp()
    assert reply.text == "ok" and reply.tool_calls == [] and folders == [(["mcp.json"], None)]
    assert list(seen["config"]["mcpServers"]) == ["docs"] and seen["allowed"] == ["mcp__docs"]
    assert seen["answers"][0]["result"]["content"][0]["text"] == "echo: hi (docs)"


def test_claude_code_failing_after_a_call_leaves_no_bridge_running(claude):
    claude.plan({"mcp": [["omega", "now", {}]], "orphan": True,     # the CLI leaves it running
                 "set": {"is_error": True, "result": "API Error: 500 boom"}})
    with pytest.raises(omega.ProviderError) as err:
        omega.complete("hi", "claude-code", claude.config(), tools=[now])
    bridge = int((claude.dir / "mcp_pids").read_text())
    try:
        assert "boom" in str(err.value) and [c.name for c in err.value.tool_calls] == ["now"]
        assert gone(bridge)
    finally:
        kill_leftovers(bridge)


# --- the agent tools: Read, Write, Edit, Bash in working_dir -----------------

@pytest.fixture
def agent(tmp_path):
    """The four agent tools working in tmp_path/work, by name; outside/ is beside it."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "sub").mkdir(parents=True)
    outside.mkdir()
    (tmp_path / "work-evil").mkdir()
    (tmp_path / "work-evil" / "x.txt").write_text("evil")
    (outside / "secret.txt").write_text("outside secret")
    (work / "notes.txt").write_text("one\ntwo\nthree\ntwo\n")
    (work / "link.txt").symlink_to(outside / "secret.txt")
    (work / "out").symlink_to(outside)
    call = omega.Call.starting_now(20)
    tools = omega.agent_tools(["Read", "Write", "Edit", "Bash"], str(work), 4096, call)

    def run(name, **arguments):
        result = omega.run_tool(tools[[t.name for t in tools].index(name)],
                                omega.ToolCall("c1", name, arguments), 4096)
        return result.result, result.error
    run.work, run.outside = work, outside
    return run


@pytest.mark.parametrize("name, arguments", [
    ("Read", {"file_path": "../../etc/passwd"}),
    ("Read", {"file_path": "/etc/passwd"}),
    ("Read", {"file_path": "link.txt"}),                       # a symlink planted inside
    ("Read", {"file_path": "out/secret.txt"}),
    ("Read", {"file_path": "../work-evil/x.txt"}),              # a prefix is not inside
    ("Write", {"file_path": "out/new.txt", "content": "x"}),    # through a symlinked folder
    ("Write", {"file_path": "link.txt", "content": "x"}),
    ("Write", {"file_path": "../outside/new.txt", "content": "x"}),
    ("Edit", {"file_path": "link.txt", "old_string": "outside", "new_string": "x"}),
    ("Read", {"file_path": "."}),
    ("Read", {"file_path": "sub"}),
])
def test_agent_tools_never_leave_working_dir(agent, name, arguments):
    result, error = agent(name, **arguments)
    assert error and "outside secret" not in result
    assert (agent.outside / "secret.txt").read_text() == "outside secret"
    assert sorted(os.listdir(agent.outside)) == ["secret.txt"]
    assert (agent.work.parent / "work-evil" / "x.txt").read_text() == "evil"


def test_agent_tools_read_write_and_edit(agent):
    assert agent("Read", file_path="notes.txt") == (
        "     1\tone\n     2\ttwo\n     3\tthree\n     4\ttwo", False)
    assert agent("Read", file_path=str(agent.work / "notes.txt"), offset=2, limit=1) == \
        ("     2\ttwo", False)
    assert agent("Write", file_path="new/deep/a.txt", content="héllo")[1] is False
    assert (agent.work / "new" / "deep" / "a.txt").read_text() == "héllo"
    assert agent("Edit", file_path="notes.txt", old_string="two", new_string="2") == \
        ("notes.txt: old_string found 2 times; give more context to make it unique, or set "
         "replace_all", True)
    assert agent("Edit", file_path="notes.txt", old_string="four", new_string="4") == \
        ("notes.txt: old_string not found", True)
    assert agent("Edit", file_path="notes.txt", old_string="two", new_string="2",
                 replace_all=True)[1] is False
    assert agent("Edit", file_path="notes.txt", old_string="three", new_string="3")[1] is False
    assert (agent.work / "notes.txt").read_text() == "one\n2\n3\n2\n"
    os.mkfifo(agent.work / "fifo")                 # would hang a blocking open
    assert agent("Read", file_path="fifo") == ("fifo: not a regular file", True)


def test_bash_runs_in_working_dir_and_leaves_nothing_running(agent):
    assert agent("Bash", command="pwd; echo oops >&2") == (
        f"{agent.work}\noops\n[exit code 0]", False)
    assert agent("Bash", command="exit 3") == ("[exit code 3]", True)
    result, error = agent("Bash", command="sleep 300 & echo $!")
    assert not error and gone(int(result.split()[0]))
    result, error = agent("Bash", command="yes", timeout=100)       # endless output
    assert error and len(result.encode()) <= 4096 and result.endswith("[stopped after 0.1 s]")
    assert "[output cut: the first 3,996 of" in result


def test_bash_stops_at_the_calls_deadline(tmp_path):
    tools = omega.agent_tools(["Bash"], str(tmp_path), 4096, omega.Call.starting_now(0.2))
    done = omega.run_tool(tools[0], omega.ToolCall("c1", "Bash", {
        "command": "sleep 30 & echo $! > pid; wait"}), 4096)
    assert done.error and re.search(r"\[stopped after 0\.[12] s\]$", done.result), done.result
    assert gone(int((tmp_path / "pid").read_text()))


@pytest.mark.parametrize("streaming", [False, True])
def test_agent_tools_on_an_http_backend(api, tmp_path, streaming, monkeypatch):
    """Bash gets no key: not from the usual variables, not from one api_key_env names."""
    (tmp_path / "a.txt").write_text("alpha\n")
    monkeypatch.setenv("WORK_KEY", "sk-work-0123456789abcdef\n")
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)          # not this call's key: SECRET_ENV's
    queue(api, "openai", streaming, calls=[
        ("c1", "Read", {"file_path": "a.txt"}),
        ("c2", "Bash", {"command": "echo $OPENAI_API_KEY$WORK_KEY; echo ${HOME:+home}"})])
    queue(api, "openai", streaming, "Read it.")
    reply, _ = with_tools("openai", api, streaming, [now], section={
        "allowed_tools": ["Read", "Bash"], "working_dir": str(tmp_path),
        "api_key_env": "WORK_KEY", "api_key": ""}, config=None)
    offered = [t["function"]["name"] for t in api.requests[0].body["tools"]]
    assert offered == ["now", "Read", "Bash"] and reply.text == "Read it."
    assert api.requests[0].headers["authorization"] == "Bearer sk-work-0123456789abcdef"
    assert sent_results("openai", api.last().body) == [("     1\talpha", None),
                                                        ("\nhome\n[exit code 0]", None)]


def test_agent_tools_are_off_by_default_and_named_ones_only(api, tmp_path):
    api.reply(openai_ok("plain"))
    omega.complete("hi", "openai", cfg("openai", api))
    assert "tools" not in api.last().body
    api.reply(openai_ok("only Write"))
    omega.complete(omega.Context("hi", allowed_tools=["Write"]), "openai",
                   cfg("openai", api, allowed_tools=["Read", "Bash"], working_dir=str(tmp_path)))
    assert [t["function"]["name"] for t in api.last().body["tools"]] == ["Write"]
    with pytest.raises(omega.ConfigError, match="'WebSearch' is not an agent tool"):
        omega.complete("hi", "openai", cfg("openai", api, allowed_tools=["WebSearch"]))
    assert len(api.requests) == 2


@pytest.mark.parametrize("name, section", [
    ("claude-code", {}),
    ("openai", {"allowed_tools": ["Read"]}),
    ("openai", {"mcp_servers": "ok"}),
], ids=["claude-code", "agent-tools", "mcp-servers"])
def test_a_working_dir_that_is_not_a_folder_is_one_config_error(api, claude, mcp_server,
                                                                 tmp_path, name, section):
    """The same line for each thing that works there, before anything runs or is sent."""
    missing = str(tmp_path / "gone")
    if section.get("mcp_servers"):
        section = {"mcp_servers": [mcp_server(section["mcp_servers"])]}
    config = claude.config(working_dir=missing) if name == "claude-code" else \
        cfg(name, api, working_dir=missing, **section)
    with pytest.raises(omega.ConfigError) as err:
        omega.complete("hi", name, config)
    assert str(err.value) == f"provider.{name}.working_dir: {missing!r} is not a directory"
    assert api.requests == [] and claude.calls() == []
    assert not (tmp_path / "docs.pid").exists()                   # no MCP server started


# --- MCP servers as tools ------------------------------------------------------

@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_mcp_servers_tools_on_an_http_backend(api, tmp_path, mcp_server, name):
    queue(api, name, False, calls=[("c1", "docs__echo", {"text": "hi"}),
                                   ("c2", "docs__fail", {}),
                                   ("c3", omega.mcp_tool_name("docs", "a.b.c"), {})])
    queue(api, name, False, "Done.")
    reply = omega.complete(omega.Context("hi", mcp_servers=[mcp_server("ok")]), name,
                           cfg(name, api))
    offered = api.requests[0].body["tools"]
    names = [t.get("name") or t["function"]["name"] for t in offered]
    assert names[:2] == ["docs__echo", "docs__fail"] and names[2].startswith("docs__a_b_c_")
    assert (offered[0].get("input_schema") or offered[0]["function"]["parameters"]) == \
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    assert [(c.result, c.error) for c in reply.tool_calls] == [
        ("echo: hi (docs)", False), ("no such page", True), ("dotted", False)]
    assert gone(int((tmp_path / "docs.pid").read_text()))


@pytest.mark.parametrize("mode, seconds, says", [
    ("missing", 20, "MCP server 'docs' cannot start"),
    ("exit", 20, "MCP server 'docs' exited (exit status 3): docs: cannot open the index"),
    ("garbage", 20, "MCP server 'docs' answered garbage: '<html>hello</html>'"),
    ("hang", 20, "MCP server 'docs' did not answer initialize within 0.2 s"),
    ("hang", 0.2, "within 0.2 s (waiting for MCP server 'docs')"),
])
def test_an_mcp_server_that_fails_is_one_line_naming_it(api, tmp_path, mcp_server, monkeypatch,
                                                        mode, seconds, says):
    # Only a hang waits out the setup step: a server that exits or writes garbage must
    # first start, which a busy machine may take longer than 0.2 s to do.
    monkeypatch.setattr(omega, "MCP_ANSWER_SECS", 0.2 if mode == "hang" and seconds > 1 else 10)
    monkeypatch.setattr(omega, "MCP_EXIT_SECS", 0.05)     # a hung server reads no EOF
    spec = mcp_server(mode)
    if mode == "missing":
        spec["command"] = str(tmp_path / "no-such-server")
    with pytest.raises(omega.ProviderError) as err:
        omega.complete("hi", "openai", cfg("openai", api, mcp_servers=[spec],
                                           timeout_secs=seconds))
    assert says in str(err.value) and "\n" not in str(err.value) and api.requests == []
    assert running_with(str(tmp_path / "mcp_server.py")) == []     # stopped, whatever it did


@pytest.mark.parametrize("servers, says", [
    ({"name": "docs"}, "expected a list"),
    ([{"name": "docs"}], "entry 1: command: expected a string"),
    ([{"name": "omega", "command": "x"}], "entry 1: name: expected"),
    ([{"name": "d", "command": "x"}, {"name": "d", "command": "y"}], "entry 2: the name 'd'"),
    ([{"name": "d", "command": "x", "args": "-v"}], "args: expected a list of strings"),
    ([{"name": "d", "command": "x", "env": {"K": 1}}], "env: expected a table of strings"),
    ([{"name": "d", "command": "x", "cwd": "/"}], "unknown key cwd"),
    (["docs"], "entry 1: expected a table {name, command, args, env}"),
])
def test_bad_mcp_servers_are_a_config_error(api, claude, servers, says):
    with pytest.raises(omega.ConfigError, match=re.escape(says)):
        omega.complete("hi", "openai", cfg("openai", api, mcp_servers=servers))
    with pytest.raises(omega.ConfigError, match=re.escape(says)):
        omega.complete(omega.Context("hi", mcp_servers=servers), "openai", cfg("openai", api))
    settings = omega.provider_settings(claude.config(), "claude-code")     # and PROVIDERS
    with pytest.raises(omega.ConfigError, match="^Context.mcp_servers: .*" + re.escape(says)):
        omega.PROVIDERS["claude-code"](omega.Context("hi", mcp_servers=servers), settings)
    assert api.requests == [] and claude.calls() == []


# =============================================================================
# 11. Diagnostics
# =============================================================================

def test_check_reports_readiness_sources_and_masks_keys(api, claude, tmp_path, monkeypatch,
                                                        capsys):
    api.default = lambda r: {"body": {"models": [{"name": "llama3"}, {"name": "qwen3"}]}}
    monkeypatch.setenv("GEMINI_API_KEY", ENV_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", api.url + "/v1")
    path = write(tmp_path / "c.toml", f"""
        [provider]
        default = "ollama"
        [provider.claude-code]
        command = "{claude.command}"
        [provider.ollama]
        base_url = "{api.url}"
        model = "qwen3"
        [provider.anthropic]
        api_key = "{KEY}"
        enabled = false
        """)
    assert omega.main(["--check", "-c", path]) == 0
    out = capsys.readouterr().out
    assert KEY not in out and ENV_KEY not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    ready = {name: lines[name].split()[4] for name in omega.NAMES}
    assert ready == {"claude-code": "yes", "ollama": "yes", "openai": "yes", "anthropic": "no",
                     "openrouter": "no", "gemini": "yes"}
    assert "no key, none needed for " + api.url in lines["openai"]
    assert f"config file: {path}" in out and "default provider: ollama" in out
    assert "2.1.197 (Claude Code)" in lines["claude-code"] and " yes " in lines["claude-code"]
    assert "answering, 2 models" in lines["ollama"] and api.last().path == "/api/tags"
    assert api.last().method == "GET" and len(api.requests) == 1      # no chat call, no cost
    assert "disabled" in lines["anthropic"] and " no " in lines["anthropic"]
    assert "key …3210 from $GEMINI_API_KEY" in lines["gemini"]
    assert "no API key" in lines["openrouter"]
    sources = out.split("where each value came from")[1]
    assert "model=qwen3 (file)" in sources and "model=gpt-4o (default)" in sources
    assert f"base_url={api.url}/v1 (env OPENAI_BASE_URL)" in sources
    assert "api_key=…3210 (env GEMINI_API_KEY)" in sources
    assert "api_key=…cdef (file)" in sources


def test_check_without_any_file_and_exit_1_when_default_is_not_ready(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("OLLAMA_HOST", refused_url())
    code = omega.main(["--check"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert "default provider: claude-code" in out.out
    assert "'claude' not found on PATH" in out.out
    assert "connection refused" in out.out


@pytest.mark.parametrize("default, env, code", [
    ("openai", {"OPENAI_API_KEY": ENV_KEY}, 0),
    ("anthropic", {"OPENAI_API_KEY": ENV_KEY}, 1),      # another one is ready: not enough
    ("openai", {}, 1),
    ("openai", {"OPENAI_API_KEY": ENV_KEY, "OMEGA_PROVIDER": "anthropic"}, 0),  # file wins
], ids=["default-ready", "default-not-ready-another-is", "nothing-ready",
        "file-default-over-OMEGA_PROVIDER"])
def test_check_exit_code_follows_the_default_provider(tmp_path, monkeypatch, capsys, default,
                                                      env, code):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))          # no claude
    monkeypatch.setenv("OLLAMA_HOST", refused_url())             # no ollama
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    path = write(tmp_path / "c.toml", f'[provider]\ndefault = "{default}"\n')
    assert omega.main(["--check", "-c", path]) == code
    out = capsys.readouterr().out
    assert f"default provider: {default}" in out and not leaks(out, ENV_KEY)


@pytest.mark.parametrize("script, why", [
    ("#!/bin/sh\necho 'claude: broken install' >&2\nexit 1\n", "at "),
    ("#!/bin/sh\nexit 0\n", "no version at "),
    ("#!/nonexistent/interpreter\n", "--version failed (claude not found)"),
], ids=["version-exits-1", "version-prints-nothing", "cannot-start"])
def test_check_says_a_broken_claude_is_not_ready(tmp_path, monkeypatch, capsys, script, why):
    claude_bin = tmp_path / "bin" / "claude"
    claude_bin.parent.mkdir()
    claude_bin.write_text(script)
    claude_bin.chmod(0o755)
    monkeypatch.setenv("PATH", str(claude_bin.parent))
    monkeypatch.setenv("OLLAMA_HOST", refused_url())
    path = write(tmp_path / "c.toml", '[provider]\ndefault = "claude-code"\n')
    assert omega.main(["--check", "-c", path]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("claude-code "))
    assert row.split()[4] == "no" and why in row and str(claude_bin) in row


@pytest.mark.parametrize("reply", [dict(action="trickle_head", body={"models": []}),
                                   dict(action="endless", chunk=1024, every=0.02)],
                         ids=["trickled-headers", "endless-body"])
def test_check_gives_ollama_two_seconds_in_all(api, tmp_path, reply, monkeypatch, capsys):
    assert omega.OLLAMA_PROBE_SECS == 2.0
    monkeypatch.setattr(omega, "OLLAMA_PROBE_SECS", 0.2)       # the same, ten times faster
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    api.default = lambda request: dict(reply)
    (tmp_path / "cli.toml").write_text(
        f'[provider]\ndefault = "ollama"\n[provider.ollama]\nbase_url = "{api.url}"\n')
    started = time.monotonic()
    code = omega.main(["-c", str(tmp_path / "cli.toml"), "--check"])
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ollama "))
    assert code == 1 and row.split()[4] == "no", out
    assert elapsed < 1.5 and api.last().path == "/api/tags"


def test_first_run_names_what_is_ready_here(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    with pytest.raises(omega.ProviderUnavailable) as err:
        omega.complete(omega.Context("hi"), config={})
    message = str(err.value)
    assert message.startswith("claude-code: 'claude' not found on PATH")
    assert message.endswith("; ready here: openai ($OPENAI_API_KEY) - use -p openai or "
                            "set provider.default")
    assert ENV_KEY not in message
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(omega.AuthError, match="nothing else is ready here"):
        omega.complete(omega.Context("hi"), "anthropic", {})


def test_check_checks_the_provider_asked_for(tmp_path, monkeypatch, cli_main, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))        # no claude: default not ready
    config = {"provider": {"default": "claude-code", "openai": {"api_key": KEY}}}
    assert cli_main(config, "--check") == 1
    assert cli_main(config, "--check", "-p", "openai") == 0
    out = capsys.readouterr().out
    assert "checking: openai" in out and not leaks(out)


def test_the_first_run_hint_says_python3_as_the_readme_does(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert omega.ready_elsewhere({}, None, "openai") == (
        "; nothing else is ready here either (see: python3 omega.py --check)")


# =============================================================================
# 12. Conversation log
# =============================================================================

# Real files under tmp_path, real SQLite, real processes racing; HOME is tmp_path/home
# (clean_env), so the default ~/.omega/log.db lands there too.

LOG_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def exchange(**fields):
    return {"conversation": None, "provider": "openai", "model": "gpt-x", "system_prompt": "",
            "prompt": "hi", "answer": "hello", "input_tokens": 3, "output_tokens": 5,
            "cost_usd": 0.0125, "duration_ms": 812, "stop_reason": "stop", "session_id": None,
            "error": None, **fields}


def sql(path, query):
    import sqlite3
    db = sqlite3.connect(path)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def one_line_log_error(call, path):
    with pytest.raises(omega.LogError) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text and str(path) in text, text
    error = caught.value                                   # nothing chained to print with it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return text


def test_import_omega_does_not_import_sqlite3():
    code = "import sys, omega; print('sqlite3' in sys.modules, '_sqlite3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_log_round_trip(tmp_path):
    path = str(tmp_path / "logs" / "log.db")
    first = omega.log_exchange(path, exchange(system_prompt="Be brief", duration_ms=812.4))
    same = omega.log_exchange(path, exchange(conversation=first.upper(), prompt="and?",
                                             answer="partial", error="openai: 500\nboom"))
    other = omega.log_exchange(path, exchange(prompt="new topic", time=0))
    assert same == first != other

    conversation, rows = omega.logged_conversation(path, first)
    assert conversation == first and [r["prompt"] for r in rows] == ["hi", "and?"]
    assert set(rows[0]) == set(omega.LOG_COLUMNS)
    assert rows[0] == {"conversation": first, "time": rows[0]["time"], "provider": "openai",
                       "model": "gpt-x", "system_prompt": "Be brief", "prompt": "hi",
                       "answer": "hello", "input_tokens": 3, "output_tokens": 5,
                       "cost_usd": 0.0125, "duration_ms": 812, "stop_reason": "stop",
                       "session_id": None, "error": None, "asked_model": None,
                       "tool_calls": None, "reasoning": None}
    assert LOG_TIME.fullmatch(rows[0]["time"]) and rows[0]["time"] <= rows[1]["time"]
    assert rows[1]["answer"] == "partial" and rows[1]["error"] == "openai: 500 boom"   # failed
    # after some text: both are kept (issue 17, item 4)

    assert omega.logged_conversation(path, None)[0] == other          # the most recent
    assert omega.logged_conversation(path, None)[1][0]["time"] == "1970-01-01T00:00:00.000Z"
    recent = omega.recent_exchanges(path, 2)
    assert [(r["conversation"], r["prompt"]) for r in recent] == [(first, "and?"),
                                                                  (other, "new topic")]
    assert len(omega.recent_exchanges(path, 100)) == 3 and omega.recent_exchanges(path, 0) == []


def test_log_is_wal_versioned_and_private(tmp_path):
    path = tmp_path / "new" / "log.db"
    omega.log_exchange(str(path), exchange())
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert sql(path, "PRAGMA user_version") == [(omega.LOG_SCHEMA_VERSION,)] == [(2,)]
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("setup, says", [
    ("PRAGMA user_version = 3; CREATE TABLE exchanges (future)", "newer omega (log schema 3"),
    ("CREATE TABLE notes (text)", "another program's database"),
])
def test_a_log_that_is_not_ours_to_change_is_refused_untouched(tmp_path, setup, says):
    import sqlite3
    path = tmp_path / "log.db"
    db = sqlite3.connect(path)
    db.executescript(setup)
    db.close()
    before = path.read_bytes()
    for call in (lambda: omega.log_exchange(str(path), exchange()),
                 lambda: omega.logged_conversation(str(path), None),
                 lambda: omega.recent_exchanges(str(path), 5)):
        assert says in one_line_log_error(call, path)
    assert path.read_bytes() == before and sql(path, "PRAGMA journal_mode") == [("delete",)]


def test_log_path_resolution(tmp_path, monkeypatch):
    home = tmp_path / "home"
    default = str(home / ".omega" / "log.db")

    def log(**table):
        return {"omega": {"log": table}}
    assert omega.log_path({}, for_cli=True) == default                 # on for the CLI
    assert omega.log_path({}, for_cli=False) is None                   # off for the library
    assert omega.log_path(log(enabled=True), for_cli=False) == default
    assert omega.log_path(log(enabled=False), for_cli=True) is None
    monkeypatch.setenv("OMEGA_LOG", "0")
    assert omega.log_path({}, for_cli=True) is None
    assert omega.log_path(log(enabled=True), for_cli=True) == default   # file over env
    monkeypatch.setenv("OMEGA_LOG", "1")               # the variable cannot turn the library on
    assert omega.log_path({}, for_cli=False) is None
    monkeypatch.setenv("OMEGA_LOG_PATH", "~/from-env.db")
    assert omega.log_path({}, for_cli=True) == str(home / "from-env.db")
    config = log(path="~/from-file.db")
    assert omega.log_path(config, for_cli=True) == str(home / "from-file.db")   # file over env
    assert omega.log_path(log(path=""), for_cli=True) == str(home / "from-env.db")
    monkeypatch.chdir(tmp_path)
    assert omega.log_path(log(path="rel.db"), True) == str(tmp_path / "rel.db")
    loaded = omega.load_config(log(enabled=True, path="~/x.db"))
    assert omega.log_path(loaded, for_cli=False) == str(home / "x.db")


def test_library_calls_log_only_when_the_config_says_so(api, tmp_path):
    api.default = lambda r: {"body": openai_ok("ok")}
    omega.complete("not logged", "openai", cfg("openai", api))
    assert not (tmp_path / "home" / ".omega").exists()
    config = {**cfg("openai", api), "omega": {"log": {"enabled": True,
                                                      "path": str(tmp_path / "lib.db")}}}
    chat = omega.Chat(provider="openai", config=config)
    chat.ask("one")
    chat.ask("two")
    _, rows = omega.logged_conversation(str(tmp_path / "lib.db"), None)
    assert [r["prompt"] for r in rows] == ["one", "two"]


def endless_stream(api, first="first"):
    """A stream that sends `first`, then "." pieces until the client hangs up."""
    api.reply(action="endless", framing="chunked", every=0.02,
              first=sse(oa_chunk(first), done=False), piece=sse(oa_chunk("."), done=False),
              headers={"Content-Type": "text/event-stream"})


def test_library_logs_the_text_received_and_what_ended_the_exchange(api, tmp_path):
    path = str(tmp_path / "lib.db")
    config = {**cfg("openai", api, max_retries=0), "omega": {"log": {"enabled": True,
                                                                     "path": path}}}
    disabled = {**config, "provider": {"openai": {**config["provider"]["openai"],
                                                  "enabled": False}}}
    with pytest.raises(omega.ConfigError, match="disabled"):        # nothing asked: no row
        omega.complete("disabled", "openai", disabled)
    body = sse(oa_chunk("half an"), done=False)
    serve_stream(api, body, hold_at=len(body), then="cut")          # an error after text
    with pytest.raises(omega.ProviderUnavailable) as err:
        list(omega.stream("cut", "openai", config))
    assert err.value.partial_text == "half an"
    endless_stream(api)
    s = omega.stream("closed", "openai", config)
    assert next(s) == "first"
    s.close()                                                       # the caller stops reading
    endless_stream(api)
    with pytest.raises(KeyboardInterrupt):                          # Ctrl-C in the caller's loop
        with omega.stream("interrupted", "openai", config) as s:
            for piece in s:
                raise KeyboardInterrupt
    rows = omega.recent_exchanges(path, 10)
    assert [(r["prompt"], r["answer"]) for r in rows] == [
        ("cut", "half an"), ("closed", "first"), ("interrupted", "first")]
    assert rows[0]["error"] == str(err.value) and rows[0]["provider"] == "openai"
    assert [(r["provider"], r["error"]) for r in rows[1:]] == [
        ("openai", "closed before the answer ended"), ("openai", "interrupted")]


def test_conversation_ids_are_short_random_and_unique(tmp_path, monkeypatch):
    path = str(tmp_path / "log.db")
    ids = [omega.log_exchange(path, exchange()) for _ in range(20)]
    assert all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids) and len(set(ids)) == 20
    drawn = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])                 # a collision
    monkeypatch.setattr(omega, "new_conversation_id", lambda: next(drawn))
    assert omega.log_exchange(path, exchange()) == "aaaaaaaa"
    assert omega.log_exchange(path, exchange()) == "bbbbbbbb"


def test_continuing_an_unknown_or_empty_log_says_why(tmp_path):
    missing, empty, path = tmp_path / "missing.db", tmp_path / "empty.db", tmp_path / "log.db"
    empty.write_bytes(b"")
    for log in (missing, empty):
        for conversation in (None, "0123abcd"):
            text = one_line_log_error(lambda: omega.logged_conversation(str(log), conversation),
                                      log)
            assert "nothing to continue" in text
    omega.log_exchange(str(path), exchange())
    text = one_line_log_error(lambda: omega.logged_conversation(str(path), "0123abcd"), path)
    assert text == f"no conversation 0123abcd in {path}"
    text = one_line_log_error(lambda: omega.logged_conversation(str(path), "hello"), path)
    assert text.startswith(f"no conversation 'hello' in {path}")
    one_line_log_error(lambda: omega.log_exchange(str(path), exchange(conversation="x; --")), path)
    assert len(omega.recent_exchanges(str(path), 10)) == 1


def test_the_log_holds_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    path = tmp_path / "log.db"
    text = one_line_log_error(lambda: omega.log_exchange(str(path), exchange(api_key=KEY)), path)
    assert "api_key" in text and KEY not in text and not path.exists()   # refused, not dropped
    omega.log_exchange(str(path), exchange(prompt=f"is {ENV_KEY} mine?",
                                           answer=f"yes, {ENV_KEY}"))
    row = omega.recent_exchanges(str(path), 1)[0]
    assert ENV_KEY not in row["prompt"] + row["answer"] and omega.mask(ENV_KEY) in row["answer"]
    assert not any(ENV_KEY.encode() in f.read_bytes() for f in tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["corrupt file", "directory"])
def test_a_broken_log_is_one_line_log_error(tmp_path, kind):
    path = tmp_path / "log.db"
    garbage = b"not a database\x00" + bytes(range(256)) * 16
    path.mkdir() if kind == "directory" else path.write_bytes(garbage)
    texts = [one_line_log_error(call, path) for call in (
        lambda: omega.log_exchange(str(path), exchange()),
        lambda: omega.logged_conversation(str(path), None),
        lambda: omega.recent_exchanges(str(path), 3))]
    assert all(("not an SQLite database" if kind == "corrupt file" else "is a directory") in t
               for t in texts), texts
    assert path.is_dir() if kind == "directory" else path.read_bytes() == garbage


def without_root_powers():
    """preexec_fn for a child that must meet permission bits: root passes them all,
    unless it drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set
    first (then the program it runs does not have them)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: [libc.prctl(24, cap, 0, 0, 0) for cap in (1, 2)]    # PR_CAPBSET_DROP


def test_a_read_only_folder_is_one_line_log_error(tmp_path):
    folder = tmp_path / "ro"
    omega.log_exchange(str(folder / "old.db"), exchange())
    folder.chmod(0o555)
    code = textwrap.dedent("""
        import os, sys, omega
        folder = sys.argv[1]
        try:
            open(os.path.join(folder, "probe"), "w")
            sys.exit("writable")
        except PermissionError:
            pass
        for name in ("log.db", "sub/log.db", "old.db"):
            try:
                omega.log_exchange(os.path.join(folder, name), {"prompt": "hi"})
                print("written")
            except omega.LogError as e:
                print(e)
        print(omega.recent_exchanges(os.path.join(folder, "log.db"), 5))
        """)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=HERE, text=True,
                             capture_output=True, timeout=30,
                             preexec_fn=without_root_powers() if os.geteuid() == 0 else None)
    finally:
        folder.chmod(0o755)
    if out.stderr.strip() == "writable":
        pytest.skip("cannot make a folder read-only for this user")
    lines = out.stdout.splitlines()
    assert out.stderr == "" and len(lines) == 4, out
    assert lines[0] == f"conversation log {folder}/log.db: cannot create it: Permission denied"
    assert lines[1] == (f"conversation log {folder}/sub/log.db: cannot create its folder "
                        f"{folder}/sub: Permission denied")
    assert lines[2].startswith(f"conversation log {folder}/old.db: cannot write")
    assert lines[3] == "[]" and sorted(os.listdir(folder)) == ["old.db"]


def test_a_writer_waits_for_another_then_gives_up_in_one_line(tmp_path, monkeypatch):
    import sqlite3
    path = str(tmp_path / "log.db")
    omega.log_exchange(path, exchange(prompt="before"))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO exchanges (conversation, time) VALUES ('00000000', 'now')")
    monkeypatch.setattr(omega, "LOG_BUSY_SECS", 0.1)
    started = time.monotonic()
    text = one_line_log_error(lambda: omega.log_exchange(path, exchange()), path)
    assert "locked by another process for more than 0.1 s" in text
    assert time.monotonic() - started < 2
    assert [r["prompt"] for r in omega.recent_exchanges(path, 5)] == ["before"]  # WAL: reads go on
    threading.Timer(0.1, holder.rollback).start()                      # released in time
    monkeypatch.setattr(omega, "LOG_BUSY_SECS", 5.0)
    omega.log_exchange(path, exchange(prompt="after"))
    holder.close()
    assert [r["prompt"] for r in omega.recent_exchanges(path, 5)] == ["before", "after"]


def test_a_busy_set_up_is_tried_again():
    # SQLite can say "database is locked" at once, without waiting (two runs making
    # a new log switch it to WAL together): such a failure is tried again.
    import sqlite3
    tries = []

    def work(conn):
        tries.append(1)
        if len(tries) < 3:
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = 5
            raise error
        return "done"
    conn = sqlite3.connect(":memory:")
    assert omega.with_retries(conn, work) == "done" and len(tries) == 3
    with pytest.raises(sqlite3.OperationalError):               # anything else: at once
        omega.with_retries(conn, lambda c: c.execute("SELECT nonsense FROM nowhere"))


def test_processes_writing_a_fresh_log_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "fresh" / "log.db")
    code = textwrap.dedent("""
        import sys, time, omega
        path, me, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
        while time.time() < start:          # all at once: the race to create the file
            pass
        conversation = None
        for i in range(20):
            conversation = omega.log_exchange(path, {"conversation": conversation,
                                                     "prompt": f"{me}-{i}", "answer": "ok"})
        """)
    start = time.time() + 0.4
    children = [subprocess.Popen([sys.executable, "-c", code, path, str(k), str(start)],
                                 cwd=HERE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    errors = [child.communicate(timeout=30)[1] for child in children]
    assert [child.returncode for child in children] == [0] * 4, errors
    rows = omega.recent_exchanges(path, 1000)
    assert len(rows) == 80
    by_conversation = {}
    for row in rows:
        by_conversation.setdefault(row["conversation"], []).append(row["prompt"])
    assert sorted(by_conversation.values()) == [[f"{k}-{i}" for i in range(20)] for k in range(4)]


def test_a_map_logs_each_item_as_its_own_exchange_from_eight_threads(api, tmp_path):
    """8 workers x 50 items writing one log file: every row there, each its own
    conversation, and no "database is locked" (or any warning) on the way."""
    api.default = lambda request: {"body": openai_ok(request.body["messages"][-1]["content"])}
    path = str(tmp_path / "log.db")
    config = {**cfg("openai", api), "omega": {"log": {"enabled": True, "path": path}}}
    heard = []
    results = omega.map([f"p{n}" for n in range(400)], workers=8, config=config,
                        on_status=heard.append)
    assert results.failed == 0 and heard == []
    rows = omega.recent_exchanges(path, 1000)
    assert sorted(row["prompt"] for row in rows) == sorted(f"p{n}" for n in range(400))
    assert all(row["answer"] == row["prompt"] and row["error"] is None for row in rows)
    assert len({row["conversation"] for row in rows}) == 400


def test_reading_never_creates_the_log(tmp_path):
    path = tmp_path / "nowhere" / "log.db"
    assert omega.recent_exchanges(str(path), 10) == []
    one_line_log_error(lambda: omega.logged_conversation(str(path), None), path)
    one_line_log_error(lambda: omega.logged_conversation(str(path), "0123abcd"), path)
    assert not (tmp_path / "nowhere").exists()


def test_the_log_is_never_reached_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.db"
    omega.log_exchange(str(victim), exchange(prompt="theirs"))
    folder = tmp_path / "home" / ".omega"
    folder.mkdir(parents=True)
    path = folder / "log.db"
    for target, link in ((victim, path), (tmp_path / "created.db", path),     # dangling
                         (tmp_path / "wal", folder / "log.db-wal")):
        link.symlink_to(target)
        for call in (lambda: omega.log_exchange(str(path), exchange()),
                     lambda: omega.recent_exchanges(str(path), 5),
                     lambda: omega.logged_conversation(str(path), None)):
            assert "symbolic link" in one_line_log_error(call, path)
        link.unlink()
    assert [r["prompt"] for r in omega.recent_exchanges(str(victim), 5)] == ["theirs"]
    assert not (tmp_path / "created.db").exists() and not (tmp_path / "wal").exists()


def test_an_older_logs_loose_permissions_are_tightened(api, tmp_path, cli_main):
    folder = tmp_path / "home" / ".omega"
    omega.log_exchange(str(folder / "log.db"), exchange())
    folder.chmod(0o755)
    (folder / "log.db").chmod(0o644)
    api.reply(openai_ok())
    assert cli_main(cfg("openai", api), "hi") == 0
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert os.stat(folder / "log.db").st_mode & 0o777 == 0o600
    chosen = tmp_path / "shared"                          # a folder the user chose stays theirs
    chosen.mkdir()
    chosen.chmod(0o755)
    omega.log_exchange(str(chosen / "log.db"), exchange())
    assert os.stat(chosen).st_mode & 0o777 == 0o755
    assert os.stat(chosen / "log.db").st_mode & 0o777 == 0o600


def test_every_key_omega_knows_is_kept_out_of_the_log(api, tmp_path, monkeypatch, cli_main,
                                                      capsys):
    other = "sk-ant-OTHER-PROVIDER-KEY-9876543210"
    named = "gm-NAMED-BY-API-KEY-ENV-1234567890"
    monkeypatch.setenv("MY_GEMINI", named)
    config = cfg("openai", api)
    config["provider"]["anthropic"] = {"api_key": other}
    config["provider"]["gemini"] = {"api_key_env": "MY_GEMINI"}
    api.reply(openai_ok(f"I saw {other} and {named}"))
    assert cli_main(config, "keys:", other, named) == 0
    assert f"I saw {other} and {named}" in capsys.readouterr().out    # the user's to see
    for file in (tmp_path / "home" / ".omega").iterdir():
        assert other.encode() not in file.read_bytes() and named.encode() not in file.read_bytes()
    assert cli_main(config, "--logs") == 0
    out = capsys.readouterr().out
    assert omega.mask(other) in out and other not in out and named not in out


def test_continue_goes_on_with_a_conversation_that_was_answered(tmp_path):
    path = str(tmp_path / "log.db")
    answered = omega.log_exchange(path, exchange(prompt="first"))
    omega.log_exchange(path, exchange(prompt="no claude", answer=None,
                                      error="claude-code: 'claude' not found on PATH"))
    assert omega.logged_conversation(path, None)[0] == answered
    only_failed = str(tmp_path / "failed.db")
    omega.log_exchange(only_failed, exchange(answer=None, error="failed"))
    with pytest.raises(omega.LogError) as err:
        omega.logged_conversation(only_failed, None)
    assert "nothing to continue" in str(err.value) and err.value.exit_code == 2


LOG_READER = textwrap.dedent("""
    import sys, omega
    path = sys.argv[1]
    print(omega.logged_conversation(path, None)[1][-1]["answer"])
    print(omega.recent_exchanges(path, 5)[-1]["prompt"])
    try:
        omega.log_exchange(path, {"prompt": "more"})
    except omega.LogError as e:
        print(e)
    """)


def test_a_read_only_log_can_still_be_read(tmp_path):
    folder = tmp_path / "ro"
    omega.log_exchange(str(folder / "log.db"), exchange(prompt="kept", answer="still here"))
    folder.chmod(0o500)
    try:
        out = subprocess.run([sys.executable, "-c", LOG_READER, str(folder / "log.db")],
                             cwd=HERE, text=True, capture_output=True, timeout=30,
                             preexec_fn=without_root_powers() if os.geteuid() == 0 else None)
    finally:
        folder.chmod(0o700)
    lines = out.stdout.splitlines()
    assert out.stderr == "" and lines[:2] == ["still here", "kept"], out
    assert lines[2].startswith(f"conversation log {folder}/log.db: ") and len(lines) == 3
    mounted = unshared(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} "
                       f"&& {sys.executable} -c '{LOG_READER}' {folder}/log.db", tmp_path)
    assert mounted.stdout.splitlines()[:2] == ["still here", "kept"], mounted


def test_a_full_disk_says_so(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    python = f"cd {HERE} && {sys.executable} -c"
    fill = f"""{python} "
f = open('{disk}/fill', 'wb')
try:
    while True:
        f.write(bytes(4096)); f.flush()
except OSError:
    pass" """
    write_one = f"""{python} "
import omega
try:
    omega.log_exchange('{disk}/log.db', {{'prompt': 'y'}})
except omega.LogError as e:
    print(e)" """
    out = unshared(f"mount -t tmpfs -o size=512k tmpfs {disk} && {write_one} && {fill} && "
                   f"{write_one}", tmp_path)
    assert out.stdout == f"conversation log {disk}/log.db: the disk is full\n", out


@pytest.mark.parametrize("asked_model", [False, True], ids=["first-v1", "v1-with-asked_model"])
def test_a_version_1_log_is_upgraded_in_place_without_losing_a_row(tmp_path, asked_model):
    import sqlite3
    path = tmp_path / "log.db"
    db = sqlite3.connect(path, isolation_level=None)      # as omega 0.2 (schema 1) made it
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(LOG_SCHEMA_V1 + ";" + omega.LOG_INDEX + ";PRAGMA user_version = 1;")
    if asked_model:                                        # added late in version 1
        db.execute("ALTER TABLE exchanges ADD COLUMN asked_model TEXT")
    for n in range(3):
        db.execute("INSERT INTO exchanges (conversation, time, provider, model, prompt, answer) "
                   "VALUES ('0123abcd', ?, 'openai', 'm', ?, 'yes')",
                   (f"2025-01-01T00:00:0{n}.000Z", f"old {n}"))
    db.close()
    conversation, rows = omega.logged_conversation(str(path), None)      # read as it stands
    assert conversation == "0123abcd" and [r["prompt"] for r in rows] == ["old 0", "old 1",
                                                                         "old 2"]
    assert rows[0]["asked_model"] is None and rows[0]["tool_calls"] is None
    assert sql(path, "PRAGMA user_version") == [(1,)]                     # reading changes nothing
    omega.log_exchange(str(path), exchange(conversation="0123abcd", asked_model="gpt-x",
                                           tool_calls=[omega.ToolCall("c", "now", {}, "noon")]))
    rows = omega.recent_exchanges(str(path), 10)
    assert [(r["prompt"], r["asked_model"], r["tool_calls"]) for r in rows] == [
        ("old 0", None, None), ("old 1", None, None), ("old 2", None, None),
        ("hi", "gpt-x", [{"name": "now", "arguments": {}, "result": "noon", "error": False}])]
    assert sql(path, "PRAGMA user_version") == [(2,)]
    assert [c[1] for c in sql(path, "PRAGMA table_info(exchanges)")][-3:] == \
        ["asked_model", "tool_calls", "reasoning"]


def test_a_calls_tool_calls_are_logged_redacted_and_cut(api, tmp_path):
    path = tmp_path / "log.db"
    config = cfg("openai", api)
    config["omega"] = {"log": {"enabled": True, "path": str(path)}}

    def long_text(word: str) -> str:
        return "é" * 3000 + word
    api.reply(answer_with("openai", calls=[("c1", "long_text", {"word": "@KEY@"})]), echo=True)
    api.reply(openai_ok("Done."))
    omega.complete("hi", "openai", config, tools=[long_text])
    (row,) = omega.recent_exchanges(str(path), 1)
    (call,) = row["tool_calls"]
    assert call["arguments"] == {"word": omega.mask(KEY)} and call["error"] is False
    assert call["result"] == "é" * 2048 + "…" and len(call["result"].encode()) <= 4096 + 3
    assert KEY.encode() not in path.read_bytes() and row["answer"] == "Done."


def thought_then_overloaded():
    """An Anthropic stream that breaks off after its thinking, before any answer text."""
    return stream_with("anthropic", "Four.", thought=THOUGHT).split(b"event: content_block_stop")[0] \
        + b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", ' \
          b'"message": "Overloaded"}}\n\n'


def test_the_log_keeps_the_reasoning_with_its_exchange(api, tmp_path):
    path = tmp_path / "log.db"
    config = cfg("anthropic", api)
    config["omega"] = {"log": {"enabled": True, "path": str(path)}}
    api.reply(answer_with("anthropic", "Four.", thought=THOUGHT))
    omega.complete("2+2?", "anthropic", config, reasoning="low")
    serve_stream(api, thought_then_overloaded())
    with pytest.raises(omega.ProviderError):
        list(omega.stream("3+3?", "anthropic", config, reasoning="low"))
    rows = omega.recent_exchanges(str(path), 2)
    assert [(r["answer"], r["reasoning"], r["error"] is None) for r in rows] == [
        ("Four.", THOUGHT, True), (None, THOUGHT, False)]


def test_a_failed_call_logs_the_tool_calls_that_ran(api, tmp_path):
    path = tmp_path / "log.db"
    config = cfg("openai", api, max_retries=0)
    config["omega"] = {"log": {"enabled": True, "path": str(path)}}
    api.reply(answer_with("openai", "Looking.", calls=[("c1", "now", {})]))
    api.reply(openai_error(400, "invalid_request_error"), status=400)
    with pytest.raises(omega.ProviderError):
        omega.complete("hi", "openai", config, tools=[now])
    (row,) = omega.recent_exchanges(str(path), 1)
    assert row["error"].startswith("openai: 400") and row["answer"] == "Looking."
    assert [c["result"] for c in row["tool_calls"]] == ["2025-10-26T09:00:00Z"]


def test_a_log_newer_than_omega_is_left_alone_with_one_warning_line(api, tmp_path, cli_main,
                                                                  capsys):
    import sqlite3
    path = tmp_path / "home" / ".omega" / "log.db"
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript("PRAGMA user_version = 3; CREATE TABLE exchanges (future)")
    db.close()
    before = path.read_bytes()
    api.reply(answer_with("openai", calls=[("c1", "now", {})]))
    api.reply(openai_ok("Noon."))
    assert cli_main(cfg("openai", api), "-q", "--functions", NOW_PY, "time?") == 0
    out, err = capsys.readouterr()
    assert out == "Noon.\n" and path.read_bytes() == before
    assert err.count("\n") == 1 and "newer omega (log schema 3" in err


# =============================================================================
# 13. Command line
# =============================================================================

# --- the prompt: words, stdin, both ------------------------------------------

def test_cli_words_print_the_answer_and_nothing_else(api, tmp_path):
    api.reply(openai_ok())
    out = run_cli(tmp_path, "hello", "world", config=cfg("openai", api), as_file=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "Hello from OpenAI\n", "")
    assert api.last().body["messages"] == [{"role": "user", "content": "hello world"}]


@pytest.mark.parametrize("args, stdin, prompt", [
    ((), "from stdin\n", "from stdin"),
    (("-",), "dash stdin", "dash stdin"),
    (("review", "this"), "\n    def f(): pass\n\n", "review this\n\n    def f(): pass"),
], ids=["stdin-alone", "dash", "after-the-words-keeping-indentation"])
def test_cli_reads_stdin_alone_dash_and_after_the_words(api, tmp_path, args, stdin, prompt):
    api.default = lambda r: {"body": ollama_ok("ok")}
    out = run_cli(tmp_path, *args, config=cfg("ollama", api), input=stdin)
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
    assert api.last().body["messages"] == [{"role": "user", "content": prompt}]


def test_cli_without_a_prompt_is_a_usage_error(tmp_path):
    out = run_cli(tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("omega: no prompt")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("words", [(), ("what", "is", "this")], ids=["stdin-alone", "after-words"])
def test_cli_binary_stdin_is_a_one_line_config_error(api, tmp_path, words):
    api.default = lambda request: {"body": openai_ok()}
    (tmp_path / "cli.toml").write_text(toml_for(cfg("openai", api)))
    binary = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8
    out = subprocess.run([*OMEGA_CLI, *words], cwd=tmp_path, input=binary,
                         capture_output=True, timeout=30, env=cli_env(tmp_path))
    stderr = out.stderr.decode(errors="replace")
    assert out.returncode == 2 and "not UTF-8 text" in stderr, stderr
    assert stderr.startswith("omega: ") and stderr.count("\n") == 1 and api.requests == []


# --- flags and output --------------------------------------------------------

def test_cli_help_and_version_touch_nothing(monkeypatch, capsys):
    monkeypatch.setenv("OMEGA_CONFIG", "/nonexistent.toml")
    assert omega.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"omega {omega.__version__}"
    assert omega.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-tokens" in out and "exit codes" in out.lower()


def test_cli_flags_reach_the_wire(api, capsys, cli_main):
    api.reply(openai_ok())
    code = cli_main(cfg("openai", api), "-m", "gpt-4.1", "-s", "Be terse", "--max-tokens", "9",
                    "--temperature", "0.5", "-q", "hi")
    assert code == 0 and capsys.readouterr().out == "Hello from OpenAI\n"
    assert api.last().body == {"model": "gpt-4.1", "max_tokens": 9, "temperature": 0.5,
                               "messages": [{"role": "system", "content": "Be terse"},
                                            {"role": "user", "content": "hi"}],
                               "stream": True, "stream_options": {"include_usage": True}}
    api.reply(gemini_ok())
    config = cfg("gemini", api)
    config["provider"]["default"] = "openai"
    assert cli_main(config, "-p", "gemini", "hi") == 0
    assert api.last().path.startswith("/v1beta/models/gemini-2.0-flash")


def test_cli_complex_flag_picks_model_complex(api, capsys, cli_main):
    api.reply(openai_ok())
    assert cli_main(cfg("openai", api, model_complex="o3"), "--complex", "hi") == 0
    assert api.last().body["model"] == "o3"


def test_cli_json_output(api, capsys, cli_main):
    api.reply(anthropic_ok())
    code = cli_main(cfg("anthropic", api), "--json", "hi")
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["text"] == "Hello from Claude"
    assert data["metadata"]["provider_used"] == "anthropic"
    assert data["metadata"]["tokens_used"] == 14 and data["metadata"]["attempts"] == 1


def no_constants(name):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize("name", HTTP_NAMES)
def test_cli_json_stays_valid_when_usage_is_junk(api, capsys, name, cli_main):
    api.reply(JUNK_USAGE[name])
    assert cli_main(cfg(name, api), "--json", "hi") == 0
    data = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    m = data["metadata"]
    assert (m["input_tokens"], m["output_tokens"], m["tokens_used"]) == (None, None, None)


def test_cli_status_lines_on_stderr_and_quiet(api, cli_main, capsys):
    config = cfg("openai", api)
    config["omega"] = {"status": {"delay_secs": 0.1, "repeat_secs": 10,
                                  "message": "thinking..."}}
    api.reply(openai_ok(), delay=0.3)
    cli_main(config, "hi")
    assert capsys.readouterr() == ("Hello from OpenAI\n", "omega: thinking...\n")
    api.reply(openai_ok(), delay=0.3)
    cli_main(config, "-q", "hi")
    assert capsys.readouterr() == ("Hello from OpenAI\n", "")


def test_cli_retry_lines_on_stderr(api, cli_main, capsys, real_retry_floor):
    api.reply(openai_error(429, "rate_limit_exceeded"), status=429, headers={"Retry-After": "0"})
    api.reply(openai_ok())
    assert cli_main(cfg("openai", api), "hi") == 0
    assert capsys.readouterr().err == "omega: openai: 429, retrying in 0.1 s (2/3)\n"


def test_cli_verbose_shows_debug_and_traceback_but_no_key(api, tmp_path):
    api.reply(openai_error(401, "invalid_api_key", f"Incorrect API key provided: {KEY}"),
              status=401)
    out = run_cli(tmp_path, "-v", "hi", config=cfg("openai", api))
    assert out.returncode == 3 and "Traceback" in out.stderr and "POST" in out.stderr
    assert KEY not in out.stderr and KEY not in out.stdout


def test_cli_prints_one_line_per_fallback_step(api2, cli_main, capsys):
    api2.reply(anthropic_ok())
    assert cli_main(chain(refused_url(), api2, max_retries=0), "hi") == 0
    assert capsys.readouterr() == (
        "Hello from Claude\n", "omega: openai unavailable (connection refused), trying anthropic\n")


def test_cli_p_stays_put_and_fallback_flag_moves_on(api2, cli_main, capsys):
    api2.default = lambda request: {"body": anthropic_ok()}
    config = {"provider": {"default": "openai", "fallback": ["anthropic"],
                           "ollama": {"base_url": refused_url(), "max_retries": 0},
                           "openrouter": {"base_url": refused_url(), "api_key": KEY},
                           "anthropic": {"base_url": api2.url, "api_key": KEY}}}
    code = cli_main(config, "-q", "-p", "ollama", "hi")
    out = capsys.readouterr()
    assert (code, out.out) == (7, "") and api2.requests == []
    assert "connection refused" in out.err and out.err.count("\n") == 1
    code = cli_main(config, "-p", "ollama", "--fallback", "openrouter,anthropic", "hi")
    out = capsys.readouterr()
    assert (code, out.out) == (0, "Hello from Claude\n"), out.err
    assert out.err == ("omega: ollama unavailable (connection refused), trying openrouter\n"
                          "omega: openrouter unavailable (connection refused), trying anthropic\n")
    assert len(api2.requests) == 1


def test_cli_help_says_where_the_config_is_looked_for(monkeypatch, cli_main, capsys):
    monkeypatch.setattr(omega, "config_paths", REAL_CONFIG_PATHS)
    assert cli_main({}, "--help") == 0
    text = "".join(capsys.readouterr().out.split())        # wrapped anywhere, even at a hyphen
    assert "./config.toml" not in text
    assert ("elsethefirstof" + "".join(f"{os.path.join(HERE, 'config.toml')},"
                                       f"{os.path.expanduser('~/.omega/config.toml')}".split())
            + "thatsetsanything") in text


@pytest.mark.parametrize("args", [("caf\udce9",), ("-s", "caf\udce9", "hi"),
                                  ("-m", "caf\udce9", "hi")], ids=["prompt", "system", "model"])
def test_cli_refuses_an_argument_that_is_not_utf8_before_sending(api, claude, tmp_path,
                                                                 cli_main, capsys, args):
    for config in (cfg("openai", api), claude.config()):      # "$(printf 'caf\xe9')"
        assert cli_main(config, *args) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err == ("omega: the argument 'caf\\xe9' is not UTF-8 text "
                                             "(byte 0xe9); give text, or a file with -a\n")
    assert api.requests == [] and claude.calls() == []
    assert not (tmp_path / "home" / ".omega").exists()


def test_cli_flags_that_take_no_prompt_say_so_and_logs_takes_any_count(tmp_path, cli_main,
                                                                       capsys):
    omega.log_exchange(str(tmp_path / "home" / ".omega" / "log.db"), exchange())
    assert cli_main({}, "--logs", "99999999999999999999") == 0
    assert "> hi\nhello" in capsys.readouterr().out
    for args in (("--logs", "1", "a prompt"), ("--models", "a prompt"), ("--logs", "-1"),
                 ("--check", "a prompt")):
        assert cli_main({}, *args) == 2, args
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith(
            f"omega: {args[0]}"), out


# --- errors and exit codes: one line on stderr -------------------------------

@pytest.mark.parametrize("args, fragment", [
    (("-p", "nope", "hi"), "nope"),
    (("-c", "bad.toml", "hi"), "malformed TOML"),
    (("--timeout", "0", "hi"), "--timeout: expected a number greater than 0"),
    (("--max-tokens", "0", "hi"), "--max-tokens: expected a number greater than 0"),
], ids=["unknown-provider", "malformed-config", "zero-timeout", "zero-max-tokens"])
def test_cli_bad_usage_and_bad_config_are_one_line(tmp_path, monkeypatch, capsys, args,
                                                   fragment):
    (tmp_path / "bad.toml").write_text("[provider\n")
    monkeypatch.chdir(tmp_path)
    assert omega.main(list(args)) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.out == ""
    assert out.err.startswith("omega: ") and fragment in out.err


@pytest.mark.parametrize("reply, expected", [
    (dict(body=openai_error(400, "invalid_request_error"), status=400), 1),
    (dict(body=openai_error(401, "invalid_api_key"), status=401), 3),
    (dict(body=openai_error(429, "insufficient_quota"), status=429), 4),
    (dict(action="stall"), 5),
    (dict(body=openai_ok(choices=[])), 6),
])
def test_cli_exit_codes(api, capsys, reply, expected, cli_main):
    api.reply(**reply)
    assert cli_main(cfg("openai", api), "--timeout", "0.3", "hi") == expected
    err = capsys.readouterr().err
    assert err.startswith("omega: openai: ") and err.count("\n") == 1


def test_cli_exit_code_for_unavailable_and_config(capsys, cli_main):
    assert cli_main(cfg("ollama", refused_url(), max_retries=0), "hi") == 7
    assert "connection refused" in capsys.readouterr().err
    assert cli_main({"provider": {"openai": {"enabled": False}}}, "-p", "openai", "hi") == 2


def test_cli_unexpected_error_is_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError(f"kaboom with {ENV_KEY}")
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setattr(omega, "answer", broken)          # where every call goes
    assert omega.main(["-p", "openai", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("omega: internal error: RuntimeError: kaboom") and err.count("\n") == 1
    assert ENV_KEY not in err and "Traceback" not in err


def run_with_closed(tmp_path, redirect, *args, config=None):
    """python omega.py ARGS with stdout (">&-") or stderr ("2>&-") closed."""
    if config is not None:
        (tmp_path / "cli.toml").write_text(toml_for(config))
    return subprocess.run(["/bin/sh", "-c", f'exec "$@" {redirect}', "sh", *OMEGA_CLI,
                           *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, env=cli_env(tmp_path))


def test_cli_reader_that_leaves_is_not_an_error(api, tmp_path):
    """python omega.py "hi" | true"""
    api.reply(openai_ok())
    (tmp_path / "cli.toml").write_text(toml_for(cfg("openai", api)))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([*OMEGA_CLI, "hi"], cwd=tmp_path, stdout=write_end,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             timeout=30, env=cli_env(tmp_path))
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (0, "")


def test_cli_with_stdout_closed_sends_nothing(api, tmp_path):
    api.default = lambda request: {"body": openai_ok()}
    out = run_with_closed(tmp_path, ">&-", "hi", config=cfg("openai", api))
    assert out.returncode == 2 and out.stderr.startswith("omega: stdout is closed"), out.stderr
    assert out.stderr.count("\n") == 1 and api.requests == []


@pytest.mark.parametrize("args, code", [(("-p", "nope", "hi"), 2), (("hi",), 7)],
                         ids=["usage-error", "provider-error"])
def test_cli_with_stderr_closed_writes_no_error_to_stdout(tmp_path, args, code):
    out = run_with_closed(tmp_path, "2>&-", *args,
                          config=cfg("ollama", refused_url(), max_retries=0))
    assert (out.returncode, out.stdout) == (code, "")


# --- streaming to stdout -----------------------------------------------------

def start_cli(tmp_path, *args, config=None):
    if config is not None:
        (tmp_path / "cli.toml").write_text(toml_for(config))
    return subprocess.Popen([*OMEGA_CLI, *args], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(tmp_path))


def read_until(pipe, wanted: bytes, seconds=10) -> bytes:
    """What a child wrote on pipe, read as it comes, up to and including wanted."""
    import select
    got, deadline = b"", time.monotonic() + seconds
    while wanted not in got and time.monotonic() < deadline:
        if select.select([pipe], [], [], 0.05)[0]:
            data = os.read(pipe.fileno(), 65536)
            if not data:
                break
            got += data
    return got


def test_cli_streams_the_first_piece_before_the_server_is_done(api, tmp_path):
    body = sse(oa_chunk("first piece"), oa_chunk(" and the rest"), oa_chunk(finish="stop"))
    serve_stream(api, body, hold_at=body.index(b"\n\n") + 2, most=1 << 20)
    child = start_cli(tmp_path, "hi", config=cfg("openai", api))
    try:
        assert read_until(child.stdout, b"first piece") == b"first piece"   # server still held
        api.release.set()
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert (child.returncode, out, err) == (0, b" and the rest\n", b"")


def test_cli_streams_claude_code_as_the_cli_writes(claude, tmp_path):
    claude.plan({"result": "Hello from the fake.", "wait": True})
    child = start_cli(tmp_path, "hi", config=claude.config())
    try:
        assert read_until(child.stdout, b"Hello from") == b"Hello from"   # the CLI still runs
        (claude.dir / "go").write_text("")
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert (child.returncode, out) == (0, b" the fake.\n")


def test_cli_no_stream_and_json_ask_for_one_answer(api, cli_main, capsys):
    for flag in ("--no-stream", "--json"):
        api.reply(openai_ok("whole"))
        assert cli_main(cfg("openai", api), flag, "hi") == 0
        assert "stream" not in api.last().body
        out = capsys.readouterr().out
        assert out == "whole\n" if flag == "--no-stream" else json.loads(out)["text"] == "whole"


def test_cli_error_after_some_text_ends_the_line_and_says_how_much_came(api, tmp_path):
    serve_stream(api, STREAM_BODIES["anthropic/error_midstream_overloaded.sse"])
    out = run_cli(tmp_path, "hi", config=cfg("anthropic", api))
    assert out.returncode == 1 and out.stdout == "The answer\n"
    assert out.stderr.count("\n") == 1 and "Overloaded" in out.stderr
    assert "broke off after 10 characters" in out.stderr


# --- reasoning: -r, --show-reasoning, --json -----------------------------------

@pytest.mark.parametrize("args", [(), ("--show-reasoning",), ("--show-reasoning", "--no-stream"),
                                  ("--show-reasoning", "--json")],
                         ids=["hidden", "streamed", "no-stream", "json"])
def test_cli_reasoning_goes_to_stderr_and_json_never_to_the_answer(api, cli_main, capsys, args):
    forged = THOUGHT + "\x1b]52;c;aGk=\x07"          # a server's escape sequence, not shown
    queue(api, "openai", "--no-stream" not in args and "--json" not in args, "Four.",
          thought=forged)
    assert cli_main(cfg("openai", api), "-q", "--no-log", "-r", "2048", *args, "2+2?") == 0
    out, err = capsys.readouterr()
    assert api.last().body["reasoning_effort"] == "low"
    assert err == (THOUGHT + "\n" if args else "")    # a line break before the answer follows
    if "--json" in args:
        assert json.loads(out) == {**json.loads(out), "text": "Four.", "reasoning": forged}
    else:
        assert out == "Four.\n"


def test_cli_shown_reasoning_ends_its_line_before_a_status_line_or_an_error(api, cli_main,
                                                                            capsys):
    queue(api, "openai", True, calls=[("c1", "now", {})], thought=THOUGHT)
    queue(api, "openai", True, "Noon.")
    assert cli_main(cfg("openai", api), "--no-log", "--show-reasoning", "--functions", NOW_PY,
                    "Time?") == 0
    out, err = capsys.readouterr()
    assert out == "Noon.\n" and err == f"{THOUGHT}\nomega: now() -> noon\n"
    serve_stream(api, thought_then_overloaded())             # reasoning, then the failure
    assert cli_main(cfg("anthropic", api, max_retries=0), "--no-log", "--show-reasoning",
                    "2+2?") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{THOUGHT}\nomega: anthropic: ") and \
        err.count("\n") == 2, err


@pytest.mark.parametrize("value", ["max", "0", "-3", "1.5"])
def test_cli_a_bad_reasoning_value_is_a_usage_error(api, cli_main, capsys, value):
    assert cli_main(cfg("openai", api), f"--reasoning={value}", "hi") == 2
    err = capsys.readouterr().err
    assert err.startswith('omega: -r: expected "off", "low", "medium", "high" or a number')
    assert err.count("\n") == 1 and api.requests == []


def test_shown_reasoning_is_dim_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    shown = omega.ReasoningShown()
    shown("Weigh")
    shown(" it\x1b[2J")
    shown.end()
    shown.end()                                   # once only
    assert sys.stderr.getvalue() == "\x1b[2mWeigh\x1b[0m\x1b[2m it\x1b[0m\n"


# --- signals: Ctrl-C, SIGTERM, SIGHUP ----------------------------------------

def start_cli_with_claude(claude, tmp_path, *args):
    """python omega.py ARGS against the fake claude; (the process, its claude pids)."""
    (tmp_path / "cli.toml").write_text(toml_for(claude.config()))
    child = subprocess.Popen([*OMEGA_CLI, *args], cwd=tmp_path,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=cli_env(tmp_path, FAKE_CLAUDE_DIR=str(claude.dir)))
    try:
        pids = read_pids(claude.dir / "pids")
    except AssertionError:
        child.kill()
        child.communicate()
        raise
    time.sleep(0.05)                     # let omega settle into its wait
    return child, pids


def test_cli_ctrl_c_exits_130_and_leaves_no_child(claude, tmp_path):
    claude.plan({"hang": True})
    child, pids = start_cli_with_claude(claude, tmp_path, "-q", "hi")
    try:
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=15)
        assert child.returncode == 130 and err == "omega: interrupted\n" and out == ""
        assert gone(*pids)
    finally:
        child.kill()
        child.communicate()
        kill_leftovers(*pids)


def test_cli_ctrl_c_mid_stream_exits_130_and_hangs_up(api, tmp_path):
    api.reply(action="endless", framing="chunked", every=0.02,
              first=sse(oa_chunk("first"), done=False), piece=sse(oa_chunk("."), done=False),
              headers={"Content-Type": "text/event-stream"})
    child = start_cli(tmp_path, "hi", config=cfg("openai", api))
    try:
        assert read_until(child.stdout, b"first").startswith(b"first")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 130 and out.endswith(b"\n") and err == b"omega: interrupted\n"
    deadline = time.monotonic() + 3
    while api.hangups == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.hangups == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])
def test_cli_sigterm_and_sighup_stop_the_claude_group(claude, tmp_path, sig, code):
    claude.plan({"mcp": [["omega", "now", {}]], "hang": True})     # the bridge goes too
    child, pids = start_cli_with_claude(claude, tmp_path, "-q", "--functions", NOW_PY, "hi")
    pids = (*pids, int((claude.dir / "mcp_pids").read_text()))
    try:
        child.send_signal(sig)
        out, err = child.communicate(timeout=15)
        assert child.returncode == code and out == ""
        assert err.startswith("omega: ") and err.count("\n") == 1, err
        assert gone(*pids)
    finally:
        child.kill()
        child.communicate()
        kill_leftovers(*pids)


def test_cli_repeated_ctrl_c_still_kills_a_child_that_ignores_sigterm(claude, tmp_path):
    claude.plan({"hang": True, "ignore_term": True})
    child, pids = start_cli_with_claude(claude, tmp_path, "-q", "hi")
    try:
        child.send_signal(signal.SIGINT)
        for _ in range(3):                   # more Ctrl-Cs during the grace period
            time.sleep(0.2)
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
        assert child.returncode == 130 and out == ""
        assert err.startswith("omega: ") and "Traceback" not in err, err
        assert gone(*pids)
    finally:
        child.kill()
        child.communicate()
        kill_leftovers(*pids)


def test_cli_a_ctrl_c_while_the_first_is_reported_still_exits_130(api, cli_main, monkeypatch):
    """A second Ctrl-C that lands while "interrupted" is being written (a user pressing
    it again and again) ends the CLI with 130 too, never a traceback."""
    told = []

    def tell(message):
        told.append(message)
        if len(told) == 1:
            raise KeyboardInterrupt                 # the second Ctrl-C, mid-report
    monkeypatch.setattr(omega, "tell", tell)
    monkeypatch.setattr(omega, "send", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        code = cli_main(cfg("openai", api), "-q", "hi")
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped omega.main (a traceback at the user)")
    assert code == 130 and told == ["omega: interrupted"]


# --- the log: --continue, --chat, --logs, --no-log ---------------------------

def log_rows(tmp_path):
    import sqlite3
    path = tmp_path / "home" / ".omega" / "log.db"
    with sqlite3.connect(path) as db:
        return [dict(zip(("conversation", "provider", "model", "prompt", "answer", "error"), r))
                for r in db.execute("SELECT conversation, provider, model, prompt, answer, "
                                    "error FROM exchanges ORDER BY id")]


def test_cli_logs_each_exchange_and_never_the_key(api, tmp_path, cli_main, capsys):
    api.reply(openai_ok("Four."))
    assert cli_main(cfg("openai", api), "What is 2+2?") == 0
    assert capsys.readouterr() == ("Four.\n", "")
    rows = log_rows(tmp_path)
    assert [(r["provider"], r["prompt"], r["answer"]) for r in rows] == [
        ("openai", "What is 2+2?", "Four.")]
    folder = tmp_path / "home" / ".omega"
    for file in folder.iterdir():
        assert KEY.encode() not in file.read_bytes() and not leaks(file.read_bytes().decode(
            "latin-1"))
    api.reply(openai_error(401, "invalid_api_key", f"bad key {KEY}"), status=401)
    assert cli_main(cfg("openai", api), "again") == 3
    assert "invalid_api_key" in log_rows(tmp_path)[-1]["error"]
    assert not leaks(log_rows(tmp_path)[-1]["error"])


def test_cli_continue_and_chat_send_the_logged_turns(api, tmp_path, cli_main, capsys):
    config = cfg("openai", api)
    api.reply(openai_ok("Four."))
    cli_main(config, "What is 2+2?")
    api.reply(openai_ok("Twelve."))
    assert cli_main(config, "--continue", "and times 3?") == 0
    assert capsys.readouterr().out == "Four.\nTwelve.\n"
    assert [(m["role"], m["content"]) for m in api.last().body["messages"]] == [
        ("user", "What is 2+2?"), ("assistant", "Four."), ("user", "and times 3?")]
    rows = log_rows(tmp_path)
    assert rows[0]["conversation"] == rows[1]["conversation"]
    api.reply(openai_ok("Hi."))
    cli_main(config, "a new one")
    api.reply(openai_ok("Thirty-six."))
    cli_main(config, "--chat", rows[0]["conversation"], "times 3 again?")
    sent = [m["content"] for m in api.last().body["messages"]]
    assert sent == ["What is 2+2?", "Four.", "and times 3?", "Twelve.", "times 3 again?"]
    capsys.readouterr()
    assert cli_main(config, "--chat", "ffffffff", "hi") == 2          # a usage error
    assert "no conversation ffffffff" in capsys.readouterr().err
    assert cli_main(config, "--logs", "2") == 0
    out = capsys.readouterr().out
    assert f"[{rows[0]['conversation']}]" in out
    assert "> times 3 again?\nThirty-six." in out and "What is 2+2" not in out
    cli_main(config, "--logs", "--json")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["answer"] for r in lines] == ["Twelve.", "Hi.", "Thirty-six."]


def test_cli_continue_with_claude_code_resumes_the_logged_session(claude, cli_main):
    cli_main(claude.config(), "Remember 42")
    cli_main(claude.config(), "--continue", "What did I say?")
    first, second = claude.calls()
    assert "--resume" in second["argv"] and second["stdin"] == "[User]\nWhat did I say?"


@pytest.mark.parametrize("how", ["--no-log", "OMEGA_LOG=0"])
def test_cli_without_the_log_writes_nothing(api, tmp_path, how, cli_main, capsys, monkeypatch):
    api.reply(openai_ok())
    args = ("--no-log", "hi") if how == "--no-log" else ("hi",)
    if how != "--no-log":
        monkeypatch.setenv("OMEGA_LOG", "0")
    assert cli_main(cfg("openai", api), *args) == 0
    assert not (tmp_path / "home" / ".omega").exists()
    assert cli_main(cfg("openai", api), *args[:-1], "--continue", "hi") == 2
    assert "needs the log" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["directory", "corrupt", "read-only"])
def test_cli_answer_comes_first_when_the_log_cannot_be_written(api, tmp_path, damage):
    log = tmp_path / "bad" / "log.db"
    log.parent.mkdir()
    if damage == "directory":
        log.mkdir()
    elif damage == "corrupt":
        log.write_bytes(b"this is not SQLite" * 100)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        log.parent.chmod(0o500)
    api.reply(openai_ok("still here"))
    out = run_cli(tmp_path, "hi", config=cfg("openai", api), OMEGA_LOG_PATH=str(log))
    assert out.returncode == 0 and out.stdout == "still here\n"
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("omega: warning: ")


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "interrupted"),
                                       (signal.SIGTERM, "stopped by SIGTERM"),
                                       (signal.SIGHUP, "stopped by SIGHUP")],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_cli_logs_an_interrupted_exchange_with_the_text_received(api, tmp_path, sig, said):
    endless_stream(api)
    child = start_cli(tmp_path, "hi", config=cfg("openai", api))
    try:
        assert read_until(child.stdout, b"first").startswith(b"first")
        child.send_signal(sig)
        _, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 128 + sig and err == f"omega: {said}\n".encode()
    row = log_rows(tmp_path)[-1]
    assert (row["prompt"], row["provider"], row["error"]) == ("hi", "openai", said)
    assert row["answer"].startswith("first")


def test_cli_logs_an_exchange_interrupted_before_any_text(api, tmp_path):
    api.reply(action="stall")
    child = start_cli(tmp_path, "--no-stream", "hi", config=cfg("openai", api))
    try:
        deadline = time.monotonic() + 10
        while not api.requests and time.monotonic() < deadline:     # the question is out
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 130
    assert [(r["prompt"], r["provider"], r["answer"], r["error"]) for r in log_rows(tmp_path)
            ] == [("hi", "openai", None, "interrupted")]


def test_cli_logs_the_text_before_an_error_and_continues_without_it(api, tmp_path, cli_main,
                                                                    capsys):
    config = cfg("openai", api, max_retries=0)
    api.reply(openai_ok("Four."))
    cli_main(config, "What is 2+2?")
    body = sse(oa_chunk("half an"), done=False)
    serve_stream(api, body, hold_at=len(body), then="cut")
    assert cli_main(config, "--continue", "and times 3?") == 7
    row = log_rows(tmp_path)[-1]
    assert row["answer"] == "half an" and row["error"].startswith("openai: ")
    capsys.readouterr()
    cli_main(config, "--logs", "1")
    assert f"> and times 3?\nhalf an\nerror: {row['error']}\n" in capsys.readouterr().out
    api.reply(openai_ok("Twelve."))
    cli_main(config, "--continue", "and times 3?")             # the broken turn is not sent
    assert [m["content"] for m in api.last().body["messages"]] == [
        "What is 2+2?", "Four.", "and times 3?"]


def test_the_cli_reads_and_checks_its_config_once(api, cli_main, monkeypatch):
    checked, real = [], omega.validate
    monkeypatch.setattr(omega, "validate", lambda raw, where: checked.append(where)
                        or real(raw, where))
    answering_json(api, "ok")
    for args in (["hi"], ["--no-stream", "hi"], ["--json", "hi"], ["--models"]):
        if args == ["--models"]:
            api.reply({"object": "list", "data": [{"id": "m-1", "object": "model"}]})
        checked.clear()
        assert cli_main(cfg("openai", api), *args) == 0
        assert len(checked) == 1, (args, checked)


@pytest.mark.parametrize("flag", ["--no-stream", "--json", "streamed"])
def test_cli_prints_the_answer_before_it_waits_for_the_log(api, tmp_path, flag):
    import sqlite3
    log = tmp_path / "home" / ".omega" / "log.db"
    omega.log_exchange(str(log), exchange())
    api.reply(openai_ok("the answer"))
    holder = sqlite3.connect(log, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")                    # another run is writing
    try:
        child = start_cli(tmp_path, *([flag] if flag != "streamed" else []), "hi",
                          config=cfg("openai", api))
        assert b"the answer" in read_until(child.stdout, b"the answer", 4)   # lock still held
    finally:
        holder.execute("COMMIT")
        holder.close()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0 and err == b""
    assert log_rows(tmp_path)[-1]["answer"] == "the answer"


def test_eight_cli_processes_at_once_lose_no_row(api, tmp_path):
    api.default = lambda r: {"body": openai_ok("ok")}
    (tmp_path / "cli.toml").write_text(toml_for(cfg("openai", api)))
    children = [subprocess.Popen([*OMEGA_CLI, f"question {i}"], cwd=tmp_path,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=cli_env(tmp_path))
                for i in range(8)]
    results = [child.communicate(timeout=30) for child in children]
    assert all(c.returncode == 0 for c in children) and all(err == b"" for _, err in results)
    assert sorted(r["prompt"] for r in log_rows(tmp_path)) == [f"question {i}" for i in range(8)]


def test_cli_logs_shows_stored_text_without_terminal_escapes(tmp_path, cli_main, capsys):
    answer = ("first line\n\x1b]52;c;cm0gLXJmIH4=\x07copied\x1b[2J\x1b[H cleared\r\n"
              "\x1b]0;title\x07\tend\x9b31m")
    path = tmp_path / "home" / ".omega" / "log.db"
    omega.log_exchange(str(path), exchange(prompt="say \x1b[31mred", answer=answer))
    assert cli_main({}, "--logs", "1") == 0
    out = capsys.readouterr().out
    assert "> say red\nfirst line\ncopied cleared\n\tend\n" in out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)
    assert cli_main({}, "--logs", "1", "--json") == 0
    line = capsys.readouterr().out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", line)
    assert json.loads(line)["answer"] == answer           # JSON keeps the text as it was


def test_cli_logs_shows_each_exchanges_cost_when_known(tmp_path, cli_main, capsys):
    path = str(tmp_path / "home" / ".omega" / "log.db")
    omega.log_exchange(path, exchange(prompt="priced"))
    omega.log_exchange(path, exchange(prompt="unpriced", cost_usd=None))
    assert cli_main({}, "--logs", "2") == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert heads[0].endswith(" openai gpt-x $0.0125") and heads[1].endswith(" openai gpt-x")


def test_cli_continue_sends_the_model_the_user_asked_for(api, cli_main):
    config = cfg("openai", api)
    api.reply(openai_ok("Four.", model="m"))              # a gateway names another model
    assert cli_main(config, "-m", "gpt-4o-mini", "What is 2+2?") == 0
    api.reply(openai_ok("Twelve.", model="m"))
    assert cli_main(config, "--continue", "and times 3?") == 0
    assert api.last().body["model"] == "gpt-4o-mini"
    api.reply(openai_ok("Hi.", model="m"))
    assert cli_main(config, "a new one") == 0             # none asked: the configured one
    api.reply(openai_ok("Ho.", model="m"))
    assert cli_main(config, "--continue", "again") == 0
    assert api.last().body["model"] == "gpt-4o"


def test_cli_unknown_conversations_are_usage_errors_and_the_start_of_an_id_will_do(
        api, cli_main, capsys, monkeypatch):
    config = cfg("openai", api)
    assert cli_main(config, "--continue", "hi") == 2                 # nothing logged yet
    assert "nothing to continue" in capsys.readouterr().err
    drawn = iter(["3f9a0c12", "3f9b7e01"])
    monkeypatch.setattr(omega, "new_conversation_id", lambda: next(drawn))
    for text in ("one", "two"):
        api.reply(openai_ok(text))
        cli_main(config, f"say {text}")
    assert cli_main(config, "--chat", "ffffffff", "hi") == 2
    assert cli_main(config, "--chat", "3f9", "hi") == 2
    err = capsys.readouterr().err
    assert "no conversation ffffffff" in err and "3f9a0c12, 3f9b7e01" in err
    api.reply(openai_ok("ok"))
    assert cli_main(config, "--chat", "3F9A", "and?") == 0
    assert [m["content"] for m in api.last().body["messages"]] == ["say one", "one", "and?"]
    assert len(api.requests) == 3


# --- files, schemas, model lists: -a, --schema, --models ---------------------

def test_cli_attach_and_schema_print_the_json_alone(api, capsys, tmp_path, monkeypatch, cli_main):
    (tmp_path / "red.png").write_bytes(PNG)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    api.reply(openai_ok('{"colour": "red",\n "confidence": 0.97}'))
    assert cli_main(cfg("openai", api), "-a", str(tmp_path / "red.png"), "--schema",
                    str(tmp_path / "schema.json"), "What colour?") == 0
    assert capsys.readouterr().out == ANSWER + "\n"
    body = api.last().body
    assert body["messages"][0]["content"][:2] == [
        {"type": "text", "text": "What colour?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}}]
    assert "stream" not in body and body["response_format"] == OPENAI_RESPONSE_FORMAT
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PDF)))   # -a - : stdin
    api.reply(openai_ok('["red"]'))
    assert cli_main(cfg("openai", api), "-a", "-", "-a", str(tmp_path / "red.png"), "--schema",
                    '{"type": "array"}', "--json", "Colours?") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == ["red"] and out["text"] == '["red"]'
    assert api.last().body["messages"][0]["content"][1] == {"type": "file", "file": {
        "filename": "stdin", "file_data": "data:application/pdf;base64," + PDF_B64}}
    api.reply({"models": [{"name": "gemma3:4b"}, {"name": "llama3.2:latest"}]})
    assert cli_main(cfg("ollama", api), "--models") == 0
    assert capsys.readouterr().out == "gemma3:4b\nllama3.2:latest\n"


def test_cli_attach_and_schema_mistakes_are_one_line_usage_errors(capsys, tmp_path, monkeypatch,
                                                                   cli_main):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x89PNG")))
    for args, words in [(("-a", "-"), "-a - reads the attachment from stdin: give the prompt"),
                        (("--schema", "{not json", "hi"), "--schema: not valid JSON"),
                        (("--schema", str(tmp_path / "none.json"), "hi"), "no such file"),
                        (("--schema", '{"type": "nonsense"}', "hi"), "unknown type 'nonsense'"),
                        (("-a", str(tmp_path / "none.png"), "hi"), "none.png: no such file")]:
        assert cli_main({}, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("omega: ") and words in err and err.count("\n") == 1, err


# --- many prompts: --each and -j ---------------------------------------------

def each_cli(tmp_path, *args, config, stdin, tty=False):
    """python omega.py --each ARGS, stdin the bytes given (or an open file); with tty
    its stderr is a pseudo-terminal. (the process, stdout, stderr as text)."""
    import pty
    (tmp_path / "cli.toml").write_text(toml_for(config))
    master, slave = pty.openpty() if tty else (None, subprocess.PIPE)
    child = subprocess.Popen([*OMEGA_CLI, "--each", "--no-log", *args],
                             cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=slave, stdin=stdin if not isinstance(stdin, bytes)
                             else subprocess.PIPE)
    try:
        out, err = child.communicate(stdin if isinstance(stdin, bytes) else None, timeout=30)
    finally:
        child.kill()
    if tty:
        os.close(slave)
        err = b""
        while True:                       # what the terminal got, until its writer is gone
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            err += data
        os.close(master)
    return child, out.decode(), err.decode()


def test_each_answers_every_line_in_order_one_a_line(api, tmp_path):
    """The lines' answers, in input order, each on one line (its newlines written
    \\n); a failed line is an empty line and one line on stderr; exit 1; the totals
    last on stderr. Three lines are in flight at once (-j 3)."""
    together = threading.Barrier(3, timeout=10)
    count = itertools.count(1)

    def reply(request):
        if next(count) <= 3:
            together.wait()
        prompt = request.body["messages"][-1]["content"]
        if "bad" in prompt:
            return {"status": 400, "body": openai_error(400, "invalid_request_error", "no")}
        return {"body": openai_ok(prompt)}
    api.default = reply
    config = cfg("openai", api, max_retries=0, prices={"gpt-4o": [1000, 1000]})
    child, out, err = each_cli(tmp_path, "-j", "3", "Say", "{}", "twice", config=config,
                               stdin=b"cat\ndog\r\nbad fish\n\xff\ncow")
    assert out == "Say cat twice\nSay dog twice\n\n\nSay cow twice\n"
    assert child.returncode == 1
    lines = err.splitlines()
    assert lines[:2] == ["omega: line 3: openai: 400 invalid_request_error: no",
                         "omega: line 4: not UTF-8 text (byte 0)"]
    assert re.fullmatch(r"omega: 5 done, 2 failed, [\d.]+/s, \$0\.051", lines[2]), err
    assert len(lines) == 3
    child, out, err = each_cli(tmp_path, "Translate:", config=config, stdin=b"a\n\n")
    assert out == "Translate:\\n\\na\nTranslate:\\n\\n\n" and child.returncode == 0


def test_each_writes_json_lines_and_counts_a_redirected_file(api, tmp_path):
    echoing(api)
    lines = tmp_path / "lines.txt"
    lines.write_text("one\nbad two\nthree\n")
    with open(lines, "rb") as stdin:
        child, out, err = each_cli(tmp_path, "--json", config=cfg("openai", api, max_retries=0),
                                   stdin=stdin)
    got = [json.loads(line) for line in out.splitlines()]
    assert [g.get("text") for g in got] == ["one", None, "three"]
    assert got[1] == {"error": "openai: 400 invalid_request_error: no bad two"}
    assert got[0]["metadata"]["provider_used"] == "openai" and child.returncode == 1
    assert re.search(r"^omega: 3/3 done, 1 failed, [\d.]+/s$", err, re.M), err    # its length known


@pytest.mark.parametrize("args, said", [
    (["-j", "2", "hi"], "-j goes with --each"),
    (["--each", "-j", "0"], "-j: expected a number 1 or more, with --each"),
    (["--each", "--logs"], "--logs: not allowed with argument --each"),
    (["--each", "--check"], "--each reads stdin for its lines: not with --check"),
    (["--each", "--continue"], "not allowed with argument"),
    (["--each", "--approve"], "--approve asks one call at a time: not with --each"),
    (["--each", "--show-reasoning"], "--show-reasoning shows one call's reasoning: not with"),
], ids=["j-alone", "j-0", "logs", "check", "continue", "approve", "show-reasoning"])
def test_each_usage_errors(cli_main, capsys, args, said):
    assert cli_main({}, *args) == 2
    assert said in capsys.readouterr().err


def test_each_refuses_an_attachment_from_stdin(tmp_path):
    out = run_cli(tmp_path, "--each", "-a", "-", "hi", input="line\n")
    assert out.returncode == 2 and "--each reads stdin for its lines: not with -a -" in out.stderr


def test_each_shows_a_progress_line_on_a_terminal_only(api, tmp_path):
    echoing(api)
    config = cfg("openai", api, prices={"gpt-4o": [1000, 1000]})
    child, out, err = each_cli(tmp_path, config=config, stdin=b"a\nb\nc\n", tty=True)
    assert out == "a\nb\nc\n" and child.returncode == 0
    assert err.startswith("\r\x1b[Komega: 1 done, ")               # drawn in place
    assert re.search(r"\r\x1b\[Komega: 3 done, [\d.]+/s, \$0\.051\r?\n$", err), err
    child, out, err = each_cli(tmp_path, "-q", config=config, stdin=b"a\nb\nc\n", tty=True)
    assert (out, err) == ("a\nb\nc\n", "")                          # -q: nothing
    child, out, err = each_cli(tmp_path, config=config, stdin=b"a\nb\nc\n")
    assert "\r" not in err and "\x1b" not in err                   # not a terminal: the totals
    assert re.fullmatch(r"omega: 3 done, [\d.]+/s, \$0\.051\n", err), err


def test_progress_text_says_what_is_known():
    assert omega.progress_text(37, 2, 500, 9.0, 0.042) == \
        "37/500 done, 2 failed, 4.1/s, ETA 1m53s, $0.042"
    assert omega.progress_text(37, 0, None, 9.0, None) == "37 done, 4.1/s"
    assert omega.progress_text(0, 0, 10, 0.0, None) == "0/10 done"
    assert omega.progress_text(5000, 0, 5001, 1.0, 12.345) == \
        "5000/5001 done, 5000.0/s, ETA 0s, $12.35"
    assert [omega.duration_text(s) for s in (42, 113, 7500)] == ["42s", "1m53s", "2h05m"]


def test_each_ctrl_c_prints_the_answers_before_the_first_unfinished_line(api, tmp_path):
    hold = threading.Event()
    echoing(api, hold=hold)
    (tmp_path / "cli.toml").write_text(toml_for(cfg("openai", api)))
    (tmp_path / "lines.txt").write_text("p1\nslow 2\np3\nslow 4\n")
    with open(tmp_path / "lines.txt") as lines:
        child = subprocess.Popen([*OMEGA_CLI, "--each", "--no-log"], cwd=tmp_path,
                                 env=cli_env(tmp_path), stdin=lines, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    try:
        assert read_until(child.stdout, b"p1\n") == b"p1\n"
        deadline = time.monotonic() + 10
        while len(api.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(api.requests) == 4
        started = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=10)
        took = time.monotonic() - started
    finally:
        child.kill()
        hold.set()
    assert child.returncode == 130 and out == b""               # p3 waits behind line 2
    assert err.decode().endswith("omega: interrupted\n") and took < 2   # 1 s, and slack


def fake_claude_processes(claude, but=()):
    """The live processes whose environment names this fake claude's folder: the
    fakes and the children they started (and the omega that ran them)."""
    mark = f"FAKE_CLAUDE_DIR={claude.dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (os.getpid(), *but):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read().split(b"\0") and alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_each_ctrl_c_stops_every_claude_process_group(claude, tmp_path):
    claude.plan({"hang": True}, {"hang": True})
    (tmp_path / "cli.toml").write_text(toml_for(claude.config()))
    (tmp_path / "lines.txt").write_text("one\ntwo\n")
    with open(tmp_path / "lines.txt") as lines:
        child = subprocess.Popen([*OMEGA_CLI, "--each", "--no-log", "-j", "2"],
                                 cwd=tmp_path, stdin=lines, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=cli_env(
                                     tmp_path, FAKE_CLAUDE_DIR=str(claude.dir)))
    try:
        deadline = time.monotonic() + 15      # two fakes, each with a child of its own
        while len(fake_claude_processes(claude, [child.pid])) < 4 \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fake_claude_processes(claude, [child.pid])) == 4
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=10)
        deadline = time.monotonic() + 3
        while fake_claude_processes(claude) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.returncode == 130 and out == b"" and fake_claude_processes(claude) == []
    finally:
        child.kill()
        kill_leftovers(*fake_claude_processes(claude))


# --- tools: --functions, --approve, status lines ------------------------------

def functions_file(tmp_path, text=None):
    path = tmp_path / "tools.py"
    path.write_text(TOOLS_PY if text is None else text)
    return str(path)


def test_functions_from_a_file_status_lines_and_json(api, tmp_path, cli_main, capsys):
    tools = functions_file(tmp_path)
    for args in ([], ["-q"], ["--json"]):
        api.reply(answer_with("openai", calls=[("c1", "get_weather", {"city": "Paris"})]))
        api.reply(openai_ok("Take an umbrella."))
        assert cli_main(cfg("openai", api), *args, "--functions", tools,
                        "What is the weather in Paris?") == 0
        out, err = capsys.readouterr()
        first = api.requests[-2].body
        assert [t["function"]["name"] for t in first["tools"]] == ["get_weather", "shout"]
        assert first["tools"][0]["function"]["description"] == "The current weather in a city."
        if args == ["--json"]:
            data = json.loads(out)
            assert data["text"] == "Take an umbrella." and data["tool_calls"] == [{
                "id": "c1", "name": "get_weather", "arguments": {"city": "Paris"},
                "result": "12 degrees celsius and rain in Paris", "error": False}]
        else:
            assert out == "Take an umbrella.\n"
        status = 'omega: get_weather(city="Paris") -> 12 degrees celsius and rain in Paris\n'
        assert err == ("" if args == ["-q"] else status)
    assert cli_main(cfg("openai", api), "--logs", "1") == 0            # the log kept the call
    assert '> What is the weather in Paris?\n  get_weather(city="Paris") -> 12 degrees ' \
        'celsius and rain in Paris\nTake an umbrella.\n' in capsys.readouterr().out


def test_functions_as_code_repeated_and_status_lines_cut_to_fit(api, cli_main, capsys):
    api.reply(answer_with("openai", calls=[("c1", "echo", {"text": "x" * 300}),
                                           ("c2", "twice", {"n": 2})]))
    api.reply(openai_ok("ok"))
    assert cli_main(cfg("openai", api), "--functions", "def echo(text: str):\n    return text",
                    "--functions", "def twice(n: int) -> int:\n    return 2 * n", "go") == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith('omega: echo(text="xxx') and lines[0].endswith("…")
    assert len(lines[0]) <= 80 and lines[1] == "omega: twice(n=2) -> 4" and len(lines) == 2


@pytest.mark.parametrize("args, says", [
    (["--functions", "missing.py"], "--functions missing.py: no such file"),
    (["--functions", "def f(:\n  pass"], "--functions def f(: pass: SyntaxError"),
    (["--functions", "import os"], "defines no public function"),
    (["--functions", "def f(*a): pass"], "tool f: parameter *a is variadic positional"),
    (["--functions", "def f(): pass", "--functions", "def f(): pass"], "two tools are named 'f'"),
    (["--functions", "raise RuntimeError('boom')"], "RuntimeError: boom"),
])
def test_bad_functions_are_one_usage_error_line(api, cli_main, capsys, args, says):
    assert cli_main(cfg("openai", api), *args, "hi") == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and api.requests == []


def test_a_key_echoed_in_arguments_never_reaches_stderr_or_the_log(api, tmp_path, cli_main,
                                                                  capsys):
    api.reply(answer_with("openai", "Checking @KEY@.", calls=[
        ("c1", "get_weather", {"city": "@KEY@\x1b[2J"})]), echo=True)
    api.reply(openai_ok("Done."))
    assert cli_main(cfg("openai", api), "--functions", functions_file(tmp_path), "hi") == 0
    err = capsys.readouterr().err
    assert not leaks(err) and omega.mask(KEY) in err and "\x1b" not in err
    for file in (tmp_path / "home" / ".omega").iterdir():
        assert KEY.encode() not in file.read_bytes()


def test_functions_on_claude_code_status_lines_json_and_the_log(claude, tmp_path, cli_main,
                                                                capsys):
    claude.plan({"mcp": [["omega", "get_weather", {"city": "Paris"}]], "result": "Rain."})
    assert cli_main(claude.config(), "--functions", functions_file(tmp_path), "--json",
                    "hi") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tool_calls"] == [{
        "id": "toolu_2", "name": "get_weather", "arguments": {"city": "Paris"},
        "result": "12 degrees celsius and rain in Paris", "error": False}]
    assert err == 'omega: get_weather(city="Paris") -> 12 degrees celsius and rain in Paris\n'
    assert cli_main(claude.config(), "--logs", "1") == 0
    assert '  get_weather(city="Paris") -> 12 degrees celsius and rain in Paris\nRain.\n' in \
        capsys.readouterr().out


def test_agent_tools_and_mcp_servers_from_the_config_file_keys_redacted(api, tmp_path,
                                                                         cli_main, capsys,
                                                                         mcp_server):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    api.reply(answer_with("openai", calls=[("c1", "Read", {"file_path": ".env"}),
                                           ("c2", "docs__echo", {"text": "hi"})]))
    api.reply(openai_ok("Found it."))
    config = cfg("openai", api, allowed_tools=["Read"], working_dir=str(tmp_path / "work"),
                 mcp_servers=[mcp_server("ok")])
    assert cli_main(config, "--json", "hi") == 0
    out, err = capsys.readouterr()
    first, second = err.splitlines()
    assert first.startswith('omega: Read(file_path=".env") -> ') and omega.mask(KEY) in first
    assert second == 'omega: docs__echo(text="hi") -> echo: hi (docs)'
    assert [c["name"] for c in json.loads(out)["tool_calls"]] == ["Read", "docs__echo"]
    assert not leaks(out) and not leaks(err)
    for file in (tmp_path / "home" / ".omega").iterdir():
        assert KEY.encode() not in file.read_bytes()


def test_approve_asks_on_the_terminal(tmp_path):
    import pty
    omega.remember_secret(KEY)                        # a key of the config, say
    master, slave = pty.openpty()
    try:
        approve = omega.terminal_approval(pytest.fail, os.ttyname(slave))
        call = omega.ToolCall("c1", "get_weather", {"city": "Paris"})
        os.write(master, b"y\n")
        assert approve(call) is True
        os.write(master, b"no\n")
        assert approve(omega.ToolCall("c2", "get_weather", {"city": KEY})) is False
        shown = b""
        while shown.count(b"[y/N]") < 2:
            assert select.select([master], [], [], 5)[0], shown      # both prompts came
            shown += os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)
    text = shown.decode()
    assert 'Run get_weather(city="Paris")? [y/N] ' in text and not leaks(text)
    assert f'Run get_weather(city="{omega.mask(KEY)}")? [y/N] ' in text


def test_approve_without_a_terminal_declines_every_call_with_one_warning(api, tmp_path):
    api.reply(answer_with("openai", calls=[("c1", "get_weather", {"city": "Paris"}),
                                           ("c2", "get_weather", {"city": "Rome"})]))
    api.reply(openai_ok("Nothing ran."))
    (tmp_path / "cli.toml").write_text(toml_for(cfg("openai", api)))
    out = subprocess.run([*OMEGA_CLI, "--functions", functions_file(tmp_path),
                          "--approve", "-q", "hi"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env=cli_env(tmp_path), stdin=subprocess.DEVNULL,
                         start_new_session=True)              # no controlling terminal
    assert out.returncode == 0 and out.stdout == "Nothing ran.\n"
    assert out.stderr == ("omega: warning: --approve: no terminal to ask on, so every tool "
                          "call is declined\n")
    assert sent_results("openai", api.last().body) == [("the user declined this call", None)] * 2


# --- what ships: an executable omega.py and a README that stands alone -------

def test_omega_py_is_executable():
    assert os.access(OMEGA_PY, os.X_OK)
    with open(OMEGA_PY) as f:
        assert f.readline().startswith("#!")


def test_readme_states_the_timings_the_code_uses():
    """The defaults the suite replaces (clean_env) are the ones the README promises."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert f"The wait is {REAL['RETRY_BASE_SECS']:g} s × 2ⁿ, capped at " \
           f"{REAL['RETRY_CAP_SECS']:g} s, times a random factor 0.75–1" in text
    assert f"when they ask for {REAL['RETRY_AFTER_MAX_SECS']:g} s or less" in text
    assert f"then SIGKILL after {REAL['KILL_GRACE_SECS']:g} s" in text


# What a reader of the README does not have: the spec omega was built to, and the folder
# it lives in. The same rules as ../shared/checks/structure.py (readme-no-spec), "the spec"
# and "spec section" in any case.
SPEC_MENTION = re.compile(r"SPEC|\.\./shared|(?i:\bthe spec\b|\bspec (?:section|§))")


def test_readme_stands_alone_and_names_the_limits():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    mentions = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
                for m in SPEC_MENTION.finditer(text)]
    assert mentions == [], mentions
    assert "max_response_bytes" in text


def test_an_older_python_is_told_in_one_line(tmp_path):
    simulated = textwrap.dedent("""
        import runpy, sys
        path = sys.argv[1]
        sys.version_info = (3, 10, 12, "final", 0)         # as Ubuntu 22.04's python3
        sys.argv = [path, "hi"]
        try:
            runpy.run_path(path, run_name="__main__")     # python omega.py hi
        except SystemExit as e:
            print("exit", e.code)
        try:
            runpy.run_path(path, run_name="omega")        # import omega
        except ImportError as e:
            print("import", e)
        """)
    out = subprocess.run([sys.executable, "-c", simulated, OMEGA_PY], capture_output=True,
                         text=True, timeout=30, env=cli_env(tmp_path))
    assert out.stderr == "omega needs Python 3.11 or newer (this is 3.10.12)\n", out
    assert out.stdout == ("exit 2\nimport omega needs Python 3.11 or newer (this is "
                          "3.10.12)\n")
    real = shutil.which("python3.10")          # a real one parses the whole file first
    if real and subprocess.run([real, "-c", "pass"], capture_output=True).returncode == 0:
        out = subprocess.run([real, OMEGA_PY, "hi"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and re.fullmatch(
            r"omega needs Python 3\.11 or newer \(this is 3\.10\.\d+\)\n", out.stderr), out


# =============================================================================
# 14. The real claude binary (make test-real)
# =============================================================================

# The real CLI honours ANTHROPIC_BASE_URL, so it can talk to a local fake of the
# Messages API. It always streams, so the fake answers SSE (and JSON when asked).

def anthropic_sse(*blocks, stop="end_turn"):
    """An Anthropic streaming reply carrying these content blocks."""
    def event(kind, **data):
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"
    events = [event("message_start", message={
        "id": "msg_sse", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}})]
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif block["type"] == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": block["thinking"]}
        else:
            start = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [event("content_block_start", index=index, content_block=start),
                   event("content_block_delta", index=index, delta=delta),
                   event("content_block_stop", index=index)]
    events += [event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                     usage={"output_tokens": 6}), event("message_stop")]
    return {"raw": "".join(events).encode(), "headers": {"Content-Type": "text/event-stream"}}


def messages_api(api, *answers):
    """Each POST /v1/messages takes the next answer (a list of content blocks, or
    (status, error body)); the last answer repeats. SSE or JSON as requested."""
    queue = list(answers)

    def answer(request):
        if not request.path.startswith("/v1/messages"):
            return {"body": {}}
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, tuple):
            return {"status": item[0], "body": item[1]}
        stop = "tool_use" if any(b["type"] == "tool_use" for b in item) else "end_turn"
        if request.body.get("stream"):
            return anthropic_sse(*item, stop=stop)
        return {"body": anthropic_ok(*item, stop=stop)}
    api.default = answer


def text(value):
    return [{"type": "text", "text": value}]


def sent_prompts(api):
    """The text of the last user message of every Messages request, in order."""
    prompts = []
    for request in api.requests:
        if request.method == "POST" and request.path.startswith("/v1/messages"):
            user = [m for m in request.body["messages"] if m["role"] == "user"][-1]
            content = user["content"]
            prompts.append(content if isinstance(content, str) else "\n".join(
                b.get("text", "") for b in content if b.get("type") == "text"))
    return prompts


def sent_blocks(api):
    """The content blocks of the last user message of the last Messages request."""
    post = [r for r in api.requests if r.method == "POST" and r.path.startswith("/v1/messages")]
    user = [m for m in post[-1].body["messages"] if m["role"] == "user"][-1]
    return user["content"] if isinstance(user["content"], list) else []


@pytest.fixture
def real_claude(api, tmp_path, monkeypatch):
    binary = os.environ.get("OMEGA_REAL_CLAUDE")
    if not binary:
        pytest.skip("no real claude binary configured: `make test-real` installs one "
                    "and sets OMEGA_REAL_CLAUDE")
    for var, value in {"ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": KEY,
                       "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                       "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir()
    return {"provider": {"default": "claude-code", "claude-code": {
        "command": binary, "working_dir": str(tmp_path / "work"), "resume_delay_secs": 0,
        "timeout_secs": 120}}}


def real(config, ctx, **section):
    config["provider"]["claude-code"].update(section)
    return omega.complete(ctx, config=config)


def real_stream(config, ctx):
    s = omega.stream(ctx, config=config)
    got = []
    with s:
        for piece in s:
            got.append((piece, time.monotonic()))
    return s, got


@pytest.mark.real_claude
def test_real_claude_plain_answer(real_claude, api):
    messages_api(api, text("Hello from the fake API."))
    reply = real(real_claude, omega.Context("Say hello."))
    assert reply.text == "Hello from the fake API."
    m = reply.metadata
    assert m.provider_used == "claude-code" and m.session_id and m.attempts == 1
    assert m.input_tokens >= 10 and m.output_tokens == 6 and m.num_turns == 1
    assert sent_prompts(api)[-1].endswith("[User]\nSay hello.")
    posts = [r for r in api.requests if r.method == "POST"]
    assert posts[0].headers["x-api-key"] == KEY and posts[0].body["stream"] is True


@pytest.mark.real_claude
def test_real_claude_model_and_system_prompt_reach_the_api(real_claude, api):
    messages_api(api, text("ok"))
    real(real_claude, omega.Context("Question?", system_prompt="Answer like a pirate."),
         model="claude-opus-4-6")
    post = [r for r in api.requests if r.method == "POST"][-1]
    assert post.body["model"] == "claude-opus-4-6"
    assert sent_prompts(api)[-1].endswith("[System]\nAnswer like a pirate.\n\n[User]\nQuestion?")


@pytest.mark.real_claude
def test_real_claude_allowed_tools_keep_the_prompt(real_claude, api):
    messages_api(api, text("ok"))
    real(real_claude, omega.Context("Read nothing, just answer."), allowed_tools=["Read", "Bash"])
    assert sent_prompts(api)[-1].endswith("[User]\nRead nothing, just answer.")


@pytest.mark.real_claude
def test_real_claude_300_kb_prompt(real_claude, api):
    messages_api(api, text("long read"))
    prompt = "".join(f"line {i}: the quick brown fox\n" for i in range(11000))[:300 * 1024]
    assert real(real_claude, omega.Context(prompt)).text == "long read"
    assert sent_prompts(api)[-1].endswith("[User]\n" + prompt)


@pytest.mark.real_claude
def test_real_claude_resume_carries_earlier_turns(real_claude, api):
    messages_api(api, text("The number is 42."), text("You said 42."))
    first = real(real_claude, omega.Context("Remember the number 42."))
    second = real(real_claude, omega.Context("Which number?", session_id=first.metadata.session_id))
    assert second.text == "You said 42." and second.metadata.session_id == first.metadata.session_id
    last = [r for r in api.requests if r.method == "POST"][-1].body["messages"]
    flat = json.dumps(last)
    assert "Remember the number 42." in flat and "The number is 42." in flat
    assert sent_prompts(api)[-1].endswith("[User]\nWhich number?")


@pytest.mark.real_claude
def test_real_claude_max_turns_then_auto_resume(real_claude, api):
    tool = {"type": "tool_use", "id": "toolu_01", "name": "Bash",
            "input": {"command": "echo hi", "description": "say hi"}}
    messages_api(api, [tool], text("Final answer."))
    statuses = []
    real_claude["provider"]["claude-code"].update(max_turns=1, allowed_tools=["Bash"])
    reply = omega.complete(omega.Context("Do the task."), config=real_claude,
                           on_status=statuses.append)
    assert reply.text == "Final answer." and reply.metadata.attempts == 2
    assert statuses == ["claude-code: reached max turns, resuming (1/5)"]
    assert sent_prompts(api)[-1].endswith(omega.RESUME_PROMPT)


@pytest.mark.real_claude
def test_real_claude_api_401_is_auth_error(real_claude, api):
    messages_api(api, (401, {"type": "error", "error": {"type": "authentication_error",
                                                        "message": "invalid x-api-key"},
                             "request_id": "req_401"}))
    with pytest.raises(omega.AuthError) as err:
        real(real_claude, omega.Context("hi"))
    assert err.value.status == 401 and KEY not in str(err.value)


@pytest.mark.real_claude
def test_real_claude_streams_pieces_before_the_answer_is_done(real_claude, api):
    body = anthropic_sse(*text("Hello from the streaming fake."))["raw"]
    cut = body.index(b"content_block_delta")
    cut = body.index(b"\n\n", cut) + 2               # right after the first text delta
    first = body[:cut].replace(b"Hello from the streaming fake.", b"Hello from")
    rest = b"event: content_block_delta\ndata: " + json.dumps({
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": " the streaming fake."}}).encode() + b"\n\n" + \
        body[cut:]

    def answer(request):
        if not request.path.startswith("/v1/messages"):
            return {"body": {}}
        return {"raw": first + rest, "action": "pieces", "framing": "chunked",
                "pieces": [(0, first), (1.0, rest), (1.0, b"")],
                "headers": {"Content-Type": "text/event-stream"}}
    api.default = answer
    started = time.monotonic()
    s, got = real_stream(real_claude, omega.Context("Say hello."))
    assert [p for p, _ in got] == ["Hello from", " the streaming fake."]
    assert got[1][1] - got[0][1] > 0.5             # the first came while the API still wrote
    assert s.reply.text == "Hello from the streaming fake." == "".join(p for p, _ in got)
    assert s.reply.metadata.output_tokens == 6 and s.reply.metadata.session_id
    assert time.monotonic() - started < 60


@pytest.mark.real_claude
def test_real_claude_api_error_mid_stream_is_typed(real_claude, api):
    body = anthropic_sse(*text("Hello from"))["raw"]
    cut = body.index(b"\n\n", body.index(b"content_block_delta")) + 2
    broken = body[:cut] + b'event: error\ndata: {"type":"error","error":{"type":' \
        b'"overloaded_error","message":"Overloaded"}}\n\n'

    def answer(request):
        if not request.path.startswith("/v1/messages"):
            return {"body": {}}
        if request.body.get("stream"):
            return {"raw": broken, "headers": {"Content-Type": "text/event-stream"}}
        return {"status": 529, "body": {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}}
    api.default = answer
    with pytest.raises(omega.ProviderError) as err:
        real_stream(real_claude, omega.Context("Say hello."))
    assert err.value.status == 529 and err.value.partial_text == "Hello from"


@pytest.mark.real_claude
def test_real_claude_reads_an_image_and_a_pdf_through_stream_json(real_claude, api):
    messages_api(api, text("A red square, a PDF that says Hello PDF, and notes."))
    reply = real(real_claude, omega.Context("What are these?", attachments=files()))
    assert reply.text == "A red square, a PDF that says Hello PDF, and notes."
    assert reply.metadata.session_id and reply.metadata.attempts == 1
    blocks = [{k: v for k, v in b.items() if k != "cache_control"} for b in sent_blocks(api)]
    at = blocks.index(ANTHROPIC_BLOCKS[0])                 # the CLI's reminders come first
    assert blocks[at:] == [*ANTHROPIC_BLOCKS, {"type": "text", "text": "[User]\nWhat are these?"}]


@pytest.mark.real_claude
def test_real_claude_json_schema_returns_structured_output(real_claude, api):
    tool = {"type": "tool_use", "id": "toolu_01", "name": "StructuredOutput",
            "input": {"colour": "red", "confidence": 0.97}}
    messages_api(api, [tool], text("Done."))
    reply = real(real_claude, omega.Context("What colour is this image?", schema=SCHEMA,
                                            attachments=files("red.png")))
    assert reply.data == {"colour": "red", "confidence": 0.97}
    assert json.loads(reply.text) == reply.data
    first = [r for r in api.requests if r.method == "POST"][0].body
    offered = {t["name"]: t for t in first.get("tools", [])}
    assert offered["StructuredOutput"]["input_schema"]["properties"] == SCHEMA["properties"]
    assert ANTHROPIC_BLOCKS[0] in sent_blocks(api)


@pytest.mark.real_claude
def test_real_claude_without_structured_output_is_invalid_json(real_claude, api):
    messages_api(api, text("It is red, I think."))      # the model never calls the tool
    with pytest.raises(omega.ProviderError) as err:
        real(real_claude, omega.Context("What colour?", schema=SCHEMA))
    assert err.value.code == "invalid_json"


def forecast(city: str) -> str:
    """The weather in a city."""
    if city == "Atlantis":
        raise ValueError("no such city")
    return f"12 degrees and rain in {city}"


@pytest.mark.real_claude
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
def test_real_claude_runs_a_python_function_through_the_bridge(real_claude, api, streaming):
    calls = [{"type": "tool_use", "id": "toolu_01", "name": "mcp__omega__forecast",
              "input": {"city": "Paris"}},
             {"type": "tool_use", "id": "toolu_02", "name": "mcp__omega__forecast",
              "input": {"city": "Atlantis"}}]
    messages_api(api, calls, text("Rain in Paris."))
    ctx = omega.Context("Weather in Paris and Atlantis?", tools=[forecast])
    if streaming:
        s, got = real_stream(real_claude, ctx)
        reply = s.reply
        assert "".join(p for p, _ in got) == "Rain in Paris."
    else:
        reply = omega.complete(ctx, config=real_claude)
    assert reply.text == "Rain in Paris." and reply.metadata.num_turns >= 2     # the CLI's count
    assert [(c.id, c.name, c.arguments, c.result, c.error) for c in reply.tool_calls] == [
        ("toolu_01", "forecast", {"city": "Paris"}, "12 degrees and rain in Paris", False),
        ("toolu_02", "forecast", {"city": "Atlantis"}, "ValueError: no such city", True)]
    posts = [r for r in api.requests if r.method == "POST" and r.path.startswith("/v1/messages")]
    offered = {t["name"]: t for t in posts[0].body["tools"]}
    assert offered["mcp__omega__forecast"]["input_schema"]["properties"] == {
        "city": {"type": "string"}}
    results = {b["tool_use_id"]: b for b in sent_blocks(api) if b.get("type") == "tool_result"}
    assert json.dumps(results["toolu_01"]["content"]).count("12 degrees and rain in Paris") == 1
    assert not results["toolu_01"].get("is_error")
    assert "ValueError: no such city" in json.dumps(results["toolu_02"]["content"])
    assert results["toolu_02"]["is_error"] is True


@pytest.mark.real_claude
def test_real_claude_takes_reasoning_as_each_model_can_and_gives_its_thinking(real_claude, api):
    messages_api(api, [{"type": "thinking", "thinking": "Two and two."}, *text("Four.")])
    for model, reasoning, thinking, effort in (
            ("claude-sonnet-4-5", 3000, {"type": "enabled", "budget_tokens": 3000}, None),
            ("claude-opus-4-8", 3000, {"type": "adaptive"}, "medium"),
            ("claude-sonnet-4-5", "off", {"type": "disabled"}, None)):
        reply = real(real_claude, omega.Context("2+2?", reasoning=reasoning), model=model)
        post = [r for r in api.requests if r.method == "POST" and r.path.startswith(
            "/v1/messages") and r.body.get("model") == model][-1]
        assert post.body["thinking"] == {**post.body["thinking"], **thinking}, reasoning
        assert (post.body.get("output_config") or {}).get("effort") == effort
        assert reply.text == "Four." and reply.reasoning == (
            None if reasoning == "off" else "Two and two.")


# =============================================================================
# 15. Test data
# =============================================================================

# What the tests send and are sent, too long to read between them: fake programs, real-shaped
# bodies and captures, test files and the request shapes that carry them, OpenAPI fragments.
# The tests read these names when they run, so they can come last; a parametrize list is read
# at import, so it names the cases instead (STREAM_EXPECTED for STREAM_BODIES, the list of
# API names beside the OpenAPI test for SPECS).


# --- fake programs -----------------------------------------------------------

FAKE_MCP_SERVER = r'''
"""A user's MCP server (stdio), in a mode: ok (tools echo, fail and a.b.c over two pages of
tools/list, a ping to the client first), exit, garbage, hang. Its pid goes to argv[2]."""
import json, os, sys, time
mode, pidfile = sys.argv[1], sys.argv[2]
open(pidfile, "w").write(str(os.getpid()))
if mode == "exit":
    sys.stderr.write("docs: starting\ndocs: cannot open the index\n")
    sys.exit(3)
TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
for line in sys.stdin:
    message = json.loads(line)
    if mode == "garbage":
        print("<html>hello</html>", flush=True)
    if mode == "hang":
        time.sleep(60)
    if "id" not in message or "method" not in message:
        continue
    method, params = message["method"], message.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "docs", "version": "1"}}
    elif method == "tools/list" and not params.get("cursor"):
        print(json.dumps({"jsonrpc": "2.0", "id": "p1", "method": "ping"}), flush=True)
        if json.loads(sys.stdin.readline()) != {"jsonrpc": "2.0", "id": "p1", "result": {}}:
            sys.exit(4)                                     # the client must answer a ping
        result = {"tools": [{"name": "echo", "description": "Echo.", "inputSchema": TEXT}],
                  "nextCursor": "2"}
    elif method == "tools/list":
        result = {"tools": [{"name": "fail", "inputSchema": {"type": "object"}},
                            {"name": "a.b.c", "inputSchema": {"type": "object"}}]}
    elif params.get("name") == "echo":
        result = {"content": [{"type": "text", "text": f"echo: {params['arguments']['text']} "
                                                       f"({os.environ['DOCS_TAG']})"}]}
    else:
        result = {"content": [{"type": "text", "text": "no such page" if params.get("name") ==
                               "fail" else "dotted"}], "isError": params.get("name") == "fail"}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
'''

# The fake programs need only the standard library: `python -S` (no site-packages, no .pth
# files) starts them in half the time, and the suite runs them about a hundred times.

FAKE_CLAUDE = r'''#!PYTHON -S
"""A stand-in for the real `claude` CLI (-p --output-format json). State lives in
$FAKE_CLAUDE_DIR: plan.json (one step per run), calls.jsonl, sessions/. "@TOKEN@" in
what it prints becomes its $CLAUDE_CODE_OAUTH_TOKEN (a CLI that echoes its credential).
--input-format stream-json: stdin is user messages, one a line (as the real CLI
reads them); the prompt is their text blocks, the other blocks are recorded.
--json-schema: the result carries structured_output, as the real CLI's does."""
import json, os, signal, subprocess, sys, time, uuid
state = os.environ["FAKE_CLAUDE_DIR"]
token = os.environ.get("CLAUDE_CODE_OAUTH_TOKEN") or ""
argv = sys.argv[1:]
if argv == ["--version"]:
    print("2.1.197 (Claude Code)")
    sys.exit(0)
def flag(name):
    return argv[argv.index(name) + 1] if name in argv else None
prompt, raw, blocks = sys.stdin.read(), None, []
if flag("--input-format") == "stream-json":
    if flag("--output-format") != "stream-json" or "--verbose" not in argv:
        sys.stderr.write("Error: --input-format=stream-json requires output-format=stream-json "
                         "and --verbose\n")
        sys.exit(1)
    raw = prompt
    for line in raw.splitlines():
        message = json.loads(line)
        assert message["type"] == "user" and message["message"]["role"] == "user", message
        blocks += message["message"]["content"]
    prompt = "\n".join(b["text"] for b in blocks if b["type"] == "text")
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": argv, "stdin": prompt, "raw": raw, "blocks": blocks,
                        "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in (
                            "CLAUDECODE", "CLAUDE_CODE_OAUTH_TOKEN")},
                        "thinking": os.environ.get("MAX_THINKING_TOKENS")}) + "\n")
    f.flush()
runs = sum(1 for _ in open(os.path.join(state, "calls.jsonl")))
plan_file = os.path.join(state, "plan.json")
plan = json.load(open(plan_file)) if os.path.exists(plan_file) else []
step = plan[runs - 1] if runs <= len(plan) else {}
sessions = os.path.join(state, "sessions")
os.makedirs(sessions, exist_ok=True)
session = flag("--resume")
if session and not os.path.exists(os.path.join(sessions, session)):
    sys.stderr.write(f"No conversation found with session ID: {session}\n")
    sys.exit(1)
if flag("--mcp-config"):                     # as the real CLI: start every server first
    servers, seen = {}, {"tools": {}, "answers": [], "config": json.load(open(flag(
        "--mcp-config"))), "allowed": (flag("--allowedTools") or "").split(","),
        "mode": oct(os.stat(os.path.dirname(flag("--mcp-config"))).st_mode & 0o777)}
    def ask(server, message):
        server.stdin.write(json.dumps(message).encode() + b"\n")
        server.stdin.flush()
        while "id" in message:               # the server's own requests (a ping) answered
            answer = json.loads(server.stdout.readline())
            if "method" not in answer:
                return answer
            server.stdin.write(json.dumps({"jsonrpc": "2.0", "id": answer["id"],
                                           "result": {}}).encode() + b"\n")
            server.stdin.flush()
    for name, spec in seen["config"]["mcpServers"].items():
        servers[name] = subprocess.Popen([spec["command"], *spec["args"]], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env={**os.environ, **spec["env"]})
        ask(servers[name], {"method": "initialize", "params": {"protocolVersion": "2025-11-25",
            "capabilities": {}, "clientInfo": {"name": "claude-code"}}, "jsonrpc": "2.0", "id": 0})
        ask(servers[name], {"method": "notifications/initialized", "jsonrpc": "2.0"})
        seen["tools"][name] = ask(servers[name], {"method": "tools/list", "jsonrpc": "2.0",
                                                  "id": 1})["result"]["tools"]
    for number, (name, tool, arguments) in enumerate(step.get("mcp", []), 2):
        seen["answers"].append(ask(servers[name], {"method": "tools/call", "jsonrpc": "2.0",
            "id": number, "params": {"name": tool, "arguments": arguments,
                                     "_meta": {"claudecode/toolUseId": f"toolu_{number}"}}})
            if {f"mcp__{name}__{tool}", f"mcp__{name}"} & set(seen["allowed"]) else "denied")
    if step.get("intruder"):                 # another process of ours calls in
        import socket
        bridge = seen["config"]["mcpServers"]["omega"]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(bridge["args"][-1])
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                         b'{"name":"weather","arguments":{"city":"Intruder"}}}\n')
            seen["intruder"] = sock.recv(100).decode()
        second = subprocess.run([bridge["command"], *bridge["args"]], capture_output=True,
                                input=b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}\n')
        seen["second"] = [second.returncode, second.stdout.decode(), second.stderr.decode()]
    open(os.path.join(state, "mcp_pids"), "w").write(
        " ".join(str(server.pid) for server in servers.values()))
    if not step.get("hang") and not step.get("orphan"):   # what Claude Code 2.1.197 sends
        for server in servers.values():
            server.send_signal(signal.SIGINT)
        seen["exits"] = [server.wait() for server in servers.values()]
    json.dump(seen, open(os.path.join(state, "mcp.json"), "w"))
if step.get("hang"):
    if step.get("ignore_term"):              # inherited by the grandchild too
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if step.get("term_cleanup"):             # SIGTERM: a short cleanup, then a clean exit
        def cleanup(signum, frame):
            time.sleep(step["term_cleanup"])
            open(os.path.join(state, "cleaned"), "w").write("yes")
            os._exit(0)
        signal.signal(signal.SIGTERM, cleanup)
    child = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    open(os.path.join(state, "pids"), "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(60)
if step.get("flood"):                        # a huge stdout or stderr
    stream = sys.stdout if step.get("to") == "stdout" else sys.stderr
    try:
        for _ in range(step["flood"] // 65536):
            stream.write("x" * 65536)
            stream.flush()
    except BrokenPipeError:
        sys.exit(1)
session = session or str(uuid.uuid4())
history = json.load(open(os.path.join(sessions, session))) if os.path.exists(
    os.path.join(sessions, session)) else []
json.dump(history + [prompt], open(os.path.join(sessions, session), "w"))
if step.get("stderr"):
    sys.stderr.write(step["stderr"].replace("@TOKEN@", token))
if "raw" in step:
    sys.stdout.write(step["raw"].replace("@TOKEN@", token))
    sys.exit(step.get("exit", 0))
model = flag("--model") or "claude-sonnet-4-6"
text = f"echo: {prompt[-60:]}" if not history else f"turn {len(history) + 1}: {prompt[:60]}"
result = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 1200,
          "duration_api_ms": 1100, "num_turns": 1, "result": step.get("result", text),
          "stop_reason": "end_turn", "session_id": session, "total_cost_usd": 0.0125,
          "usage": {"input_tokens": 5, "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 1000, "output_tokens": 20,
                    "server_tool_use": {"web_search_requests": 0}, "service_tier": "standard"},
          "modelUsage": {model + "[1m]": {"inputTokens": 5, "outputTokens": 20, "costUSD": 0.0125}},
          "permission_denials": [], "uuid": "u-1", "prompt_length": len(prompt)}
if flag("--json-schema") is not None and not step.get("no_structured"):
    json.loads(flag("--json-schema"))        # the real CLI exits 1 on a schema that is not JSON
    value = step.get("structured", {"colour": "red"})
    result.update(structured_output=value, result=json.dumps(value, separators=(",", ":")),
                  stop_reason="tool_use")
result.update(step.get("set", {}))
for key in step.get("drop", []):
    result.pop(key, None)
out = json.dumps(result).replace("@TOKEN@", token)
if step.get("array"):
    out = json.dumps([{"type": "system", "subtype": "init", "session_id": session},
                      {"type": "assistant", "message": {"content": []}}, result])
if step.get("linger"):                       # a grandchild keeps our stdout open
    keeper = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    open(os.path.join(state, "pids"), "w").write(f"{os.getpid()} {keeper.pid}")
if flag("--output-format") == "stream-json":  # one JSON object per line, as written
    def emit(obj):
        print(obj if isinstance(obj, str) else json.dumps(obj), flush=True)
    def event(inner, parent=None):
        return {"type": "stream_event", "event": inner, "session_id": session,
                "parent_tool_use_id": parent, "uuid": str(uuid.uuid4())}
    def wait():                              # until the test creates the file `go`
        for _ in range(1000):
            if os.path.exists(os.path.join(state, "go")):
                return
            time.sleep(0.01)
    emit({"type": "system", "subtype": "init", "session_id": session, "model": model})
    text = result.get("result") if not result["is_error"] else None
    lines = step.get("lines")
    if lines is None and isinstance(text, str):
        half, mid = len(text) // 2, "msg_" + session[:8]
        lines = [event({"type": "message_start", "message": {"id": mid, "content": []}}),
                 event({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
                 event({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text[:half]}}),
                 *(["WAIT"] if step.get("wait") else []),
                 event({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text[half:]}}),
                 {"type": "assistant", "session_id": session, "parent_tool_use_id": None,
                  "message": {"id": mid, "model": model, "content": [{"type": "text",
                                                                     "text": text}]}},
                 event({"type": "content_block_stop", "index": 0}),
                 event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 20}}),
                 event({"type": "message_stop"})]
    for line in lines or ():
        if line == "WAIT":
            wait()
        elif line == "HANG":
            keeper = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
            open(os.path.join(state, "pids"), "w").write(f"{os.getpid()} {keeper.pid}")
            time.sleep(60)
        elif isinstance(line, dict) and "delta" in line:     # shorthand for a text delta
            emit(event({"type": "content_block_delta", "index": 0, "delta": {
                "type": "text_delta", "text": line["delta"]}}, line.get("parent")))
        elif isinstance(line, dict) and "start" in line:     # shorthand for message_start
            emit(event({"type": "message_start", "message": {"id": line["start"]}}))
        else:
            emit(line)
    if not step.get("no_result"):
        emit(result)
    sys.exit(step.get("exit", 1 if result["is_error"] else 0))
print(out)
sys.stdout.flush()
if step.get("linger"):
    open(os.path.join(state, "exited"), "w").write(repr(time.time()))
sys.exit(step.get("exit", 1 if result["is_error"] else 0))
'''

CLOSES_STDIN = r'''#!PYTHON -S
import json, os, sys, time
os.close(0)                                 # reads none of the prompt
time.sleep(0.5)
print(json.dumps({"type": "result", "subtype": "success", "is_error": False,
                  "result": "answered without reading", "session_id": "s-1"}))
'''

# A claude that answers after a flood of argv[1] tiny JSON objects on stdout: as many
# lines (argv[2] "lines"), or in one line (argv[2] "array").
JSON_LINES_CLAUDE = r"""#!PYTHON -S
import json, sys
sys.stdin.read()
count, out = int(sys.argv[1]), sys.stdout.buffer
if sys.argv[2] == "array":
    out.write(b"[" + b"{}," * (count - 1) + b"{}]\n")
else:
    for _ in range(count // 10000):
        out.write(b"{}\n" * 10000)
out.write(json.dumps({"type": "result", "subtype": "success", "is_error": False,
                      "result": "still answered", "session_id": "s-1"}).encode() + b"\n")
"""

# omega in a child that makes one call (argv[2]: the case) after a warm-up call, with its
# address space allowed to grow by the case's allowance only: a reader that holds far
# more than it read dies of MemoryError there, reported as the call's outcome.
MEMORY_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import omega

def address_space():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

case = json.loads(sys.argv[2])
omega.complete("hi", "openai", case["warm_up"])     # every module and thread a call needs
files = [omega.Attachment(b"some notes", name="notes.txt")] if case["file"] else []
ctx = omega.Context("hi", attachments=files)
resource.setrlimit(resource.RLIMIT_AS, (address_space() + case["allowance"],
                                        resource.RLIM_INFINITY))
try:
    if case["stream"]:
        text = "".join(omega.stream(ctx, case["provider"], case["config"]))
    else:
        text = omega.complete(ctx, case["provider"], case["config"]).text
    outcome = {"text": text[:100]}
except Exception as e:                       # MemoryError included: reported, not raised
    outcome = {"error": type(e).__name__, "message": str(e)[:300]}
print(json.dumps(outcome))
"""

# omega in a child that abandons streams (argv[2] of them, then a tenth of that in each of
# sixteen threads) from a server of its own, each left in a reference cycle, while a
# garbage collection runs inside the connection pool's lock at every get and put. Prints how many streams it abandoned, how
# many of their connections the server saw closed, and how many connections went back
# to a pool from inside a collection.
COLLECTING_CHILD = r"""
import gc, http.server, json, queue, sys, threading, time
sys.path.insert(0, sys.argv[1])
import omega
import urllib3.connectionpool

EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
ANSWER = json.dumps({"choices": [{"index": 0, "message": {"content": "whole"},
                                  "finish_reason": "stop"}]}).encode()
hung_up, lock = [0], threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        if b'"stream": true' not in body:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(ANSWER)))
            self.end_headers()
            self.wfile.write(ANSWER)
            return
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:                       # an endless stream, until the client hangs up
                self.wfile.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
                time.sleep(0.005)
        except OSError:
            with lock:
                hung_up[0] += 1
            self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        pass


server = Server(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
config = {"provider": {"default": "openai", "openai": {
    "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "api_key": "sk-test"}}}
collecting, puts_in_gc = threading.local(), []


def track(phase, info):
    collecting.now = phase == "start"


class CollectingQueue(queue.LifoQueue):
    def _get(self):                      # called with the pool's lock held
        gc.collect()
        return super()._get()

    def _put(self, item):
        if getattr(collecting, "now", False):
            puts_in_gc.append(item)
        gc.collect()
        super()._put(item)


omega.complete("warm up", "openai", config)
urllib3.connectionpool.HTTPConnectionPool.QueueCls = CollectingQueue
omega._local.__dict__.clear()             # new sessions: pools with that queue
gc.disable()                             # collections only where this child says
gc.freeze()                              # and quick: what exists now is not scanned
gc.callbacks.append(track)


def abandon(n):
    for i in range(n):
        stream = omega.stream("hi", "openai", config)
        for piece in stream:
            break
        held = [stream]                  # in a cycle of the caller's: only the collector
        held.append(held)                # can close it, in whatever it interrupts
        del stream, held
        if i % 5 == 4:
            assert omega.complete("hi", "openai", config).text == "whole"


streams = int(sys.argv[2])
abandon(streams)
threads = [threading.Thread(target=abandon, args=(streams // 10,)) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
gc.collect()
total = streams + 16 * (streams // 10)
deadline = time.monotonic() + 5
while hung_up[0] < total and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"streams": total, "hung_up": hung_up[0], "puts_in_gc": len(puts_in_gc)}))
"""

# omega in a child that abandons streams in a loop (see
# test_abandoning_streams_in_a_loop_never_hangs); "done" when it gets through.
ABANDONING_CHILD = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import omega
config = json.loads(sys.argv[2])

def abandon(times):
    for _ in range(times):
        for piece in omega.stream("hi", "openai", config, timeout=30):
            break

abandon(1000)
threads = [threading.Thread(target=abandon, args=(25,)) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for _ in range(50):
    stream = omega.stream("hi", "openai", config, timeout=30)
    next(stream)
    del stream
    assert omega.complete("hi", "openai", config, timeout=30).text == "ok"
print("done")
"""

# omega in a child whose address space is capped at 1 GiB: a client that reads
# without limit dies of MemoryError there instead of eating the machine.
CAPPED_CHILD = r"""
import json, resource, sys
limit = 1 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[1])
import omega
try:
    omega.complete(omega.Context("hi"), "openai", json.loads(sys.argv[2]))
    outcome = {"error": None}
except Exception as e:                   # MemoryError included: reported, not raised
    outcome = {"error": type(e).__name__, "message": str(e)[:300],
               "status": getattr(e, "status", None)}
outcome["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(outcome))
"""


# --- stream bodies and captures ----------------------------------------------

# The first line of a real OpenRouter stream (a kimi-k2 tool call by way of Novita,
# recorded in simonw/llm's tests): it begins with a space.
OPENROUTER_SPACED_LINE = (
    b' data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":'
    b'"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,'
    b'"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fpv0_170758dd"}')

# Real-shaped stream bodies, byte for byte (Gemini's keep their CRLF line ends):
# OpenAI, OpenRouter and Ollama built from the documented shapes, Anthropic from the
# docs' examples, Gemini recorded by Google for its SDKs' tests.
STREAM_BODIES = {
    'anthropic/error_midstream_overloaded.sse': (
        b'event: message_start\n'
        b'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2,"service_tier":"standard"}}}\n'
        b'\n'
        b'event: content_block_start\n'
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"The answer"}}\n'
        b'\n'
        b'event: error\n'
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n'
        b'\n'
    ),
    'anthropic/normal_docs_example.sse': (
        b'event: message_start\n'
        b'data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}\n'
        b'\n'
        b'event: content_block_start\n'
        b'data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}\n'
        b'\n'
        b'event: ping\n'
        b'data: {"type": "ping"}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}\n'
        b'\n'
        b'event: content_block_stop\n'
        b'data: {"type": "content_block_stop", "index": 0}\n'
        b'\n'
        b'event: message_delta\n'
        b'data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}\n'
        b'\n'
        b'event: message_stop\n'
        b'data: {"type": "message_stop"}\n'
        b'\n'
    ),
    'anthropic/refusal.sse': (
        b'event: message_start\n'
        b'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2,"service_tier":"standard"}}}\n'
        b'\n'
        b'event: content_block_start\n'
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello.."}}\n'
        b'\n'
        b'event: content_block_stop\n'
        b'data: {"type":"content_block_stop","index":0}\n'
        b'\n'
        b'event: message_delta\n'
        b'data: {"type":"message_delta","delta":{"stop_reason":"refusal","stop_sequence":null,"stop_details":{"type":"refusal","category":"cyber","explanation":null}},"usage":{"output_tokens":4}}\n'
        b'\n'
        b'event: message_stop\n'
        b'data: {"type":"message_stop"}\n'
        b'\n'
    ),
    'anthropic/thinking_docs_example.sse': (
        b'event: message_start\n'
        b'data: {"type": "message_start", "message": {"id": "msg_01...", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-5", "stop_reason": null, "stop_sequence": null}}\n'
        b'\n'
        b'event: content_block_start\n'
        b'data: {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "I need to find the GCD of 1071 and 462 using the Euclidean algorithm.\\n\\n1071 = 2 \xc3\x97 462 + 147"}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "\\n462 = 3 \xc3\x97 147 + 21"}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "\\n147 = 7 \xc3\x97 21 + 0"}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "\\nThe remainder is 0, so GCD(1071, 462) = 21."}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."}}\n'
        b'\n'
        b'event: content_block_stop\n'
        b'data: {"type": "content_block_stop", "index": 0}\n'
        b'\n'
        b'event: content_block_start\n'
        b'data: {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}\n'
        b'\n'
        b'event: content_block_delta\n'
        b'data: {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "The greatest common divisor of 1071 and 462 is **21**."}}\n'
        b'\n'
        b'event: content_block_stop\n'
        b'data: {"type": "content_block_stop", "index": 1}\n'
        b'\n'
        b'event: message_delta\n'
        b'data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}}\n'
        b'\n'
        b'event: message_stop\n'
        b'data: {"type": "message_stop"}\n'
        b'\n'
    ),
    'gemini/blocked_prompt.GE-FIX.sse': (
        b'data: {"promptFeedback": {"blockReason": "SAFETY","safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HATE_SPEECH","probability": "HIGH"},{"category": "HARM_CATEGORY_HARASSMENT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_DANGEROUS_CONTENT","probability": "NEGLIGIBLE"}]}}\r\n'
    ),
    'gemini/error_midstream.GE-FIX.sse': (
        b'data: {"candidates": [{"content": {"parts": [{"text": "First "}]},"finishReason": "STOP","index": 0,"safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HATE_SPEECH","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HARASSMENT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_DANGEROUS_CONTENT","probability": "NEGLIGIBLE"}]}],"promptFeedback": {"safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HATE_SPEECH","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HARASSMENT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_DANGEROUS_CONTENT","probability": "NEGLIGIBLE"}]}}\n'
        b'\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "Second "}]},"finishReason": "STOP","index": 0,"safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HATE_SPEECH","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_HARASSMENT","probability": "NEGLIGIBLE"},{"category": "HARM_CATEGORY_DANGEROUS_CONTENT","probability": "NEGLIGIBLE"}]}]}\n'
        b'\n'
        b'{\n'
        b'  "error": {\n'
        b'    "code": 499,\n'
        b'    "message": "The operation was cancelled.",\n'
        b'    "status": "CANCELLED",\n'
        b'    "details": [\n'
        b'      {\n'
        b'        "@type": "type.googleapis.com/google.rpc.DebugInfo",\n'
        b'        "detail": "[ORIGINAL ERROR] generic::cancelled: "\n'
        b'      }\n'
        b'    ]\n'
        b'  }\n'
        b'}\n'
    ),
    'gemini/normal_with_usage.GE-FIX.sse': (
        b'data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"}}],"usageMetadata": {"promptTokenCount": 7,"totalTokenCount": 7,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 7}]},"modelVersion": "gemini-2.0-flash"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": " capital of Wyoming"}],"role": "model"}}],"usageMetadata": {"promptTokenCount": 7,"totalTokenCount": 7,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 7}]},"modelVersion": "gemini-2.0-flash"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": " is **Cheyenne**.\\n"}],"role": "model"},"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 7,"candidatesTokenCount": 10,"totalTokenCount": 17,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 7}],"candidatesTokensDetails": [{"modality": "TEXT","tokenCount": 10}]},"modelVersion": "gemini-2.0-flash"}\r\n'
        b'\r\n'
    ),
    'gemini/thinking_thought_parts.GE-FIX.sse': (
        b'data: {"candidates": [{"content": {"parts": [{"text": "**Exploring Sky Color**\\n\\nI\'ve zeroed in on the core question: why does the sky appear blue? My thought process has taken shape, highlighting sunlight\'s composition, the atmospheric role, and the significance of scattering. Specifically, I\'m focusing on Rayleigh scattering and how the wavelengths of light interact. My next step will be to explain this.\\n\\n\\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 80,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"thoughtsTokenCount": 70},"modelVersion": "gemini-2.5-flash","responseId": "0J-HaJetAqv0jrEPwu-tsQ0"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "**Refining the Explanation**\\n\\nI\'m now in the process of formulating a clear and concise explanation. The initial draft is complete and it explains why the sky appears blue by referencing how sunlight is scattered by Earth\'s atmosphere. I\'m focusing on the significance of the shorter wavelengths of blue light, ensuring a comprehensive understanding is conveyed. The current plan is to finalize the explanation.\\n\\n\\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 328,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"thoughtsTokenCount": 318},"modelVersion": "gemini-2.5-flash","responseId": "0J-HaJetAqv0jrEPwu-tsQ0"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "**Constructing a Concise Answer**\\n\\nI\'ve formulated a succinct explanation for why the sky is blue. Sunlight contains all colors. Tiny gas molecules in the atmosphere scatter sunlight. Blue light has shorter wavelengths, scattering more efficiently. This dispersed blue light fills the sky, making it appear blue to us. I\'m satisfied with this concise response.\\n\\n\\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 550,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"thoughtsTokenCount": 540},"modelVersion": "gemini-2.5-flash","responseId": "0J-HaJetAqv0jrEPwu-tsQ0"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "The sky is blue because tiny gas molecules in Earth\'s atmosphere scatter blue light from the sun more efficiently than other colors."}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 22,"totalTokenCount": 572,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"thoughtsTokenCount": 540},"modelVersion": "gemini-2.5-flash","responseId": "0J-HaJetAqv0jrEPwu-tsQ0"}\r\n'
        b'\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": " Blue light has shorter, smaller wavelengths, causing it to be scattered in all directions, making the sky appear blue to our eyes."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 48,"totalTokenCount": 598,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"thoughtsTokenCount": 540},"modelVersion": "gemini-2.5-flash","responseId": "0J-HaJetAqv0jrEPwu-tsQ0"}\r\n'
        b'\r\n'
    ),
    'ollama/error_midstream.ndjson': (
        b'{"model":"llama3.2","created_at":"2025-10-26T17:21:21.196249Z","message":{"role":"assistant","content":" Yes"},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2025-10-26T17:21:21.207235Z","message":{"role":"assistant","content":"."},"done":false}\n'
        b'{"error":"an error was encountered while running the model"}\n'
    ),
    'ollama/normal_with_usage.ndjson': (
        b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24.097767Z","message":{"role":"assistant","content":"The"},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24.109172Z","message":{"role":"assistant","content":" sky"},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24.121485Z","message":{"role":"assistant","content":" is blue."},"done":false}\n'
        b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24.132802Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}\n'
    ),
    'openai/error_midstream.sse': (
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":"The answer"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":" is"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}\n'
        b'\n'
        b'data: [DONE]\n'
        b'\n'
    ),
    'openai/normal.sse': (
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":" How can I help?"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"obfuscation":""}\n'
        b'\n'
        b'data: [DONE]\n'
        b'\n'
    ),
    'openai/refusal.sse': (
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":""},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"refusal":"I\'m sorry,"},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"refusal":" I can\'t help with that."},"logprobs":null,"finish_reason":null}],"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"obfuscation":""}\n'
        b'\n'
        b'data: [DONE]\n'
        b'\n'
    ),
    'openai/usage.sse': (
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{"content":" How can I help?"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Xy3k"}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null,"obfuscation":""}\n'
        b'\n'
        b'data: {"id":"chatcmpl-C9xYzAbCdEfGhIjKlMnOpQrStUv","object":"chat.completion.chunk","created":1764636000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_560af6e559","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":9,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"pQ"}\n'
        b'\n'
        b'data: [DONE]\n'
        b'\n'
    ),
    'openrouter/error_midstream.sse': (
        b': OPENROUTER PROCESSING\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":"The answer"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":" is"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error","native_finish_reason":null,"logprobs":null}],"error":{"code":502,"message":"Provider disconnected unexpectedly","metadata":{"error_type":"provider_unavailable"}}}\n'
        b'\n'
    ),
    'openrouter/normal_usage_cost.sse': (
        b': OPENROUTER PROCESSING\n'
        b'\n'
        b': OPENROUTER PROCESSING\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fp_560af6e559"}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":"!"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":" How can I help?"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop","native_finish_reason":"stop","logprobs":null}]}\n'
        b'\n'
        b'data: {"id":"gen-1764636000-AbCdEfGhIjKlMnOpQrSt","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","created":1764636000,"choices":[],"usage":{"prompt_tokens":13,"completion_tokens":9,"total_tokens":22,"cost":7.35e-06,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"cost_details":{"upstream_inference_cost":null,"upstream_inference_prompt_cost":1.95e-06,"upstream_inference_completions_cost":5.4e-06},"completion_tokens_details":{"reasoning_tokens":0,"image_tokens":0}}}\n'
        b'\n'
        b'data: [DONE]\n'
        b'\n'
    ),
}

# What the real claude 2.1.197 printed with --output-format stream-json --verbose (the
# _partial ones with --include-partial-messages too), line for line, and its exit code.
CLAUDE_STREAM_CAPTURES = {
    'stream_json_basic': (0, [
        '{"type":"system","subtype":"init","cwd":"/home/user/proj","session_id":"aac70456-2382-4cec-9ec5-9d4ad6aacf03","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"d93b96cc-f67d-4166-8bf7-57e408f42f74","memory_paths":{"auto":"/home/user/.claude/projects/-home-user-proj/memory/"},"fast_mode_state":"off"}',
        '{"type":"assistant","message":{"id":"msg_d536439c1c774fd497ebebbc","type":"message","role":"assistant","model":"claude-opus-4-8","content":[{"type":"text","text":"Hello from the fake."}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1668,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"},"context_management":null},"parent_tool_use_id":null,"session_id":"aac70456-2382-4cec-9ec5-9d4ad6aacf03","uuid":"a1dafc23-5b62-4c16-b2db-18d09d9a4d91","request_id":"req_4fd537ebf7364c839b3f4154"}',
        '{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":176,"duration_api_ms":40,"ttft_ms":168,"ttft_stream_ms":167,"time_to_request_ms":144,"num_turns":1,"result":"Hello from the fake.","stop_reason":"end_turn","session_id":"aac70456-2382-4cec-9ec5-9d4ad6aacf03","total_cost_usd":0.00864,"usage":{"input_tokens":1668,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":12,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":1668,"outputTokens":12,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00864,"contextWindow":1000000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"454d474d-3ac2-421c-8300-ac23eca97d4e"}',
    ]),
    'stream_json_partial': (0, [
        '{"type":"system","subtype":"init","cwd":"/home/user/proj","session_id":"25034f04-2dda-4c12-8313-89347a2cd182","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"a15423ea-bf2b-4891-8aab-d20e71c53f3d","memory_paths":{"auto":"/home/user/.claude/projects/-home-user-proj/memory/"},"fast_mode_state":"off"}',
        '{"type":"system","subtype":"status","status":"requesting","uuid":"75ec73d4-7529-4fce-80d5-83712fae3c93","session_id":"25034f04-2dda-4c12-8313-89347a2cd182"}',
        '{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_133014c2170b437db03d80de","type":"message","role":"assistant","model":"claude-opus-4-8","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1668,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}}},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"ece89bdb-336f-4378-a14f-7e1edc830ce5","ttft_ms":22}',
        '{"type":"stream_event","event":{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"498d330f-98a0-43b2-a7b4-2902805ef464"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello from"}},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"fc5bd88a-853c-4350-b6a3-c0a44f2b0c12"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" the fake."}},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"e245fe87-a2b6-469c-8565-4183c394f479"}',
        '{"type":"assistant","message":{"id":"msg_133014c2170b437db03d80de","type":"message","role":"assistant","model":"claude-opus-4-8","content":[{"type":"text","text":"Hello from the fake."}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1668,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"},"context_management":null},"parent_tool_use_id":null,"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","uuid":"b55b097d-acf9-48bd-9497-c3ced95533f0","request_id":"req_cb33deb561ff4501a4cecff5"}',
        '{"type":"stream_event","event":{"type":"content_block_stop","index":0},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"7a211797-3a36-47b3-b71a-deb666ffb1f6"}',
        '{"type":"stream_event","event":{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":12}},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"9b667e53-aa75-494f-9217-6edd21ba8ec3"}',
        '{"type":"stream_event","event":{"type":"message_stop"},"session_id":"25034f04-2dda-4c12-8313-89347a2cd182","parent_tool_use_id":null,"uuid":"01ddc77d-6b0e-4c5e-b2cd-13b043a3fa56"}',
        '{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":222,"duration_api_ms":113,"ttft_ms":137,"ttft_stream_ms":135,"time_to_request_ms":115,"num_turns":1,"result":"Hello from the fake.","stop_reason":"end_turn","session_id":"25034f04-2dda-4c12-8313-89347a2cd182","total_cost_usd":0.00864,"usage":{"input_tokens":1668,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":12,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":1668,"outputTokens":12,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00864,"contextWindow":1000000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"1e8d686b-8185-4b7f-a595-d510d5a2ce0a"}',
    ]),
    'max_turns_1_tool_use_partial': (1, [
        '{"type":"system","subtype":"init","cwd":"/home/user/proj","session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"f8b12c2d-b13f-4ba2-a042-a99971bcf023","memory_paths":{"auto":"/home/user/.claude/projects/-home-user-proj/memory/"},"fast_mode_state":"off"}',
        '{"type":"system","subtype":"status","status":"requesting","uuid":"aa594e3a-f157-4cf9-8798-63b56cd293c1","session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83"}',
        '{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_8d3d01bc3abe48d3bb9c9ace","type":"message","role":"assistant","model":"claude-opus-4-8","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1669,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"bc66b5d6-d2c2-4da5-b3cd-5a4b21d679db","ttft_ms":22}',
        '{"type":"stream_event","event":{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"43de3250-d67c-4ba4-ba98-c027a767ccbc"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me ru"}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"209eca6c-1670-417f-b1e7-1a0bc5c8fb3d"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"n a tool."}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"e80dc49e-7fee-4a28-a483-7759f0123ea6"}',
        '{"type":"assistant","message":{"id":"msg_8d3d01bc3abe48d3bb9c9ace","type":"message","role":"assistant","model":"claude-opus-4-8","content":[{"type":"text","text":"Let me run a tool."}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1669,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"},"context_management":null},"parent_tool_use_id":null,"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","uuid":"d1640595-8362-4e44-8708-0cdcf6ecf30e","request_id":"req_9dff886181e74c9f8a9580d1"}',
        '{"type":"stream_event","event":{"type":"content_block_stop","index":0},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"b72f1a37-f926-4630-8656-329cbe9baa99"}',
        '{"type":"stream_event","event":{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_b48fe7e37e694d90a59e1c20","name":"Bash","input":{}}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"2c77f927-67fa-4179-ad65-ad1f1cecf542"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"command\\": \\"echo fake-tool-call\\""}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"3c098129-3168-49a5-9908-74727981eee6"}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":", \\"description\\": \\"Echo a marker\\"}"}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"76fc6685-1f26-4372-8657-8bd8cd5a9422"}',
        '{"type":"assistant","message":{"id":"msg_8d3d01bc3abe48d3bb9c9ace","type":"message","role":"assistant","model":"claude-opus-4-8","content":[{"type":"tool_use","id":"toolu_b48fe7e37e694d90a59e1c20","name":"Bash","input":{"command":"echo fake-tool-call","description":"Echo a marker"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1669,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"},"context_management":null},"parent_tool_use_id":null,"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","uuid":"258947d5-a4aa-475c-b6b0-a63ebe9598ce","request_id":"req_9dff886181e74c9f8a9580d1"}',
        '{"type":"stream_event","event":{"type":"content_block_stop","index":1},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"28619e69-4946-4861-a04c-a9f4f814cc4e"}',
        '{"type":"stream_event","event":{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":50}},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"6fdcf452-0d7f-42b2-989b-bd80b8627d0f"}',
        '{"type":"stream_event","event":{"type":"message_stop"},"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","parent_tool_use_id":null,"uuid":"db42b5fd-8842-4fce-b3d3-60bf4916f4dc"}',
        '{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_b48fe7e37e694d90a59e1c20","type":"tool_result","content":"fake-tool-call","is_error":false}]},"parent_tool_use_id":null,"session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","uuid":"032e06a2-4b45-4f54-a161-f2ccd5ea3620","timestamp":"2026-12-02T00:58:37.058Z","tool_use_result":{"stdout":"fake-tool-call","stderr":"","interrupted":false,"isImage":false,"noOutputExpected":false}}',
        '{"type":"result","subtype":"error_max_turns","duration_ms":417,"duration_api_ms":125,"is_error":true,"num_turns":2,"stop_reason":"tool_use","session_id":"3e9b162b-e1ee-420b-a9aa-bd1bba2a7f83","total_cost_usd":0.009595,"usage":{"input_tokens":1669,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":50,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":1669,"outputTokens":50,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.009595,"contextWindow":1000000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"max_turns","fast_mode_state":"off","uuid":"6d730055-7d4c-4702-b676-f8638566018a","errors":["Reached maximum number of turns (1)"]}',
    ]),
    'api_error_401': (1, [
        '{"type":"system","subtype":"init","cwd":"/home/user/proj","session_id":"60b7f1fc-15c6-4390-805d-42e36e49db11","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"ea63b7eb-3506-4f1f-81b9-41f5a356dcbe","memory_paths":{"auto":"/home/user/.claude/projects/-home-user-proj/memory/"},"fast_mode_state":"off"}',
        '{"type":"system","subtype":"api_retry","attempt":1,"max_retries":1,"retry_delay_ms":532.9752229665512,"error_status":401,"error":"authentication_failed","session_id":"60b7f1fc-15c6-4390-805d-42e36e49db11","uuid":"51a11f79-a084-4082-84fb-e3ab2040bd0c"}',
        '{"type":"assistant","message":{"id":"01da47ae-7e11-4041-8f7d-8ec617a8701d","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null},"content":[{"type":"text","text":"Failed to authenticate. API Error: 401 fake error 401"}],"context_management":null},"parent_tool_use_id":null,"session_id":"60b7f1fc-15c6-4390-805d-42e36e49db11","uuid":"10af7f75-8fa0-42d9-bfc4-27ba86e93184","error":"authentication_failed","request_id":"req_15f163b68302436485e2e027"}',
        '{"type":"result","subtype":"success","is_error":true,"api_error_status":401,"duration_ms":692,"duration_api_ms":0,"num_turns":1,"result":"Failed to authenticate. API Error: 401 fake error 401","stop_reason":"stop_sequence","session_id":"60b7f1fc-15c6-4390-805d-42e36e49db11","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"15bbe476-0218-4d7b-8bde-651467975bbd"}',
    ]),
}


# --- answer bodies -----------------------------------------------------------

NAN, INF = float("nan"), float("inf")
JUNK_USAGE = {   # the server sends NaN / Infinity / strings where counts belong
    "openai": openai_ok(usage={"prompt_tokens": NAN, "completion_tokens": INF,
                               "total_tokens": "53"}),
    "openrouter": openai_ok(usage={"prompt_tokens": "12", "completion_tokens": -INF,
                                   "cost": NAN}),
    "anthropic": anthropic_ok(usage={"input_tokens": "10", "cache_read_input_tokens": NAN,
                                     "output_tokens": INF}),
    "gemini": gemini_ok(usage={"promptTokenCount": INF, "candidatesTokenCount": "3",
                               "thoughtsTokenCount": NAN}),
    "ollama": ollama_ok(prompt_eval_count=NAN, eval_count="3"),
}


# --- a host application's config file ----------------------------------------

HOST_TABLES = """baseURL = "https://host.example/api"
name = "the host app"

[omega]
enabled = true

[channel.telegram]
token = "123:abc"
"""


# --- test files and the request shapes that carry them -----------------------

# The shapes below are the attachment fixtures' request bodies (built from each
# API's own types) and the stdin lines the real claude 2.1.197 read, cut to what
# omega sends: a real 2x2 red PNG, a real 387-byte one-page PDF, a text file and
# one schema (strict-compatible for OpenAI, Anthropic and Gemini alike).
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEElEQVR4nGP4z8AARAwQCgAf7gP9i18U1AAAAABJRU5ErkJggg=="
PDF_B64 = (
    "JVBERi0xLjQKMSAwIG9iajw8L1R5cGUvQ2F0YWxvZy9QYWdlcyAyIDAgUj4+ZW5kb2JqCjIgMCBvYmo8PC9UeXBl"
    "L1BhZ2VzL0tpZHNbMyAwIFJdL0NvdW50IDE+PmVuZG9iagozIDAgb2JqPDwvVHlwZS9QYWdlL1BhcmVudCAyIDAg"
    "Ui9NZWRpYUJveFswIDAgMjAwIDIwMF0vQ29udGVudHMgNCAwIFIvUmVzb3VyY2VzPDwvRm9udDw8L0YxIDUgMCBS"
    "Pj4+Pj4+ZW5kb2JqCjQgMCBvYmo8PC9MZW5ndGggNDQ+PnN0cmVhbQpCVCAvRjEgMjQgVGYgMjAgMTAwIFRkIChI"
    "ZWxsbyBQREYpIFRqIEVUCmVuZHN0cmVhbQplbmRvYmoKNSAwIG9iajw8L1R5cGUvRm9udC9TdWJ0eXBlL1R5cGUx"
    "L0Jhc2VGb250L0hlbHZldGljYT4+ZW5kb2JqCnRyYWlsZXI8PC9Sb290IDEgMCBSPj4KJSVFT0YK")
PNG, PDF, NOTES = base64.b64decode(PNG_B64), base64.b64decode(PDF_B64), b"alpha\nbeta\n"
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"},
                                           "confidence": {"type": "number"}},
          "required": ["colour", "confidence"], "additionalProperties": False}
ANSWER = '{"colour":"red","confidence":0.97}'
QUESTION = "Describe the image, summarise the PDF, and use notes.txt."
NOTES_BLOCK = '<file name="notes.txt">\nalpha\nbeta\n</file>'

# openai/request_attachments.json (less "detail": "auto", the default, which vLLM
# rejects) and request_json_schema.json; OpenRouter's are the same parts.
OPENAI_PARTS = [
    {"type": "text", "text": QUESTION},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
    {"type": "file", "file": {"filename": "hello.pdf",
                              "file_data": "data:application/pdf;base64," + PDF_B64}},
    {"type": "text", "text": NOTES_BLOCK}]
OPENAI_RESPONSE_FORMAT = {"type": "json_schema",
                          "json_schema": {"name": "answer", "strict": True, "schema": SCHEMA}}
# anthropic/request_attachments.json (less its image by URL) and
# request_output_config_json_schema.json; claude-code/stdin_image, stdin_pdf and
# stdin_text_document.stream-json.jsonl carry the same three blocks.
ANTHROPIC_BLOCKS = [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                    "data": PDF_B64}, "title": "hello.pdf"},
    {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                    "data": "alpha\nbeta\n"}, "title": "notes.txt"}]
# gemini/request_attachments.json and request_response_json_schema.json
GEMINI_PARTS = [{"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
                {"inlineData": {"mimeType": "application/pdf", "data": PDF_B64}},
                {"text": NOTES_BLOCK}, {"text": QUESTION}]
# ollama/request_image_and_schema.json and request_text_file_inline.json
OLLAMA_MESSAGE = {"role": "user", "content": QUESTION + "\n\n" + NOTES_BLOCK, "images": [PNG_B64]}


# --- tools: functions, recorded exchanges, a version-1 log -------------------

# The functions the recorded exchanges below offered (their results are the recorded ones).
def lookup_population(country: str) -> int:
    "Returns the current population of the specified fictional country"
    return 123124


def can_have_dragons(population: int) -> bool:
    "Returns True if the specified population can have dragons, False otherwise"
    return population > 100000


def get_weather(city: str) -> str:
    """Get the weather in a given city

    city: The city to get the weather for
    """
    return f"12 degrees celsius and rain in {city}"


def GetWeatherArgs(city: str, country: str, units: Literal["c", "f"]) -> str:
    """Get the temperature for the given country/city combo"""
    return f"12 degrees {units} and rain in {city}"


def get_stock_price(ticker: str, exchange: str) -> dict:
    """Fetch the latest price for a given ticker"""
    return {"price": 227.52, "currency": "USD"}


def now() -> str:
    """The current date and time."""
    return "2025-10-26T09:00:00Z"


def fixed_version() -> str:
    """Return a fixed test version string"""
    return "0.32a0"


def llm_version() -> str:
    return "0.27"


def weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1,
            ratio: float = 1.0, when: str | None = None):
    """The weather: a result of every kind, and every way a tool fails."""
    if city == "Atlantis":
        raise ValueError("no such city")
    if city == "Nowhere":
        raise RuntimeError
    if city == "Refused":
        raise omega.ToolFailed("Refused is not a city I may look up")
    if city == "Data":
        return {"city": city, "temperature": "12°C", "days": [1, 2], "when": omega.Message}
    if city == "Nothing":
        return None
    return f"12 degrees {unit} and rain in {city}"


# --functions: a file with a public function, a helper and an import (neither offered).
TOOLS_PY = '''from os.path import join


def get_weather(city: str) -> str:
    """The current weather in a city.

    city: the city's name, e.g. "Paris"
    """
    return f"12 degrees celsius and rain in {city}"


def _helper():
    return join("a", "b")


def shout(text: str) -> str:
    return text.upper()
'''
NOW_PY = 'def now() -> str:\n    return "noon"\n'

# The log's table as omega 0.2 made it (schema version 1, before asked_model came).
LOG_SCHEMA_V1 = """CREATE TABLE exchanges (
    id INTEGER PRIMARY KEY,          -- the order rows were written in
    conversation TEXT NOT NULL,      -- 8 lowercase hex characters
    time TEXT NOT NULL,              -- UTC, ISO 8601: 2026-12-02T09:50:23.123Z
    provider TEXT,
    model TEXT,
    system_prompt TEXT,
    prompt TEXT,
    answer TEXT,                     -- with an error: the text received before it
    input_tokens INTEGER,
    output_tokens INTEGER,
    cost_usd REAL,
    duration_ms INTEGER,
    stop_reason TEXT,
    session_id TEXT,
    error TEXT                       -- one line when it failed or was stopped, else NULL
)"""

# Tool-calling bodies copied from the wire-format notes' recordings (real traffic of the
# official SDKs' and simonw/llm's tests, the APIs' docs, Google's SDK test data; BUILT:
# made by hand in the documented shape): answers that ask for tools, whole and streamed,
# and the second-round requests a correct client sends.

# openai/request-two-tools.json (REAL)
OPENAI_REQUEST_TWO_TOOLS = json.loads(r'''{"messages":[{"role":"user","content":"Can the country of Crumpet have dragons? Answer with only YES or NO"}],"model":"gpt-4o-mini","stream":false,"tools":[{"type":"function","function":{"name":"lookup_population","description":"Returns the current population of the specified fictional country","parameters":{"properties":{"country":{"type":"string"}},"required":["country"],"type":"object"}}},{"type":"function","function":{"name":"can_have_dragons","description":"Returns True if the specified population can have dragons, False otherwise","parameters":{"properties":{"population":{"type":"integer"}},"required":["population"],"type":"object"}}}]}''')

# openai/response-single-call-raw.json (REAL)
OPENAI_SINGLE_CALL = json.loads(r'''{"id":"chatcmpl-BWpGNGdPONTwxHkZVxbqctQSBDmTn","object":"chat.completion","created":1747163251,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_TTY8UFNo7rNCaOBUNtlRSvMG","type":"function","function":{"name":"lookup_population","arguments":"{\"country\":\"Crumpet\"}"}}],"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":92,"completion_tokens":17,"total_tokens":109,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_0392822090"}''')

# openai/round2-request.json (REAL, built by simonw/llm)
OPENAI_ROUND2 = json.loads(r'''{"messages":[{"role":"user","content":"Can the country of Crumpet have dragons? Answer with only YES or NO"},{"role":"assistant","tool_calls":[{"type":"function","id":"call_TTY8UFNo7rNCaOBUNtlRSvMG","function":{"name":"lookup_population","arguments":"{\"country\": \"Crumpet\"}"}}]},{"role":"tool","tool_call_id":"call_TTY8UFNo7rNCaOBUNtlRSvMG","content":"123124"}],"model":"gpt-4o-mini","stream":false,"tools":[{"type":"function","function":{"name":"lookup_population","description":"Returns the current population of the specified fictional country","parameters":{"properties":{"country":{"type":"string"}},"required":["country"],"type":"object"}}},{"type":"function","function":{"name":"can_have_dragons","description":"Returns True if the specified population can have dragons, False otherwise","parameters":{"properties":{"population":{"type":"integer"}},"required":["population"],"type":"object"}}}]}''')

# openai/response-parallel-calls.json (REAL, re-serialized)
OPENAI_PARALLEL = json.loads(r'''{"id":"chatcmpl-ABfvyvfNWKcl7Ohqos4UFrmMs1v4C","object":"chat.completion","created":1727346166,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_fdNz3vOBKYgOIpMdWotB9MjY","type":"function","function":{"name":"GetWeatherArgs","arguments":"{\"city\": \"Edinburgh\", \"country\": \"GB\", \"units\": \"c\"}"}},{"id":"call_h1DWI1POMJLb0KwIyQHWXD4p","type":"function","function":{"name":"get_stock_price","arguments":"{\"ticker\": \"AAPL\", \"exchange\": \"NASDAQ\"}"}}],"refusal":null},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":149,"completion_tokens":60,"total_tokens":209,"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_b40fb1c6fb"}''')

# openai/round2-request-parallel.json (BUILT)
OPENAI_ROUND2_PARALLEL = json.loads(r'''{"model":"gpt-4o-2024-08-06","messages":[{"role":"user","content":"What's the weather like in Edinburgh?"},{"role":"user","content":"What's the price of AAPL?"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_fdNz3vOBKYgOIpMdWotB9MjY","type":"function","function":{"name":"GetWeatherArgs","arguments":"{\"city\": \"Edinburgh\", \"country\": \"GB\", \"units\": \"c\"}"}},{"id":"call_h1DWI1POMJLb0KwIyQHWXD4p","type":"function","function":{"name":"get_stock_price","arguments":"{\"ticker\": \"AAPL\", \"exchange\": \"NASDAQ\"}"}}]},{"role":"tool","tool_call_id":"call_fdNz3vOBKYgOIpMdWotB9MjY","content":"12 degrees c and rain in Edinburgh"},{"role":"tool","tool_call_id":"call_h1DWI1POMJLb0KwIyQHWXD4p","content":"{\"price\": 227.52, \"currency\": \"USD\"}"}],"tools":[{"type":"function","function":{"name":"GetWeatherArgs","description":"Get the temperature for the given country/city combo","parameters":{"type":"object","properties":{"city":{"type":"string"},"country":{"type":"string"},"units":{"type":"string","enum":["c","f"]}},"required":["city","country","units"],"additionalProperties":false},"strict":true}},{"type":"function","function":{"name":"get_stock_price","description":"Fetch the latest price for a given ticker","parameters":{"type":"object","properties":{"ticker":{"type":"string"},"exchange":{"type":"string"}},"required":["ticker","exchange"],"additionalProperties":false},"strict":true}}]}''')

# openai/stream-single-call-gpt-4o-mini.sse (REAL)
OPENAI_STREAM_SINGLE = rb'''data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1EYWDzueHEp8OsB8jJSEp7WB","type":"function","function":{"name":"multiply","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"123"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":",\""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"b"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"233"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4","object":"chat.completion.chunk","created":1747148049,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0","choices":[],"usage":{"prompt_tokens":54,"completion_tokens":20,"total_tokens":74,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

'''

# openai/stream-parallel-calls.sse (REAL)
OPENAI_STREAM_PARALLEL = rb'''data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"role":"assistant","content":null},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_JMW1whyEaYG438VE1OIflxA2","type":"function","function":{"name":"GetWeatherArgs","arguments":""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\": "}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Edinb"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"urgh"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\", \"c"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ountry"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\": \""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"GB\", "}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"units"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\": \""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"c\"}"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_DNYTawLBoN8fj3KN6qU9N1Ou","type":"function","function":{"name":"get_stock_price","arguments":""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"ti"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"cker\""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":": \"AAP"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"L\", "}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\"exch"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"ange\":"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":" \"NA"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"SDAQ\""}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"}"}}]},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}]}

data: {"id":"chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63","object":"chat.completion.chunk","created":1727346178,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","choices":[],"usage":{"prompt_tokens":149,"completion_tokens":60,"total_tokens":209,"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# openai-compatible/llamacpp-response-tool-call.json (REAL)
LLAMACPP_CALL = json.loads(r'''{"choices":[{"finish_reason":"tool_calls","index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"get_current_weather","arguments":"{\"location\":\"Istanbul, Turkey.\"}"},"id":"a0b2a9fb4"}]}}],"created":1750711340,"model":"mistralai_Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf","system_fingerprint":"b5697-ef035803","object":"chat.completion","usage":{"completion_tokens":39,"prompt_tokens":120,"total_tokens":159},"id":"chatcmpl-rdyqGaribJmnaex1JO4tMR46XfvLGQlL","timings":{"prompt_n":100,"prompt_ms":100.287,"prompt_per_token_ms":1.0028700000000002,"prompt_per_second":997.1382133277492,"predicted_n":39,"predicted_ms":904.706,"predicted_per_token_ms":23.197589743589745,"predicted_per_second":43.10792677400172}}''')

# openai-compatible/llamacpp-stream-reasoning-tool-call.sse (BUILT)
LLAMACPP_STREAM = rb'''data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"The user asks for Paris weather; "}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"call get_weather."}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"Kq9wZ3xT0bY7nL2mR5vC8dF1gH4jP6sA","type":"function","function":{"name":"get_weather","arguments":""}}]}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":"tool_calls","index":0,"delta":{}}],"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk"}

data: {"created":1756000000,"id":"chatcmpl-Q1xZ8vK2mLpR4tN6wY0aB3cD5eF7gH9j","model":"qwen3-8b-q4_k_m.gguf","system_fingerprint":"b6200-abcdef12","object":"chat.completion.chunk","choices":[],"usage":{"completion_tokens":38,"prompt_tokens":181,"total_tokens":219}}

data: [DONE]

'''

# openai-compatible/deepseek-round2-request-thinking-tool.json (BUILT)
DEEPSEEK_ROUND2 = json.loads(r'''{"model":"deepseek-v4-pro","messages":[{"role":"user","content":"What's the weather in Paris tomorrow?"},{"role":"assistant","content":"","reasoning_content":"I need the date first, then the weather. Call get_date.","tool_calls":[{"id":"call_00_aB3dE5fG7hJ9kL1mN3pQ5rS7","type":"function","function":{"name":"get_date","arguments":"{}"}}]},{"role":"tool","tool_call_id":"call_00_aB3dE5fG7hJ9kL1mN3pQ5rS7","content":"2026-08-21"}],"tools":[{"type":"function","function":{"name":"get_date","description":"Today's date","parameters":{"type":"object","properties":{}}}},{"type":"function","function":{"name":"get_weather","description":"Weather for a city and date","parameters":{"type":"object","properties":{"city":{"type":"string"},"date":{"type":"string"}},"required":["city","date"]}}}],"thinking":{"type":"enabled"},"reasoning_effort":"high"}''')

# openrouter/stream-no-args-variant-a.sse (REAL)
OPENROUTER_STREAM_A = rb'''data: {"id":"gen-1753242299-QZRAt5HJHd1ptY8sdS0s","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-QZRAt5HJHd1ptY8sdS0s","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-QZRAt5HJHd1ptY8sdS0s","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"0","type":"function","function":{"name":"llm_version","arguments":""}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-QZRAt5HJHd1ptY8sdS0s","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"0","type":"function","function":{"name":"llm_version","arguments":"{}"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-QZRAt5HJHd1ptY8sdS0s","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"usage":{"prompt_tokens":57,"completion_tokens":17,"total_tokens":74,"cost":0.00007159,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},"cost_details":{"upstream_inference_cost":null},"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# openrouter/stream-no-args-variant-c.sse (REAL; first line begins with a space)
OPENROUTER_STREAM_C = rb''' data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fpv0_170758dd"}

data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"llm_version:0","type":"function","function":{"name":"llm_version"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fpv0_170758dd"}

data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"function":{"arguments":"{}"},"type":"function"}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":"fpv0_170758dd"}

data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls","native_finish_reason":"tool_calls","logprobs":null}],"system_fingerprint":"fpv0_170758dd"}

data: {"id":"gen-1753248108-FGOxpkEzFEwhNKSPpI4a","provider":"Novita","model":"moonshotai/kimi-k2","object":"chat.completion.chunk","created":1753248108,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"usage":{"prompt_tokens":56,"completion_tokens":12,"total_tokens":68,"cost":0.00005952,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},"cost_details":{"upstream_inference_cost":null},"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# openrouter/stream-no-args-arguments-null-variant-d.sse (CONSTRUCTED upstream)
OPENROUTER_STREAM_D = rb'''data: {"id":"gen-1753242299-DdArgsNullVariantD00","provider":"Meta","model":"muse-spark-1.1","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-DdArgsNullVariantD00","provider":"Meta","model":"muse-spark-1.1","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"0","type":"function","function":{"name":"llm_version","arguments":null}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"system_fingerprint":""}

data: {"id":"gen-1753242299-DdArgsNullVariantD00","provider":"Meta","model":"muse-spark-1.1","object":"chat.completion.chunk","created":1753242299,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls","native_finish_reason":"tool_calls","logprobs":null}],"usage":{"prompt_tokens":57,"completion_tokens":17,"total_tokens":74,"cost":0.00007159,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},"cost_details":{"upstream_inference_cost":null},"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

'''

# openrouter/response-reasoning-tool-call.json (BUILT)
OPENROUTER_REASONING_CALL = json.loads(r'''{"id":"gen-1756000000-AbCdEfGhIjKlMnOpQrSt","provider":"Anthropic","model":"anthropic/claude-sonnet-4.5","object":"chat.completion","created":1756000000,"choices":[{"logprobs":null,"finish_reason":"tool_calls","native_finish_reason":"tool_use","index":0,"message":{"role":"assistant","content":"","refusal":null,"reasoning":"The user wants Paris weather; call get_weather with city Paris.","reasoning_details":[{"type":"reasoning.text","text":"The user wants Paris weather; call get_weather with city Paris.","signature":"EvkDCpMBCA8YAipA...(opaque)...","format":"anthropic-claude-v1","index":0}],"tool_calls":[{"id":"toolu_01ESed5hCdyBEf6xWqtpMKwH","index":0,"type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]}}],"usage":{"prompt_tokens":610,"completion_tokens":92,"total_tokens":702,"cost":0.00321,"completion_tokens_details":{"reasoning_tokens":41}}}''')

# openrouter/round2-request-reasoning-details.json (BUILT)
OPENROUTER_ROUND2 = json.loads(r'''{"model":"anthropic/claude-sonnet-4.5","messages":[{"role":"user","content":"What is the weather in Paris? You must use the tool."},{"role":"assistant","content":"","tool_calls":[{"id":"toolu_01ESed5hCdyBEf6xWqtpMKwH","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}],"reasoning_details":[{"type":"reasoning.text","text":"The user wants Paris weather; call get_weather with city Paris.","signature":"EvkDCpMBCA8YAipA...(opaque)...","format":"anthropic-claude-v1","index":0}]},{"role":"tool","tool_call_id":"toolu_01ESed5hCdyBEf6xWqtpMKwH","content":"12 degrees celsius and rain"}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Weather for a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],"reasoning":{"max_tokens":2048},"max_tokens":4096}''')

# anthropic/request-tools.json (REAL)
ANTHROPIC_REQUEST_TOOLS = json.loads(r'''{"max_tokens":1024,"messages":[{"role":"user","content":"What is the weather in SF?"}],"model":"claude-haiku-4-5","tools":[{"name":"get_weather","description":"Lookup the weather for a given city in either celsius or fahrenheit","input_schema":{"additionalProperties":false,"properties":{"location":{"description":"The city and state, e.g. San Francisco, CA","title":"Location","type":"string"},"units":{"description":"Unit for the output, either 'c' for celsius or 'f' for fahrenheit","enum":["c","f"],"title":"Units","type":"string"}},"required":["location","units"],"type":"object"}}]}''')

# anthropic/response-single-call.json (REAL)
ANTHROPIC_SINGLE_CALL = json.loads(r'''{"model":"claude-haiku-4-5-20251001","id":"msg_01YPmXusvsWu64vxcNZf1uJq","type":"message","role":"assistant","content":[{"type":"tool_use","id":"toolu_016xm9m1i3NcGW5xFMMZJTqY","name":"get_weather","input":{"location":"San Francisco, CA","units":"f"},"caller":{"type":"direct"}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":656,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":74,"service_tier":"standard","inference_geo":"not_available"}}''')

# anthropic/round2-request.json (REAL, the SDK's key order)
ANTHROPIC_ROUND2 = json.loads(r'''{"max_tokens":1024,"messages":[{"role":"user","content":"What is the weather in SF?"},{"role":"assistant","content":[{"id":"toolu_016xm9m1i3NcGW5xFMMZJTqY","input":{"location":"San Francisco, CA","units":"f"},"name":"get_weather","type":"tool_use","caller":{"type":"direct"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_016xm9m1i3NcGW5xFMMZJTqY","content":"{\"location\": \"San Francisco, CA\", \"temperature\": \"68\\u00b0F\", \"condition\": \"Sunny\"}"}]}],"model":"claude-haiku-4-5","tools":[{"name":"get_weather","description":"Lookup the weather for a given city in either celsius or fahrenheit","input_schema":{"additionalProperties":false,"properties":{"location":{"description":"The city and state, e.g. San Francisco, CA","title":"Location","type":"string"},"units":{"description":"Unit for the output, either 'c' for celsius or 'f' for fahrenheit","enum":["c","f"],"title":"Units","type":"string"}},"required":["location","units"],"type":"object"}}]}''')

# anthropic/round2-request-is-error.json (REAL)
ANTHROPIC_ROUND2_IS_ERROR = json.loads(r'''{"max_tokens":1024,"messages":[{"role":"user","content":"What is the weather in SF?"},{"role":"assistant","content":[{"id":"toolu_01A9HHF5Ezy3oBrKmSgfASm9","input":{"location":"San Francisco, CA","units":"f"},"name":"get_weather","type":"tool_use","caller":{"type":"direct"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01A9HHF5Ezy3oBrKmSgfASm9","content":"RuntimeError('Unexpected error, try again')","is_error":true}]}],"model":"claude-haiku-4-5","tools":[{"name":"get_weather","description":"Lookup the weather for a given city in either celsius or fahrenheit","input_schema":{"additionalProperties":false,"properties":{"location":{"description":"The city and state, e.g. San Francisco, CA","title":"Location","type":"string"},"units":{"description":"Unit for the output, either 'c' for celsius or 'f' for fahrenheit","enum":["c","f"],"title":"Units","type":"string"}},"required":["location","units"],"type":"object"}}]}''')

# anthropic/round2-request-thinking.json (REAL, built by llm-anthropic)
ANTHROPIC_ROUND2_THINKING = json.loads(r'''{"max_tokens":64000,"messages":[{"role":"user","content":[{"type":"text","text":"Use the fixed_version tool. Then tell me the version and make one short joke about it. Think about it first."}]},{"role":"assistant","content":[{"type":"thinking","thinking":"The user wants me to:\n1. Use the fixed_version tool\n2. Tell them the version\n3. Make a short joke about it\n\nLet me first call the fixed_version tool to see what version it returns.","signature":"EoQDCm0IDhgCKkCDzGs2kL2PgnDCZU/nM2wG2P1VIXCRHVnhDDzBQxNF1fl4QBXEKLxRItNJ2MwFdW9eeZPhsxSQIxD54cv3zs29MhljbGF1ZGUtaGFpa3UtNC01LTIwMjUxMDAxOABCCHRoaW5raW5nEgy/OWlwTmmqUjC6L70aDJ4P0R5NfuIe9U5zAiIwCxPduXS2UxCNxJCee3i91qK3cAyAgxCjL2wkQ5UD56iX1hXGOyuNaiH5k+dF5OCQKsQBxiAo+NjC61hV8nRYtaiP+C4inOcuMKuTG9Z1rysxTXkKBTl3oMiOlnEPHHPpKpg4sYF2G5VoTg8JTon20hdZw4GfTEVupnU1qAmnMqyAgke9SoV7HBW/PyA/FxL/q33xJ2gKFiD+BsgI9Z0koMmFKCvm2MoYE6u+ONEwKdFQXL1FKRW6t/bYbJGrLJLwxilsL82h9j4xjggjMn8Npvpn+zsrDPW/8PuLd4Pu+/EsjoneYwyxQQtUVgzhVGhhANWRjSBwUxgB"},{"type":"tool_use","id":"toolu_01825dXWLSoJwCst1qTsiWdb","name":"fixed_version","input":{}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01825dXWLSoJwCst1qTsiWdb","content":"0.32a0"}]}],"model":"claude-haiku-4-5-20251001","temperature":1.0,"tools":[{"name":"fixed_version","description":"Return a fixed test version string","input_schema":{"properties":{},"type":"object"}}],"thinking":{"type":"enabled","budget_tokens":1024,"display":"summarized"},"stream":true}''')

# anthropic/stream-parallel-no-args.sse (REAL)
ANTHROPIC_STREAM_PARALLEL = rb'''event: message_start
data: {"type":"message_start","message":{"model":"claude-haiku-4-5-20251001","id":"msg_01V2noLbAb2NgKnjaNw6Cn3w","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"stop_details":null,"usage":{"input_tokens":542,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":62,"service_tier":"standard","inference_geo":"not_available"}}  }

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_01LtHJmixrs9NcWQkK8hu8hj","name":"pelican_name_generator","input":{},"caller":{"type":"direct"}}     }

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}               }

event: content_block_stop
data: {"type":"content_block_stop","index":0       }

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01N8a4jWyf116qKTMqKKmjyt","name":"pelican_name_generator","input":{},"caller":{"type":"direct"}}         }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}  }

event: content_block_stop
data: {"type":"content_block_stop","index":1   }

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null,"stop_details":null},"usage":{"input_tokens":542,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":62}               }

event: message_stop
data: {"type":"message_stop"     }

'''

# anthropic/stream-single-call-input-json-delta.sse (REAL)
ANTHROPIC_STREAM_SINGLE = rb'''event: message_start
data: {"type":"message_start","message":{"model":"claude-haiku-4-5-20251001","id":"msg_01R4hRKPvDP3eyHsaAgs1gBn","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":656,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":26,"service_tier":"standard","inference_geo":"not_available"}}  }

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_01TJoxvFknVdnV9XpWFPaRmY","name":"get_weather","input":{},"caller":{"type":"direct"}}              }

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}           }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}           }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" \"San"}     }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" Francisco, "}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"CA\""}     }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":", \"units\": "}     }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"\"f\"}"}             }

event: content_block_stop
data: {"type":"content_block_stop","index":0      }

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"input_tokens":656,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":74}              }

event: message_stop
data: {"type":"message_stop"       }

'''

# anthropic/stream-thinking-tool-use.sse (REAL)
ANTHROPIC_STREAM_THINKING = rb'''event: message_start
data: {"type":"message_start","message":{"model":"claude-haiku-4-5-20251001","id":"msg_01JdU4xqNHXL9QCFWkwCDKGr","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"stop_details":null,"usage":{"input_tokens":598,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":8,"service_tier":"standard","inference_geo":"not_available"}}             }

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}  }

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user wants me to:\n1"}         }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":". Use the fixed_version tool\n2. Tell them the version\n3. Make a short joke about it\n\nLet me first call the fixed_version tool to see what version it returns."}               }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":""}             }

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EoQDCm0IDhgCKkCDzGs2kL2PgnDCZU/nM2wG2P1VIXCRHVnhDDzBQxNF1fl4QBXEKLxRItNJ2MwFdW9eeZPhsxSQIxD54cv3zs29MhljbGF1ZGUtaGFpa3UtNC01LTIwMjUxMDAxOABCCHRoaW5raW5nEgy/OWlwTmmqUjC6L70aDJ4P0R5NfuIe9U5zAiIwCxPduXS2UxCNxJCee3i91qK3cAyAgxCjL2wkQ5UD56iX1hXGOyuNaiH5k+dF5OCQKsQBxiAo+NjC61hV8nRYtaiP+C4inOcuMKuTG9Z1rysxTXkKBTl3oMiOlnEPHHPpKpg4sYF2G5VoTg8JTon20hdZw4GfTEVupnU1qAmnMqyAgke9SoV7HBW/PyA/FxL/q33xJ2gKFiD+BsgI9Z0koMmFKCvm2MoYE6u+ONEwKdFQXL1FKRW6t/bYbJGrLJLwxilsL82h9j4xjggjMn8Npvpn+zsrDPW/8PuLd4Pu+/EsjoneYwyxQQtUVgzhVGhhANWRjSBwUxgB"}               }

event: content_block_stop
data: {"type":"content_block_stop","index":0           }

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01825dXWLSoJwCst1qTsiWdb","name":"fixed_version","input":{},"caller":{"type":"direct"}}             }

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}             }

event: content_block_stop
data: {"type":"content_block_stop","index":1       }

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null,"stop_details":null},"usage":{"input_tokens":598,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":92,"output_tokens_details":{"thinking_tokens":53}}}

event: message_stop
data: {"type":"message_stop"    }

'''

# gemini/response-thinking-call-signature.json (Google SDK test data)
GEMINI_THINKING_CALL = json.loads(r'''{"candidates":[{"content":{"parts":[{"text":"**Thinking Through the New Year's Eve Calculation**\n\nOkay, so the user wants to know how many days until New Year's Eve.  My first thought is, \"Right, I need the current date.\" The `now()` tool seems perfect for that. It takes no parameters, which makes it simple. I'll call `now()`.\n\nTo actually *answer* the question though, I'll need a bit more.  I'll have to figure out the date of the *next* New Year's Eve. And then, crucially, calculate the difference in days between *today's* date (from `now()`) and that New Year's Eve.\n\nThe user is asking *until* New Year's Eve, so that clarifies it. I'll determine the year, and if it's already after December 31st of the current year, then it's December 31st of the *next* year.  That's how I need to do it.\n\nFor instance, if it's October 26, 2023, the answer is 66 days to December 31, 2023. But if it's January 1, 2024, the answer will be 365, because 2024 is a leap year, and I'll be calculating to December 31, 2024.\n\nThe plan is straightforward: get the current date, then perform the calculation. The final output will be a clear sentence stating the number of days.\n\nI also need to consider some edge cases.  If it *is* New Year's Eve, then it's 0 days. If it's December 30th, then it's 1 day. I'll need to check for leap years as well. I think this will all work.\n","thought":true},{"functionCall":{"name":"now","args":{}},"thoughtSignature":"CtQOAVSoXO74PmYr9AFurEIJNTAtfagOIxtRA5FcMPow3t+9ZhbhilokxHpmxmgnjFgyuOV/VCoF1mwTRcWrqItOVgV8sOR1NmRi9ENW/B7uWJTh0hMHsHPy62KwaDG1hJNFs+MXhPkGE7JFD7pzrlVAi6ZitQfr3vEKHqCnE9/uWk+EUebwNOO1Ej1AhDXeMgGbSHqNK+7FQqgnrzy6WVIEKCUBAqDvvb5VXXSYkYP+AvuM9/4PluCHrVeB4bYt4LKc1HVAZtKOH4+k4cNG7+Z9qoGVke/ua528n6KnnoRJRKXikLlkAhbDDFCEbCEjJFr0NPEImX8dYyiUjCcdIWHj6FdRUInYPov02SlqoaE5cI1BhZkvW5kaQoNPfq5nS5gQ/y9HJAouMsy83yAI8G1qjzNICeaw5hsZTg89Z9x7gF+LJrGOxAOSefoV7MhQFtzj+pHVEhRCfzkDKgiPPHTL29FGBxI+FuCI+kF4VONQJnF+sqK57XuGysgyqODw/kJJSwxp9ihqzlfuKAK4QYeLURf2yroFEVujWN6n36hwqIsYpKNfQrbzXJbkV8xgZlKBvmzBfmt9ycFrBzeU+8SNCLYdV2GReaK4bt/fX2SHTpmqhwAvqRArZ1Cdat+yozn1KA8+nGH9SMnfUP2qn0Kj28fzbG0AsP8nZgVlXdOXCVkeUUSUqtRQEMQOSXzqidJbg5KUAQnadsuJ1deTZwBJv1YWCU2lisW/k6vlB2M05OoUaC7L4vx12+Fx3D+e04Hd3vaVj8HE2q5xAseDiCPmuXPulNVByGdVlUdczc6hJ0eFwbZtV33nWSqUPts9XeY6RMfWqabmUg/qY/npD1fhszlqWG5hkuzUv8q4BuGLniFHz6hXmbr274aO++6+cxMEiRwgpZBLGxFukELIQ2HKtUTcdTe+2Q6J2BcznmsK7h31fcp6lyZlzPjZ6/glBczy0xxhQJyVtcfuDPsPwfRCEIKkNlrYPGNW/Edtp/nU6avZ3Dq9g18Dmlrhw1NffqP98lUt1xj1K+TM1Pa0IltSatI5hf/y4O6wRv/EeAIck6imZyJmWEhxO6SBbBy5Cmo7rh83wyRNr8NNHzJoE1/dMRhz9LnygekZsCxQqT+MOmQZsA5pu7O3ZnxFajCRPTSii8OVcseGK65/riQ1zwIJoM/K5//KnvE/GtFtbdn7wBmOU/XaglYaApIlZioxioy4qAzbM8T5kijXGj7E0AFkLsM3XC3hdhehNwNHwbaEicZW7ubnMJmlZi+AfZq+tMkiPG898Xxm+ZUSkcLQy4fsufKQWiQ1Xa960/dd/iQnF2dYSaMKiKCRw9OZt3+gnroziayEgsFei2m6urGJCTII3D3HBxLnMbuZyg2PzZeaYKAigsxb5MSx8ULz1/+dYQFkpIGMzUHz/gs2IVAvEy0NUS/K8agKP1HRNq8KLOqWrmBR07OOjClOI3EtHnEMY5QIi7NqRDl7H9QFHYaJE9ed2p94oepq8gXaP2/HrJrV/Nbe5puge+qbc8vvYPKWLi9EWOQ/avBFGD3kh5rlPnX/MNybIUf4GViIjnLykQS31Wt2V+E0gY5OFqPwVHLamQMEuQ+fNpb/w9goEk4Br5ZDvVNXri7CMWXYvv8/6hPzJLwPsiAd9hYvdbUQ4EGyOT3zdtVuz8nD7Npo7dG3BFCw9FMh1ebh2IhRSkWgSgvPrh099tc7pLOqM1/tu3FxLWu4rYIJjf76IS8gcu+Wd3xJcOjPtDzOMbay6gNKuJiUzAu/ue9fUP7WwCE8WZmzX8qvKdNMyY/YnDF1pemTjcF3oxixipAsTPOUdxkkjrxAOT7NEXq9pFPGpN4ZEBRx6aq+vXovp3nQu9jSnTBNdBpDkG8/Gc4r3IYQJP0rWa9ya8eKRicUElrAUn2J5dvQBwAZVFfMKurtRshZoI5eN71Q9EhLcls4EM8Yxb+7Tg7ERkV1dpztGqMEBqwmfcnfq7a4nN88Sx89qSzyE/qzdVnE8giE7di8h0DtE+Y3bH8y+58T7iPymS+BWDBk9Sjm40QRi2yINVQYqLot+2tUER5AzbbwylLixObauJUFa8Y99mbzKR41M1myKSofnfZ3nmjsr1TcC9fL/Q01fyTM7q7oORP2yvLGFzf0yeJ9CgtH6zcBc5x7X7bCn5KnEcMiN8RTumDOHOzxwPj2xflWGC/HjCSRRLymFWoDWh8bhajylMzLsWb7NBWyP4HGKel21YJ43RhjwcALr363V1XjoIbhZlI8eWH1fFsDxUoEf06XUL/mbrjV0LHeqHHabKG054Xb6TcH0unO1lwGk/KuSzj7dQTZ44EahkGfoQQi8cElnwsOhQfnsoCrpFh4+Vxyrqa1IEGpX3Apv+qp+IL9sUYViKFbYyslfbpxxCdK9UkRM8BHB28UBlrCb4rbzpCt1eZvFZ+5ERB5PAutjZ5U4yP9ca6tg2eJw7a1aQzMTaa20acqLL8AgwXDPHYhBUvGlQbIC1+Zdw=="}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":38,"candidatesTokenCount":8,"totalTokenCount":547,"promptTokensDetails":[{"modality":"TEXT","tokenCount":38}],"thoughtsTokenCount":501},"modelVersion":"gemini-2.5-pro","responseId":"38CHaLjMG6TujrEPtvTiuQk"}''')

# gemini/round2-request-camel-case.json (BUILT)
GEMINI_ROUND2 = json.loads(r'''{"contents":[{"role":"user","parts":[{"text":"How many days until New Year's Eve?"}]},{"role":"model","parts":[{"text":"**Thinking Through the New Year's Eve Calculation**\n\nOkay, so the user wants to know how many days until New Year's Eve.  My first thought is, \"Right, I need the current date.\" The `now()` tool seems perfect for that. It takes no parameters, which makes it simple. I'll call `now()`.\n\nTo actually *answer* the question though, I'll need a bit more.  I'll have to figure out the date of the *next* New Year's Eve. And then, crucially, calculate the difference in days between *today's* date (from `now()`) and that New Year's Eve.\n\nThe user is asking *until* New Year's Eve, so that clarifies it. I'll determine the year, and if it's already after December 31st of the current year, then it's December 31st of the *next* year.  That's how I need to do it.\n\nFor instance, if it's October 26, 2023, the answer is 66 days to December 31, 2023. But if it's January 1, 2024, the answer will be 365, because 2024 is a leap year, and I'll be calculating to December 31, 2024.\n\nThe plan is straightforward: get the current date, then perform the calculation. The final output will be a clear sentence stating the number of days.\n\nI also need to consider some edge cases.  If it *is* New Year's Eve, then it's 0 days. If it's December 30th, then it's 1 day. I'll need to check for leap years as well. I think this will all work.\n","thought":true},{"functionCall":{"name":"now","args":{}},"thoughtSignature":"CtQOAVSoXO74PmYr9AFurEIJNTAtfagOIxtRA5FcMPow3t+9ZhbhilokxHpmxmgnjFgyuOV/VCoF1mwTRcWrqItOVgV8sOR1NmRi9ENW/B7uWJTh0hMHsHPy62KwaDG1hJNFs+MXhPkGE7JFD7pzrlVAi6ZitQfr3vEKHqCnE9/uWk+EUebwNOO1Ej1AhDXeMgGbSHqNK+7FQqgnrzy6WVIEKCUBAqDvvb5VXXSYkYP+AvuM9/4PluCHrVeB4bYt4LKc1HVAZtKOH4+k4cNG7+Z9qoGVke/ua528n6KnnoRJRKXikLlkAhbDDFCEbCEjJFr0NPEImX8dYyiUjCcdIWHj6FdRUInYPov02SlqoaE5cI1BhZkvW5kaQoNPfq5nS5gQ/y9HJAouMsy83yAI8G1qjzNICeaw5hsZTg89Z9x7gF+LJrGOxAOSefoV7MhQFtzj+pHVEhRCfzkDKgiPPHTL29FGBxI+FuCI+kF4VONQJnF+sqK57XuGysgyqODw/kJJSwxp9ihqzlfuKAK4QYeLURf2yroFEVujWN6n36hwqIsYpKNfQrbzXJbkV8xgZlKBvmzBfmt9ycFrBzeU+8SNCLYdV2GReaK4bt/fX2SHTpmqhwAvqRArZ1Cdat+yozn1KA8+nGH9SMnfUP2qn0Kj28fzbG0AsP8nZgVlXdOXCVkeUUSUqtRQEMQOSXzqidJbg5KUAQnadsuJ1deTZwBJv1YWCU2lisW/k6vlB2M05OoUaC7L4vx12+Fx3D+e04Hd3vaVj8HE2q5xAseDiCPmuXPulNVByGdVlUdczc6hJ0eFwbZtV33nWSqUPts9XeY6RMfWqabmUg/qY/npD1fhszlqWG5hkuzUv8q4BuGLniFHz6hXmbr274aO++6+cxMEiRwgpZBLGxFukELIQ2HKtUTcdTe+2Q6J2BcznmsK7h31fcp6lyZlzPjZ6/glBczy0xxhQJyVtcfuDPsPwfRCEIKkNlrYPGNW/Edtp/nU6avZ3Dq9g18Dmlrhw1NffqP98lUt1xj1K+TM1Pa0IltSatI5hf/y4O6wRv/EeAIck6imZyJmWEhxO6SBbBy5Cmo7rh83wyRNr8NNHzJoE1/dMRhz9LnygekZsCxQqT+MOmQZsA5pu7O3ZnxFajCRPTSii8OVcseGK65/riQ1zwIJoM/K5//KnvE/GtFtbdn7wBmOU/XaglYaApIlZioxioy4qAzbM8T5kijXGj7E0AFkLsM3XC3hdhehNwNHwbaEicZW7ubnMJmlZi+AfZq+tMkiPG898Xxm+ZUSkcLQy4fsufKQWiQ1Xa960/dd/iQnF2dYSaMKiKCRw9OZt3+gnroziayEgsFei2m6urGJCTII3D3HBxLnMbuZyg2PzZeaYKAigsxb5MSx8ULz1/+dYQFkpIGMzUHz/gs2IVAvEy0NUS/K8agKP1HRNq8KLOqWrmBR07OOjClOI3EtHnEMY5QIi7NqRDl7H9QFHYaJE9ed2p94oepq8gXaP2/HrJrV/Nbe5puge+qbc8vvYPKWLi9EWOQ/avBFGD3kh5rlPnX/MNybIUf4GViIjnLykQS31Wt2V+E0gY5OFqPwVHLamQMEuQ+fNpb/w9goEk4Br5ZDvVNXri7CMWXYvv8/6hPzJLwPsiAd9hYvdbUQ4EGyOT3zdtVuz8nD7Npo7dG3BFCw9FMh1ebh2IhRSkWgSgvPrh099tc7pLOqM1/tu3FxLWu4rYIJjf76IS8gcu+Wd3xJcOjPtDzOMbay6gNKuJiUzAu/ue9fUP7WwCE8WZmzX8qvKdNMyY/YnDF1pemTjcF3oxixipAsTPOUdxkkjrxAOT7NEXq9pFPGpN4ZEBRx6aq+vXovp3nQu9jSnTBNdBpDkG8/Gc4r3IYQJP0rWa9ya8eKRicUElrAUn2J5dvQBwAZVFfMKurtRshZoI5eN71Q9EhLcls4EM8Yxb+7Tg7ERkV1dpztGqMEBqwmfcnfq7a4nN88Sx89qSzyE/qzdVnE8giE7di8h0DtE+Y3bH8y+58T7iPymS+BWDBk9Sjm40QRi2yINVQYqLot+2tUER5AzbbwylLixObauJUFa8Y99mbzKR41M1myKSofnfZ3nmjsr1TcC9fL/Q01fyTM7q7oORP2yvLGFzf0yeJ9CgtH6zcBc5x7X7bCn5KnEcMiN8RTumDOHOzxwPj2xflWGC/HjCSRRLymFWoDWh8bhajylMzLsWb7NBWyP4HGKel21YJ43RhjwcALr363V1XjoIbhZlI8eWH1fFsDxUoEf06XUL/mbrjV0LHeqHHabKG054Xb6TcH0unO1lwGk/KuSzj7dQTZ44EahkGfoQQi8cElnwsOhQfnsoCrpFh4+Vxyrqa1IEGpX3Apv+qp+IL9sUYViKFbYyslfbpxxCdK9UkRM8BHB28UBlrCb4rbzpCt1eZvFZ+5ERB5PAutjZ5U4yP9ca6tg2eJw7a1aQzMTaa20acqLL8AgwXDPHYhBUvGlQbIC1+Zdw=="}]},{"role":"user","parts":[{"functionResponse":{"name":"now","response":{"result":"2025-10-26T09:00:00Z"}}}]}],"tools":[{"functionDeclarations":[{"name":"now","description":"The current date and time.","parameters":{"type":"object","properties":{}}}]}],"generationConfig":{"thinkingConfig":{"includeThoughts":true,"thinkingBudget":1024}}}''')

# gemini/response-parallel-calls.json (Google SDK test data)
GEMINI_PARALLEL = json.loads(r'''{"candidates":[{"content":{"parts":[{"functionCall":{"name":"sum","args":{"y":1,"x":2}}},{"functionCall":{"name":"multiply","args":{"y":3,"x":4}}},{"functionCall":{"name":"subtract","args":{"y":5,"x":6}}}],"role":"model"},"finishReason":"STOP","index":0}]}''')

# gemini/response-call-args-absent.json (Google SDK test data)
GEMINI_ARGS_ABSENT = json.loads(r'''{"candidates":[{"content":{"parts":[{"functionCall":{"name":"current_time"}}],"role":"model"},"finishReason":"STOP","index":0}]}''')

# gemini/stream-thinking-call-signature.sse (Google SDK test data; CRLF restored below)
GEMINI_STREAM = rb'''data: {"candidates": [{"content": {"parts": [{"text": "**Calculating the Days**\n\nI've determined the user's request involves calculating the days until New Year's Eve. I need to get the current date and the date of New Year's Eve. My plan involves using `default_api.now()` to get the current date and time. Then, I can perform the calculation to find the time difference.\n\n\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 38,"totalTokenCount": 106,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 38}],"thoughtsTokenCount": 68},"modelVersion": "gemini-2.5-flash","responseId": "48SHaPHpHKbG-8YPtZCawAk"}

data: {"candidates": [{"content": {"parts": [{"text": "**Determining the Approach**\n\nI'm now zeroing in on the best method. Having established the core requirement -- the number of days until New Year's Eve -- I've identified `default_api.now()` as my primary tool for retrieving the current date. I'll need to define December 31st of the current year. I've also recognized the need to calculate the difference, which isn't a direct function. I'll calculate this myself after getting today's date.\n\n\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 38,"totalTokenCount": 206,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 38}],"thoughtsTokenCount": 168},"modelVersion": "gemini-2.5-flash","responseId": "48SHaPHpHKbG-8YPtZCawAk"}

data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "now","args": {}},"thoughtSignature": "CiIBVKhc7vB+vaaq6rA/KC79Ts7iXagIOA4EBOyBFDpl+pxPCmcBVKhc7gYyIw6X0IsswYK3hRIlOqJqLuw/CA777RLwVhbkj5IXXM6JPdtsso69K/H8aVi6ThxLZkLoQYapEKm4jpotk9HFJ1LnyOFHeQcKdXia2iBBNjb6LTZU/+Pib0zJbWnttT57Ct8BAVSoXO6n/xiy62ll0Bb/4DRtdUMN6l5WhI/yNCH0nVn5o7XWCT9ltApMM3MB2VEkId1U1lMu5d78n0juWxqYh7RvjqN3wCT1KMHeC9Yx6slplr27i/J9qzruq/X6y0ZbUvrv607cWrff53jfgJ7qvSHopN9ZD/kuwUn2lzXhvgIBHvAcLIEwHUcfsIYX5WPonf2aST1Ti1ui2dWw8eQpogiSIytX0L734L9nT0zj3VGlWJIxgeOA4IDH4ZjhWeU73K0P1YUjrla+RWQ7WAmga27KOtO1Zw3faShHT7esSAryAQFUqFzuPbTNs0g+Gt+7+kId/JtIdDKmBmZXIzHotCMUEj82J+3CQbaIjD15XVB8wBQjqwYSsWjWq01jMWqfbs10IS9WBhOeUewFfvqfoZUNxUcZkm314D9wt2eVFvkO4pIRDJs7oV7w0v7M3TaiovtI6hNz087wCtRy0cEF/0narcw1l1pFNSHxAK8Y9rbAVbrsNFglkI/oC0eOPbBn1K/F+dPnOiKgFaMg1v858aMx1rafr665kbrT3H/HcBMRrS9urjtYPXoseBpakOG+X/F6RUp9pHgMyuxCFxAstL2dCJ2UDX4LwZvvR+uQUkZ94smaCvABAVSoXO5wl+s/MoiArjmga1WCjBvsIAsE0Zqmw02g8ID8BfyjTXIHqZ6Z1cklDFg/MxYs/oQVW2fW0D6z0Nqg+38JcSpjl6e6P9oHF891mUuPKhP8HsWD+ZvQy6Wuh4IkeSwooBTHRoo2wIIqXLwseNPHCXg1M+9jE9feqdGWefq1jI3c5tc2yr5777IEQ/5BwrAMlL3Gsrq1pDptbuBOi4ZPWDhiaZmbdn1Zoh1CXZZNyqu9CH/hpFkzAtoN87vfYELHVQoV2wyzM+8JEDGoPvkvw27VuKsQEahGHHuAtMjf5kxA7Qyqd8kXMlLleEs0"}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 38,"candidatesTokenCount": 6,"totalTokenCount": 212,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 38}],"thoughtsTokenCount": 168},"modelVersion": "gemini-2.5-flash","responseId": "48SHaPHpHKbG-8YPtZCawAk"}

'''

# gemini/stream-json-array-gemini3-call.json (REAL, the elements of the array)
GEMINI3_STREAM_ARRAY = json.loads(r'''[{"candidates":[{"content":{"parts":[{"functionCall":{"name":"multiply","args":{"y":3,"x":5}},"thoughtSignature":"Et0BCtoBAXLI2nwMB4momyXTj+K3OPELPDi5Mq6bA5ZHuiKVF9m94gyxd+zdlC+s73nWxHx1ImnA9wPRG1sKMAvENS5i0Bef0VxMS31QE4PbbJw81tSto0OCC+AJdHF0i7x3uHqBuj91gBPwmy3rhAQM+8kxmaF4FeJ0rvICgjIIjG7rBgCE8vOD9Glt/sy3WPKo//jOukERM0rVGAPpMogXNtQbJWUQ8469alaZN67hbYJNaL5XSNcsbsu4ub04B2aFPc6NJld2EWK/enYFPnarMNwobDsSstlzuMygTHQ="}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":60,"candidatesTokenCount":16,"totalTokenCount":108,"promptTokensDetails":[{"modality":"TEXT","tokenCount":60}],"thoughtsTokenCount":32},"modelVersion":"gemini-3-flash-preview","responseId":"6XJFadi3PJOx-sAPgJ3S6Qs"},{"candidates":[{"content":{"parts":[{"text":""}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":60,"candidatesTokenCount":16,"totalTokenCount":108,"promptTokensDetails":[{"modality":"TEXT","tokenCount":60}],"thoughtsTokenCount":32},"modelVersion":"gemini-3-flash-preview","responseId":"6XJFadi3PJOx-sAPgJ3S6Qs"}]''')

# gemini/round2-request-gemini3.json (REAL, built by llm-gemini, snake_case)
GEMINI3_ROUND2 = json.loads(r'''{"contents":[{"role":"user","parts":[{"text":"What is 5 times 3?"}]},{"role":"model","parts":[{"text":""},{"function_call":{"name":"multiply","args":{"y":3,"x":5}},"thoughtSignature":"Et0BCtoBAXLI2nwMB4momyXTj+K3OPELPDi5Mq6bA5ZHuiKVF9m94gyxd+zdlC+s73nWxHx1ImnA9wPRG1sKMAvENS5i0Bef0VxMS31QE4PbbJw81tSto0OCC+AJdHF0i7x3uHqBuj91gBPwmy3rhAQM+8kxmaF4FeJ0rvICgjIIjG7rBgCE8vOD9Glt/sy3WPKo//jOukERM0rVGAPpMogXNtQbJWUQ8469alaZN67hbYJNaL5XSNcsbsu4ub04B2aFPc6NJld2EWK/enYFPnarMNwobDsSstlzuMygTHQ="}]},{"role":"user","parts":[{"function_response":{"name":"multiply","response":{"output":"15"}}}]}],"safetySettings":[{"category":"HARM_CATEGORY_DANGEROUS_CONTENT","threshold":"BLOCK_NONE"},{"category":"HARM_CATEGORY_SEXUALLY_EXPLICIT","threshold":"BLOCK_NONE"},{"category":"HARM_CATEGORY_HATE_SPEECH","threshold":"BLOCK_NONE"},{"category":"HARM_CATEGORY_HARASSMENT","threshold":"BLOCK_NONE"}],"tools":[{"functionDeclarations":[{"name":"multiply","description":"Multiply two numbers.","parameters":{"properties":{"x":{"type":"integer"},"y":{"type":"integer"}},"required":["x","y"],"type":"object"}}]}]}''')

# ollama/response-tool-call-docs.json (DOCS)
OLLAMA_CALL = json.loads(r'''{"model":"llama3.2","created_at":"2025-07-07T20:32:53.844124Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Tokyo"}}}]},"done_reason":"stop","done":true,"total_duration":3244883583,"load_duration":2969184542,"prompt_eval_count":169,"prompt_eval_duration":141656333,"eval_count":18,"eval_duration":133293625}''')

# ollama/stream-tool-call-docs.ndjson (DOCS)
OLLAMA_STREAM = rb'''{"model":"llama3.2","created_at":"2025-07-07T20:22:19.184789Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Tokyo"}}}]},"done":false}
{"model":"llama3.2","created_at":"2025-07-07T20:22:19.19314Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":182242375,"load_duration":41295167,"prompt_eval_count":169,"prompt_eval_duration":24573166,"eval_count":15,"eval_duration":115959084}
'''

# ollama/response-parallel-calls-current.json (BUILT)
OLLAMA_PARALLEL = json.loads(r'''{"model":"qwen3","created_at":"2026-08-21T10:00:00.000000Z","message":{"role":"assistant","content":"","thinking":"The user wants the weather in Paris and in Tokyo. I will call get_weather twice.","tool_calls":[{"id":"call_k3v9x0qa","function":{"index":0,"name":"get_weather","arguments":{"city":"Paris"}}},{"id":"call_7m2pd4zt","function":{"index":1,"name":"get_weather","arguments":{"city":"Tokyo"}}}]},"done_reason":"stop","done":true,"total_duration":2140000000,"load_duration":41000000,"prompt_eval_count":182,"prompt_eval_duration":120000000,"eval_count":61,"eval_duration":1900000000}''')

# ollama/round2-request-docs.json (DOCS)
OLLAMA_ROUND2 = json.loads(r'''{"model":"llama3.2","messages":[{"role":"user","content":"what is the weather in Toronto?"},{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Toronto"}}}]},{"role":"tool","content":"11 degrees celsius","tool_name":"get_weather"}],"stream":false,"tools":[{"type":"function","function":{"name":"get_weather","description":"Get the weather in a given city","parameters":{"type":"object","properties":{"city":{"type":"string","description":"The city to get the weather for"}},"required":["city"]}}}]}''')


# --- the official OpenAPI specs ----------------------------------------------

# Fragments copied from openai-openapi.yaml (openai/openai-openapi f85dbe22),
# openrouter-openapi.yaml (OpenRouterTeam/typescript-sdk .speakeasy/in.openapi.yaml)
# and ollama-openapi.yaml (ollama/ollama docs/openapi.yaml): the schemas of the
# request parts omega sends, descriptions dropped, alternatives omega never sends
# (audio, tool and developer messages, cache controls) left out. The validator
# (spec_errors, in Backends) is stricter than the specs in one way: a key a fragment
# does not list is an error, so a misspelt field cannot pass.
OPENAI_SPEC = {
    "CreateChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/ChatCompletionRequestMessage"},
            },
            "temperature": {
                "anyOf": [{"type": "number", "minimum": 0, "maximum": 2}, {"type": "null"}],
            },
            "max_tokens": {"type": "integer", "nullable": True},
            "max_completion_tokens": {"type": "integer", "nullable": True},
            "stream": {"type": "boolean", "nullable": True},
            "stream_options": {"$ref": "#/components/schemas/ChatCompletionStreamOptions"},
            "response_format": {
                "oneOf": [
                    {"$ref": "#/components/schemas/ResponseFormatText"},
                    {"$ref": "#/components/schemas/ResponseFormatJsonSchema"},
                    {"$ref": "#/components/schemas/ResponseFormatJsonObject"},
                ],
            },
        },
    },
    "ChatCompletionRequestMessage": {
        "oneOf": [
            {"$ref": "#/components/schemas/ChatCompletionRequestSystemMessage"},
            {"$ref": "#/components/schemas/ChatCompletionRequestUserMessage"},
            {"$ref": "#/components/schemas/ChatCompletionRequestAssistantMessage"},
        ],
    },
    "ChatCompletionRequestSystemMessage": {
        "type": "object",
        "properties": {
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "$ref": "#/components/schemas/ChatCompletionRequestSystemMessageContentPart",
                        },
                        "minItems": 1,
                    },
                ],
            },
            "role": {"type": "string", "enum": ["system"]},
        },
        "required": ["content", "role"],
    },
    "ChatCompletionRequestSystemMessageContentPart": {
        "oneOf": [{"$ref": "#/components/schemas/ChatCompletionRequestMessageContentPartText"}],
    },
    "ChatCompletionRequestUserMessage": {
        "type": "object",
        "properties": {
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "$ref": "#/components/schemas/ChatCompletionRequestUserMessageContentPart",
                        },
                        "minItems": 1,
                    },
                ],
            },
            "role": {"type": "string", "enum": ["user"]},
        },
        "required": ["content", "role"],
    },
    "ChatCompletionRequestUserMessageContentPart": {
        "oneOf": [
            {"$ref": "#/components/schemas/ChatCompletionRequestMessageContentPartText"},
            {"$ref": "#/components/schemas/ChatCompletionRequestMessageContentPartImage"},
            {"$ref": "#/components/schemas/ChatCompletionRequestMessageContentPartFile"},
        ],
    },
    "ChatCompletionRequestMessageContentPartText": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
        "required": ["type", "text"],
    },
    "ChatCompletionRequestMessageContentPartImage": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["image_url"]},
            "image_url": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "detail": {"type": "string", "enum": ["auto", "low", "high"]},
                },
                "required": ["url"],
            },
        },
        "required": ["type", "image_url"],
    },
    "ChatCompletionRequestMessageContentPartFile": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["file"]},
            "file": {
                "type": "object",
                "properties": {
                    "filename": {"type": "string"},
                    "file_data": {"type": "string"},
                    "file_id": {"type": "string"},
                },
            },
        },
        "required": ["type", "file"],
    },
    "ChatCompletionRequestAssistantMessage": {
        "type": "object",
        "properties": {
            "content": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "role": {"type": "string", "enum": ["assistant"]},
        },
        "required": ["role"],
    },
    "ResponseFormatText": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["text"]}},
        "required": ["type"],
    },
    "ResponseFormatJsonSchema": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["json_schema"]},
            "json_schema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "schema": {"$ref": "#/components/schemas/ResponseFormatJsonSchemaSchema"},
                    "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                },
                "required": ["name"],
            },
        },
        "required": ["type", "json_schema"],
    },
    "ResponseFormatJsonSchemaSchema": {"type": "object", "additionalProperties": True},
    "ResponseFormatJsonObject": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["json_object"]}},
        "required": ["type"],
    },
    "ChatCompletionStreamOptions": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "include_usage": {"type": "boolean"},
                    "include_obfuscation": {"type": "boolean"},
                },
            },
            {"type": "null"},
        ],
    },
}
OPENROUTER_SPEC = {
    "ChatRequest": {
        "properties": {
            "max_completion_tokens": {"type": ["integer", "null"]},
            "max_tokens": {"type": ["integer", "null"]},
            "messages": {
                "items": {"$ref": "#/components/schemas/ChatMessages"},
                "minItems": 1,
                "type": "array",
            },
            "model": {"$ref": "#/components/schemas/ModelName"},
            "provider": {"$ref": "#/components/schemas/ProviderPreferences"},
            "response_format": {
                "oneOf": [
                    {"$ref": "#/components/schemas/ChatFormatTextConfig"},
                    {"$ref": "#/components/schemas/ChatFormatJsonObjectConfig"},
                    {"$ref": "#/components/schemas/ChatFormatJsonSchemaConfig"},
                ],
            },
            "stream": {"type": "boolean"},
            "stream_options": {"$ref": "#/components/schemas/ChatStreamOptions"},
            "temperature": {"type": ["number", "null"]},
        },
        "required": ["messages"],
        "type": "object",
    },
    "ChatMessages": {
        "oneOf": [
            {"$ref": "#/components/schemas/ChatSystemMessage"},
            {"$ref": "#/components/schemas/ChatUserMessage"},
            {"$ref": "#/components/schemas/ChatAssistantMessage"},
        ],
    },
    "ChatSystemMessage": {
        "properties": {
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"items": {"$ref": "#/components/schemas/ChatContentText"}, "type": "array"},
                ],
            },
            "role": {"enum": ["system"], "type": "string"},
        },
        "required": ["role", "content"],
        "type": "object",
    },
    "ChatUserMessage": {
        "properties": {
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"items": {"$ref": "#/components/schemas/ChatContentItems"}, "type": "array"},
                ],
            },
            "role": {"enum": ["user"], "type": "string"},
        },
        "required": ["role", "content"],
        "type": "object",
    },
    "ChatAssistantMessage": {
        "properties": {
            "content": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "role": {"enum": ["assistant"], "type": "string"},
        },
        "required": ["role"],
        "type": "object",
    },
    "ChatContentItems": {
        "oneOf": [
            {"$ref": "#/components/schemas/ChatContentText"},
            {"$ref": "#/components/schemas/ChatContentImage"},
            {"$ref": "#/components/schemas/ChatContentFile"},
        ],
    },
    "ChatContentText": {
        "properties": {"text": {"type": "string"}, "type": {"enum": ["text"], "type": "string"}},
        "required": ["type", "text"],
        "type": "object",
    },
    "ChatContentImage": {
        "properties": {
            "image_url": {
                "properties": {
                    "detail": {"enum": ["auto", "low", "high", "original"], "type": "string"},
                    "url": {"type": "string"},
                },
                "required": ["url"],
                "type": "object",
            },
            "type": {"enum": ["image_url"], "type": "string"},
        },
        "required": ["type", "image_url"],
        "type": "object",
    },
    "ChatContentFile": {
        "properties": {
            "file": {
                "properties": {
                    "file_data": {"type": "string"},
                    "file_id": {"type": "string"},
                    "filename": {"type": "string"},
                },
                "type": "object",
            },
            "type": {"enum": ["file"], "type": "string"},
        },
        "required": ["type", "file"],
        "type": "object",
    },
    "ChatFormatTextConfig": {
        "properties": {"type": {"enum": ["text"], "type": "string"}},
        "required": ["type"],
        "type": "object",
    },
    "ChatFormatJsonObjectConfig": {
        "properties": {"type": {"enum": ["json_object"], "type": "string"}},
        "required": ["type"],
        "type": "object",
    },
    "ChatFormatJsonSchemaConfig": {
        "properties": {
            "json_schema": {"$ref": "#/components/schemas/ChatJsonSchemaConfig"},
            "type": {"enum": ["json_schema"], "type": "string"},
        },
        "required": ["type", "json_schema"],
        "type": "object",
    },
    "ChatJsonSchemaConfig": {
        "properties": {
            "name": {"maxLength": 64, "type": "string"},
            "schema": {"additionalProperties": {}, "type": "object"},
            "strict": {"type": ["boolean", "null"]},
        },
        "required": ["name"],
        "type": "object",
    },
    "ChatStreamOptions": {
        "properties": {"include_usage": {"type": "boolean"}},
        "type": ["object", "null"],
    },
    "ModelName": {"type": "string"},
    "ProviderPreferences": {
        "additionalProperties": False,
        "properties": {"require_parameters": {"type": ["boolean", "null"]}},
        "type": ["object", "null"],
    },
}
OLLAMA_SPEC = {
    "ChatRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}},
            "format": {"oneOf": [{"type": "string", "enum": ["json"]}, {"type": "object"}]},
            "options": {"$ref": "#/components/schemas/ModelOptions"},
            "stream": {"type": "boolean"},
            "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
            "content": {"type": "string"},
            "images": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelOptions": {
        "type": "object",
        "properties": {
            "seed": {"type": "integer"},
            "temperature": {"type": "number"},
            "top_k": {"type": "integer"},
            "top_p": {"type": "number"},
            "min_p": {"type": "number"},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "num_ctx": {"type": "integer"},
            "num_predict": {"type": "integer"},
        },
        "additionalProperties": True,
    },
}

SPECS = {"openai": (OPENAI_SPEC, "CreateChatCompletionRequest"),
         "openrouter": (OPENROUTER_SPEC, "ChatRequest"), "ollama": (OLLAMA_SPEC, "ChatRequest")}
