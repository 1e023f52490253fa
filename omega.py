#!/usr/bin/env python3
"""omega: one small, dependable client for six AI backends.

    import omega
    omega.ask("Say hi")                                  # -> "Hi!"
    omega.ask("Say hi", provider="ollama", model="qwen3", system="Be brief")
    reply = omega.complete(omega.Context("Say hi"))      # -> OutgoingMessage
    omega.ask("What is in it?", attachments=["cat.png"])  # images, PDFs, text files
    omega.ask("Three colours", schema={"type": "array"}) # -> the parsed JSON value
    omega.models("openai")                               # -> ["gpt-4o", ...]
    for piece in omega.stream("Tell me a story"): ...    # the answer as it is written
    omega.map(["Translate: cat", "Translate: dog"], workers=8)  # many at once, in order
    chat = omega.Chat(provider="anthropic"); chat.ask("Hi"); chat.ask("And?")
    omega.ask("Umbrella in Paris?", tools=[get_weather])  # the model calls your function
    omega.complete("Is 1001 prime?", reasoning="high").reasoning   # its thinking, apart

    python omega.py "Say hi"                             # the same from a shell
    python omega.py --each "Translate: {}" < lines.txt   # one prompt per line

Backends: the local `claude` CLI (claude-code), Ollama, OpenAI and every
OpenAI-compatible server, Anthropic, OpenRouter and Gemini. Needs Python 3.11+
and `requests`; nothing else. Copy this file into your project and go.

Contents (each a banner below). Every name is defined above the top-level code
that uses it at import time. Function bodies look forward only in these ways:
the backend table (8) is built from the backends' functions, so the code that
reads it comes first: Secrets' redact() (SECRET_ENV), Configuration (BACKENDS,
NAMES, SCHEMA), and require_key() and openai_request() in 7 (their own entry);
clean() and shorten() (3), which every text a server wrote goes through, serve
Data (1) and Errors (2) too; Calling runs the tool loop of Tools, hands each
exchange to the Conversation log and, when nothing is set up, asks Diagnostics
which providers are ready (all three below it, so that the public API comes
right after what it is built on); and inside a section a function may come
before the helpers it calls. To follow a call, start reading at 9, Calling.

     1. Data               Message, Context, Tool, ToolCall, Attachment,
                           MessageMetadata, OutgoingMessage, Call (with a map's stop)
     2. Errors             OmegaError ... ProviderUnavailable (context given to
                           __init__), LogError, NoConversation; the failure policy:
                           every backend's error bodies -> typed errors, Retry-After
     3. Secrets            Secret, mask, redact, printable, clean
     4. Configuration      read -> validate -> provider settings -> keys -> load_config;
                           the reasoning values and what an effort costs in tokens
     5. Attachments        the kind from the bytes, read once, base64 written once
     6. Transports         HTTP (per-thread session, the deadline watchdog, send, body
                           reading, the retry loop and each server's Retry-After pause,
                           SSE and NDJSON framing), then processes (the claude CLI's
                           process group)
     7. Backends           shared helpers, tool calls, reasoning text, JSON answers (a
                           schema in each API's form, the answer parsed); then one banner
                           per backend: its request builder (with its reasoning knob),
                           response parser, stream reader, tool declarations, calls and
                           round, model list
     8. The backend table  BACKENDS; NAMES, PROVIDERS, SCHEMA, DEFAULTS derived from it
     9. Calling            Options (every call's keywords), status timer, routing,
                           attempt -> rounds (the tool loop) -> the provider chain ->
                           answer(), priced; complete(), stream() and Stream, ask(),
                           Chat, models(); map() and its workers        <- start here
    10. Tools              schemas from type hints and docstrings, run_tool, the tool
                           loop (tool_rounds) that rounds() runs for a call with tools;
                           MCP: the bridge that runs them for claude-code (--mcp-bridge)
                           and the client of the user's MCP servers; the agent tools
    11. Diagnostics        readiness probes (PROBES), --check, the first-run hint
    12. Conversation log   log_path, log_exchange, logged_conversation, recent_exchanges
                           (SQLite, WAL, schema versions); logged() writes a call's row
    13. Command line       parse_args, prompt reading, --functions, main(); --each and
                           its progress line
"""

from __future__ import annotations   # annotations stay text: subprocess is imported lazily

import binascii
import collections
import contextlib
import errno
import functools
import heapq
import itertools
import json
import math
import os
import random
import re
import selectors
import shlex
import shutil
import signal
import stat
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

# The first moment an older Python can be told so, which is why nothing in this
# file may use syntax that 3.10 (Ubuntu 22.04's) cannot parse: it must get this
# far. Later it would fail deep inside, on a missing tomllib or a newer call.
if sys.version_info < (3, 11):
    _TOO_OLD = "omega needs Python 3.11 or newer (this is %d.%d.%d)" % tuple(sys.version_info[:3])
    if __name__ == "__main__":
        sys.stderr.write(_TOO_OLD + "\n")
        sys.exit(2)
    raise ImportError(_TOO_OLD)

# Imported where first needed instead, because each costs start-up time that most
# runs never use (`import omega` and `--help` must stay cheap): requests with
# urllib3 and http.client (tens of ms; the first HTTP call), tomllib (a config
# file), logging (a debug line or -v), socket (the watchdog), email.utils (an
# HTTP-date Retry-After), argparse (the CLI), traceback (-v), sqlite3 (the
# conversation log), queue (map()).

__version__ = "0.2.0"
__all__ = [
    "ask", "complete", "stream", "Stream", "Chat", "classify", "route", "load_config", "Message", "Context",
    "MessageMetadata", "OutgoingMessage", "PROVIDERS", "OmegaError", "ConfigError",
    "ProviderError", "AuthError", "RateLimitError", "ProviderTimeout", "EmptyResponse",
    "ProviderUnavailable", "Attachment", "models", "Options", "Results", "Tool", "ToolCall",
    "ToolFailed",
]   # and map(), left out: `from omega import *` must not take Python's own map away

USER_AGENT = f"omega/{__version__}"


# =============================================================================
# 1. Data
# =============================================================================
# What goes in and what comes out, as plain dataclasses: a request (Context, its
# Messages and Attachments), an answer (OutgoingMessage and its MessageMetadata)
# and Call, one call's deadline and listener. First, because every section below
# passes them around; nothing here does I/O.

@dataclass
class Message:
    role: str       # "user", "assistant" or "system"
    content: str


@dataclass
class Context:
    """One request: the new message plus everything that shapes its answer."""
    current_message: str
    system_prompt: str = ""
    history: tuple = ()              # Message or {"role", "content"} dicts, oldest first
    model: str | None = None         # overrides the configured model for this request
    complex: bool = False            # use the provider's model_complex
    session_id: str | None = None    # claude-code: resume this CLI session
    max_turns: int | None = None     # the most model rounds: claude-code's agent turns
                                     #   (disables auto-resume), the HTTP tool loop's rounds
    allowed_tools: list | None = None  # overrides the provider's: claude-code's own tools,
                                       #   the HTTP backends' agent tools (Read, Bash …)
    max_tokens: int | None = None
    temperature: float | None = None
    attachments: tuple = ()          # paths, bytes or Attachment, sent with current_message
    schema: dict | None = None       # a JSON Schema the answer must follow: see reply.data
    tools: tuple = ()                # functions or Tools the model may call (the tool loop)
    mcp_servers: list | None = None  # [{name, command, args, env}] whose tools the model
                                     #   may call; overrides the provider's
    reasoning: str | int | None = None  # "off", "low", "medium", "high" or a token budget;
                                     #   None: the backend's default (see reply.reasoning)

    def to_api_messages(self) -> tuple[str, list[dict]]:
        """(system prompt, [{"role", "content"}, ...]) ready for a chat API: history
        then the current message, same-role neighbours merged, empty ones dropped,
        history `system` messages folded into the system prompt."""
        system = [self.system_prompt] if self.system_prompt else []
        messages: list[dict] = []
        for turn in (*self.history, Message("user", self.current_message)):
            role, content = (turn["role"], turn["content"]) if isinstance(turn, dict) \
                else (turn.role, turn.content)
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"unknown message role {role!r}: use user, assistant or system")
            if not content:
                continue
            if role == "system":
                system.append(content)
            elif messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n\n" + content
            else:
                messages.append({"role": role, "content": content})
        return "\n\n".join(system), messages

    def to_prompt_string(self) -> str:
        """The conversation as one text, for the claude CLI. With a session_id the
        CLI already holds the history, so only the new message goes."""
        system, messages = self.to_api_messages()
        if self.session_id:
            return "[User]\n" + "\n\n".join(x for x in (system, self.current_message) if x)
        blocks = [f"[System]\n{system}"] if system else []
        blocks += [f"[{m['role'].title()}]\n{m['content']}" for m in messages]
        return "\n\n".join(blocks)


@dataclass
class Attachment:
    """A file sent with the message: an image (PNG, JPEG, GIF, WebP), a PDF or UTF-8
    text. Its kind comes from the bytes, never from `mime` or a file name (a .png
    that holds a PDF goes as a PDF); `mime` only names a text file's own type
    ("text/markdown"); `name` is what the model is told (default: the file name)."""
    data: bytes
    mime: str | None = None
    name: str | None = None

    def __repr__(self) -> str:          # never megabytes of bytes in a log or traceback
        return f"Attachment({len(self.data):,} bytes, mime={self.mime!r}, name={self.name!r})"


@dataclass
class Tool:
    """A function the model may call: its name, the function, what it does (told to
    the model) and its parameters as a JSON Schema object. A plain function given as
    a tool becomes one, its schema from its type hints and its docstring (see
    tool_from); build a Tool to name it otherwise or to write the schema by hand. A
    Tool whose fn is None is declared only: a call of it gets an error result."""
    name: str
    fn: Callable | None
    description: str = ""
    parameters: dict | None = None


@dataclass
class ToolCall:
    """One call the model asked for and what it got: `arguments` as parsed ({} when
    none came), `result` the text sent back, `error` True when that text reports a
    failure. `raw_arguments` holds the argument text only when it was not a JSON
    object, so the model can be told so (never shown in the repr)."""
    id: str | None
    name: str
    arguments: dict
    result: str | None = None
    error: bool = False
    raw_arguments: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """{"id", "name", "arguments", "result", "error"}: the arguments as the model
        sent them when they were not a JSON object."""
        arguments = self.arguments if self.raw_arguments is None else self.raw_arguments
        return {"id": self.id, "name": self.name, "arguments": arguments,
                "result": self.result, "error": self.error}


def number(value) -> bool:
    """True for an int or float (JSON booleans are ints to Python: not here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def count(value) -> int | None:
    """A token or turn count as a server sent it, or None when it is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def total(values) -> int | float | None:
    """The sum of the numbers among values; None when there is none (unknown, not 0)."""
    values = [v for v in values if number(v)]
    return sum(values) if values else None


@dataclass
class MessageMetadata:
    """What happened. None wherever the backend did not say (never a made-up 0).
    Values a server sent are checked here: a count that is not an integer, a cost
    that is not a finite number or a name that is not a string becomes None."""
    provider_used: str | None = None
    model: str | None = None
    input_tokens: int | None = None    # all input, cache reads and writes included
    output_tokens: int | None = None   # all output, reasoning included
    tokens_used: int | None = None     # their sum, when both are known
    processing_time_ms: int | None = None
    stop_reason: str | None = None
    session_id: str | None = None
    cost_usd: float | None = None
    num_turns: int | None = None
    request_id: str | None = None
    attempts: int | None = None        # HTTP requests or CLI runs
    fallbacks: list = field(default_factory=list)  # "provider: error" tried before
    cache_read_tokens: int | None = None   # of input_tokens: read from the provider's cache
    cache_write_tokens: int | None = None  # of input_tokens: written to it

    def __post_init__(self):
        for name in ("input_tokens", "output_tokens", "tokens_used", "num_turns",
                     "cache_read_tokens", "cache_write_tokens"):
            setattr(self, name, count(getattr(self, name)))
        for name in ("model", "stop_reason", "session_id", "request_id"):
            value = getattr(self, name)
            setattr(self, name, clean(value, 200) or None if isinstance(value, str) else None)
        cost = self.cost_usd
        self.cost_usd = float(cost) if number(cost) and math.isfinite(cost) else None
        if self.tokens_used is None and None not in (self.input_tokens, self.output_tokens):
            self.tokens_used = self.input_tokens + self.output_tokens


@dataclass
class OutgoingMessage:
    text: str
    metadata: MessageMetadata
    data: object = None     # with Context.schema: the answer parsed (text is the raw JSON)
    tool_calls: list = field(default_factory=list)   # ToolCalls of every round, in order
    reasoning: str | None = None    # the model's visible reasoning, never part of text

    def to_dict(self) -> dict:
        """Plain JSON-able data: {"text": ..., "metadata": {...}}, "data" when the
        answer was asked for as JSON, "tool_calls" when tools ran, "reasoning" when
        the model's reasoning came back."""
        out = {"text": self.text, "metadata": asdict(self.metadata)}
        if self.data is not None:
            out["data"] = self.data
        if self.tool_calls:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        return out


class ReasoningPiece(str):
    """A piece of the model's reasoning, as the stream generators yield it among the
    answer's text pieces: marked by its type, so that it reaches s.reasoning (and
    --show-reasoning), never s.text. Only the text pieces of a stream are answer."""
    __slots__ = ()


class MapWorker(threading.local):
    """What a thread knows of the map() (9) it works for, if any."""
    stop = None          # the Event that the map's Ctrl-C sets (a class default: no lookup fails)


MAP_WORKER = MapWorker()


@dataclass
class Call:
    """One call's own state, apart from its configuration: when it must end, who
    hears about progress, and which provider comes next if this one fails (then a
    refused connection moves on at once instead of retrying). Made in a map()
    worker, it also holds that map's stop Event: once it is set, the call has no
    time left, its waits end at once and it ends as interrupted (KeyboardInterrupt),
    its connection shut by the map (Watchdog.stop_all)."""
    deadline: float                        # time.monotonic() value
    seconds: float                         # what the deadline stands for, for messages
    on_status: Callable | None = None
    next_provider: str | None = None
    stop: threading.Event | None = field(default_factory=lambda: MAP_WORKER.stop)

    @classmethod
    def starting_now(cls, seconds: float, on_status=None, next_provider=None) -> "Call":
        return cls(time.monotonic() + seconds, seconds, on_status, next_provider)

    def left(self) -> float:
        """Seconds until the deadline (negative once it has passed or the call was
        stopped)."""
        if self.stop is not None and self.stop.is_set():
            return -1.0
        return self.deadline - time.monotonic()

    def stopped(self) -> bool:
        """True once the map this call belongs to was stopped (Ctrl-C)."""
        return self.stop is not None and self.stop.is_set()

    def sleep(self, seconds: float) -> None:
        """time.sleep(seconds), ended by a stop (KeyboardInterrupt)."""
        if self.stop is None:
            time.sleep(seconds)
        elif self.stop.wait(seconds):
            raise KeyboardInterrupt

    def notify(self, message: str) -> None:
        if self.on_status is not None:
            self.on_status(message)


# =============================================================================
# 2. Errors
# =============================================================================
# The exceptions, each given all it knows when it is made (as in requests), and
# their constructors; then the failure policy that turns every backend's error
# bodies, stream errors and waits into them. Early, because everything below
# raises them, and one policy serves HTTP, streams and the claude CLI alike.

class OmegaError(Exception):
    """Base of every error omega raises. `exit_code` is what the CLI exits with."""
    exit_code = 1


class ConfigError(OmegaError):
    """Bad configuration or usage: malformed TOML, unknown key or provider, bad value.
    Its message is cleaned like every other error line: a path or value it names
    cannot forge a second line or a colour change, nor show a key."""
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(clean(message, 1000))


class LogError(OmegaError):
    """The conversation log could not be read or written: one line naming the file
    and what went wrong, meant to be shown as a warning (the answer is not lost)."""
    exit_code = 1


class NoConversation(LogError):
    """The log holds no conversation to go on with (--continue, --chat ID): the
    user asked for something that is not there, a usage error."""
    exit_code = 2


class ProviderError(OmegaError):
    """A backend failed. Like the exceptions of `requests`, it is given all it knows
    when it is made, and `str(err)` is built from that, so nothing goes stale:

    provider, status (HTTP), code and message (the backend's own), request_id;
    retry_after (seconds the server asked for), retryable (another try may help),
    reason (a few words for the fallback story: "connection refused");
    not_set_up (no key or no CLI: nothing was sent), session_id (claude-code: where
    to resume), partial_text (what was answered before the failure), tool_calls (the
    ToolCalls that ran before it), fallbacks ("provider: error" for each provider
    tried after this one).

    Every text a server could have written is redacted of keys, stripped of control
    characters and capped before it is stored (see clean())."""
    exit_code = 1

    def __init__(self, message: str, provider: str = "", status: int | None = None,
                 code: str | None = None, request_id: str | None = None, *,
                 retry_after: float | None = None, retryable: bool = False,
                 reason: str | None = None, not_set_up: bool = False,
                 session_id: str | None = None, partial_text: str | None = None,
                 tool_calls=(), fallbacks=()):
        self.message = clean(message, 1000)
        self.provider, self.status = provider, status if count(status) is not None else None
        self.code = clean(code, 100) or None if isinstance(code, str) else None
        self.request_id = clean(request_id, 200) or None if isinstance(request_id, str) else None
        self.session_id = clean(session_id, 200) or None if isinstance(session_id, str) else None
        self.retry_after, self.retryable, self.not_set_up = retry_after, retryable, not_set_up
        self.reason = clean(reason, 80) if reason else self.short_reason()
        self.partial_text, self.fallbacks = partial_text, list(fallbacks)
        self.tool_calls = list(tool_calls)
        super().__init__(str(self))

    def __str__(self) -> str:
        head = self.head()
        text = f"{head}: {self.message}" if head else self.message
        if self.provider:
            text = f"{self.provider}: {text}"
        if self.request_id:
            text += f" (request_id={self.request_id})"
        if self.fallbacks:
            text += "; then tried " + "; ".join(self.fallbacks)
        return text

    def head(self) -> str:
        """'503 server_error': the status, then the code unless it only repeats the
        status (LiteLLM sends {"code": "400"} with a 400)."""
        code = None if self.code == str(self.status) else self.code
        return " ".join(str(x) for x in (self.status, code) if x)

    def short_reason(self) -> str:
        """'503 server_error', or the message's first words (never cut mid-word)."""
        return self.head() or shorten(self.message, 60)

    def with_context(self, **changes) -> "ProviderError":
        """A copy of this error, of the same class, with some context changed."""
        context = dict(message=self.message, provider=self.provider, status=self.status,
                       code=self.code, request_id=self.request_id,
                       retry_after=self.retry_after, retryable=self.retryable,
                       reason=self.reason, not_set_up=self.not_set_up,
                       session_id=self.session_id, partial_text=self.partial_text,
                       tool_calls=self.tool_calls, fallbacks=self.fallbacks)
        return type(self)(**{**context, **changes})


class AuthError(ProviderError):
    """Missing or rejected credentials (no key, 401/403, CLI not logged in)."""
    exit_code = 3


class RateLimitError(ProviderError):
    """429 after retries, or exhausted quota/credit (never retried)."""
    exit_code = 4


class ProviderTimeout(ProviderError):
    """The call's deadline (`timeout_secs`, retries included) passed."""
    exit_code = 5


class EmptyResponse(ProviderError):
    """The backend answered without text: blocked prompt, safety stop, bare refusal."""
    exit_code = 6


class ProviderUnavailable(ProviderError):
    """Nothing to talk to: connection refused, unknown host, `claude` not installed.
    Safe to retry: nothing reached a model."""
    exit_code = 7


def timed_out(settings: dict, call: Call, detail: str = "", **context) -> ProviderTimeout:
    """The error for a call out of time; a call its map() stopped (Ctrl-C) has no
    time left either, but was interrupted: KeyboardInterrupt is raised instead."""
    if call.stopped():
        raise KeyboardInterrupt
    return ProviderTimeout(f"no answer within {call.seconds:g} s{detail}", settings["name"],
                           reason="timed out", **context)


def too_large(settings: dict, status: int | None = None, where: str = "") -> ProviderError:
    """status: the answer's HTTP status, kept only when it was an error (the body of
    a 500 was too large): a 200 is not what went wrong."""
    limit = settings["max_response_bytes"]
    where = f" ({where})" if where else ""
    return ProviderError(f"answer larger than {limit:,} bytes{where}; raise max_response_bytes "
                         "if it is expected", settings["name"],
                         status if status and status >= 300 else None,
                         reason="answer too large")


def empty_answer(settings: dict, why: str, reasoning: str | None = None) -> EmptyResponse:
    """reasoning: what the model thought instead, which is then said with what to do
    (a thinking model can spend max_tokens before it writes a word)."""
    if reasoning:
        why += f"; only reasoning came, {len(reasoning):,} characters: raise max_tokens or " \
               "ask for less reasoning"
    return EmptyResponse(f"no answer text ({why})", settings["name"])


def ended_early(settings: dict) -> ProviderUnavailable:
    return ProviderUnavailable("the stream ended early (no end marker)", settings["name"],
                               retryable=True, reason="stream ended early")


def shape_error(settings: dict, request_id: str | None = None) -> ProviderError:
    return ProviderError("the answer did not have the expected shape", settings["name"],
                         request_id=request_id)


# -----------------------------------------------------------------------------
# failure policy: every backend's error bodies, one set of rules
# -----------------------------------------------------------------------------

# HTTP statuses that another try may fix; any other fails the same way again.
RETRY_STATUS = {408, 409, 429} | set(range(500, 600))
# Markers of exhausted quota or credit: a RateLimitError that waiting will not fix.
QUOTA_CODES = {"insufficient_quota", "billing_error", "enforced_spend_limit_reached"}
# How a model that cannot see images says so (OpenAI 400, OpenRouter 404, Ollama
# 500, llama.cpp, vLLM): the same request fails the same way however often it is
# tried, so it is neither retried nor sent to a fallback.
NO_IMAGES = "model takes no images"
NO_IMAGES_SAID = ("only supported by certain models", "support image input",
                  "required for image input", "image input is not supported",
                  "is not a multimodal model")


def error_for(status: int | None, code: str | None, message: str, provider: str,
              **context) -> ProviderError:
    """The error for a failure, by one policy for HTTP error bodies and for the API
    errors the claude CLI reports: its class, and whether a retry may help."""
    if status == 402 or code in QUOTA_CODES or "credit balance is too low" in message.lower():
        cls, retryable = RateLimitError, False          # waiting will not bring credit back
    elif status in (401, 403) or code == "API_KEY_INVALID":
        cls, retryable = AuthError, False
    elif any(said in message.lower() for said in NO_IMAGES_SAID):
        cls, retryable, context = ProviderError, False, {"reason": NO_IMAGES, **context}
    else:
        cls, retryable = RateLimitError if status == 429 else ProviderError, status in RETRY_STATUS
    return cls(message, provider, status, code, **{"retryable": retryable, **context})


def http_error(status: int, headers, content: bytes, settings: dict) -> ProviderError:
    """The error a non-2xx answer stands for, with the wait it asked for."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        data = None
    context = {"retry_after": retry_after(headers, data)}
    if headers.get("x-should-retry") == "false":
        context["retryable"] = False
    if data is None:
        return error_for(status, None, plain_text(content, headers) or not_json(content),
                         settings["name"], request_id=request_id_of(headers), **context)
    return error_from_body(data, status, settings, headers, **context)


def error_from_body(data, status: int, settings: dict, headers=None, **context) -> ProviderError:
    """The backend's own code and message, from any of the five error body shapes:
    OpenAI {error:{message,type,code}}, Anthropic {type,error:{type,message}},
    Gemini {error:{code,message,status,details}}, Ollama {error:"..."},
    OpenRouter {error:{code:int,message,metadata}}."""
    name = settings["name"]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]                                   # Gemini sometimes wraps it
    err = data.get("error") if isinstance(data, dict) else None
    code, reasons, upstream = None, None, ""
    if isinstance(err, dict):
        message = err.get("message")
        code = next((c for c in (err.get("code"), err.get("type"), err.get("status"))
                     if isinstance(c, str) and c), None)
        details = err.get("details")
        if isinstance(details, dict) and isinstance(details.get("error_code"), str):
            code = details["error_code"]                               # Anthropic spend cap
        for detail in details if isinstance(details, list) else ():
            if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
                code = detail["reason"]                                # Gemini ErrorInfo
        meta = err.get("metadata") if isinstance(err.get("metadata"), dict) else {}
        reasons = meta.get("reasons") if isinstance(meta.get("reasons"), list) else None
        if meta.get("raw"):                                            # OpenRouter upstream
            raw = meta["raw"] if isinstance(meta["raw"], str) else json.dumps(meta["raw"])
            upstream = f" ({clean(meta.get('provider_name') or 'upstream', 40)}: {clean(raw, 300)})"
    elif isinstance(err, str):
        message = err
    else:
        message = data.get("message") or data.get("detail") if isinstance(data, dict) else None
    message = (clean(message, 500) if message else "") or f"HTTP {status}"
    rid = request_id_of(headers or {}) or (data.get("request_id") if isinstance(data, dict)
                                           else None)
    if status == 403 and reasons:                      # OpenRouter moderation: prompt blocked
        blocked = ", ".join(clean(r, 60) for r in reasons)
        return EmptyResponse(f"prompt blocked by moderation ({blocked}): {message}", name,
                             status, code, rid, **context)
    return error_for(status, code, message + upstream, name, request_id=rid, **context)


def error_in_answer(data, settings: dict) -> None:
    """OpenRouter puts some errors inside a 200 body, or inside a choice: raise them."""
    for holder in (data, *(data.get("choices") or ())[:1]):
        if isinstance(holder, dict) and isinstance(holder.get("error"), dict):
            status = holder["error"].get("code")
            raise error_from_body(holder, status if count(status) else 200, settings)


# Error types sent inside a 200 stream, as the HTTP status they stand for
# (OpenAI/Anthropic `type`, Gemini `status`, OpenRouter `metadata.error_type`).
STREAM_ERROR_STATUS = {
    "invalid_request_error": 400, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
    "authentication_error": 401, "UNAUTHENTICATED": 401, "permission_error": 403,
    "PERMISSION_DENIED": 403, "not_found_error": 404, "NOT_FOUND": 404,
    "request_too_large": 413, "rate_limit_error": 429, "rate_limit_exceeded": 429,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "api_error": 500, "server_error": 500,
    "server": 500, "INTERNAL": 500, "provider_unavailable": 503, "UNAVAILABLE": 503,
    "timeout": 504, "DEADLINE_EXCEEDED": 504, "overloaded_error": 529,
    "provider_overloaded": 529,
}


def stream_error(data, settings: dict) -> ProviderError:
    """An error sent inside a stream, classified as the HTTP error it stands for
    (overloaded_error is a retryable 529, OpenRouter's code is its status …);
    one with no known type counts as a server error (500)."""
    holder = data[0] if isinstance(data, list) and data else data
    err = holder.get("error") if isinstance(holder, dict) else None
    status = None
    if isinstance(err, dict):
        meta = err.get("metadata") if isinstance(err.get("metadata"), dict) else {}
        code = err.get("code")
        if count(code) and 400 <= code <= 599:
            status = code
        else:
            status = next((STREAM_ERROR_STATUS[k] for k in (err.get("type"), err.get("status"),
                           code, meta.get("error_type"))
                           if isinstance(k, str) and k in STREAM_ERROR_STATUS), None)
    return error_from_body(holder, status or 500, settings)


def retry_after(headers, data) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, Retry-After (seconds
    or an HTTP date), or Gemini's RetryInfo.retryDelay ("27s") in the body."""
    try:
        if headers.get("retry-after-ms"):
            return finite_wait(float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value:
            try:
                return finite_wait(float(value))
            except ValueError:
                from email.utils import parsedate_to_datetime
                return finite_wait(parsedate_to_datetime(value).timestamp() - time.time())
        err = data.get("error") if isinstance(data, dict) else None
        for detail in (err.get("details") or ()) if isinstance(err, dict) else ():
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            if isinstance(delay, str) and delay.endswith("s"):
                return finite_wait(float(delay[:-1]))
    except (ValueError, TypeError, OverflowError):
        pass
    return None


def finite_wait(seconds: float) -> float | None:
    return max(0.0, seconds) if math.isfinite(seconds) else None


def not_json(content: bytes, error: Exception | None = None) -> str:
    """One wording for a body that should have been JSON (never the body itself)."""
    if isinstance(error, RecursionError):
        return "the server sent JSON nested too deeply to read"
    if not content.strip():
        what = "an empty body"
    elif content.lstrip()[:1] == b"<":
        what = "an HTML page"
    else:
        what = "malformed data"
    return f"the server sent {what}, not JSON"


def plain_text(content: bytes, headers) -> str:
    """A text/plain error body as the server wrote it ("Internal Server Error"),
    redacted, on one line and capped; "" for any other body."""
    media = (headers.get("content-type") or "").split(";")[0].strip().lower()
    return clean(content[:2000].decode("utf-8", "replace"), 300) if media == "text/plain" \
        else ""


def request_id_of(headers) -> str | None:
    """The id a server gives a request: OpenRouter's X-Generation-Id (gen-…), else
    x-request-id (OpenAI and most others) or request-id (Anthropic)."""
    return headers.get("x-generation-id") or headers.get("x-request-id") \
        or headers.get("request-id")


# =============================================================================
# 3. Secrets
# =============================================================================
# A key never shows: Secret keeps it out of reprs, and clean(), which every text a
# server wrote goes through before omega shows or stores it, redacts every key
# omega knows (the variables that hold keys come from the backend table, 8).

def mask(secret: str) -> str:
    """'…abcd': enough to tell two keys apart, too little to use one."""
    return "…" + secret[-4:] if len(secret) >= 12 else "…"


class Secret(str):
    """A str whose repr shows only its last four characters, so that a key inside
    a printed dict, a log record or a traceback's locals stays private."""

    def __repr__(self) -> str:
        return repr(mask(self))


# Every key omega has handled in this process (from a file, the environment or an
# argument): redacted from whatever omega shows, whoever echoes it back.
_known_secrets: set[str] = set()


def remember_secret(value: str) -> str:
    if len(value) >= 6:           # shorter "keys" would redact ordinary words
        _known_secrets.add(str.__str__(value))
    return value


def redact(text: str) -> str:
    """text with every credential we know of replaced by its mask: the keys omega
    has used, and the values of the environment variables that hold keys (a server
    or the claude CLI can echo those even when omega did not send them)."""
    secrets = [*tuple(_known_secrets), *(os.environ.get(name) for name in SECRET_ENV)]
    for secret in secrets:
        if secret and len(secret) >= 6 and secret in text:
            text = text.replace(secret, mask(secret))
    return text


# Terminal escape sequences (CSI and OSC, in their ESC and 8-bit C1 forms, and the
# two-character ESC forms), then any other control character: a server must not be
# able to forge a line, move the cursor or write to the clipboard through a text.
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
                      r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|\x1b.?"
                      r"|[\x00-\x1f\x7f-\x9f]")


def shorten(text: str, limit: int) -> str:
    """text cut to at most limit characters at a word boundary, with '…'."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut) + "…"


def printable(text: str) -> str:
    """Text of many lines fit to show again on a terminal (--logs): keys redacted,
    escape sequences and control characters out, line breaks and tabs kept. Line by
    line, so that a sequence left open cannot swallow the lines after it."""
    keep = {"\t": "\t"}
    return "\n".join(_ESCAPES.sub(lambda m: keep.get(m.group(), ""), line)
                     for line in redact(text).replace("\r\n", "\n").split("\n"))


def clean(text, limit: int) -> str:
    """Text fit to show on one line: keys redacted first (so that shortening cannot
    leave part of one behind), escapes and control characters out, whitespace
    collapsed, at most `limit` characters."""
    text = redact(str(text))
    if not text.isprintable():
        text = _ESCAPES.sub(" ", text)
    return shorten(" ".join(text.split()), limit)


# =============================================================================
# 4. Configuration
# =============================================================================
# A config is a TOML file (or a dict shaped like one). omega owns three tables:
# [provider] (with one [provider.<name>] section per backend), [omega.status] and
# [omega.log]; anything else in the file ([log], [status], the other keys of an
# [omega] table …) belongs to the application that vendors omega.py and is left
# alone. Inside omega's tables every key is checked strictly. In the order
# a value travels: read -> validate -> provider settings -> keys -> load_config;
# which keys a section takes, and their defaults, come from the backend table (8).

NUMBER = (int, float)
MAX_RETRIES_CAP = 10

# The type of every key a [provider.<name>] section may hold. Which keys a backend
# accepts is the set of keys of its defaults (see the backend table).
KEY_TYPES = {
    "enabled": bool, "model": str, "model_complex": str, "timeout_secs": NUMBER,
    "max_tokens": int, "temperature": NUMBER, "max_response_bytes": int,
    "base_url": str, "max_retries": int, "api_key": str, "api_key_env": str,
    "command": str, "max_turns": int, "allowed_tools": list, "skip_permissions": bool,
    "max_resume_attempts": int, "resume_delay_secs": NUMBER, "working_dir": str,
    "oauth_token": str, "num_ctx": int, "keep_alive": (str, int),
    "referer": str, "title": str, "stream_usage": bool, "max_attachment_bytes": int,
    "prices": dict, "max_tool_result_bytes": int, "mcp_servers": list, "thinking": str,
}
PROVIDER_KEYS = {"default": str, "fallback": list, "auto_route": bool}
STATUS_KEYS = {"delay_secs": NUMBER, "repeat_secs": NUMBER, "message": str,
               "repeat_message": str}
LOG_KEYS = {"enabled": bool, "path": str}
STATUS_DEFAULTS = {"delay_secs": 15, "repeat_secs": 120,
                   "message": "This is taking a moment...",
                   "repeat_message": "Still working on your request..."}


def is_command(value: str) -> bool:
    try:
        return bool(shlex.split(value))
    except ValueError:                     # unbalanced quotes
        return False


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


# What a value must be beyond its type: key -> (test, what to say when it fails).
RULES = {
    "timeout_secs": (lambda v: v > 0, "a number greater than 0"),
    "max_tokens": (lambda v: v > 0, "a number greater than 0"),
    "max_turns": (lambda v: v > 0, "a number greater than 0"),
    "num_ctx": (lambda v: v > 0, "a number greater than 0"),
    "max_response_bytes": (lambda v: v > 0, "a number greater than 0"),
    "max_attachment_bytes": (lambda v: v > 0, "a number greater than 0"),
    "max_tool_result_bytes": (lambda v: v > 0, "a number greater than 0"),
    "max_retries": (lambda v: 0 <= v <= MAX_RETRIES_CAP,
                    f"a number from 0 to {MAX_RETRIES_CAP}"),
    "max_resume_attempts": (lambda v: v >= 0, "a number 0 or more"),
    "resume_delay_secs": (lambda v: v >= 0, "a number 0 or more"),
    "temperature": (lambda v: v >= 0, "a number 0 or more"),
    "delay_secs": (lambda v: v >= 0.1, "a number 0.1 or more"),
    "repeat_secs": (lambda v: v >= 0.1, "a number 0.1 or more"),
    "base_url": (is_url, "an http:// or https:// URL"),
    "command": (is_command, "a command, such as \"claude\""),
    "allowed_tools": (lambda v: all(isinstance(x, str) for x in v), "a list of strings"),
    "thinking": (lambda v: v in ("enabled", "adaptive"), '"enabled" or "adaptive"'),
}


def config_paths() -> list[str]:
    """Where a config file is looked for when none is named, in order."""
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.toml"),
            os.path.join(os.path.expanduser("~"), ".omega", "config.toml")]


def read_config(config=None) -> tuple[dict, str | None]:
    """(the raw, validated config dict, the file it came from or None).
    config: a path, a dict shaped like the file, or None for the usual search, in
    which a file that sets nothing (the shipped, all-comment example) is passed
    over: it must not hide ~/.omega/config.toml."""
    if isinstance(config, dict):
        raw, path = config, config.get("_file")
    else:
        path = os.fspath(config) if config is not None else \
            os.environ.get("OMEGA_CONFIG") or None
        if path is not None:
            raw = parse_config(path)
        else:
            found = ((p, parse_config(p)) for p in config_paths() if os.path.isfile(p))
            raw, path = next(((r, p) for p, r in found if not sets_nothing(r)), ({}, None))
    validate(raw, path or "config")
    remember_keys(raw)
    return raw, path


def parse_config(path: str) -> dict:
    import tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None


def sets_nothing(raw: dict) -> bool:
    """True for a file of comments, blank lines and empty tables only."""
    return all(isinstance(v, dict) and sets_nothing(v) for v in raw.values())


def own_tables(raw: dict) -> dict:
    """The config's [omega] table, {} when there is none (or it is the host's value)."""
    return raw["omega"] if isinstance(raw.get("omega"), dict) else {}


def own_table(raw: dict, name: str) -> dict:
    """omega's own [omega.<name>] table of a config ({} when there is none)."""
    return own_tables(raw).get(name) or {}


def with_own_table(raw: dict, name: str, table: dict) -> dict:
    """A copy of raw with [omega.<name>] set to table."""
    return {**raw, "omega": {**own_tables(raw), name: table}}


def remember_keys(raw: dict) -> None:
    """Learn every key the config holds or names, whichever provider it belongs to,
    so that none is shown or logged in clear, even in a call to another provider."""
    for section in (raw.get("provider") or {}).values():
        if isinstance(section, dict):
            for value in (section.get("api_key"), section.get("oauth_token"),
                          os.environ.get(section.get("api_key_env") or "")):
                if isinstance(value, str) and value.strip():
                    remember_secret(value.strip())


def validate(raw: dict, where: str) -> None:
    """Raise a one-line ConfigError naming the file, the key and what is expected.
    Only omega's own tables are checked; the host application's are not ours."""
    own = own_tables(raw)
    for table, value in (("provider", raw.get("provider", {})),
                         ("omega.status", own.get("status", {})),
                         ("omega.log", own.get("log", {}))):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {table}: expected a table, got {type(value).__name__}")
    providers = raw.get("provider", {})
    check_keys(providers, {**PROVIDER_KEYS, **{n: dict for n in NAMES}}, where, "provider.")
    for name in NAMES:
        check_keys(providers.get(name, {}), SCHEMA[name], where, f"provider.{name}.")
        check_prices(providers.get(name, {}).get("prices", {}), f"{where}: provider.{name}.prices")
        check_mcp_servers(providers.get(name, {}).get("mcp_servers", []),
                          f"{where}: provider.{name}.mcp_servers")
    if "default" in providers:
        check_provider(providers["default"], f"{where}: provider.default")
    for name in providers.get("fallback", []):
        check_provider(name, f"{where}: provider.fallback")
    check_keys(own_table(raw, "status"), STATUS_KEYS, where, "omega.status.")
    check_keys(own_table(raw, "log"), LOG_KEYS, where, "omega.log.")


def older_tables(raw: dict) -> list[str]:
    """Top-level tables an older omega read ([status], [log]) that hold only omega's
    key names: most likely meant for omega, which reads [omega.status] and
    [omega.log] now (a host's own [log] is left alone, so it cannot tell for sure)."""
    return [name for name, keys in (("status", STATUS_KEYS), ("log", LOG_KEYS))
            if isinstance(raw.get(name), dict) and raw[name] and set(raw[name]) <= set(keys)]


def check_keys(section: dict, schema: dict, where: str, prefix: str) -> None:
    for key, value in section.items():
        if key.startswith("_"):           # load_config's own notes (_file, _sources)
            continue
        if key not in schema:
            known = ", ".join(k for k in schema if k not in NAMES)
            raise ConfigError(f"{where}: unknown key {prefix}{key} (known: {known})")
        check_value(key, value, schema[key], f"{where}: {prefix}{key}")


def check_value(key: str, value, kind, where: str) -> None:
    """value, for the config key `key`, is of kind and meets its rule (RULES); else
    a ConfigError that starts with where. A number must be finite and fit in a
    float (an integer of 400 digits is no timeout)."""
    if value is None or isinstance(value, bool) != (kind is bool) \
            or not isinstance(value, kind) or number(value) and not finite(value):
        expected = {bool: "true or false", str: "a string", int: "an integer",
                    list: "a list", dict: "a table", NUMBER: "a number",
                    (str, int): "a string or an integer"}[kind]
        got = shorten(repr(value), 40) if number(value) else type(value).__name__
        raise ConfigError(f"{where}: expected {expected}, got {got}")
    rule = RULES.get(key) if kind is not dict else None
    if rule and not rule[0](value):
        shown = "" if isinstance(value, str) and "key" in key else f", got {value!r}"
        raise ConfigError(f"{where}: expected {rule[1]}{shown}")


# Anthropic's manual budgets for the three efforts (SPEC 14); also the scale on
# which a token budget finds its nearest effort, for APIs that take only efforts.
EFFORT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
MIN_THINKING_BUDGET = 1024      # Anthropic: "budget_tokens: Input should be >= 1024"


def check_reasoning(value, where: str = "reasoning") -> str | int | None:
    """The reasoning value as given, or a ConfigError: None (the backend's own
    default), "off", "low", "medium", "high" or a token budget (an int above 0;
    True is no budget, though Python counts it an int)."""
    if value is None or isinstance(value, str) and (value == "off" or value in EFFORT_BUDGETS) \
            or type(value) is int and value > 0:
        return value
    raise ConfigError(f'{where}: expected "off", "low", "medium", "high" or a number of '
                      f'tokens above 0, not {clean(repr(value), 60)}')


def effort_of(reasoning: str | int) -> str:
    """An effort, or the effort whose budget is nearest a token budget on a log
    scale (ties go to the lower): for APIs that take no budget."""
    if reasoning in EFFORT_BUDGETS:
        return reasoning
    return min(EFFORT_BUDGETS, key=lambda e: abs(math.log(reasoning / EFFORT_BUDGETS[e])))


def thinking_budget(reasoning: str | int) -> int:
    """Anthropic's budget_tokens for an effort or a budget (below the API's floor:
    the floor). The claude CLI forwards MAX_THINKING_TOKENS as budget_tokens."""
    return max(EFFORT_BUDGETS.get(reasoning, reasoning), MIN_THINKING_BUDGET)


def check_prices(prices: dict, where: str) -> None:
    """[provider.<name>.prices]: "<model>" = [input, output] in US dollars per million
    tokens, optionally then cache reads and cache writes; 2 to 4 numbers, 0 or more."""
    for model, price in prices.items():
        if not (isinstance(price, list) and 2 <= len(price) <= 4
                and all(number(p) and finite(p) and p >= 0 for p in price)):
            raise ConfigError(f"{where}.{json.dumps(model)}: expected [input, output] US "
                              "dollars per million tokens, then optionally cache read and "
                              "cache write prices (2 to 4 numbers 0 or more), got "
                              + shorten(repr(price), 60))


def check_mcp_servers(servers: list, where: str) -> None:
    """mcp_servers: a list of {name, command, args, env} tables; args (a list of
    strings) and env (a table of strings) optional; each name a tool name's first
    part, used once, not "omega" (the bridge's). Values are never shown: an env
    may hold a token."""
    if not isinstance(servers, list):
        raise ConfigError(f"{where}: expected a list of {{name, command, args, env}} tables")
    names = set()
    for place, spec in enumerate(servers, 1):
        problem = mcp_server_problem(spec, names)
        if problem:
            raise ConfigError(f"{where}: entry {place}: {problem}")


def mcp_server_problem(spec, names: set) -> str | None:
    if not isinstance(spec, dict):
        return "expected a table {name, command, args, env}"
    name, args, env = spec.get("name"), spec.get("args", []), spec.get("env", {})
    extra = sorted(str(key) for key in set(spec) - {"name", "command", "args", "env"})
    if extra:
        return f"unknown key {shorten(extra[0], 40)} (known: name, command, args, env)"
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name == BRIDGE_SERVER:
        return "name: expected 1 to 64 letters, digits, _ or -, starting with a letter or _ " \
               f"(and not {BRIDGE_SERVER!r})"
    if name in names:
        return f"the name {name!r} is used twice"
    names.add(name)
    if not isinstance(spec.get("command"), str) or not spec["command"]:
        return "command: expected a string"
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        return "args: expected a list of strings"
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        return "env: expected a table of strings"
    return None


def finite(value) -> bool:
    """A number that is not NaN or infinite, and that a float can hold."""
    try:
        return math.isfinite(value)
    except OverflowError:                  # an int too large for a float
        return False


def check_provider(name, where: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"{where}: unknown provider {name!r} (choose from {', '.join(NAMES)})")


def check_history(history) -> list[Message]:
    """history (Messages or {"role", "content"} dicts, oldest first) as Messages; a
    ConfigError naming the entry for an unknown role or a content that is missing
    or not text, before anything is sent."""
    messages = []
    for place, turn in enumerate(history, 1):
        if isinstance(turn, Message):
            role, content = turn.role, turn.content
        elif isinstance(turn, dict):
            role, content = turn.get("role"), turn.get("content")
        else:
            raise ConfigError(f"history entry {place}: expected a Message or a "
                              f"{{\"role\", \"content\"}} dict, got {type(turn).__name__}")
        if role not in ("user", "assistant", "system"):
            raise ConfigError(f"history entry {place}: unknown role {shorten(repr(role), 40)} "
                              "(use user, assistant or system)")
        if not isinstance(content, str):
            raise ConfigError(f"history entry {place}: " + (
                "no content" if content is None else
                f"content must be text, got {type(content).__name__}"))
        messages.append(turn if isinstance(turn, Message) else Message(role, content))
    return messages


def header_value(value: str, where: str) -> str:
    """A key or header value, cleaned: surrounding whitespace goes (a key read from
    a file often ends in a newline); a control or non-Latin-1 character left inside
    is an error that names the setting and never shows the value."""
    value = value.strip()
    if any(c < " " or "\x7f" <= c < "\xa0" or c > "\xff" for c in value):
        raise ConfigError(f"{where}: holds a control or non-Latin-1 character, which cannot "
                          "go in an HTTP header (the value is not shown)")
    return value


def provider_settings(raw: dict, name: str, path: str | None = None) -> dict:
    """Everything one backend needs: defaults, then the file's section, then the
    environment fallbacks, with the API key resolved. `sources` says where each
    value came from ("file", "env NAME" or "default")."""
    check_provider(name, "provider")
    backend = BACKENDS[name]
    section = {k: v for k, v in raw.get("provider", {}).get(name, {}).items() if k[0] != "_"}
    settings = {**backend.defaults, **section, "name": name, "config_file": path}
    sources = {k: "file" for k in section}
    var = backend.base_url_env
    if var and "base_url" not in section and os.environ.get(var):
        url = os.environ[var]
        if backend.base_url_from_env:
            url = backend.base_url_from_env(url)
        if not is_url(url):
            raise ConfigError(f"environment variable {var}: expected an http:// or https:// URL")
        settings["base_url"], sources["base_url"] = url, f"env {var}"
    if "base_url" in settings:
        settings["base_url"] = settings["base_url"].rstrip("/")
    for key in ("referer", "title"):
        if settings.get(key):
            settings[key] = header_value(settings[key], f"provider.{name}.{key}")
    if backend.key_env:
        key, sources["api_key"] = find_key(name, section, settings["base_url"])
        settings["api_key"] = Secret(remember_secret(key)) if key else None
    if settings.get("oauth_token"):
        token = header_value(settings["oauth_token"], f"provider.{name}.oauth_token")
        settings["oauth_token"] = Secret(remember_secret(token)) if token else None
    settings["sources"] = {k: sources.get(k, "default") for k in backend.defaults}
    if "api_key" in sources:
        settings["sources"]["api_key"] = sources["api_key"]
    return settings


def find_key(name: str, section: dict, base_url: str) -> tuple[str | None, str]:
    """(the API key, where it came from), cleaned. A base_url written in the config
    file gets only a key written beside it (or named by api_key_env): the user's key
    for the official service never goes to a server they did not give it to."""
    if section.get("api_key", "").strip():
        return header_value(section["api_key"], f"provider.{name}.api_key"), "file"
    official = BACKENDS[name].defaults["base_url"]
    names = [section["api_key_env"]] if section.get("api_key_env") else \
        BACKENDS[name].key_env if "base_url" not in section or base_url == official else ()
    for var in names:
        value = os.environ.get(var, "").strip()
        if value:
            return header_value(value, f"environment variable {var}"), f"env {var}"
    return None, f"env {names[0]}" if section.get("api_key_env") else "none"


def load_config(path=None) -> dict:
    """The merged, validated configuration: every provider's settings filled in
    from the file, the environment and the defaults, `_sources` saying where each
    value came from. `path`: a file path, a dict shaped like the file, or None
    for the usual search. The result is itself a valid `config=`."""
    raw, file = read_config(path)
    providers = raw.get("provider", {})
    merged = {"default": default_provider(raw), "fallback": list(providers.get("fallback", [])),
              "auto_route": providers.get("auto_route", False)}
    for name in NAMES:
        settings = provider_settings(raw, name, file)
        merged[name] = {k: v for k, v in settings.items() if k in SCHEMA[name] and v is not None}
        merged[name]["_sources"] = settings["sources"]
    return {"provider": merged, "omega": {"status": {**STATUS_DEFAULTS,
                                                     **own_table(raw, "status")},
                                          "log": dict(own_table(raw, "log"))}, "_file": file}


def default_provider(raw: dict) -> str:
    """provider.default, else $OMEGA_PROVIDER, else claude-code."""
    name = raw.get("provider", {}).get("default")
    if name is None:
        name = os.environ.get("OMEGA_PROVIDER") or "claude-code"
        check_provider(name, "environment variable OMEGA_PROVIDER")
    return name


# =============================================================================
# 5. Attachments: the kind from the bytes, read once, base64 written once
# =============================================================================
# complete() prepares Context.attachments once (files read, kinds found), and each
# backend's request builder (7) puts them in its API's own shape. The bytes go into
# the body as Inline values, whose base64 json_payload (6) writes straight into the
# bytes sent: a call holds the file and one encoded copy, never a JSON string of it,
# and retries send the same bytes again. File I/O and limits live here, apart from
# any backend; what each API takes (its parts, its own limits) stays with it (7).

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
PDF = "application/pdf"
MIB = 1024 * 1024


def sniff(data: bytes) -> str | None:
    """The type the first bytes announce (PNG, JPEG, GIF, WebP, PDF), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return PDF
    return None


def attachments_of(ctx: Context, settings: dict) -> list[Attachment]:
    """ctx.attachments ready for this backend: Attachments with a name and the type
    their bytes say, none over max_attachment_bytes. Files are read here unless
    complete() did it already (it passes Attachments on)."""
    items = ctx.attachments
    if isinstance(items, (str, bytes, bytearray, memoryview, os.PathLike, Attachment)):
        items = (items,)                     # one given alone, not a list of one
    return [prepared_attachment(item, number, settings["max_attachment_bytes"],
                                settings["name"]) for number, item in enumerate(items or (), 1)]


def prepared_attachment(item, number: int, limit: int, who: str) -> Attachment:
    """item (a path, bytes or an Attachment) as an Attachment with the type its bytes
    say and a name; a ConfigError naming the file for anything omega cannot send."""
    if isinstance(item, Attachment):
        data, mime, name = item.data, item.mime, item.name
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data, mime, name = item, None, None
    elif isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        data, mime = read_attachment(path, limit, who), None
        name = os.path.basename(path.rstrip(os.sep)) or path
    else:
        raise ConfigError(f"attachment {number}: expected a file path, bytes or an Attachment, "
                          f"got {type(item).__name__}")
    if isinstance(data, str):                # Attachment("some text"): a text file
        data = data.encode("utf-8", "surrogatepass")
    elif isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise ConfigError(f"attachment {number}: its data must be bytes, got "
                          f"{type(data).__name__}")
    name = name if isinstance(name, str) and name else f"attachment-{number}"
    if len(data) > limit:
        raise too_big(who, name, len(data), limit)
    kind = sniff(data)
    if kind is None:
        if isinstance(mime, str) and (mime.startswith("image/") or mime == PDF):
            raise ConfigError(f"{name}: said to be {mime}, but its bytes are not a PNG, JPEG, "
                              "GIF, WebP or PDF")
        if b"\0" in data or not is_utf8(data):
            raise ConfigError(f"{name}: not an image (PNG, JPEG, GIF, WebP), a PDF or UTF-8 "
                              "text, so omega cannot send it")
        kind = mime if isinstance(mime, str) and mime.startswith("text/") else "text/plain"
    if isinstance(item, Attachment) and item.data is data and item.mime == kind \
            and item.name == name:
        return item
    return Attachment(data, kind, name)


# What a path may be instead of a regular file, in the words of an error.
NOT_A_FILE = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
              (stat.S_ISDIR, "a directory"))


def read_attachment(path: str, limit: int, who: str) -> bytes:
    """The bytes of a regular file, read once; one over the limit is refused before
    it is read. Anything else (a FIFO, a device, a socket) is refused unread: it
    could make the call wait for ever, whatever its deadline (-a - reads stdin)."""
    try:
        kind = os.stat(path).st_mode         # a socket cannot even be opened: say what it is
        if not stat.S_ISREG(kind):
            raise not_a_file(path, kind)
        # O_NONBLOCK: should a FIFO take the file's place meanwhile, opening it
        # returns at once instead of waiting for a writer (fstat then refuses it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise not_a_file(path, info.st_mode)
            if info.st_size > limit:
                raise too_big(who, path, info.st_size, limit)
            return f.read(limit + 1)      # one that grew meanwhile: prepared_attachment refuses it
    except FileNotFoundError:
        raise ConfigError(f"attachment {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"attachment {path}: cannot read it ({e.strerror})") from None


def not_a_file(path: str, mode: int) -> ConfigError:
    what = next((name for test, name in NOT_A_FILE if test(mode)), "something else")
    return ConfigError(f"attachment {path}: cannot read it: it is {what}, not a regular file "
                       "(only files are read; -a - reads stdin)")


def too_big(who: str, name: str, size: int, limit: int) -> ConfigError:
    return ConfigError(f"{who}: {name} is {size:,} bytes, more than max_attachment_bytes "
                       f"({limit:,}); raise provider.{who}.max_attachment_bytes if it is expected")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_image(attachment: Attachment) -> bool:
    return attachment.mime in IMAGE_TYPES


def is_text(attachment: Attachment) -> bool:
    return attachment.mime != PDF and not is_image(attachment)


def attachment_text(attachment: Attachment) -> str:
    return attachment.data.decode("utf-8").removeprefix("\ufeff")


def file_block(attachment: Attachment) -> str:
    """A text file as the model sees it where an API has no file part of its own:
    <file name="notes.md">, the text, </file>."""
    text = attachment_text(attachment)
    end = "" if text.endswith("\n") else "\n"
    name = attachment.name
    for char, entity in (("&", "&amp;"), ('"', "&quot;"), ("<", "&lt;"), (">", "&gt;")):
        name = name.replace(char, entity)
    return f'<file name="{clean(name, 200)}">\n{text}{end}</file>'


def base64_size(size: int) -> int:
    return (size + 2) // 3 * 4


def wire_size(attachment: Attachment) -> int:
    """Bytes it adds to a request: base64 for an image or PDF, the text itself else."""
    return len(attachment.data) if is_text(attachment) else base64_size(len(attachment.data))


class Inline:
    """Attachment bytes that go into a request body as base64 text after `prefix`
    (such as "data:image/png;base64,"): json_payload writes them straight into the
    bytes sent (json.dumps alone does not know them)."""
    __slots__ = ("data", "prefix")

    def __init__(self, data: bytes, prefix: str = ""):
        self.data, self.prefix = data, prefix

    def __repr__(self) -> str:
        return f"Inline({self.prefix}<{len(self.data):,} bytes as base64>)"


def refuse(settings: dict, attachment: Attachment, why: str) -> ConfigError:
    """What a backend cannot take, said before anything is sent to it."""
    return ConfigError(f"{settings['name']}: cannot send {attachment.name}: {why}")


def raw_size(attachment: Attachment) -> int:
    return len(attachment.data)


def limit_each(settings: dict, files: list, kinds, most: int, what: str,
               size=raw_size) -> None:
    """Refuse the first file of these kinds whose size(file) is over most."""
    for attachment in files:
        if attachment.mime in kinds and size(attachment) > most:
            raise refuse(settings, attachment, f"{what} may be at most {most:,} bytes, this is "
                                               f"{size(attachment):,}")


def limit_total(settings: dict, files: list, kinds, most: int, what: str,
                size=raw_size) -> None:
    """Refuse files of these kinds whose sizes add up to more than most."""
    chosen = [a for a in files if kinds is None or a.mime in kinds]
    total = sum(size(a) for a in chosen)
    if total > most:
        names = ", ".join(a.name for a in chosen[:3]) + (" …" if len(chosen) > 3 else "")
        raise ConfigError(f"{settings['name']}: cannot send {names}: {what} may be at most "
                          f"{most:,} bytes in one request, these are {total:,}")


# =============================================================================
# 6. Transports: HTTP, then processes
# =============================================================================
# How bytes travel: HTTP for five backends, a child process for the claude CLI.
# Both hold the call's deadline and max_response_bytes; what the bytes mean (a
# request's body, an answer's JSON) is each backend's business, in 7.


# -----------------------------------------------------------------------------
# HTTP: one requests.Session per thread, a real deadline, retries
# -----------------------------------------------------------------------------
# send() opens a request and returns once the headers are in; read_body() or
# body_pieces() read the body, through urllib3's public read_chunked() and read1().
# While they run, the WATCHDOG holds the request's deadline and its socket, and
# shuts that socket when the deadline passes, so no phase of a request (connect,
# status line, headers, body, a stream) can outlast it, however slowly a server
# trickles bytes.
# A request ended early (an error, a stream closed, or left to the garbage
# collector) closes its own connection and touches nothing else: no other
# request's deadline, no connection pool.

_local = threading.local()   # per thread: session, environ (cache per origin)
RETRY_BASE_SECS = 0.5        # backoff: RETRY_BASE_SECS × 2ⁿ, capped, times 0.75–1
RETRY_CAP_SECS = 8.0
RETRY_MIN_SECS = 0.1         # even a server asking for 0 s gets a breath
RETRY_AFTER_MAX_SECS = 60    # a server asking for a longer wait is not retried

READ_SIZE = 65536
END_GRACE_SECS = 0.05        # after an end marker, how long the end of the body may take
# Failures that mean "nobody is there": with another provider next, move on at once.
NOBODY_THERE = ("connection refused", "host not found")


def thread_session():
    """This thread's Session (its connection pools) and its cache of what the
    environment says per origin. requests re-reads the proxy environment and
    netrc on every request when trust_env is on (about a third of a local call);
    omega reads it once per thread and base_url, and keeps proxies working."""
    session = getattr(_local, "session", None)
    if session is None:
        import requests
        session = _local.session = requests.Session()
        session.trust_env = False
        adapter = WATCHDOG.adapter_class()
        session.mount("https://", adapter())
        session.mount("http://", adapter())
        _local.environ = {}
    return session, _local.environ


@dataclass(eq=False)
class Watch:
    """One HTTP request's deadline and the socket to shut when it passes."""
    deadline: float
    sock: object = None
    fired: bool = False       # the deadline passed while the request was open (or it was stopped)
    ended: bool = False       # the request is over: its socket is not its to shut
    stop: object = None       # the stop Event of the map() whose call sent it (see Call)


class Watchdog:
    """The deadlines of the HTTP requests in flight, and the one thread that keeps
    them: when a request's deadline passes, its socket is shut, which wakes whoever
    reads or writes it. A per-read timeout cannot do this: a server sending a byte a
    second never trips it.

    start(deadline) guards the request this thread sends next, until sent(): the
    connection it uses reports its socket meanwhile (report(), called by the
    connections of adapter_class()). end(watch) stops guarding one request. Each
    touches its own Watch only: a request ended from anywhere (a stream closed by the
    garbage collector in the middle of another call) ends no other request's guard."""

    def __init__(self):
        self.queue = []                 # heap of (deadline, order, Watch), earliest first
        self.order = itertools.count()
        # Reentrant: end() may run in a finalizer while this thread holds the lock.
        self.lock = threading.Condition(threading.RLock())
        self.thread = None              # started by the first request
        self.sending = threading.local()  # .watch: the request this thread is sending
        self.adapter = None

    def start(self, deadline: float, stop=None) -> Watch:
        watch = Watch(deadline, stop=stop)
        with self.lock:
            if stop is not None and stop.is_set():   # stopped after the caller looked:
                watch.fired = True                   # its socket is shut once known
            while self.queue and self.queue[0][2].ended:          # keep the heap small
                heapq.heappop(self.queue)
            heapq.heappush(self.queue, (deadline, next(self.order), watch))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="omega-watchdog",
                                               daemon=True)
                self.thread.start()
            elif self.queue[0][2] is watch:                        # a new earliest deadline
                self.lock.notify()
        self.sending.watch = watch
        return watch

    def sent(self) -> None:
        """The request is out (its socket known): later connections are not its."""
        self.sending.watch = None

    def report(self, sock) -> None:
        """The socket of the connection this thread's request uses."""
        watch = getattr(self.sending, "watch", None)
        if watch is not None and sock is not None:
            watch.sock = sock
            if watch.fired:                   # the deadline passed while it connected
                self.shut(sock)

    def end(self, watch: Watch) -> None:
        """Stop guarding this request: from now on its socket is not the watchdog's."""
        with self.lock:
            watch.ended = True

    def stop_all(self, stop) -> None:
        """Shut the socket of every request in flight that a map() stopped (stop: its
        Event, already set): whoever waits on one wakes to an interrupted call."""
        with self.lock:
            for _, _, watch in self.queue:
                if watch.stop is stop and not watch.ended:
                    watch.fired = True
                    self.shut(watch.sock)

    def run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self.queue and (self.queue[0][2].ended or self.queue[0][0] <= now):
                    watch = heapq.heappop(self.queue)[2]
                    if not watch.ended:
                        watch.fired = True
                        self.shut(watch.sock)
                self.lock.wait(self.queue[0][0] - now if self.queue else None)

    @staticmethod
    def shut(sock) -> None:
        """Wake whoever is blocked on sock: they see the connection end."""
        import socket
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass

    def adapter_class(self):
        """requests' HTTPAdapter, with pools whose connections report their socket
        (after connecting, and before each request on a reused connection), through
        the documented extension points: the pool manager's pool_classes_by_scheme
        and the pools' ConnectionCls."""
        if self.adapter is None:
            from requests.adapters import HTTPAdapter
            from urllib3 import connection, connectionpool
            report = self.report

            def watched(base):
                class Watched(base):
                    def connect(self):
                        super().connect()
                        report(self.sock)

                    def request(self, *args, **kwargs):
                        report(self.sock)
                        return super().request(*args, **kwargs)
                return Watched

            class HTTPPool(connectionpool.HTTPConnectionPool):
                ConnectionCls = watched(connection.HTTPConnection)

            class HTTPSPool(connectionpool.HTTPSConnectionPool):
                ConnectionCls = watched(connection.HTTPSConnection)

            pools = {"http": HTTPPool, "https": HTTPSPool}

            class WatchedAdapter(HTTPAdapter):
                def init_poolmanager(self, *args, **kwargs):
                    super().init_poolmanager(*args, **kwargs)
                    self.poolmanager.pool_classes_by_scheme = pools

                def proxy_manager_for(self, proxy, **kwargs):
                    manager = super().proxy_manager_for(proxy, **kwargs)
                    if not proxy.lower().startswith("socks"):     # SOCKS has pools of its own
                        manager.pool_classes_by_scheme = pools
                    return manager
            self.adapter = WatchedAdapter
        return self.adapter


WATCHDOG = Watchdog()


def environ_for(base_url: str, cache: dict) -> dict:
    """The proxies and CA bundle the environment sets for this base_url, as
    requests finds them (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE …)."""
    found = cache.get(base_url)
    if found is None:
        from requests.utils import get_environ_proxies
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        found = cache[base_url] = {"proxies": get_environ_proxies(base_url), "verify": verify}
    return found


def prepared_url(url: str, cache: dict) -> str:
    """url checked and normalised by requests once (IDNA, quoting), then reused."""
    found = cache.get(url)
    if found is None:
        import requests
        request = requests.PreparedRequest()
        request.prepare_url(url, None)
        found = cache[url] = request.url
    return found


def send(method: str, url: str, headers: dict, payload: bytes | None, settings: dict,
         call: Call):
    """Open one request straight on the Session's adapter (no per-request merging of
    session defaults, cookies or environment) and return (response, watch) once
    the headers are in; the body is left for read_body() or body_pieces()."""
    import requests
    if call.left() <= 0:
        raise timed_out(settings, call)
    paused = PAUSED_UNTIL.get(settings["base_url"])
    if paused is not None and paused[1] != threading.get_ident():
        wait_out_pause(paused[0], settings, call)
    session, cache = thread_session()
    close_left_bodies()
    watch = WATCHDOG.start(call.deadline, call.stop)
    try:
        request = requests.PreparedRequest()
        request.method, request.url, request.body = method, prepared_url(url, cache), payload
        request.headers = headers if payload is None else \
            {**headers, "Content-Length": str(payload_size(payload))}
        response = session.get_adapter(request.url).send(
            request, stream=True, timeout=max(call.left(), 0.001),
            **environ_for(settings["base_url"], cache))
    except Exception as e:
        WATCHDOG.end(watch)
        raise transport_error(e, settings, call, watch) from None
    except BaseException:
        WATCHDOG.end(watch)
        raise
    finally:
        WATCHDOG.sent()
    return response, watch


# urllib3 reads a chunked body through a generator (read_chunked) that, closed
# before its end, puts its connection back in the pool, which takes the pool's lock:
# a garbage collection that closed one while its thread held that lock (taking a
# connection for another request) would wait forever. So none of them is ever
# garbage: each is held in OPEN_BODIES while it is read, and one left unfinished (a
# stream closed early, or abandoned to the collector) waits in LEFT_BODIES, its
# connection already closed by hang_up(), until the next request closes it where no
# lock is held (urllib3 then puts that closed connection back; it reconnects when
# taken again).
OPEN_BODIES: set = set()
LEFT_BODIES = collections.deque()


def body_pieces(response, settings: dict):
    """The body as it arrives, decompressed, at most max_response_bytes in all. Each
    piece comes as soon as its bytes are in: a whole HTTP chunk, or what the socket
    has, at most READ_SIZE bytes (urllib3 1.26, which has no read1(), reads a body
    that is not chunked READ_SIZE bytes at a time). The raw bytes are decompressed
    here in bounded steps, so that a gzip bomb stops at the limit instead of being
    inflated first. A chunked or Content-Length body cut short raises; at the end of
    the body urllib3 puts the connection back in the pool."""
    raw = response.raw
    inflate = decompressor(response.headers.get("Content-Encoding"), settings)
    limit, total, received = settings["max_response_bytes"], 0, 0
    chunks = raw.read_chunked(READ_SIZE, decode_content=False) if raw.chunked else \
        plain_body(raw)
    OPEN_BODIES.add(chunks)
    try:
        for data in chunks:
            received += len(data)
            for piece in inflate(data) if inflate else (data,):
                total += len(piece)
                if total > limit:
                    raise too_large(settings, response.status_code)
                yield piece
        length = response.headers.get("Content-Length", "")
        if not raw.chunked and length.isdigit() and received < int(length):
            raise ConnectionError(f"body cut short, {int(length) - received} bytes missing")
    except ValueError:                 # urllib3 reads a negative chunk size as a length
        LEFT_BODIES.append(chunks)
        raise ConnectionError("malformed chunked body") from None
    except BaseException:
        LEFT_BODIES.append(chunks)     # closed later: see OPEN_BODIES
        raise
    finally:
        OPEN_BODIES.discard(chunks)


def plain_body(raw):
    """A body with a Content-Length, or one that ends when the connection does."""
    read = getattr(raw, "read1", raw.read)
    while data := read(READ_SIZE, decode_content=False):
        yield data


def close_left_bodies() -> None:
    """Close the bodies that requests ended early left unfinished (see OPEN_BODIES)."""
    while LEFT_BODIES:
        try:
            body = LEFT_BODIES.popleft()
        except IndexError:             # another thread took the last one
            return
        body.close()


def hang_up(response) -> None:
    """Close the response's own connection, which never goes back to the pool with
    its body unread. No lock is taken: safe from a finalizer, whatever the thread it
    runs in holds. Once the body has ended, there is nothing to do."""
    response.raw.close()


def finish_body(body, response, watch: Watch) -> None:
    """After an answer's end marker: the end of the body (body: its pieces), if it
    comes within END_GRACE_SECS, so that the connection goes back to the pool; from a
    server that holds the connection open or sends more, the connection is closed
    instead. The answer is complete either way: nothing is raised."""
    import urllib3
    sock, ended = watch.sock, False
    try:
        before = sock.gettimeout() if sock is not None else None
        if sock is not None:
            sock.settimeout(END_GRACE_SECS)
        ended = next(body, None) is None
        if sock is not None:             # as it was, for the connection's next request
            sock.settimeout(before)
    except (OSError, urllib3.exceptions.HTTPError, ProviderError):  # a timeout, a cut
        ended = False
    if not ended:
        hang_up(response)


def read_body(response, watch: Watch, settings: dict, call: Call) -> bytes:
    """The whole body (see body_pieces); the connection goes back to the pool."""
    try:
        body = b"".join(body_pieces(response, settings))
    except BaseException as e:
        WATCHDOG.end(watch)
        hang_up(response)
        if isinstance(e, Exception) and not isinstance(e, OmegaError):
            raise transport_error(e, settings, call, watch) from None
        raise
    WATCHDOG.end(watch)
    if watch.fired:                # shut mid-body: what arrived is not the whole answer
        hang_up(response)
        raise timed_out(settings, call)
    return body


def decompressor(encoding: str | None, settings: dict):
    """None for a plain body, else a function from compressed bytes to pieces of
    at most READ_SIZE decompressed bytes (gzip and deflate: what omega asks for)."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProviderError(f"the server sent a body in {encoding!r} encoding, which omega "
                            "does not read (it asks for gzip or deflate)", settings["name"])
    state = []

    def inflate(data: bytes):
        if not state:      # deflate is zlib-wrapped by the RFC, raw deflate in practice too
            zlib_header = len(data) > 1 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0
            state.append(zlib.decompressobj(31 if encoding != "deflate" else 15 if zlib_header else -15))
        while True:
            try:
                piece = state[0].decompress(data, READ_SIZE)
            except zlib.error:
                raise ProviderError(f"the server sent a broken {encoding} body",
                                    settings["name"]) from None
            if piece:
                yield piece
            data = state[0].unconsumed_tail
            if not data and len(piece) < READ_SIZE:
                return
    return inflate


def transport_error(e: Exception, settings: dict, call: Call, watch: Watch) -> OmegaError:
    """Turn what requests, urllib3, http.client or the socket raised into ours."""
    import http.client
    import requests
    import urllib3
    if isinstance(e, OmegaError):
        return e
    if isinstance(e, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                      requests.exceptions.MissingSchema)):
        return ConfigError(f"{settings['name']}: invalid base_url: {e}")
    if not isinstance(e, (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                          http.client.HTTPException)):
        raise e
    if watch.fired or call.left() <= 0 or isinstance(
            e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return timed_out(settings, call)
    reason = connection_trouble(e)
    return ProviderUnavailable(f"cannot get an answer from {settings['base_url']} ({reason})",
                               settings["name"], retryable=True, reason=reason)


def connection_trouble(e: Exception) -> str:
    text = str(e)
    if "refused" in text.lower():
        return "connection refused"
    if "NameResolution" in text or "Name or service not known" in text:
        return "host not found"
    if "SSL" in type(e).__name__ or "CERTIFICATE" in text:
        return "TLS error"
    return "connection closed before a complete answer"


def json_payload(body) -> bytes | list[bytes]:
    """body as the JSON bytes to send. Attachment bytes in it (Inline values) are
    written as base64 straight into the result, which is then a list of pieces sent
    one after the other: a 20 MB image costs one encoded copy, not three (a JSON
    string, its bytes, and their concatenation). A body without any is plain bytes."""
    try:
        return json.dumps(body).encode()       # the usual case, at full speed
    except TypeError:
        pass
    inlines, token = [], []

    def hold(value):
        if not isinstance(value, Inline):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        if not token:                          # unguessable: no prompt text can forge it
            token.append(os.urandom(12).hex())
        inlines.append(value)
        return f"{token[0]}:{len(inlines) - 1}"
    text = json.dumps(body, default=hold)
    pieces = []
    for number, inline in enumerate(inlines):     # in the order they were written
        before, _, text = text.partition(f'"{token[0]}:{number}"')
        pieces += [before.encode(), b'"' + inline.prefix.encode(),
                   binascii.b2a_base64(inline.data, newline=False), b'"']
    pieces.append(text.encode())
    return pieces


def payload_size(payload: bytes | list[bytes]) -> int:
    return len(payload) if isinstance(payload, bytes) else sum(len(piece) for piece in payload)


def request_headers(headers: dict, payload: bytes | None, streaming: bool = False) -> dict:
    # A compressed stream may be held back by the server until a block fills.
    encoding = "identity" if streaming else "gzip, deflate"
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": encoding, **headers}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    return headers


def request_json(method: str, url: str, headers: dict, body, settings: dict,
                 call: Call) -> tuple:
    """Send body as JSON (None: no body) with retries inside the call's deadline.
    Returns (parsed JSON, response headers, number of requests made)."""
    payload = None if body is None else json_payload(body)
    headers = request_headers(headers, payload)
    for attempt in itertools.count(1):
        started = time.monotonic()
        try:
            response, watch = send(method, url, headers, payload, settings, call)
            content = read_body(response, watch, settings, call)
        except ProviderUnavailable as e:          # refused, reset, cut short: try again
            error = e
        else:
            status, reply_headers = response.status_code, response.headers
            log_debug("%s: %s %s -> %d in %.0f ms", settings["name"], method, url, status,
                      (time.monotonic() - started) * 1000)
            if status < 300:
                return parse_json(content, status, reply_headers, settings), reply_headers, attempt
            error = http_error(status, reply_headers, content, settings)
        pause_before_retry(error, attempt, settings, call)


# base_url -> (the time.monotonic() value before which nothing goes to that server,
# the thread that was told so): a 429 with Retry-After, waited out by the request that
# got it, pauses every other thread's requests to that server too (map()'s workers,
# above all), so that they do not each run into it. One dict look-up per request.
PAUSED_UNTIL: dict = {}


def wait_out_pause(until: float, settings: dict, call: Call) -> None:
    """Wait until the server's pause (PAUSED_UNTIL) ends, or fail at once as
    rate-limited when it ends after this call's deadline."""
    wait = until - time.monotonic()
    if wait <= 0:
        return
    if wait >= call.left():
        raise RateLimitError(f"the server asked for a pause of {wait:.1f} s more (Retry-After), "
                             "past this call's deadline", settings["name"],
                             reason="paused by Retry-After")
    log_debug("%s: paused by Retry-After, waiting %.2f s", settings["name"], wait)
    call.sleep(wait)


def pause_before_retry(error: ProviderError, attempt: int, settings: dict, call: Call) -> None:
    """Wait before the next attempt and say so, or raise error when another try
    cannot help or would not end before the deadline. A Retry-After of a 429
    pauses the other requests to that server too (PAUSED_UNTIL)."""
    wait = retry_wait(error, attempt, settings, call)
    if wait is None:
        raise error
    if isinstance(error, RateLimitError) and error.retry_after is not None:
        until, url = time.monotonic() + wait, settings["base_url"]
        if until > PAUSED_UNTIL.get(url, (0.0,))[0]:
            PAUSED_UNTIL[url] = (until, threading.get_ident())
    call.notify(f"{settings['name']}: {error.status or error.reason}, retrying in {wait:.1f} s "
                f"({attempt + 1}/{settings['max_retries'] + 1})")
    log_debug("%s: attempt %d failed (%s); waiting %.2f s", settings["name"], attempt,
              error.reason, wait)
    call.sleep(wait)


def retry_wait(error: ProviderError, attempt: int, settings: dict, call: Call) -> float | None:
    """Seconds to wait before trying again, or None when another try cannot help
    or would not end before the deadline."""
    if not error.retryable or attempt > settings["max_retries"]:
        return None
    if call.next_provider and error.reason in NOBODY_THERE:
        return None
    wait = error.retry_after
    if wait is None:
        wait = min(RETRY_CAP_SECS, RETRY_BASE_SECS * 2 ** (attempt - 1)) * random.uniform(0.75, 1)
    elif wait > RETRY_AFTER_MAX_SECS:
        return None
    wait = max(RETRY_MIN_SECS, wait)
    return wait if wait < call.left() else None


# JSON that holds more objects and arrays than an answer does is refused before it
# is parsed: each costs 70-200 bytes once parsed, so 32 MiB of `[{},{},…]` would take
# a gigabyte. Up to one per JSON_BYTES_PER_OBJECT bytes keeps it under about 10 ×
# its size; smaller bodies are not counted (they cannot cost much).
JSON_BYTES_PER_OBJECT = 20
JSON_COUNTED_BYTES = 65536


def too_many_objects(data: bytes | str) -> bool:
    """True for JSON denser in `{` and `[` than an answer is (braces inside strings
    count too: the test is cheap and errs on the side of reading)."""
    if len(data) <= JSON_COUNTED_BYTES:
        return False
    brace, bracket = ("{", "[") if isinstance(data, str) else (b"{", b"[")
    return (data.count(brace) + data.count(bracket)) * JSON_BYTES_PER_OBJECT > len(data)


def dense_json(settings: dict, status: int | None = None, request_id: str | None = None,
               where: str = "") -> ProviderError:
    return ProviderError(f"the server sent JSON with more objects than an answer holds{where}; "
                         "it was not read", settings["name"], status, request_id=request_id)


def parse_json(content: bytes, status: int, headers, settings: dict):
    if too_many_objects(content):
        raise dense_json(settings, status, request_id_of(headers))
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as e:
        raise ProviderError(not_json(content, e), settings["name"], status,
                            request_id=request_id_of(headers)) from None


BOM = b"\xef\xbb\xbf"
# What Python spends on each line held in memory, besides its bytes: a body of
# millions of tiny lines counts against max_response_bytes for what it costs.
LINE_OVERHEAD = 64
JSON_FIRST = frozenset(b'{["}]')   # how a line of Gemini's bare JSON error object begins


def sse_events(chunks, settings: dict):
    """(event name or None, data) for each Server-Sent Event in a body that arrives
    in pieces of any size. Lines end at CR, LF or CRLF, also when the CRLF is split
    across reads; comments and unknown fields (`id`, `retry`, `keep-alive`, a name
    that begins with a space) are ignored; data lines are joined by LF; an event with
    empty data is dropped; a last event without its blank line still counts. All in
    bytes, split before decoding: a UTF-8 character cut between reads is whole again
    in its line, and U+2028 inside JSON is not a line end. Two shapes outside the
    standard come back as events too: the old llama.cpp `error:` field as
    (b"error", data), and Gemini's bare JSON error object (lines that are no field
    but begin, indented or not, as JSON does: `{`, `[`, `"`, `}`, `]`) as
    (b"raw", those lines). What one line or event holds, its lines' overhead
    included, is at most max_response_bytes."""
    limit = settings["max_response_bytes"]
    held, cr, first = bytearray(), False, True   # cr: the last piece ended in CR
    name, data, raw, size = None, [], [], 0
    for chunk in itertools.chain(chunks, (b"\n\n",)):    # the end of the body ends all
        if not chunk:
            continue
        if chunk.startswith(b"data:") and not (held or data or raw or cr or first):
            # The usual piece, one whole event of one data line (LF or CRLF line ends),
            # at a fraction of the cost of the lines below, which give the same.
            stop = chunk.find(b"\n")
            cut = stop - (chunk[stop - 1:stop] == b"\r")
            if chunk.find(b"\r") in (-1, cut) and chunk[stop:] in (b"\n\n", b"\n\r\n"):
                if cut + LINE_OVERHEAD > limit:
                    raise too_large(settings, where="one event of the stream")
                value = chunk[6:cut] if chunk[5:6] == b" " else chunk[5:cut]
                if value:
                    yield name, value
                name = None
                continue
        if cr and chunk[:1] == b"\n":
            chunk = chunk[1:]             # the LF of a CRLF split between two reads
        if b"\r" in chunk:
            cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            cr = False
        lines = complete_lines(chunk, held, settings)
        if not lines:
            continue
        if first:
            lines[0], first = lines[0].removeprefix(BOM), False
        for line in lines:
            if not line:                   # a blank line: the event is complete
                if data:
                    joined = b"\n".join(data)
                    if joined:
                        yield name, joined
                elif raw:
                    yield b"raw", b"\n".join(raw)
                name, data, raw, size = None, [], [], 0
                continue
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                data.append(value)
            elif line[0] == 58:            # ":" a comment (OpenRouter's keep-alives)
                continue
            else:
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"event":
                    name = value
                    continue
                if field == b"data":       # `data` alone: an empty data line
                    data.append(value)
                elif field == b"error":
                    name = b"error"
                    data.append(value)
                elif raw or line.lstrip()[:1] and line.lstrip()[0] in JSON_FIRST:
                    raw.append(line)
                else:
                    continue               # an unknown field
            size += len(line) + LINE_OVERHEAD
            if size > limit:
                raise too_large(settings, where="one event of the stream")


def ndjson_lines(chunks, settings: dict):
    """Each non-blank line of a newline-delimited JSON body arriving in pieces; one
    line holds at most max_response_bytes, however it is cut."""
    held = bytearray()
    for chunk in chunks:
        for line in complete_lines(chunk, held, settings):
            if line.strip():
                yield line
    if held.strip():
        yield bytes(held)


def complete_lines(chunk: bytes, held: bytearray, settings: dict) -> list[bytes]:
    """The lines (LF-ended) that a piece of a body completes. held: the start of a
    line that earlier pieces left unfinished, which this piece's unfinished end
    joins; more than max_response_bytes of it is an error, however it is cut."""
    if b"\n" in chunk:
        lines = chunk.split(b"\n")
        if held:
            lines[0] = bytes(held) + lines[0]
            held.clear()
        held += lines.pop()
    else:
        lines = []
        held += chunk
    if len(held) > settings["max_response_bytes"]:
        raise too_large(settings, where="one line of the stream")
    return lines


_logger = None


def log_debug(message: str, *args) -> None:
    """Debug logging to the "omega" logger (the CLI's -v shows it). Never a key:
    callers pass URLs, statuses and timings, not headers or bodies."""
    global _logger
    if _logger is None:
        import logging
        _logger = logging.getLogger("omega")
    if _logger.isEnabledFor(10):
        _logger.debug(message, *args)


# -----------------------------------------------------------------------------
# processes: the claude CLI in its own process group
# -----------------------------------------------------------------------------
# run_claude() and start_claude() + child_output() run the CLI with its stdin fed
# and its output read without blocking (and the MCP bridge of its tools served,
# in 10), until it exits or the deadline passes; stop_group() then stops whatever
# is left of its process group: the CLI's, an MCP server's, a Bash tool's.

KILL_GRACE_SECS = 2.0            # between SIGTERM and SIGKILL for the CLI's process group
LATE_GRACE_SECS = 0.5            # the same past the deadline, which holds within a second
CLI_EXIT_GRACE_SECS = 0.5        # after its result line, for the CLI to exit by itself


def working_dir(settings: dict) -> str | None:
    """The provider's working_dir (None: the current directory), checked: where the
    claude CLI runs, the agent tools work and MCP servers start."""
    cwd = settings.get("working_dir")
    if cwd and not os.path.isdir(cwd):
        raise ConfigError(f"provider.{settings['name']}.working_dir: {cwd!r} is not a directory")
    return cwd


def start_claude(argv: list[str], settings: dict, call: Call,
                 env: dict | None = None) -> subprocess.Popen:
    """Start the CLI in its own process group; env: variables set for it on top of
    claude_code_env's."""
    import subprocess      # only claude-code needs it: 0.5 MB and a few ms spared elsewhere
    name = settings["name"]
    if call.left() <= 0:
        raise timed_out(settings, call)
    cwd = working_dir(settings)
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=cwd,
                                env={**claude_code_env(settings), **(env or {})},
                                start_new_session=True)
    except FileNotFoundError:
        raise ProviderUnavailable(
            f"{argv[0]!r} not found on PATH; install Claude Code "
            "(npm install -g @anthropic-ai/claude-code) or set provider.claude-code.command",
            name, reason="claude not found", not_set_up=True) from None
    except OSError as e:
        what = "is not executable" if isinstance(e, PermissionError) else f"cannot run: {e.strerror}"
        raise ProviderUnavailable(f"{argv[0]!r} {what}", name, reason="claude cannot run") from None


def claude_code_env(settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}  # nested-session guard
    if settings.get("oauth_token"):
        env["CLAUDE_CODE_OAUTH_TOKEN"] = str.__str__(settings["oauth_token"])
    return env


def child_output(child: subprocess.Popen, stdin_data: bytes | list[bytes], settings: dict,
                 call: Call, errors: list, tools: ToolServer | None = None):
    """Feed the child stdin_data (bytes, or pieces of bytes written one after the
    other, never joined); yield its stdout as it comes and collect its stderr into
    errors, each at most max_response_bytes; until the child exits (not until its
    pipes close: a grandchild may hold them open) or the deadline. tools: the
    bridge's sockets are served in the same loop, so the calls the CLI makes run
    here, in the calling thread, one at a time (serve_ready, in 10)."""
    limit, sizes = settings["max_response_bytes"], {}
    pieces = [memoryview(p) for p in ([stdin_data] if isinstance(stdin_data, bytes)
                                      else stdin_data) if p]
    with selectors.DefaultSelector() as selector:
        for pipe in (child.stdout, child.stderr):
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ)
            sizes[pipe] = 0
        if pieces:
            os.set_blocking(child.stdin.fileno(), False)
            selector.register(child.stdin, selectors.EVENT_WRITE)
        else:
            child.stdin.close()
        if tools is not None and tools.listener:
            selector.register(tools.listener, selectors.EVENT_READ, tools)
        while True:
            exited = child.poll() is not None       # then read what is left, and stop
            for key, _ in selector.select(0 if exited else max(0, min(call.left(), 0.1))):
                pipe = key.fileobj
                if key.data is not None:            # the bridge's listener or a bridge
                    serve_ready(key.data, pipe, selector)
                    continue
                if pipe is child.stdin:
                    try:
                        written = os.write(pipe.fileno(), pieces[0][:READ_SIZE])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:             # it stopped reading: fine
                        pieces = []
                    else:
                        pieces[0] = pieces[0][written:]     # a view: no copy
                        if not pieces[0]:
                            pieces.pop(0)
                    if not pieces:
                        selector.unregister(pipe)
                        pipe.close()
                    continue
                while True:
                    try:
                        data = os.read(pipe.fileno(), READ_SIZE)
                    except BlockingIOError:
                        break
                    if not data:
                        selector.unregister(pipe)
                        break
                    sizes[pipe] += len(data)
                    if sizes[pipe] > limit:
                        raise too_large(settings, where="claude output")
                    if pipe is child.stdout:
                        yield data
                    else:
                        errors.append(data)
                    if not exited:
                        break
            readers = [k for k in selector.get_map().values()
                       if k.fileobj is not child.stdin and k.data is None]
            if exited or not readers:
                break
            if call.left() <= 0:
                raise timed_out(settings, call, " (the claude process group was stopped)")
    import subprocess      # already loaded by start_claude
    try:
        child.wait(timeout=max(call.left(), 0))
    except subprocess.TimeoutExpired:
        raise timed_out(settings, call, " (the claude process group was stopped)") from None


def run_claude(argv: list[str], stdin: str | bytes | list, settings: dict,
               call: Call, env: dict | None = None,
               tools: ToolServer | None = None) -> tuple[int, str, str]:
    """Run the CLI once in its own process group, stdin (text, bytes or pieces of
    bytes) on its stdin, its tools served (see child_output); (exit code, stdout,
    stderr). The run ends when the CLI exits, even if a grandchild (an MCP server)
    still holds its output open; then, or at the deadline, or on Ctrl-C, whatever
    is left of the group is stopped. env: as start_claude takes it."""
    child = start_claude(argv, settings, call, env)
    errors: list[bytes] = []
    try:
        out = b"".join(child_output(child, stdin.encode() if isinstance(stdin, str) else stdin,
                                    settings, call, errors, tools))
    finally:
        stop_group(child, kill_grace(call))
    return child.returncode, out.decode(errors="replace"), b"".join(errors).decode(errors="replace")


def kill_grace(call: Call) -> float:
    """How long the CLI's group may take to go after SIGTERM: KILL_GRACE_SECS, but
    never more than LATE_GRACE_SECS past the call's deadline."""
    return min(KILL_GRACE_SECS, max(call.left(), 0.0) + LATE_GRACE_SECS)


def stop_group(child: subprocess.Popen, grace: float) -> None:
    """Stop the child's whole process group: SIGTERM, up to grace seconds for it to
    go, then SIGKILL for whatever is left. The SIGKILL is sent even when Ctrl-C is
    pressed again meanwhile: nothing survives, whatever the number of Ctrl-Cs."""
    try:
        if signal_group(child, signal.SIGTERM):
            end = time.monotonic() + grace
            while group_alive(child) and time.monotonic() < end:
                time.sleep(0.01)
    finally:
        signal_group(child, signal.SIGKILL)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe is not None:            # a Bash tool has no stdin or stderr pipe
                try:
                    pipe.close()
                except OSError:
                    pass
        child.wait()


def signal_group(child: subprocess.Popen, sig: int) -> bool:
    try:
        os.killpg(child.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(child: subprocess.Popen) -> bool:
    child.poll()                       # reap the leader, so that only the living count
    if not signal_group(child, 0):
        return False
    # A dead grandchild stays a zombie until its new parent reaps it, and a
    # container's PID 1 often never does: on Linux only members still running count.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == child.pid and fields[0] != b"Z":
                return True
    return False


# =============================================================================
# 7. Backends
# =============================================================================
# An HTTP backend is three plain functions, testable without a network:
#   <name>_request(ctx, settings, streaming=False) -> (url, headers, body)
#   <name>_response(data, settings) -> OutgoingMessage
#   <name>_events(chunks, settings): a generator that reads a streamed body (bytes
#       as they arrive), yields the answer's text pieces (its reasoning as
#       ReasoningPieces) and returns the body the same answer would have had
#       unstreamed, for <name>_response to read.
# and three more for the tool loop (10), in each API's shape:
#   <name>_tools(tools) -> body["tools"], the declarations
#   <name>_calls(data) -> [ToolCall], the calls an answer asks for
#   <name>_round(data, calls) -> the messages that go back: the model's turn as it
#       came, then the results.
# call_http() and stream_http() run them with the transport; the backend table
# (8) lists them. First the helpers they share, tool calls, reasoning text and JSON
# answers, then one sub-banner per backend: request builder, response parser,
# stream reader, tool declarations, calls and round, model list side by side.

def drain(pieces) -> OutgoingMessage:
    """Run a generator of pieces to its end; what it returns."""
    while True:
        try:
            next(pieces)
        except StopIteration as end:
            return end.value


def call_http(backend, request: tuple, settings: dict, call: Call,
              schema: dict | None = None) -> tuple[OutgoingMessage, dict]:
    """One HTTP backend call: send request (url, headers, body) with retries, parse.
    Returns (the reply, the body it was read from)."""
    url, headers, body = request
    data, reply_headers, attempts = request_json("POST", url, headers, body, settings, call)
    return parsed(backend, data, reply_headers, attempts, settings, schema), data


def parsed(backend, data, headers, attempts: int, settings: dict,
           schema: dict | None = None) -> OutgoingMessage:
    """The backend's reading of a body, with the request id and attempts added, and
    with a schema, the answer's JSON in reply.data."""
    request_id = request_id_of(headers)
    try:
        reply = backend.response(data, settings)
        if schema is not None:
            reply.data = json_answer(reply.text, reply.metadata.stop_reason, schema, settings)
    except ProviderError as e:
        raise (e.with_context(request_id=request_id) if request_id and not e.request_id
               else e) from None
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise shape_error(settings, request_id) from None
    reply.metadata = replace(reply.metadata, attempts=attempts,
                             request_id=reply.metadata.request_id or request_id)
    return reply


def stream_http(backend, request: tuple, settings: dict, call: Call,
                schema: dict | None = None):
    """One streamed HTTP backend call of request (url, headers, body): yields text
    pieces (and ReasoningPieces) as they arrive and returns (the reply, the body it
    was read from). Failures before the first piece (a status, an error event, a cut
    connection, an early end) are retried as in call_http; after it (answer text or
    reasoning) they are raised, since it is already on the caller's screen. Reading ends at the answer's end marker: what
    the server sends after it is not waited for. An answer with no text (one that
    only calls tools) yields nothing."""
    url, headers, body = request
    payload = json_payload(body)
    headers = request_headers(headers, payload, streaming=True)
    for attempt in itertools.count(1):
        shown = False
        try:
            response, watch = send("POST", url, headers, payload, settings, call)
        except ProviderUnavailable as e:          # refused, reset: try again
            pause_before_retry(e, attempt, settings, call)
            continue
        try:
            status, reply_headers = response.status_code, response.headers
            log_debug("%s: POST %s -> %d, streaming", settings["name"], url, status)
            media = reply_headers.get("Content-Type", "").split(";")[0].strip().lower()
            if status >= 300 or media == "application/json":
                content = read_body(response, watch, settings, call)
                if status >= 300:
                    raise http_error(status, reply_headers, content, settings)
                # Some gateways answer a stream request with one plain body.
                data = parse_json(content, status, reply_headers, settings)
                reply = parsed(backend, data, reply_headers, attempt, settings, schema)
                shown = True
                if reply.reasoning:
                    yield ReasoningPiece(reply.reasoning)
                if reply.text:
                    yield reply.text
                return reply, data
            body = body_pieces(response, settings)
            pieces = backend.events(body, settings)
            try:
                piece = next(pieces)
            except StopIteration as end:  # no piece: an OpenAI refusal comes whole, at the end
                data = end.value
            else:
                shown = True
                yield piece
                data = yield from pieces
            if watch.fired:                # the socket was shut: the end was not the server's
                raise timed_out(settings, call)
            finish_body(body, response, watch)
            WATCHDOG.end(watch)
            reply = parsed(backend, data, reply_headers, attempt, settings, schema)
            if not shown and reply.text:
                yield reply.text
            return reply, data
        except ProviderError as e:
            error = timed_out(settings, call) if watch.fired else e
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            error = timed_out(settings, call) if watch.fired else \
                shape_error(settings, request_id_of(response.headers))
        except Exception as e:
            if isinstance(e, OmegaError):
                raise
            error = transport_error(e, settings, call, watch)
        finally:                     # also when the caller closes the stream, or the collector
            WATCHDOG.end(watch)
            hang_up(response)        # nothing left to do once the body has ended
        if shown:
            raise error
        pause_before_retry(error, attempt, settings, call)


def stream_json(data: bytes, settings: dict):
    """One event's JSON (a dict or a list), or the error for malformed data."""
    if too_many_objects(data):
        raise dense_json(settings, where=" (in the stream)")
    try:
        value = json.loads(data.decode())    # str: json.loads skips guessing the encoding
    except (ValueError, RecursionError) as e:
        raise ProviderError(not_json(data, e) + " (in the stream)", settings["name"]) from None
    if not isinstance(value, (dict, list)):
        raise shape_error(settings)
    return value


def answer_text(value, settings: dict) -> str:
    """The answer text a server sent, which must be a string (or nothing)."""
    if value is None or isinstance(value, str):
        return value or ""
    raise shape_error(settings)


def require_key(settings: dict) -> str | None:
    """The API key, or an AuthError (before any request) naming where to put one.
    A backend that serves local OpenAI-compatible servers needs none off its
    official base_url."""
    key, name = settings.get("api_key"), settings["name"]
    backend = BACKENDS[name]
    if key or backend.keyless_off_official and \
            settings["base_url"] != backend.defaults["base_url"]:
        return key
    where = f"set provider.{name}.api_key"
    if settings.get("api_key_env"):
        where += f" or the {settings['api_key_env']} environment variable"
    elif settings["sources"].get("api_key") == "none" and \
            settings["base_url"] != backend.defaults["base_url"]:
        where += (f" or api_key_env (a base_url from the config file never gets "
                  f"{backend.key_env[0]})")
    else:
        where += " or " + " / ".join(backend.key_env) + " in the environment"
    raise AuthError(f"no API key: {where}", name, reason="no API key", not_set_up=True)


def model_of(ctx: Context, settings: dict) -> str:
    """Context.model wins; else complex=True picks model_complex; else model."""
    if ctx.model:
        return ctx.model
    if ctx.complex and settings.get("model_complex"):
        return settings["model_complex"]
    return settings["model"]


def requested(ctx: Context, settings: dict, key: str):
    """max_tokens, temperature, max_turns, allowed_tools, mcp_servers: the request's
    value, checked as the config's is (a NaN would go out as invalid JSON), else
    the configured one."""
    value = getattr(ctx, key)
    if value is None:
        return settings.get(key)
    if key == "mcp_servers":            # its own check: a rule's message would show an env
        check_mcp_servers(value, f"Context.{key}")
    else:
        check_value(key, value, KEY_TYPES[key], f"Context.{key}")
    return value


def chat_messages(ctx: Context) -> list[dict]:
    """OpenAI/OpenRouter/Ollama shape: the system prompt as the first message."""
    system, messages = ctx.to_api_messages()
    return [{"role": "system", "content": system}, *messages] if system else messages


def token_counts(input_tokens, output_tokens) -> tuple:
    """Gemini and Ollama leave a count out when it is 0: next to a present count,
    a missing one is 0; with neither present, both are unknown."""
    input_tokens, output_tokens = count(input_tokens), count(output_tokens)
    if input_tokens is None and output_tokens is None:
        return None, None
    return input_tokens or 0, output_tokens or 0


MAX_PAGES = 100      # of a model list: a server that never stops paging is an error


def too_many_pages(settings: dict) -> ProviderError:
    return ProviderError(f"the model list did not end after {MAX_PAGES} pages", settings["name"])


def user_turn(messages: list[dict]) -> dict:
    """The message attachments go with: the current user turn, last in messages
    (added empty when the current message is empty and the history ends otherwise)."""
    if not messages or messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": ""})
    return messages[-1]


# Where a chat message or stream delta holds reasoning text (SPEC 14), in order of
# trust: DeepSeek and llama.cpp (and vLLM before its rename), vLLM now and
# OpenRouter, Ollama. A server that sends two of them sends the same text twice.
CHAT_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
CHAT_REASONING_FIELDS = frozenset((*CHAT_REASONING_KEYS, "reasoning_details"))
DETAIL_TEXT = {"reasoning.text": "text", "reasoning.summary": "summary"}


def joined_reasoning(texts) -> str | None:
    """The reasoning of several answers (tool-loop rounds) as one text, a blank line
    between; None when none had any."""
    return "\n\n".join(t for t in texts if t) or None


def chat_reasoning(message: dict) -> str | None:
    """The reasoning text of a Chat Completions message or stream delta, or of an
    Ollama message: the first key of CHAT_REASONING_KEYS that holds text, else the
    readable items of OpenRouter's reasoning_details (encrypted ones are not).
    OpenAI's own API sends none: it only counts reasoning tokens."""
    for key in CHAT_REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    details = message.get("reasoning_details")
    texts = [item.get(DETAIL_TEXT.get(item.get("type"))) for item in details
             if isinstance(item, dict)] if isinstance(details, list) else ()
    return "".join(t for t in texts if isinstance(t, str)) or None


def chat_reasoning_fold(held: dict, delta: dict) -> ReasoningPiece | None:
    """Fold one stream delta (or Ollama line's message) into held, the reasoning
    fields the streamed message will carry as an unstreamed one would: each text
    grown under the key it came in (openai_round sends reasoning_content back to
    DeepSeek, ollama_round sends `thinking`), reasoning_details merged (OpenRouter).
    Returns the delta's reasoning piece, if any. Texts are held as lists of pieces
    (adding to a string copies it: quadratic in a long thought); reasoning_fields()
    joins them."""
    if CHAT_REASONING_FIELDS.isdisjoint(delta):    # most deltas: a stream's cost per delta
        return None
    for key in CHAT_REASONING_KEYS:
        if isinstance(delta.get(key), str):
            held.setdefault(key, []).append(delta[key])
    if isinstance(delta.get("reasoning_details"), list):
        merge_reasoning_details(held.setdefault("reasoning_details", []),
                                delta["reasoning_details"])
    thought = chat_reasoning(delta)
    return ReasoningPiece(thought) if thought else None


def reasoning_fields(held: dict) -> dict:
    """What chat_reasoning_fold held, as the fields of the streamed message."""
    return {key: value if key == "reasoning_details" else "".join(value)
            for key, value in held.items()}


def merge_reasoning_details(details: list, items: list) -> None:
    """Add streamed reasoning_details items to details, the list an unstreamed answer
    holds. OpenRouter streams one block as many items with the same type and index
    (every item index 0, in fact), its signature alone in the last: an item that
    continues a text or summary block without a signature yet is merged into it
    (text concatenated, keys it lacked added); anything else (encrypted data, a new
    index, text after a signature) is an item of its own. Sending back fragments,
    or items rebuilt from the text, makes Claude refuse the signature."""
    for item in items:
        if not isinstance(item, dict):
            continue
        last, key = details[-1] if details else {}, DETAIL_TEXT.get(item.get("type"))
        if key and last.get("type") == item["type"] and last.get("index") == item.get("index") \
                and not last.get("signature"):
            for name, value in item.items():
                if name == key and isinstance(value, str):
                    last[key] = (last.get(key) or "") + value
                elif last.get(name) is None:
                    last[name] = value
        else:
            details.append(dict(item))


# -----------------------------------------------------------------------------
# tool calls: what every API's declarations, calls and rounds share
# -----------------------------------------------------------------------------
# Facts and traps per API: each backend's banner below. What holds for all: whether
# the model called tools is read from the calls present, never from a stop reason
# (Gemini says STOP, Ollama stop, some OpenAI-compatible streams say nothing);
# arguments that are "", null or missing mean {}; the model's turn goes back as it
# came, every block, id and signature in its place.

def tool_call(call_id, name, arguments) -> ToolCall:
    """A ToolCall from what a server sent: arguments as an object, as JSON text
    (OpenAI), or nothing ("", null, a missing key: all mean {}). Anything else
    keeps its text in raw_arguments, for run_tool to tell the model."""
    value = arguments
    if arguments is None or isinstance(arguments, str) and not arguments.strip():
        value = {}
    elif isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    call_id = call_id if isinstance(call_id, str) else None
    name = name if isinstance(name, str) else ""
    if isinstance(value, dict):
        return ToolCall(call_id, name, value)
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(call_id, name, {}, raw_arguments=raw)


def declaration(tool: Tool, key: str, parameters: dict) -> dict:
    """A tool as every API declares it: name, description (if any), and its
    parameters under the API's own key."""
    return {"name": tool.name, **({"description": tool.description} if tool.description else {}),
            key: parameters}


def message_calls(message: dict) -> list[ToolCall]:
    """The calls of a chat message's tool_calls (OpenAI's and Ollama's shape)."""
    return [tool_call(c.get("id"), (c.get("function") or {}).get("name"),
                      (c.get("function") or {}).get("arguments"))
            for c in message.get("tool_calls") or ()]


# -----------------------------------------------------------------------------
# JSON answers: one JSON Schema, each backend's native form, the answer parsed
# -----------------------------------------------------------------------------
# No schema library: omega checks that a schema is JSON with known type names
# (the claude CLI silently ignores one it cannot read), puts it where each API
# wants it, and checks only the top-level type of the answer.

SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_HOLDERS = ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "allOf",
                  "not", "if", "then", "else", "contains", "propertyNames", "additionalItems",
                  "unevaluatedItems", "unevaluatedProperties")
CUT_OFF = ("length", "max_tokens", "MAX_TOKENS")           # stop reasons of a cut answer
REFUSED = ("refusal", "content_filter", "SAFETY", "RECITATION", "BLOCKLIST",
           "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY")


def subschemas(schema):
    """schema and every schema inside it, through the keywords that hold schemas."""
    stack, seen = [schema], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        for key in SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in SCHEMA_HOLDERS:
            value = node.get(key)
            stack.extend(value if isinstance(value, list) else [value])


def schema_types(schema: dict) -> list:
    kinds = schema.get("type")
    return [] if kinds is None else kinds if isinstance(kinds, list) else [kinds]


def is_object_schema(schema: dict) -> bool:
    return "object" in schema_types(schema) or "type" not in schema and "properties" in schema


def check_schema(schema) -> None:
    """A ConfigError unless schema is a JSON object whose `type`s are all known."""
    if not isinstance(schema, dict):
        raise ConfigError(f"schema: expected a JSON Schema object, got {type(schema).__name__}")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ConfigError(f"schema: not JSON data ({e})") from None
    for node in subschemas(schema):
        for kind in schema_types(node):
            if not isinstance(kind, str) or kind not in SCHEMA_TYPES:
                raise ConfigError(f"schema: unknown type {kind!r} (known: "
                                  f"{', '.join(SCHEMA_TYPES)})")


def strict_ready(schema: dict) -> bool:
    """True when OpenAI's strict mode takes the schema as it is: an object at the
    top, every object closed (additionalProperties false), all its properties required."""
    if not is_object_schema(schema):
        return False
    for node in subschemas(schema):
        if is_object_schema(node):
            required = node.get("required") or []
            properties = node.get("properties") or {}
            if node.get("additionalProperties") is not False or not isinstance(required, list) \
                    or sorted(str(k) for k in required) != sorted(str(k) for k in properties):
                return False
    return True


def closed(schema):
    """A copy of schema with every object closed (additionalProperties: false), as
    Anthropic's structured output requires; the caller's dict is left alone."""
    if not isinstance(schema, dict):
        return [closed(s) for s in schema] if isinstance(schema, list) else schema
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in SCHEMA_HOLDERS:
        if key in out:
            out[key] = closed(out[key])
    if is_object_schema(out):
        out["additionalProperties"] = False
    return out


def schema_name(schema: dict) -> str:
    """OpenAI's json_schema.name: the schema's title when it fits, else "answer"."""
    title = schema.get("title")
    return title if isinstance(title, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", title) \
        else "answer"


def json_answer(text: str, stop, schema: dict, settings: dict):
    """The answer's JSON value. A refusal is an EmptyResponse; an answer cut off,
    not JSON, or of another type than the schema's is a ProviderError with code
    invalid_json (the raw text in partial_text): never retried, never sent elsewhere."""
    name = settings["name"]
    if stop in REFUSED:
        raise EmptyResponse(f"no JSON answer: the model refused (stop_reason={stop}): {text}",
                            name, reason="refused")
    if stop in CUT_OFF:
        raise invalid_json(settings, f"the JSON answer was cut off (stop_reason={stop}); "
                                     "raise max_tokens", text)
    try:
        value = json.loads(text, parse_constant=not_a_number)
    except (ValueError, RecursionError):
        raise invalid_json(settings, f"the answer is not JSON: {shorten(text, 80)!r}",
                           text) from None
    return of_schema_type(value, schema, settings, text)


def of_schema_type(value, schema: dict, settings: dict, text: str):
    """value, when its JSON type is one the schema's top-level `type` allows."""
    if not type_fits(value, schema):
        kind, kinds = json_type(value), schema_types(schema)
        raise invalid_json(settings, f"the JSON answer is {'an' if kind[0] in 'aeiou' else 'a'} "
                                     f"{kind}, the schema asks for {' or '.join(kinds)}", text)
    return value


def type_fits(value, schema: dict) -> bool:
    """True when value's JSON type is one the schema's top-level `type` allows (an
    integer is a number; 3.0 is an integer)."""
    kinds, kind = schema_types(schema), json_type(value)
    return not kinds or kind in kinds or kind == "integer" and "number" in kinds or \
        kind == "number" and value.is_integer() and "integer" in kinds


def not_a_number(name: str):
    raise ValueError(f"{name} is not JSON")   # Python's json takes NaN and Infinity; JSON not


def json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            type(None): "null"}.get(type(value), "unknown")


def invalid_json(settings: dict, message: str, text: str | None) -> ProviderError:
    return ProviderError(message, settings["name"], code="invalid_json", reason="invalid JSON",
                         partial_text=text or None)


# -----------------------------------------------------------------------------
# openai (and every OpenAI-compatible server)
# -----------------------------------------------------------------------------

def bearer(key: str | None) -> dict:
    """OpenAI's (and OpenRouter's) credential header; none without a key."""
    return {"Authorization": Secret(f"Bearer {key}")} if key else {}


def openai_compatible_request(ctx: Context, settings: dict, streaming: bool = False,
                              tokens_key: str = "max_tokens",
                              image_limits: tuple | None = None) -> tuple[str, dict, dict]:
    """A Chat Completions request for any OpenAI-compatible server. tokens_key: the
    field max_tokens goes in; image_limits: (bytes per image, bytes of all images)."""
    headers = bearer(require_key(settings))
    body = {"model": model_of(ctx, settings), "messages": chat_messages(ctx)}
    max_tokens, temperature = requested(ctx, settings, "max_tokens"), \
        requested(ctx, settings, "temperature")
    if max_tokens is not None:
        body[tokens_key] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    files = attachments_of(ctx, settings)
    if files:
        if image_limits:
            limit_each(settings, files, IMAGE_TYPES, image_limits[0], "an image")
            limit_total(settings, files, IMAGE_TYPES, image_limits[1], "images")
        turn = user_turn(body["messages"])      # the question first, then the files
        turn["content"] = [{"type": "text", "text": turn["content"]}] * bool(turn["content"]) \
            + [openai_part(a) for a in files]
    if ctx.schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": schema_name(ctx.schema), "schema": ctx.schema,
            "strict": strict_ready(ctx.schema)}}
    if streaming:
        body["stream"] = True
        if settings.get("stream_usage", True):      # a server that rejects it: stream_usage = false
            body["stream_options"] = {"include_usage": True}
    return settings["base_url"] + "/chat/completions", headers, body


def openai_request(ctx: Context, settings: dict, streaming: bool = False) -> tuple[str, dict, dict]:
    """What only OpenAI asks: its official endpoint rejects max_tokens for o-series
    and gpt-5 models (other servers know only max_tokens), and it has image limits."""
    official = settings["base_url"] == BACKENDS["openai"].defaults["base_url"]
    url, headers, body = openai_compatible_request(
        ctx, settings, streaming, "max_completion_tokens" if official else "max_tokens",
        image_limits=(20 * MIB, 50 * MIB))
    openai_reasoning_effort(body, ctx.reasoning)
    return url, headers, body


def openai_reasoning_effort(body: dict, reasoning: str | int | None) -> None:
    """Set reasoning_effort in a Chat Completions body. A budget becomes its nearest
    effort. "off" is what the model's family can say nearest to no reasoning: see
    openai_off. DeepSeek's switch is `thinking` (its efforts go beside it)."""
    if reasoning is None:
        return
    model = body["model"].rsplit("/", 1)[-1].lower()
    if model.startswith("deepseek"):
        body["thinking"] = {"type": "disabled" if reasoning == "off" else "enabled"}
        if reasoning == "off":
            return
    effort = openai_off(model) if reasoning == "off" else effort_of(reasoning)
    if effort:
        body["reasoning_effort"] = effort


def openai_off(model: str) -> str | None:
    """The reasoning_effort nearest to none for a model name: "none" for gpt-5.1 and
    later (they refuse "minimal"), "minimal" for gpt-5 (it has no "none"), "low" for
    models that always reason (o-series, codex, gpt-oss), nothing for models that
    do not reason (gpt-4o, gpt-4.1, *-chat-latest: they refuse the field). Any other
    name (a compatible server's model) gets the spec's "none"."""
    if re.match(r"gpt-[34]|chatgpt", model) or "-chat" in model:
        return None
    if re.match(r"o\d", model) or "codex" in model or "gpt-oss" in model:
        return "low"
    return "minimal" if re.match(r"gpt-5(-|$)", model) else "none"


def openai_part(attachment: Attachment) -> dict:
    """An image as a data URL, a PDF as a file part (the only file type Chat
    Completions takes), a text file as text."""
    if is_image(attachment):
        return {"type": "image_url", "image_url": {
            "url": Inline(attachment.data, f"data:{attachment.mime};base64,")}}
    if attachment.mime == PDF:
        return {"type": "file", "file": {"filename": attachment.name, "file_data": Inline(
            attachment.data, f"data:{PDF};base64,")}}
    return {"type": "text", "text": file_block(attachment)}


def openai_response(data: dict, settings: dict) -> OutgoingMessage:
    error_in_answer(data, settings)                    # OpenRouter: an error in a 200
    if not data.get("choices"):
        raise empty_answer(settings, "no choices")
    choice = data["choices"][0]
    message = choice.get("message") or {}
    text, stop = message.get("content"), choice.get("finish_reason")
    if isinstance(text, list):                         # some compatible servers send parts
        text = "".join(p["text"] for p in text if isinstance(p, dict)
                       and isinstance(p.get("text"), str))
    text = answer_text(text, settings)
    if not text and message.get("refusal"):
        text, stop = answer_text(message["refusal"], settings), "refusal"
    if not text and not message.get("tool_calls"):
        raise empty_answer(settings, f"finish_reason={stop}", chat_reasoning(message))
    usage = data.get("usage") or {}
    cached = usage.get("prompt_tokens_details")
    cached = cached if isinstance(cached, dict) else {}    # OpenRouter says writes too
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"),
        stop_reason=stop, cost_usd=usage.get("cost"),
        cache_read_tokens=cached.get("cached_tokens"),
        cache_write_tokens=cached.get("cache_write_tokens")), reasoning=chat_reasoning(message))


def openai_events(chunks, settings: dict):
    """SSE `data:` chunks: the content deltas of choice 0 (by its `index`: a second
    choice is not this answer) are the pieces; a refusal, the tool calls (see
    openai_tool_deltas), the finish reason and the usage chunk (after it, choices
    empty) go into the body; it ends at `data: [DONE]`, with or without a finish
    reason before it (some compatible servers send none, with tool calls too). An
    `error` in any chunk is raised, even with the finish reason "error" (OpenRouter)
    or a [DONE] after it (vLLM). Reasoning deltas are ReasoningPieces, their fields
    kept in the message as they came (chat_reasoning_fold), for openai_round."""
    text, refusal, calls, finish, usage, model, held = [], [], [], None, None, None, {}
    for name, data in sse_events(chunks, settings):
        if data == b"[DONE]":
            message = {"content": "".join(text) or None, "refusal": "".join(refusal),
                       **reasoning_fields(held)}
            if calls:
                message["tool_calls"] = streamed_calls(calls)
            return {"model": model, "usage": usage,
                    "choices": [{"finish_reason": finish, "message": message}]}
        chunk = stream_json(data, settings)
        if name == b"error":                  # old llama.cpp: the error object alone
            raise stream_error({"error": chunk}, settings)
        if not isinstance(chunk, dict) or chunk.get("error") or chunk.get("object") == "error":
            raise stream_error(chunk, settings)
        choices = chunk.get("choices")          # empty in the usage chunk
        if choices:
            choice = choices[0]
            if choice.get("index", 0) != 0:
                choice = next((c for c in choices if c.get("index") == 0), {})
            delta = choice.get("delta") or {}
            thought = chat_reasoning_fold(held, delta)
            if thought:
                yield thought
            piece = delta.get("content")
            if piece and isinstance(piece, str):
                text.append(piece)
                yield piece
            if isinstance(delta.get("refusal"), str):
                refusal.append(delta["refusal"])
            if delta.get("tool_calls"):
                openai_tool_deltas(calls, delta["tool_calls"])
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
        model = chunk.get("model") or model
    raise ended_early(settings)


def openai_tools(tools: list[Tool]) -> list[dict]:
    """body["tools"] for Chat Completions (OpenRouter and Ollama take the same)."""
    return [{"type": "function", "function": declaration(t, "parameters", t.parameters)}
            for t in tools]


def openai_calls(data: dict) -> list[ToolCall]:
    """The calls in a Chat Completions body, in the model's order (arguments arrive
    as JSON text). Whether there are any is the only sign: streams may never say
    finish_reason "tool_calls"."""
    return message_calls((data.get("choices") or [{}])[0].get("message") or {})


def openai_round(data: dict, calls: list[ToolCall]) -> list[dict]:
    """The model's turn as it came, then one `role: tool` message per call. Of the
    answer's message only what a request takes goes back: content (null allowed),
    the reasoning DeepSeek (reasoning_content) and OpenRouter (reasoning_details)
    require on a tool-call turn, and each call's id, type, name and arguments; not
    refusal, annotations, `reasoning` or a call's stream `index`. Empty arguments go
    as "{}": servers that template the history parse them as JSON."""
    message = data["choices"][0]["message"]
    turn = {"role": "assistant", "content": message.get("content")}
    if message.get("reasoning_content") is not None:
        turn["reasoning_content"] = message["reasoning_content"]
    turn["tool_calls"] = [{"id": c.get("id"), "type": c.get("type") or "function", "function": {
        "name": c["function"].get("name"), "arguments": c["function"].get("arguments") or "{}"}}
        for c in message["tool_calls"]]
    if message.get("reasoning_details"):
        turn["reasoning_details"] = message["reasoning_details"]
    return [turn, *({"role": "tool", "tool_call_id": c.id, "content": c.result} for c in calls)]


def openai_tool_deltas(calls: list[dict], deltas) -> None:
    """Fold one chunk's delta.tool_calls into calls (the message's tool_calls as
    they grow; streamed_calls() makes them whole). Only `arguments` is
    concatenated: id, type and name may come again in later deltas (OpenRouter), or
    in every delta with the id in function.id (llama.cpp before May 2025). A delta
    belongs to the last call with its `index`, or to the last call when index is
    null or missing; an id new to that index starts another call (several calls on
    index 0 with distinct ids)."""
    for delta in deltas if isinstance(deltas, list) else ():
        if not isinstance(delta, dict):
            continue
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        index, call_id = delta.get("index"), delta.get("id") or function.get("id")
        call = next((c for c in reversed(calls) if index is None or c["index"] == index), None)
        if call is None or call_id and call["id"] and call_id != call["id"]:
            call = {"index": index, "id": None, "type": delta.get("type") or "function",
                    "function": {"name": "", "arguments": []}}
            calls.append(call)
        call["id"] = call["id"] or call_id
        call["function"]["name"] = call["function"]["name"] or function.get("name") or ""
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"].append(function["arguments"])


def streamed_calls(calls: list[dict]) -> list[dict]:
    """The calls openai_tool_deltas folded, as a non-streamed message holds them:
    each one's argument pieces joined (kept apart while streaming, so that many
    small pieces cost their length, not its square)."""
    return [{**c, "function": {**c["function"], "arguments": "".join(c["function"]["arguments"])}}
            for c in calls]


def openai_compatible_models(settings: dict, call: Call, key: str | None) -> list[str]:
    """GET {base_url}/models with key, if any: the ids. OpenRouter's list may come
    in pages (links.next), which are followed on the same server only: a next link
    elsewhere would take the key with it."""
    headers = bearer(key)
    url, names = settings["base_url"] + "/models", []
    for _ in range(MAX_PAGES):
        data = request_json("GET", url, headers, None, settings, call)[0]
        names += [m.get("id") for m in data["data"]]
        link = (data.get("links") or {}).get("next")
        if not link:
            return names
        url = urljoin(url, link)
        if urlsplit(url)[:2] != urlsplit(settings["base_url"])[:2]:
            raise ProviderError("the model list's next page is on another server; not "
                                "following it", settings["name"])
    raise too_many_pages(settings)


def openai_models(settings: dict, call: Call) -> list[str]:
    """GET {base_url}/models with the key require_key() asks for."""
    return openai_compatible_models(settings, call, require_key(settings))


# -----------------------------------------------------------------------------
# openrouter (the OpenAI format, plus attribution headers and cost)
# -----------------------------------------------------------------------------

def openrouter_request(ctx: Context, settings: dict,
                       streaming: bool = False) -> tuple[str, dict, dict]:
    url, headers, body = openai_compatible_request(ctx, settings, streaming)
    if ctx.schema is not None:       # else a provider that cannot follow it may be chosen
        body["provider"] = {"require_parameters": True}
    if ctx.reasoning is not None:    # its own object, which it translates for every upstream
        body["reasoning"] = {"max_tokens": ctx.reasoning} if type(ctx.reasoning) is int \
            else {"effort": "none" if ctx.reasoning == "off" else ctx.reasoning}
    if settings.get("referer"):
        headers["HTTP-Referer"] = settings["referer"]
    if settings.get("title"):
        headers["X-OpenRouter-Title"] = settings["title"]
    return url, headers, body


def openrouter_models(settings: dict, call: Call) -> list[str]:
    """OpenRouter lists its models without a key."""
    return openai_compatible_models(settings, call, settings.get("api_key"))


openrouter_response = openai_response   # usage.cost and errors-in-200 are handled there
openrouter_events = openai_events       # its `: OPENROUTER PROCESSING` comments are skipped


# -----------------------------------------------------------------------------
# anthropic
# -----------------------------------------------------------------------------

def anthropic_headers(settings: dict) -> dict:
    return {"x-api-key": require_key(settings), "anthropic-version": "2023-06-01"}


def anthropic_request(ctx: Context, settings: dict,
                      streaming: bool = False) -> tuple[str, dict, dict]:
    headers = anthropic_headers(settings)
    system, messages = ctx.to_api_messages()
    body = {"model": model_of(ctx, settings),
            "max_tokens": requested(ctx, settings, "max_tokens"), "messages": messages}
    if system:
        body["system"] = system
    if requested(ctx, settings, "temperature") is not None:
        body["temperature"] = requested(ctx, settings, "temperature")
    files = attachments_of(ctx, settings)
    if files:
        limit_each(settings, files, IMAGE_TYPES, 5 * MIB, "an image as base64",
                   size=wire_size)
        limit_total(settings, files, None, 32 * MIB, "attachments as base64", size=wire_size)
        turn = user_turn(messages)              # files first, as Anthropic advises
        turn["content"] = [anthropic_block(a) for a in files] \
            + [{"type": "text", "text": turn["content"]}] * bool(turn["content"])
    if ctx.schema is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": closed(ctx.schema)}}
    anthropic_thinking(body, ctx.reasoning, settings)
    if streaming:
        body["stream"] = True
    return settings["base_url"] + "/v1/messages", headers, body


def anthropic_thinking(body: dict, reasoning: str | int | None, settings: dict) -> None:
    """Set `thinking` in a Messages body (after output_config, which it extends).
    Manual (the default): type enabled with budget_tokens, max_tokens raised above
    the budget by the room the answer had. With `thinking = "adaptive"` in the
    section: type adaptive and output_config.effort, a budget as its nearest effort.
    Thinking text is asked for as "summarized" (Opus 4.7 and later omit it unless
    asked). "off" is type disabled; with adaptive thinking it is no `thinking` at
    all, which is the API's default, since adaptive-only models refuse "disabled".
    A temperature with thinking is a ConfigError: the API refuses it."""
    if reasoning is None or reasoning == "off" and settings.get("thinking") == "adaptive":
        return
    if reasoning == "off":
        body["thinking"] = {"type": "disabled"}
        return
    if body.get("temperature") is not None:
        raise ConfigError(f"{settings['name']}: a temperature cannot go with reasoning "
                          f"(the API takes none with thinking): leave temperature unset or "
                          f'use reasoning="off"')
    if settings.get("thinking") == "adaptive":
        body["thinking"] = {"type": "adaptive", "display": "summarized"}
        body.setdefault("output_config", {})["effort"] = effort_of(reasoning)
        return
    budget = thinking_budget(reasoning)
    body["thinking"] = {"type": "enabled", "budget_tokens": budget, "display": "summarized"}
    if body["max_tokens"] <= budget:
        body["max_tokens"] += budget


def anthropic_block(attachment: Attachment) -> dict:
    """A Messages API content block (the claude CLI forwards the same ones): an
    image, a PDF document, or a text document, each with its name as title."""
    if is_image(attachment):
        return {"type": "image", "source": {"type": "base64", "media_type": attachment.mime,
                                            "data": Inline(attachment.data)}}
    if attachment.mime == PDF:
        source = {"type": "base64", "media_type": PDF, "data": Inline(attachment.data)}
    else:
        source = {"type": "text", "media_type": "text/plain", "data": attachment_text(attachment)}
    return {"type": "document", "source": source, "title": attachment.name}


def anthropic_response(data: dict, settings: dict) -> OutgoingMessage:
    text = "".join(answer_text(b.get("text"), settings) for b in data.get("content") or ()
                   if isinstance(b, dict) and b.get("type") == "text")
    stop = data.get("stop_reason")
    if not text and not anthropic_calls(data):
        details = data.get("stop_details") or {}
        why = f"stop_reason={stop}" + (f", {details['category']}" if details.get("category") else "")
        raise empty_answer(settings, why, anthropic_reasoning(data.get("content")))
    usage = data.get("usage") or {}
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=anthropic_input_tokens(usage), output_tokens=usage.get("output_tokens"),
        stop_reason=stop, cache_read_tokens=usage.get("cache_read_input_tokens"),
        cache_write_tokens=usage.get("cache_creation_input_tokens")),
        reasoning=anthropic_reasoning(data.get("content")))


def anthropic_reasoning(content: list | None) -> str | None:
    """The text of the thinking blocks in Messages API content: an answer's, or a
    claude CLI assistant message's. redacted_thinking is opaque (kept only for the
    round trip); a block sent with display "omitted" has empty text."""
    return "".join(b["thinking"] for b in content or () if isinstance(b, dict)
                   and b.get("type") == "thinking" and isinstance(b.get("thinking"), str)) \
        or None


def thinking_delta(event: dict) -> str | None:
    """The reasoning piece of one Messages API stream event (the claude CLI's
    stream_event lines carry the same events): a thinking_delta's text. A
    signature_delta is no text; an empty delta happens."""
    delta = event.get("delta") if event.get("type") == "content_block_delta" else None
    if isinstance(delta, dict) and delta.get("type") == "thinking_delta" \
            and isinstance(delta.get("thinking"), str):
        return delta["thinking"] or None
    return None


def anthropic_events(chunks, settings: dict):
    """`event:` + `data:` pairs: text_delta pieces, thinking_delta ReasoningPieces
    (signatures and tool input are neither); every content block as a non-streamed answer holds
    it (see anthropic_block_event); the message from message_start, its stop reason
    and usage from message_delta (cumulative: replaced, never added); it ends at
    message_stop. `event: error` (overloaded_error …) is raised."""
    message, usage, content, growing = {}, {}, [], collections.defaultdict(list)
    for name, data in sse_events(chunks, settings):
        if name == b"ping":
            continue
        event = stream_json(data, settings)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "content_block_delta" or kind == "content_block_start":
            piece = anthropic_block_event(content, growing, event)
            if piece:
                yield piece
        elif kind == "error" or name == b"error":
            raise stream_error(event, settings)
        elif kind == "message_start":
            message = dict(event.get("message") or {})
            usage = dict(message.get("usage") or {})
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            message.update((k, delta[k]) for k in ("stop_reason", "stop_details") if k in delta)
            usage.update(event.get("usage") or {})
        elif kind == "message_stop":
            return {**message, "usage": usage, "content": anthropic_blocks(content, growing)}
    raise ended_early(settings)


# Which field of a content_block_delta grows which field of its block.
ANTHROPIC_DELTAS = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
                    "signature_delta": ("signature", "signature"),
                    "input_json_delta": ("partial_json", "input")}


def anthropic_block_event(content: list, growing: dict, event: dict) -> str | None:
    """Fold one content_block_start or _delta event into content, the blocks a
    non-streamed body would hold: the start brings each block whole but empty (a
    tool_use's `input: {}` there is a placeholder); text, thinking, signature and
    partial_json deltas grow it, their pieces held in growing (a defaultdict(list)
    of (index, field) -> pieces) until anthropic_blocks() joins them. Returns a
    text_delta's text (the answer's piece) or a thinking_delta's (a ReasoningPiece)."""
    if event["type"] == "content_block_start":
        content.append(dict(event["content_block"]))
        return None
    delta = event.get("delta") or {}
    source, target = ANTHROPIC_DELTAS.get(delta.get("type"), (None, None))
    value = delta.get(source)
    if not isinstance(value, str):
        return None
    growing[event["index"], target].append(value)
    return value if source == "text" else ReasoningPiece(value) if source == "thinking" else None


def anthropic_blocks(content: list, growing: dict) -> list:
    """content with the pieces of growing joined into their blocks: a tool_use's
    input parsed from its partial_json (none, or "", is {}; text that is not a JSON
    object stays a str, for anthropic_calls to report)."""
    for (index, target), pieces in growing.items():
        block, text = content[index], "".join(pieces)
        if target != "input":
            block[target] = (block.get(target) or "") + text
            continue
        try:
            value = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError):
            value = None
        block["input"] = value if isinstance(value, dict) else text
    return content


def anthropic_tools(tools: list[Tool]) -> list[dict]:
    """body["tools"] for the Messages API."""
    return [declaration(t, "input_schema", t.parameters) for t in tools]


def anthropic_calls(data: dict) -> list[ToolCall]:
    """The tool_use blocks of a Messages body (input is an object; a str input is
    streamed text that was not JSON, see anthropic_blocks)."""
    return [tool_call(b.get("id"), b.get("name"), b.get("input"))
            for b in data.get("content") or () if isinstance(b, dict)
            and b.get("type") == "tool_use"]


def anthropic_round(data: dict, calls: list[ToolCall]) -> list[dict]:
    """The assistant turn with every block as it came (thinking and its signature,
    redacted_thinking, text, tool_use with its id and caller), in order: a changed
    or missing thinking block is a 400. Then ONE user turn holding one tool_result
    per call, is_error on failures. Only a tool_use whose streamed input was not
    JSON changes: it goes back with input {} (the API wants an object)."""
    blocks = [{**b, "input": {}} if b.get("type") == "tool_use" and isinstance(b.get("input"), str)
              else b for b in data["content"]]
    results = [{"type": "tool_result", "tool_use_id": c.id, "content": c.result,
                **({"is_error": True} if c.error else {})} for c in calls]
    return [{"role": "assistant", "content": blocks}, {"role": "user", "content": results}]


def anthropic_models(settings: dict, call: Call) -> list[str]:
    """GET /v1/models, 1,000 a page, after_id = the last page's last_id while has_more."""
    headers = anthropic_headers(settings)
    names, after = [], None
    for _ in range(MAX_PAGES):
        url = settings["base_url"] + "/v1/models?limit=1000" + \
            (f"&after_id={quote(after, safe='')}" if after else "")
        data = request_json("GET", url, headers, None, settings, call)[0]
        names += [m.get("id") for m in data["data"]]
        last = data.get("last_id")
        if not data.get("has_more") or not isinstance(last, str) or last == after:
            return names
        after = last
    raise too_many_pages(settings)


def anthropic_input_tokens(usage: dict) -> int | None:
    """All input: fresh tokens plus cache writes plus cache reads (the claude CLI
    reports the same usage object)."""
    if count(usage.get("input_tokens")) is None:
        return None
    return sum(count(usage.get(k)) or 0 for k in ("input_tokens", "cache_creation_input_tokens",
                                                  "cache_read_input_tokens"))


# -----------------------------------------------------------------------------
# gemini
# -----------------------------------------------------------------------------

def gemini_headers(settings: dict) -> dict:
    # The key travels in a header: URLs end up in proxy logs and tracebacks.
    return {"x-goog-api-key": require_key(settings)}


def gemini_request(ctx: Context, settings: dict,
                   streaming: bool = False) -> tuple[str, dict, dict]:
    headers = gemini_headers(settings)
    system, messages = ctx.to_api_messages()
    files = attachments_of(ctx, settings)
    if files:
        for attachment in files:
            if attachment.mime == "image/gif":
                raise refuse(settings, attachment, "Gemini takes PNG, JPEG and WebP images, "
                                                   "not GIF")
        limit_each(settings, files, (PDF,), 50 * MIB, "a PDF sent inline")
        limit_total(settings, files, None, 100 * MIB, "inline data as base64", size=wire_size)
        user_turn(messages)
    body = {"contents": [{"role": "model" if m["role"] == "assistant" else "user",
                          "parts": [{"text": m["content"]}] * bool(m["content"])}
                         for m in messages]}
    if files:                                   # the files, then the question
        body["contents"][-1]["parts"][:0] = [gemini_part(a) for a in files]
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config = {}
    if requested(ctx, settings, "max_tokens") is not None:
        config["maxOutputTokens"] = requested(ctx, settings, "max_tokens")
    if requested(ctx, settings, "temperature") is not None:
        config["temperature"] = requested(ctx, settings, "temperature")
    if ctx.schema is not None:
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = {k: v for k, v in ctx.schema.items() if k != "$schema"}
    model = model_of(ctx, settings)
    gemini_thinking(config, ctx.reasoning, model)
    if config:
        body["generationConfig"] = config
    model = quote(model.removeprefix("models/"), safe="")
    method = "streamGenerateContent?alt=sse" if streaming else "generateContent"
    return f"{settings['base_url']}/v1beta/models/{model}:{method}", headers, body


def gemini_thinking(config: dict, reasoning: str | int | None, model: str) -> None:
    """Set thinkingConfig in a generationConfig. By the model name: Gemini 3 and
    later take thinkingLevel, 2.5 (and a name without a version: an alias such as
    gemini-flash-latest, which Gemini 3 also serves with a budget) take
    thinkingBudget; never both (400). Models before 2.5 do not think, and None is
    the model's default: nothing. includeThoughts asks for the thought summaries.
    "off": budget 0, level MINIMAL; Pro models cannot stop thinking, so their
    least (budget 128, level LOW)."""
    found = re.search(r"gemini-(\d+(?:\.\d+)?)", model)
    version = float(found[1]) if found else None
    if reasoning is None or version is not None and version < 2.5:
        return
    pro = "-pro" in model
    if version is not None and version >= 3:
        level = ("LOW" if pro else "MINIMAL") if reasoning == "off" \
            else effort_of(reasoning).upper()
        config["thinkingConfig"] = {"thinkingLevel": level}
    else:
        budget = (128 if pro else 0) if reasoning == "off" \
            else EFFORT_BUDGETS.get(reasoning, reasoning)
        config["thinkingConfig"] = {"thinkingBudget": budget}
    if reasoning != "off":
        config["thinkingConfig"]["includeThoughts"] = True


def gemini_part(attachment: Attachment) -> dict:
    if is_text(attachment):
        return {"text": file_block(attachment)}
    return {"inlineData": {"mimeType": attachment.mime, "data": Inline(attachment.data)}}


def gemini_response(data: dict, settings: dict) -> OutgoingMessage:
    if not data.get("candidates"):
        feedback = data.get("promptFeedback") or {}
        why = f"prompt blocked: {feedback.get('blockReason', 'no candidates')}"
        if feedback.get("blockReasonMessage"):
            why += f": {feedback['blockReasonMessage']}"
        raise empty_answer(settings, why)
    candidate = data["candidates"][0]
    parts = (candidate.get("content") or {}).get("parts") or ()
    text = "".join(answer_text(p.get("text"), settings) for p in parts if not p.get("thought"))
    stop = candidate.get("finishReason")
    if not text and not any("functionCall" in p for p in parts):
        why = f"finishReason={stop}"
        if candidate.get("finishMessage"):
            why += f": {candidate['finishMessage']}"
        raise empty_answer(settings, why, gemini_reasoning(parts))
    usage = data.get("usageMetadata")
    tokens_in, tokens_out = gemini_token_counts(usage)
    cached = count(usage.get("cachedContentTokenCount")) if isinstance(usage, dict) else None
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("modelVersion") or settings["model"],
        input_tokens=tokens_in, output_tokens=tokens_out, stop_reason=stop,
        request_id=data.get("responseId"),
        # a count of 0 is left out: next to the input count, a missing one is 0
        cache_read_tokens=cached if cached is not None or tokens_in is None else 0),
        reasoning=gemini_reasoning(parts))


def gemini_reasoning(parts) -> str | None:
    """The thought summaries among Gemini parts (`thought: true`, sent only with
    includeThoughts)."""
    return "".join(p["text"] for p in parts or () if isinstance(p, dict) and p.get("thought")
                   and isinstance(p.get("text"), str)) or None


def gemini_events(chunks, settings: dict):
    """`data:` events (CRLF), each a whole GenerateContentResponse holding only new
    parts: non-thought text parts are the pieces, thought parts ReasoningPieces;
    every part goes into the body's
    model turn (see gemini_turn); usage is the last snapshot seen. No end marker but
    a finishReason (or a blocked prompt) before the body ends; a turn that calls
    tools says STOP too. An error arrives as a bare JSON object outside any `data:`
    field."""
    parts, candidate, feedback, usage, model, response_id = [], {}, {}, None, None, None
    for name, data in sse_events(chunks, settings):
        chunk = stream_json(data, settings)
        if name == b"raw" or not isinstance(chunk, dict) or "error" in chunk:
            raise stream_error(chunk, settings)
        candidates = chunk.get("candidates")
        if candidates:
            candidate = candidates[0]            # the last one holds the finish reason
            for part in (candidate.get("content") or {}).get("parts") or ():
                parts.append(part)
                piece = part.get("text")
                if piece and isinstance(piece, str):
                    yield ReasoningPiece(piece) if part.get("thought") else piece
        feedback = chunk.get("promptFeedback") or feedback
        usage = chunk.get("usageMetadata") or usage
        model = chunk.get("modelVersion") or model
        response_id = chunk.get("responseId") or response_id
    if not candidate.get("finishReason") and not feedback.get("blockReason"):
        raise ended_early(settings)
    body = {"usageMetadata": usage, "modelVersion": model, "responseId": response_id,
            "promptFeedback": feedback}
    if candidate:
        body["candidates"] = [{**candidate, "content": {"role": "model",
                                                        "parts": gemini_turn(parts)}}]
    return body


def gemini_turn(parts: list) -> list:
    """The parts of a streamed model turn as a non-streamed body holds them, and as
    they must go back: every part as it came and in order (a functionCall part
    arrives whole, with its thoughtSignature; Gemini 3 refuses a turn whose
    signature moved); only runs of plain text pieces of one kind (thought or answer)
    are joined."""
    turn = []
    for kind, run in itertools.groupby(parts, gemini_text_kind):
        if kind is True or kind is False:
            run = list(run)
            turn.append({**run[0], "text": "".join(p["text"] for p in run)} if len(run) > 1
                        else run[0])
        else:
            turn += run
    return turn


GEMINI_PLAIN_KEYS = frozenset(("text", "thought"))


def gemini_text_kind(part: dict):
    """Whether a plain text part is thought (True) or answer (False); any other
    part is its own kind (itself)."""
    if part.keys() <= GEMINI_PLAIN_KEYS and isinstance(part.get("text"), str):
        return bool(part.get("thought"))
    return part


def gemini_tools(tools: list[Tool]) -> list[dict]:
    """body["tools"]: the declarations with `parametersJsonSchema` (plain JSON Schema,
    as sent to the other APIs) rather than `parameters`, an OpenAPI subset that
    refuses type lists, additionalProperties, $ref and (Gemini 3) a property without
    a type, and fails the whole request for one such tool. `$schema` is left out,
    as for responseJsonSchema."""
    return [{"functionDeclarations": [declaration(t, "parametersJsonSchema", {
        k: v for k, v in t.parameters.items() if k != "$schema"}) for t in tools]}]


def gemini_calls(data: dict) -> list[ToolCall]:
    """The functionCall parts of the first candidate: `args` may be absent, `id`
    is usually absent. finishReason says STOP either way."""
    parts = ((data.get("candidates") or [{}])[0].get("content") or {}).get("parts") or ()
    return [tool_call(p["functionCall"].get("id"), p["functionCall"].get("name"),
                      p["functionCall"].get("args")) for p in parts
            if isinstance(p, dict) and isinstance(p.get("functionCall"), dict)]


def gemini_round(data: dict, calls: list[ToolCall]) -> list[dict]:
    """The model turn with every part as it came (thought parts, empty text parts,
    each thoughtSignature on its own part: Gemini 3 answers 400 without it), then
    ONE user turn of functionResponse parts, in call order; `response` must be an
    object: {"result": text} or {"error": text}; `id` when the call had one."""
    return [{"role": "model", "parts": data["candidates"][0]["content"]["parts"]},
            {"role": "user", "parts": [{"functionResponse": {
                "name": c.name, "response": {"error" if c.error else "result": c.result},
                **({"id": c.id} if c.id else {})}} for c in calls]}]


def gemini_models(settings: dict, call: Call) -> list[str]:
    """GET /v1beta/models, 1,000 a page, while there is a nextPageToken: the models
    that can generateContent (the list holds embedding and image models too)."""
    headers = gemini_headers(settings)
    names, token = [], None
    for _ in range(MAX_PAGES):
        url = settings["base_url"] + "/v1beta/models?pageSize=1000" + \
            (f"&pageToken={quote(token, safe='')}" if token else "")
        data = request_json("GET", url, headers, None, settings, call)[0]
        names += [m.get("name", "").removeprefix("models/") for m in data.get("models") or ()
                  if "generateContent" in (m.get("supportedGenerationMethods") or ())]
        last, token = token, data.get("nextPageToken")
        if not token or not isinstance(token, str) or token == last:
            return names
    raise too_many_pages(settings)


def gemini_token_counts(usage) -> tuple:
    """(input, output): output counts thinking too; zero counts are left out."""
    if not isinstance(usage, dict):
        return None, None
    answer, thoughts = count(usage.get("candidatesTokenCount")), \
        count(usage.get("thoughtsTokenCount"))
    output = None if answer is None and thoughts is None else (answer or 0) + (thoughts or 0)
    return token_counts(usage.get("promptTokenCount"), output)


# -----------------------------------------------------------------------------
# ollama
# -----------------------------------------------------------------------------

def ollama_request(ctx: Context, settings: dict, streaming: bool = False) -> tuple[str, dict, dict]:
    body = {"model": model_of(ctx, settings), "messages": chat_messages(ctx),
            "stream": streaming}      # Ollama streams unless told not to
    files = attachments_of(ctx, settings)
    if files:
        for attachment in files:
            if attachment.mime == PDF:
                raise refuse(settings, attachment, "Ollama's /api/chat takes images and text "
                                                   "files, not PDFs")
        turn = user_turn(body["messages"])      # text files after the question
        turn["content"] = "\n\n".join([turn["content"]] * bool(turn["content"])
                                       + [file_block(a) for a in files if is_text(a)])
        images = [Inline(a.data) for a in files if is_image(a)]     # raw base64, no data: URL
        if images:
            turn["images"] = images
    if ctx.schema is not None:
        body["format"] = ctx.schema
    options = {"num_predict": requested(ctx, settings, "max_tokens"),
               "temperature": requested(ctx, settings, "temperature"),
               "num_ctx": settings.get("num_ctx")}
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        body["options"] = options
    if settings.get("keep_alive") is not None:
        body["keep_alive"] = settings["keep_alive"]
    # `think`: an effort as its level (a budget as the nearest), "off" as false, but
    # gpt-oss ignores false and cannot stop thinking: "low". Unset (None), the server
    # turns thinking on for the models that can think.
    if ctx.reasoning == "off":
        body["think"] = "low" if "gpt-oss" in body["model"] else False
    elif ctx.reasoning is not None:
        body["think"] = effort_of(ctx.reasoning)
    return settings["base_url"] + "/api/chat", {}, body


def ollama_response(data: dict, settings: dict) -> OutgoingMessage:
    message = data.get("message") or {}
    text = answer_text(message.get("content"), settings)      # not `thinking`
    if not text and not message.get("tool_calls"):
        raise empty_answer(settings, f"done_reason={data.get('done_reason')}",
                           chat_reasoning(message))
    tokens_in, tokens_out = token_counts(data.get("prompt_eval_count"), data.get("eval_count"))
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=tokens_in, output_tokens=tokens_out, stop_reason=data.get("done_reason")),
        reasoning=chat_reasoning(message))


def ollama_events(chunks, settings: dict):
    """NDJSON lines: message.content pieces, message.thinking ReasoningPieces (kept in
    the message for ollama_round); tool calls, each whole on a line before the last;
    the last line has `done: true`, the stop reason and the counts. An `{"error"}`
    line is raised."""
    text, calls, held = [], [], {}
    for line in ndjson_lines(chunks, settings):
        data = stream_json(line, settings)
        if not isinstance(data, dict) or data.get("error"):
            raise stream_error(data, settings)
        message = data.get("message") or {}
        thought = chat_reasoning_fold(held, message)
        if thought:
            yield thought
        piece = message.get("content")
        if piece and isinstance(piece, str):
            text.append(piece)
            yield piece
        if "tool_calls" in message and isinstance(message["tool_calls"], list):
            calls += message["tool_calls"]
        if data.get("done"):
            message = {"role": "assistant", "content": "".join(text), **reasoning_fields(held)}
            if calls:
                message["tool_calls"] = calls
            return {**data, "message": message}
    raise ended_early(settings)


def ollama_calls(data: dict) -> list[ToolCall]:
    """message.tool_calls: arguments an object; `id` only since Ollama 0.12.10."""
    return message_calls(data.get("message") or {})


def ollama_round(data: dict, calls: list[ToolCall]) -> list[dict]:
    """The assistant message as it came (content, thinking, tool_calls), then one
    `role: tool` message per call with tool_name, and tool_call_id when it had one."""
    return [data["message"], *({"role": "tool", "content": c.result, "tool_name": c.name,
                                **({"tool_call_id": c.id} if c.id else {})} for c in calls)]


def ollama_models(settings: dict, call: Call) -> list[str]:
    """GET /api/tags: the models pulled on this server."""
    data = request_json("GET", settings["base_url"] + "/api/tags", {}, None, settings, call)[0]
    return [m.get("name") or m.get("model") for m in data["models"]]


def ollama_host(value: str) -> str:
    """OLLAMA_HOST may be 'host', 'host:port' or a URL; make it a URL with a port."""
    url = value if "://" in value else "http://" + value
    scheme, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    if not host.rsplit("]", 1)[-1].count(":"):    # no port (IPv6 brackets aside)
        host += ":11434"
    return f"{scheme}://{host}{slash}{path}"


# -----------------------------------------------------------------------------
# claude-code (the local `claude` CLI, run as a subprocess: see 6)
# -----------------------------------------------------------------------------

RESUME_PROMPT = "Continue where you left off. Complete the remaining work."
# The longest one command-line argument may be (Linux: MAX_ARG_STRLEN, 32 pages,
# its closing NUL included). The CLI takes a schema only as the value of
# --json-schema, so a longer one cannot reach it.
MAX_ARG_BYTES = 32 * 4096 - 1
MODEL_ALIASES = ("sonnet", "opus", "haiku")   # what `claude --model` takes besides full names
TURN_SEPARATOR = "\n\n---\n\n"   # between the texts of resumed runs


def claude_code_argv(ctx: Context, settings: dict, session_id: str | None,
                     streaming: bool = False, files: bool = False,
                     tools: ToolServer | None = None) -> list[str]:
    """files: the prompt comes as a stream-json message (claude_code_stdin), which the
    CLI reads only with stream-json output, and that only with --verbose. Reasoning
    asked for is read from the same events: --output-format json carries none.
    tools: the MCP config that gives the CLI the bridge and the MCP servers."""
    output = ["stream-json", "--verbose", "--include-partial-messages"] if streaming else \
        ["stream-json", "--verbose"] if files or thinks(ctx) else ["json"]
    argv = [*shlex.split(settings["command"]), "-p",
            *(["--input-format", "stream-json"] if files else []), "--output-format", *output,
            "--max-turns", str(ctx.max_turns or settings["max_turns"]),
            "--model", model_of(ctx, settings)]
    if session_id:
        argv += ["--resume", session_id]
    if settings["skip_permissions"]:
        argv.append("--dangerously-skip-permissions")
    if ctx.schema is not None:
        argv += ["--json-schema", claude_code_schema(ctx.schema, settings)]
    if thinks(ctx):
        argv += ["--effort", effort_of(ctx.reasoning)]
    allowed = list(requested(ctx, settings, "allowed_tools") or ())
    if tools is not None:
        # The config by path (its secret never in an argv), and only it: a server named
        # omega in the user's own MCP settings cannot stand in for the bridge. Its tools
        # must be allowed too, else in -p mode the CLI refuses every call.
        argv += ["--mcp-config", tools.config, "--strict-mcp-config"]
        allowed += tools.allowed
    if allowed:
        # Last and as one word: list flags swallow every following word.
        argv += ["--allowedTools", ",".join(allowed)]
    return argv


def thinks(ctx: Context) -> bool:
    """True when ctx asks for reasoning: an effort or a budget (not None, not "off")."""
    return ctx.reasoning is not None and ctx.reasoning != "off"


def claude_code_thinking(reasoning: str | int | None) -> dict:
    """The environment the CLI gets for a reasoning value, beside --effort (see
    claude_code_argv). Its two knobs work on different models (CLI 2.1.197,
    wire-reasoning.md 8): --effort on adaptive ones, which ignore
    MAX_THINKING_TOKENS except 0; MAX_THINKING_TOKENS on budget ones, which ignore
    --effort. So every value but "off" sets both: an effort and its budget, or a
    budget and its nearest effort. "off" is MAX_THINKING_TOKENS=0, which both obey."""
    if reasoning is None:
        return {}
    return {"MAX_THINKING_TOKENS": "0" if reasoning == "off" else str(thinking_budget(reasoning))}


def claude_code_schema(schema: dict, settings: dict) -> str:
    """The schema as the CLI's --json-schema value: compact JSON, ASCII only; one
    too long for a command-line argument is refused before the CLI runs."""
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_ARG_BYTES:
        raise ConfigError(f"{settings['name']}: the schema is {len(text):,} bytes as JSON; "
                          f"the claude CLI takes it as one command-line argument, which may "
                          f"be at most {MAX_ARG_BYTES:,} bytes (an HTTP provider takes more)")
    return text


def claude_code_stdin(prompt: str, files: list) -> bytes | list[bytes]:
    """What the CLI reads on stdin: the prompt, or with files one stream-json user
    message (the files as Messages API blocks, then the prompt), which the CLI
    forwards to the API as it is. It must come through a pipe: 2.1.197 reads nothing
    from a redirected regular file."""
    if not files:
        return prompt.encode()
    payload = json_payload({"type": "user", "message": {"role": "user", "content": [
        *(anthropic_block(f) for f in files), {"type": "text", "text": prompt}]},
        "parent_tool_use_id": None, "session_id": ""})
    return [*payload, b"\n"] if isinstance(payload, list) else payload + b"\n"


def claude_code_result(code: int, out: str, err: str, settings: dict) -> dict:
    """The CLI's result object (--output-format json), or the error it stands for.
    stdout is parsed whatever the exit code: the CLI exits 1 with valid JSON on errors."""
    name = settings["name"]
    if too_many_objects(out):
        raise dense_json(settings)
    try:
        data = json.loads(out) if out.strip() else None
    except (ValueError, RecursionError):
        if code == 0:                          # not JSON but a clean exit: the answer itself
            return {"subtype": "success", "is_error": False, "result": out.strip()}
        data = None
    if isinstance(data, list):                 # --verbose turns the output into events
        data = next((e for e in reversed(data) if isinstance(e, dict)
                     and e.get("type") == "result"), None)
    if not isinstance(data, dict):
        # The last lines of stderr, else of a stdout that is not JSON (a wrapper or an
        # older CLI may print "Invalid API key · Please run /login" there).
        said = err.strip() or (out.strip() if data is None else "")
        tail = clean(" ".join(said.splitlines()[-3:])[-2000:], 400)
        message = tail or f"exited with code {code} and no result"
        cls = AuthError if looks_like_login_error(message) else ProviderError
        raise cls(message, name)
    return data


def json_or_none(line: bytes | str):
    """The JSON value of a line; None for one that is not JSON or nests too deep."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None                            # some builds print debug lines on stdout


def looks_like_login_error(text: str) -> bool:
    low = text.lower()
    return any(s in low for s in ("not logged in", "/login", "invalid api key",
                                  "failed to authenticate", "oauth token"))


def claude_code_error(data: dict, settings: dict, **context) -> ProviderError:
    """The error an is_error result stands for, by api_error_status and text."""
    name, subtype, session_id = settings["name"], data.get("subtype"), data.get("session_id")
    errors = data.get("errors") if isinstance(data.get("errors"), list) else ()
    message = clean(data.get("result") or "; ".join(str(e) for e in errors) or subtype
                    or "error", 500)
    code = subtype if isinstance(subtype, str) and subtype != "success" else None
    if code == "error_max_structured_output_retries":     # as every other JSON failure
        code = "invalid_json"
    if code and isinstance(session_id, str):      # so the user can --resume it
        message += f" (session_id={session_id})"
    error = error_for(count(data.get("api_error_status")), code, message, name,
                      session_id=session_id, **context)
    if type(error) is ProviderError and looks_like_login_error(message):
        error = AuthError(message, name, error.status, code, session_id=session_id, **context)
    return error


def claude_code_json(result: dict, schema: dict, settings: dict) -> tuple[str, object]:
    """(JSON text, value) of a --json-schema run. The CLI ends with success even
    when the model never gave structured output (it answered in text, or gave up
    after a schema error): then there is no structured_output, which is checked here."""
    text = result.get("result") if isinstance(result.get("result"), str) else ""
    if "structured_output" not in result:
        raise invalid_json(settings, "the CLI returned no structured_output (the model "
                                     f"answered in text: {shorten(text, 80)!r})", text)
    value = result["structured_output"]
    text = text or json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text, of_schema_type(value, schema, settings, text)


def claude_code_metadata(results: list[dict], settings: dict, session_id, ctx) -> MessageMetadata:
    usages = [r.get("usage") if isinstance(r.get("usage"), dict) else {} for r in results]
    model = model_of(ctx, settings)
    used = results[-1].get("modelUsage")
    if isinstance(used, dict) and used and model not in used:   # the CLI names it only here
        def output(name):
            return count((used[name] if isinstance(used[name], dict) else {}).get("outputTokens"))
        model = str(max(used, key=lambda m: output(m) or 0)).split("[")[0]
    return MessageMetadata(
        provider_used=settings["name"], model=model,
        input_tokens=total(anthropic_input_tokens(u) for u in usages),
        output_tokens=total(count(u.get("output_tokens")) for u in usages),
        cache_read_tokens=total(count(u.get("cache_read_input_tokens")) for u in usages),
        cache_write_tokens=total(count(u.get("cache_creation_input_tokens")) for u in usages),
        stop_reason=results[-1].get("stop_reason") or results[-1].get("subtype"),
        session_id=session_id,
        cost_usd=total(r.get("total_cost_usd", r.get("cost_usd")) for r in results),
        num_turns=total(count(r.get("num_turns")) for r in results), attempts=len(results))


def claude_code_events(argv: list[str], stdin: bytes | list[bytes], settings: dict,
                       call: Call, before: str, thoughts: list, env: dict | None = None,
                       tools: ToolServer | None = None):
    """Run the CLI once with stream-json output (env: as start_claude takes it;
    tools: as child_output takes them);
    yield the main agent's text as it is written (before: a piece to send ahead of
    the first one) and its reasoning as ReasoningPieces, each also added to
    thoughts (the call's reasoning so far); return (the result object, whether
    any text was yielded). Only `text_delta`s of the main agent are text: never
    tool input, thinking, or the CLI's synthetic error messages. Its reasoning is
    the `thinking_delta`s of a streamed message, or the thinking blocks of an
    assistant line whose message was not streamed (one block a line: the lines of
    one message join as they are); a later message's, or run's, starts with a
    blank line. A new message's text after earlier text starts with a blank line. A
    text that comes whole, after part of it was streamed (the CLI retries without
    streaming after a mid-stream overload) or only in the `result` line (a CLI that
    streams no deltas, a resumed run), yields what extends the text shown, or if it
    does not extend it, a blank line and the text whole: nothing of the answer goes
    unshown. Reading ends at the `result` line; the CLI then has CLI_EXIT_GRACE_SECS
    to exit before its process group is stopped."""
    child = start_claude(argv, settings, call, env)
    errors: list[bytes] = []
    result, shown, partial, streamed, new_message = None, False, "", set(), False
    started, current, thought_in = set(), None, object()     # for the reasoning
    lines = ndjson_lines(child_output(child, stdin, settings, call, errors, tools), settings)
    try:
        for line in lines:
            if too_many_objects(line):
                raise dense_json(settings, where=" (on the CLI's stdout)")
            event = json_or_none(line)
            if not isinstance(event, dict) or event.get("parent_tool_use_id"):
                continue          # a debug line (some builds); a subagent's work is not the answer
            kind, piece, thought = event.get("type"), "", None
            if kind == "stream_event":
                inner = event.get("event") if isinstance(event.get("event"), dict) else {}
                delta = inner.get("delta") if isinstance(inner.get("delta"), dict) else {}
                if inner.get("type") == "message_start":
                    current = (inner.get("message") or {}).get("id")
                    streamed.add(current)
                    started.add(current)
                    partial, new_message = "", True
                elif delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                    piece = ("\n\n" if new_message and shown else "") + delta["text"]
                    partial += delta["text"]
                    new_message = False
                else:
                    thought, message_id = thinking_delta(inner), current
            elif kind == "assistant" and not event.get("error"):
                message = event.get("message") if isinstance(event.get("message"), dict) else {}
                message_id, own = message.get("id"), message.get("model") != "<synthetic>"
                texts = [b["text"] for b in message.get("content") or () if isinstance(b, dict)
                         and b.get("type") == "text" and isinstance(b.get("text"), str)]
                if own and message_id not in started:
                    thought = anthropic_reasoning(message.get("content"))
                if own and texts and message_id not in streamed:   # one block a line: text's
                    whole = "".join(texts)
                    streamed.add(message_id)
                    piece, partial, new_message = unshown(whole, partial, shown), whole, False
            elif kind == "result":
                result = event
                piece = unshown(claude_code_answer(event, settings), partial, shown)
            if thought:
                if thoughts and message_id != thought_in:
                    thought = "\n\n" + thought
                thought_in = message_id
                thoughts.append(thought)
                yield ReasoningPiece(thought)
            if piece:
                if not shown and before:
                    yield before
                shown = True
                yield piece
            if result is not None:
                break
    finally:
        lines.close()
        if result is not None:          # it normally exits at once; give it the chance
            import subprocess           # already loaded by start_claude
            try:
                child.wait(timeout=max(0.0, min(CLI_EXIT_GRACE_SECS, call.left())))
            except subprocess.TimeoutExpired:
                pass
        stop_group(child, kill_grace(call))
    if result is None:
        err = b"".join(errors).decode(errors="replace")
        if not err.strip():
            raise ended_early(settings)
        result = claude_code_result(child.returncode, "", err, settings)
    return result, shown


def unshown(whole: str, partial: str, shown: bool) -> str:
    """What of a message's whole text is still to show, after partial (the part of
    it streamed so far): the rest, if whole extends partial; else whole, after a
    blank line if anything was shown before."""
    if partial and whole.startswith(partial):
        return whole[len(partial):]
    return ("\n\n" if shown else "") + whole if whole else ""


def claude_code_answer(result: dict, settings: dict) -> str:
    """The answer text of a result object: a success's, or what an older CLI says
    when it stops at max turns; "" for an error."""
    subtype = result.get("subtype")
    if subtype == "error_max_turns" or subtype == "success" and not result.get("is_error"):
        return answer_text(result.get("result"), settings)
    return ""


def claude_code_run(ctx: Context, settings: dict, call: Call, streaming: bool = False,
                    approve: Callable | None = None):
    """claude_code() as a generator (see claude_code_runs). With tools= or
    mcp_servers, the CLI gets them in an MCP config (serve_tools, in 10): the
    user's functions run in this thread while the CLI runs, approve asked before
    each; the reply's tool_calls records them, as does an error after one ran
    (never then sent to a fallback)."""
    servers = requested(ctx, settings, "mcp_servers")
    if not (ctx.tools or servers):
        return (yield from claude_code_runs(ctx, settings, call, streaming))
    with serve_tools(ctx.tools, approve, call, settings["max_tool_result_bytes"],
                     servers or ()) as tools:
        try:
            reply = yield from claude_code_runs(ctx, settings, call, streaming, tools)
        except ProviderError as e:
            if not tools.calls:
                raise
            raise e.with_context(tool_calls=tools.calls) from None
        reply.tool_calls = tools.calls
        return reply


def claude_code_runs(ctx: Context, settings: dict, call: Call, streaming: bool,
                     tools: ToolServer | None = None):
    """The CLI's runs of one call: with streaming, the CLI's text as it is
    written (see claude_code_events), and a TURN_SEPARATOR piece before each
    auto-resumed run's text; returns the OutgoingMessage either way. Attachments
    go with the first run only: a resumed run continues the session that has them
    (their stream-json output is read line by line too, as a stream's).
    With a schema the answer is the CLI's structured_output, not the model's prose
    around it: streamed, its JSON text comes whole at the end. Reasoning asked for
    is read from stream-json events, also when not streaming (then only its
    pieces are yielded while streaming), and set in the environment of every run,
    resumed ones too (claude_code_thinking)."""
    prompt, session_id = ctx.to_prompt_string(), ctx.session_id
    files = attachments_of(ctx, settings)
    live = streaming and ctx.schema is None
    texts, results, resumes, shown = [], [], 0, False
    env, thoughts = claude_code_thinking(ctx.reasoning), []
    while True:
        argv = claude_code_argv(ctx, settings, session_id, live, bool(files), tools)
        log_debug("claude-code: running %s", argv[:4] + ["…"])
        stdin = claude_code_stdin(prompt, files)
        if live:
            data, shown_now = yield from claude_code_events(
                argv, stdin, settings, call, TURN_SEPARATOR if shown else "", thoughts, env,
                tools)
            shown = shown or shown_now
        elif files or thinks(ctx):
            events = claude_code_events(argv, stdin, settings, call, "", thoughts, env, tools)
            data = (yield from after_blank_line(events, False, text=False))[0] if streaming \
                else drain(events)[0]
        else:
            data = claude_code_result(*run_claude(argv, stdin, settings, call, env, tools),
                                      settings)
        results.append(data)
        if isinstance(data.get("session_id"), str):
            session_id = data["session_id"]
        stopped = data.get("subtype") == "error_max_turns"
        done = data.get("subtype") == "success" and not data.get("is_error")
        text = claude_code_answer(data, settings)
        if text:                                   # older CLIs say something when they stop
            texts.append(text)
        if done:
            break
        if not (stopped and session_id and ctx.max_turns is None
                and resumes < settings["max_resume_attempts"]):
            raise claude_code_error(data, settings,
                                    partial_text=TURN_SEPARATOR.join(texts) or None)
        resumes += 1
        wait = settings["resume_delay_secs"] * 2 ** (resumes - 1)
        if wait >= call.left():
            raise timed_out(settings, call, f" (resume {resumes} would pass the deadline; "
                                            f"session_id={session_id})", session_id=session_id)
        call.notify(f"claude-code: reached max turns, resuming ({resumes}/"
                    f"{settings['max_resume_attempts']})")
        call.sleep(wait)
        prompt, files = RESUME_PROMPT, []
    metadata = claude_code_metadata(results, settings, session_id, ctx)
    reasoning = "".join(thoughts) or None
    if ctx.schema is not None:
        text, value = claude_code_json(results[-1], ctx.schema, settings)
        if streaming:
            yield text
        return OutgoingMessage(text, metadata, value, reasoning=reasoning)
    if not texts:
        raise empty_answer(settings, "the CLI returned an empty result")
    return OutgoingMessage(TURN_SEPARATOR.join(texts), metadata, reasoning=reasoning)


def claude_code(ctx: Context, settings: dict, call: Call) -> OutgoingMessage:
    """Run `claude -p` with the prompt on stdin; resume on error_max_turns."""
    return drain(claude_code_run(ctx, settings, call))


def claude_code_models(settings: dict, call: Call) -> list[str]:
    """The CLI lists no models: its aliases, then the configured ones."""
    return [*MODEL_ALIASES, settings["model"], *filter(None, [settings.get("model_complex")])]


# =============================================================================
# 8. The backend table
# =============================================================================
# Everything omega knows about a backend is its entry here: how it is called (and
# for the tool loop, how it declares tools, reads calls and sends results back),
# every config key it accepts (with its default), where its key and base URL may
# come from in the environment, whether it keeps the conversation itself, and
# which readiness check --check runs. Code outside a backend's own functions asks
# the entry, never the name. A new backend is its functions above plus one entry
# below. Its readiness check is named, not referenced (`probe`): the probes call
# the transports and backends, and sit with the diagnostics, below. A backend
# whose key says whether it is ready uses "key"; any other adds its probe to PROBES.

@dataclass(frozen=True)
class Backend:
    defaults: dict                   # every key its config section accepts -> its default
    request: Callable | None = None  # HTTP: (ctx, settings, streaming) -> (url, headers, body)
    response: Callable | None = None  # HTTP: (data, settings) -> OutgoingMessage
    events: Callable | None = None   # HTTP: (chunks, settings) -> pieces, returns data
    run: Callable | None = None      # not HTTP: (ctx, settings, call, streaming, approve)
                                     #   -> pieces, returns OutgoingMessage
    models: Callable | None = None   # (settings, call) -> the model names it offers
    tools: Callable | None = None    # HTTP: (tools) -> body["tools"] (claude-code: its run)
    calls: Callable | None = None    # HTTP: (data) -> the ToolCalls the answer asks for
    round: Callable | None = None    # HTTP: (data, calls) -> the messages that go back
    turns: str = "messages"          # where those messages go in the request body
    key_env: tuple = ()              # environment variables that may hold its API key
    secret_env: tuple = ()           # other variables holding its credentials (redacted)
    base_url_env: str | None = None  # environment variable that may hold its base_url
    base_url_from_env: Callable | None = None  # that variable's value -> a URL (else as is)
    keyless_off_official: bool = False  # no key needed off the official base_url
    sessions: bool = False           # it keeps the conversation: a reply's session_id is
                                     #   resumed instead of the turns being sent again
    probe: str = "key"               # its readiness check, a name in PROBES (Diagnostics):
                                     #   "key" is a key there or none needed, no request

    def call(self, ctx: Context, settings: dict, call: Call) -> OutgoingMessage:
        """One call of ctx (PROVIDERS, classify): no fallback, and on an HTTP backend no
        tool loop (claude-code's CLI runs ctx.tools and MCP servers itself)."""
        check_reasoning(ctx.reasoning)      # answer() checks it for the other calls
        return drain(self.run(ctx, settings, call)) if self.run \
            else call_http(self, self.request(ctx, settings), settings, call, ctx.schema)[0]


_COMMON = {"enabled": True, "model_complex": None, "max_tokens": None, "temperature": None,
           "max_response_bytes": 32 * 1024 * 1024, "max_attachment_bytes": 32 * 1024 * 1024,
           "prices": None, "max_tool_result_bytes": 65536, "allowed_tools": [],
           "working_dir": None, "mcp_servers": []}
_HTTP = {**_COMMON, "timeout_secs": 600, "max_retries": 2, "max_turns": 10}
_KEYED = {**_HTTP, "api_key": None, "api_key_env": None}

BACKENDS = {
    "claude-code": Backend(
        run=claude_code_run, models=claude_code_models, sessions=True, probe="claude-code",
        secret_env=("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"),
        defaults={**_COMMON, "model": "claude-sonnet-4-6", "model_complex": "claude-opus-4-6",
                  "timeout_secs": 3600, "command": "claude", "max_turns": 25,
                  "skip_permissions": False, "max_resume_attempts": 5,
                  "resume_delay_secs": 2, "oauth_token": None}),
    "ollama": Backend(
        request=ollama_request, response=ollama_response, events=ollama_events,
        tools=openai_tools, calls=ollama_calls, round=ollama_round,
        models=ollama_models, probe="ollama",
        base_url_env="OLLAMA_HOST", base_url_from_env=ollama_host,
        defaults={**_HTTP, "model": "llama3", "base_url": "http://localhost:11434",
                  "num_ctx": None, "keep_alive": None}),
    "openai": Backend(
        request=openai_request, response=openai_response, events=openai_events,
        tools=openai_tools, calls=openai_calls, round=openai_round,
        models=openai_models, key_env=("OPENAI_API_KEY",),
        base_url_env="OPENAI_BASE_URL",
        keyless_off_official=True,
        defaults={**_KEYED, "model": "gpt-4o", "base_url": "https://api.openai.com/v1",
                  "stream_usage": True}),
    "anthropic": Backend(
        request=anthropic_request, response=anthropic_response, events=anthropic_events,
        tools=anthropic_tools, calls=anthropic_calls, round=anthropic_round,
        models=anthropic_models,
        key_env=("ANTHROPIC_API_KEY",), base_url_env="ANTHROPIC_BASE_URL",
        defaults={**_KEYED, "model": "claude-sonnet-4-20250514", "max_tokens": 8192,
                  "base_url": "https://api.anthropic.com", "thinking": "enabled"}),
    "openrouter": Backend(
        request=openrouter_request, response=openrouter_response, events=openrouter_events,
        tools=openai_tools, calls=openai_calls, round=openai_round,
        models=openrouter_models, key_env=("OPENROUTER_API_KEY",),
        defaults={**_KEYED, "model": "anthropic/claude-sonnet-4",
                  "base_url": "https://openrouter.ai/api/v1", "referer": None, "title": None,
                  "stream_usage": True}),
    "gemini": Backend(
        request=gemini_request, response=gemini_response, events=gemini_events,
        tools=gemini_tools, calls=gemini_calls, round=gemini_round, turns="contents",
        models=gemini_models,
        key_env=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        defaults={**_KEYED, "model": "gemini-2.0-flash",
                  "base_url": "https://generativelanguage.googleapis.com"}),
}

NAMES = tuple(BACKENDS)
DEFAULTS = {name: backend.defaults for name, backend in BACKENDS.items()}
SCHEMA = {name: {key: KEY_TYPES[key] for key in backend.defaults}
          for name, backend in BACKENDS.items()}
SECRET_ENV = tuple(dict.fromkeys(var for backend in BACKENDS.values()
                                 for var in (*backend.key_env, *backend.secret_env)))


def provider_function(name: str) -> Callable:
    """PROVIDERS[name]: fn(ctx, settings) -> OutgoingMessage, with settings from
    provider_settings(); the deadline starts when it is called."""
    backend = BACKENDS[name]

    def call(ctx: Context, settings: dict) -> OutgoingMessage:
        return backend.call(ctx, settings, Call.starting_now(settings["timeout_secs"]))
    call.__name__ = call.__qualname__ = name.replace("-", "_")
    call.request, call.response = backend.request, backend.response
    return call


PROVIDERS = {name: provider_function(name) for name in NAMES}


def keeps_sessions(name: str | None) -> bool:
    """True for a backend that keeps the conversation itself (the claude CLI's
    sessions): a reply's session_id is resumed, instead of sending the turns again."""
    backend = BACKENDS.get(name)
    return backend is not None and backend.sessions


# =============================================================================
# 9. Calling: options, one attempt, the provider chain, the public API
# =============================================================================
# complete(), stream() and its Stream, ask(), Chat, models() and map(): what a user
# calls, and what they share, in the order a call travels: its keywords become one
# Options record; answer() checks them, once; try_providers() tries each provider
# of the chain in turn under one deadline and status timer (auto_route first);
# rounds() is a provider's part (with tools, the tool loop of 10); attempt() is
# one request to one provider. Everything above serves this section: to follow a
# call, start reading here.

@dataclass(frozen=True)
class Options:
    """The keywords complete(), stream(), ask() and Chat take (and models() those
    that apply), gathered into one record when a call starts. None: not given.

    provider: one of PROVIDERS (default: provider.default, $OMEGA_PROVIDER,
        "claude-code"); config: a TOML path, a dict shaped like the file, or None
        for the usual search.
    model, system (the system prompt), history, attachments, schema, max_tokens,
        temperature, tools, reasoning, and complex, session_id, max_turns,
        allowed_tools, mcp_servers: Context fields, set on the Context given (a keyword
        given wins).
    approve: called with each ToolCall before it runs; False sends the model "the
        user declined this call" instead.
    timeout: seconds for the whole call, fallbacks included (each provider's own
        timeout_secs bounds its part).
    base_url, api_key, max_retries: for the chosen provider in this call only, over
        the config file and the environment (the key goes to that provider's base
        URL only, never to a fallback).
    on_status: called with short progress messages (slow call, retries, fallbacks),
        from the calling thread or the status timer's thread.
    fallback: providers to try, in order, when the first one fails (default: the
        configured provider.fallback, unless `provider` was given)."""
    provider: str | None = None
    config: object = None
    model: str | None = None
    system: str | None = None
    history: tuple | list | None = None
    attachments: tuple | list | None = None
    schema: dict | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    complex: bool | None = None
    session_id: str | None = None
    max_turns: int | None = None
    allowed_tools: list | None = None
    mcp_servers: list | None = None
    tools: tuple | list | None = None
    reasoning: str | int | None = None
    approve: Callable | None = None
    timeout: float | None = None
    base_url: str | None = None
    api_key: str | None = None
    max_retries: int | None = None
    on_status: Callable | None = None
    fallback: list | None = None

    def __repr__(self) -> str:
        """The keywords given; never a key (api_key, a config dict's) nor file bytes."""
        shown = []
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "api_key":
                value = mask(value)
            elif name == "config" and isinstance(value, dict):
                value = "{…}"
            elif name in ("history", "attachments", "tools", "mcp_servers"):
                value = f"<{len(value)}>"
            else:
                value = repr(value)
            shown.append(f"{name}={value}")
        return f"Options({', '.join(shown)})"

    def __post_init__(self):
        if self.timeout is not None:
            check_value("timeout_secs", self.timeout, NUMBER, "timeout")


OPTION_NAMES = frozenset(f.name for f in fields(Options))
# The keywords that set a Context field, and the field each sets.
CONTEXT_KEYWORDS = {"system": "system_prompt", **{f.name: f.name for f in fields(Options)
                                                  if f.name in {c.name for c in fields(Context)}}}
CHAT_KEYWORDS = OPTION_NAMES - {"history", "session_id"}      # a Chat keeps its own
MODELS_KEYWORDS = frozenset({"provider", "config", "timeout", "base_url", "api_key",
                             "max_retries", "on_status"})


def options_of(function: str, given: dict, names=OPTION_NAMES,
               base: Options | None = None) -> Options:
    """The keywords given to function() as Options (over base's, if any). One it
    does not take is a TypeError naming it, as Python's own."""
    for name in given:
        if name not in names:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    return replace(base, **given) if base is not None else Options(**given)


def context_of(ctx: Context | str, options: Options) -> Context:
    """ctx (a Context, or the message text) with the Context fields options set."""
    given = {key: value for name, key in CONTEXT_KEYWORDS.items()
             if (value := getattr(options, name)) is not None}
    if isinstance(ctx, str):
        return Context(ctx, **given)
    return replace(ctx, **given) if given else ctx


def start_status_timer(on_status, status: dict):
    """Call on_status(message) after delay_secs, then on_status(repeat_message)
    every repeat_secs, until the returned stop() is called. No callback, no thread."""
    if on_status is None:
        return lambda: None
    lock, state = threading.Lock(), {"stopped": False, "timer": None}

    def schedule(delay, message):
        timer = threading.Timer(delay, fire, (message,))
        timer.daemon = True
        state["timer"] = timer
        timer.start()

    def fire(message):
        with lock:             # held while reporting, so nothing is said after stop()
            if state["stopped"]:
                return
            schedule(status["repeat_secs"], status["repeat_message"])
            on_status(message)

    def stop():
        with lock:
            state["stopped"] = True
            state["timer"].cancel()

    with lock:
        schedule(status["delay_secs"], status["message"])
    return stop


CLASSIFIER_PROMPT = """Decide how much work the request below needs.
Answer with the single word DIRECT if it is a simple question, a greeting, a \
lookup or a routine action that one reply can handle.
Answer with a numbered list of the steps (1. ... 2. ...) only if it is genuinely \
complex work: changes across several files, deep research, or building something new.
Answer with nothing else.

Request:
"""


def count_steps(answer: str) -> int:
    """Numbered lines ("1." or "1)", any number of digits) in a classifier answer."""
    return len(re.findall(r"(?m)^\s*\d{1,3}[.)]\s+\S", answer))


def classify(ctx: Context, config=None, provider: str | None = None) -> bool:
    """True when the provider's fast model calls this request genuinely complex
    (two or more steps). One extra call, no tools, one turn; any failure: False."""
    raw, path = read_config(config)
    return is_complex(ctx, raw, path, provider or default_provider(raw))


def is_complex(ctx: Context, raw: dict, path: str | None, name: str,
               call: Call | None = None) -> bool:
    question = Context(CLASSIFIER_PROMPT + ctx.current_message, max_turns=1, allowed_tools=[],
                       mcp_servers=[])
    try:
        settings = {**usable_settings(raw, name, path), "max_resume_attempts": 0}
        call = call or Call.starting_now(settings["timeout_secs"])
        answer = BACKENDS[name].call(question, settings, call).text
    except OmegaError as e:
        log_debug("classify: %s; treating the request as simple", e)
        return False
    return count_steps(answer) >= 2          # "DIRECT" and anything else: simple


def route(ctx: Context, config=None, provider: str | None = None) -> Context:
    """A copy of ctx with `model` set to the provider's model_complex or model, as
    classify() decides. A ctx that already names a model is returned as it is."""
    if ctx.model:
        return ctx
    raw, path = read_config(config)
    return routed(ctx, raw, path, provider or default_provider(raw))


def routed(ctx: Context, raw: dict, path: str | None, name: str,
           call: Call | None = None) -> Context:
    hard = ctx.complex or is_complex(ctx, raw, path, name, call)
    return replace(ctx, model=model_of(replace(ctx, complex=hard),
                                       provider_settings(raw, name, path)))


# Failures worth trying another provider for; a bad request would fail there too.
FALLBACK_ERRORS = (ProviderUnavailable, ProviderTimeout, RateLimitError, AuthError)


def worth_falling_back(error: OmegaError) -> bool:
    """Another provider may answer: never once a tool has run (it would run again)."""
    if getattr(error, "tool_calls", None):
        return False
    return isinstance(error, FALLBACK_ERRORS) or (getattr(error, "status", 0) or 0) >= 500 \
        and getattr(error, "reason", None) != NO_IMAGES


def usable_settings(raw: dict, name: str, path: str | None) -> dict:
    """provider_settings; a disabled provider is a ConfigError naming the file."""
    settings = provider_settings(raw, name, path)
    if not settings["enabled"]:
        raise ConfigError(f"{path or 'config'}: provider {name} is disabled "
                          f"(provider.{name}.enabled = false)")
    return settings


def failure_label(error: OmegaError) -> str:
    """'unavailable (connection refused)': one step of the fallback story."""
    kind = {ProviderUnavailable: "unavailable", ProviderTimeout: "timed out",
            RateLimitError: "rate-limited", AuthError: "not authorized",
            ConfigError: "misconfigured"}.get(type(error), "failed")
    return f"{kind} ({getattr(error, 'reason', None) or shorten(str(error), 60)})"


def failure_text(name: str, error: OmegaError) -> str:
    return f"{name}: {error}" if isinstance(error, ConfigError) else str(error)


def provider_chain(raw: dict, provider: str | None, fallback) -> list[str]:
    """The providers to try, in order. An explicitly chosen provider is not fallen
    back from unless a chain is given explicitly too: a prompt meant for a local
    model must never travel elsewhere unasked."""
    if provider is None:
        first = default_provider(raw)
        rest = raw.get("provider", {}).get("fallback", ()) if fallback is None else fallback
    else:
        first, rest = provider, fallback or ()
    check_provider(first, "provider")
    for name in rest:
        check_provider(name, "fallback")
    return list(dict.fromkeys([first, *rest]))


def call_settings(options: Options) -> dict:
    """The per-call settings given (base_url, api_key, max_retries), for the chosen
    provider's section."""
    return {name: value for name in ("base_url", "api_key", "max_retries")
            if (value := getattr(options, name)) is not None}


def with_call_settings(raw: dict, name: str, settings: dict) -> dict:
    """raw with settings given to one call placed in the provider's section, where
    they win over the file's and the environment's; checked like the file."""
    providers = raw.get("provider", {})
    section = {**providers.get(name, {}), **settings}
    if "base_url" in settings and "api_key" not in settings:
        section.pop("api_key", None)         # the file's key was meant for its base_url
    raw = {**raw, "provider": {**providers, name: section}}
    validate(raw, "arguments")
    return raw


def attempt(backend, request: tuple, settings: dict, call: Call, streaming: bool,
            schema: dict | None = None):
    """One request (url, headers, body, built already) to one HTTP provider, its own
    retries included, each resending that same body: a generator that yields the
    answer's text pieces (streaming; none otherwise) and returns (the
    OutgoingMessage, the body it was read from)."""
    if streaming:
        return (yield from stream_http(backend, request, settings, call, schema))
    return call_http(backend, request, settings, call, schema)


def rounds(ctx: Context, settings: dict, call: Call, streaming: bool,
           approve: Callable | None = None):
    """A provider's part of the call: a generator of the answer's text pieces that
    returns the OutgoingMessage. claude-code: its CLI runs (the tools through its
    MCP bridge, in 10). Without tools, one attempt. With tools (ctx.tools, the
    agent tools, MCP servers' tools: offered_tools, in 10), the tool loop
    (tool_rounds): a round is one attempt (its retries its own); when its answer
    asks for tools, they run, the model's turn and their results join the request,
    and the next round goes out, until an answer without tool calls. The chain
    above sees one answer; streamed text passes through."""
    backend = BACKENDS[settings["name"]]
    if backend.run:
        return (yield from backend.run(ctx, settings, call, streaming, approve))
    with offered_tools(ctx, settings, call) as tools:
        if tools:
            return (yield from tool_rounds(backend, replace(ctx, tools=tuple(tools)), settings,
                                           call, streaming, approve))
    request = backend.request(ctx, settings, streaming)
    return (yield from attempt(backend, request, settings, call, streaming, ctx.schema))[0]


def priced(meta: MessageMetadata, settings: dict, asked: str) -> float | None:
    """What an answer cost: what the backend said, else by the provider's prices
    ([provider.<name>.prices], US dollars per million tokens) for the model the
    server named or else the one asked for; None without a price or a token count,
    never a guess. Cache reads and writes are inside input_tokens; without their own
    prices they cost what input costs."""
    prices = settings.get("prices") or {}
    price = prices.get(meta.model) or prices.get(asked)
    if meta.cost_usd is not None or price is None or None in (meta.input_tokens,
                                                             meta.output_tokens):
        return meta.cost_usd
    input_price, output_price = price[:2]
    read_price = price[2] if len(price) > 2 else input_price
    write_price = price[3] if len(price) > 3 else input_price
    reads, writes = meta.cache_read_tokens or 0, meta.cache_write_tokens or 0
    fresh = max(0, meta.input_tokens - reads - writes)
    return (fresh * input_price + reads * read_price + writes * write_price
            + meta.output_tokens * output_price) / 1e6


def try_providers(ctx: Context, chain: list[str], raw: dict, path: str | None,
                  options: Options, streaming: bool):
    """Try each provider of chain in turn until one answers; the first one's error
    otherwise. One deadline (options.timeout) and one status timer span them all.
    A generator of the answer's text pieces (streaming) that returns the reply;
    once a piece has passed (it is on the caller's screen), there is no going
    elsewhere: a later error is raised as it is."""
    started = time.monotonic()
    on_status, timeout = options.on_status, options.timeout
    deadline = started + timeout if timeout else math.inf
    stop_status = start_status_timer(on_status, {**STATUS_DEFAULTS, **own_table(raw, "status")})
    failures: list[tuple[str, OmegaError]] = []
    try:
        for index, name in enumerate(chain):
            next_name = chain[index + 1] if index + 1 < len(chain) else None
            shown = False
            try:
                settings = provider_settings(raw, name, path)
                if not settings["enabled"]:
                    if index == 0:
                        usable_settings(raw, name, path)       # the error that says so
                    continue                                   # a disabled fallback is skipped
                if settings["timeout_secs"] <= deadline - time.monotonic():
                    call = Call.starting_now(settings["timeout_secs"], on_status, next_name)
                else:                        # the caller's timeout ends this call first
                    call = Call(deadline, timeout, on_status, next_name)
                if index == 0 and raw.get("provider", {}).get("auto_route") \
                        and not ctx.model and not ctx.complex:
                    ctx = routed(ctx, raw, path, name, call)
                pieces = rounds(ctx if index == 0 else replace(ctx, model=None),
                                settings, call, streaming, options.approve)
                try:
                    piece = next(pieces)
                except StopIteration as end:             # a whole answer
                    reply = end.value
                else:
                    stop_status()
                    shown = True
                    yield piece
                    reply = yield from pieces
                finally:
                    pieces.close()
            except ProviderError as e:
                if shown:
                    if not failures:
                        raise
                    raise e.with_context(fallbacks=[failure_text(n, f) for n, f in failures]) \
                        from None
                failures.append((name, e))
                if not worth_falling_back(e) or next_name is None:
                    break
                if on_status is not None:
                    on_status(f"{name} {failure_label(e)}, trying {next_name}")
                continue
            except ConfigError as e:
                if index == 0:
                    raise
                failures.append((name, e))         # a broken fallback is reported, not skipped
                continue
            reply.metadata.provider_used = name
            reply.metadata.cost_usd = priced(reply.metadata, settings, model_of(
                ctx if index == 0 else replace(ctx, model=None), settings))
            reply.metadata.fallbacks = [failure_text(n, e) for n, e in failures]
            reply.metadata.processing_time_ms = round((time.monotonic() - started) * 1000)
            return reply
    finally:
        stop_status()
    first = failures[0][1]
    others = [failure_text(n, e) for n, e in failures[1:]]
    hint = ready_elsewhere(raw, path, chain[0]) if first.not_set_up and not others else ""
    raise first.with_context(message=first.message + hint, fallbacks=others)


def answer(ctx: Context | str, options: Options, streaming: bool, *,
           conversation: dict | None = None, config: tuple | None = None,
           log: str | None = None, warn: Callable | None = None,
           show: Callable | None = None):
    """A call, checked now: the generator that makes it when first asked for a
    piece. It yields the answer's text pieces (streaming; none otherwise) and
    returns the OutgoingMessage; the exchange goes to the log when it is on.
    conversation: {"id": …} of the logged conversation this call continues (a
    Chat's, the CLI's), set to the id its row was written under.
    config: (raw, path) when the caller has read options.config already (the CLI,
    so that it is checked once); then `log` is the log file (None: no log) and
    `warn` hears that a row could not be written. Otherwise options.config is read
    here, the log is on when its [omega.log] table says so, and on_status hears.
    show: told the reply before its row is written (see logged())."""
    if config is None:
        raw, path = read_config(options.config)
        log, warn = log_path(raw, for_cli=False), options.on_status
    else:
        raw, path = config
    ctx = context_of(ctx, options)
    check_history(ctx.history)
    check_reasoning(ctx.reasoning)
    chain = provider_chain(raw, options.provider, options.fallback)
    settings = call_settings(options)
    if settings:
        raw = with_call_settings(raw, chain[0], settings)
    if ctx.schema is not None:
        check_schema(ctx.schema)
    if ctx.tools:                # a bad definition names its function before anything is sent
        ctx = replace(ctx, tools=tuple(tools_from(ctx.tools)))
    if ctx.attachments:          # read once for the whole chain, under the first one's limit
        ctx = replace(ctx, attachments=tuple(attachments_of(ctx, provider_settings(
            raw, chain[0], path))))
    pieces = try_providers(ctx, chain, raw, path, options, streaming)
    return logged(pieces, log, ctx, chain[0], conversation, warn, show) if log or show \
        else pieces


def complete(ctx: Context | str, provider: str | None = None, config=None, on_status=None,
             **options) -> OutgoingMessage:
    """Send ctx (a Context, or the message text) to a backend and return its answer
    with metadata. Takes every keyword of Options (provider, config and on_status
    also by position). Raises a ProviderError subclass (or ConfigError) with a
    one-line message; when fallbacks were tried too, the first provider's error,
    with err.fallbacks."""
    options = options_of("complete", dict(options, provider=provider, config=config,
                                          on_status=on_status))
    return drain(answer(ctx, options, False))


def stream(ctx: Context | str, provider: str | None = None, config=None, on_status=None,
           **options) -> "Stream":
    """The answer as it is written: iterate for its text pieces (non-empty str),
    then read .reply, the OutgoingMessage complete() would have returned. Same
    arguments as complete(); the configuration is checked now, nothing is sent
    before the first piece is asked for. Retries and fallback happen only before
    the first piece; an error after it carries err.partial_text. close() (or
    leaving a `with` block) stops the download or the claude process at once."""
    options = options_of("stream", dict(options, provider=provider, config=config,
                                        on_status=on_status))
    return Stream(answer(ctx, options, True))


class Stream:
    """Text pieces as they arrive (see stream()). `text` is the text so far,
    `reasoning` the model's reasoning so far (None: none yet), never among the
    pieces; `reply` is the OutgoingMessage once the answer ended well, else None.
    on_reasoning: called with each piece of reasoning as it arrives.

    The Stream keeps its own record of both, and what makes the pieces never
    refers back to it: a stream left unfinished (a `break`, an exception) is
    closed the moment the last reference to it goes (its connection hung up, its
    claude process stopped), not whenever the garbage collector runs."""

    def __init__(self, pieces, on_reasoning: Callable | None = None):
        self._pieces, self._shown, self._thoughts, self.reply = pieces, [], [], None
        self._on_reasoning = on_reasoning

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration as end:
                if end.value is not None:
                    self.reply = end.value
                raise StopIteration from None
            except ProviderError as e:
                if not self._shown:
                    raise
                raise e.with_context(partial_text="".join(self._shown)) from None
            if type(piece) is not ReasoningPiece:
                self._shown.append(piece)
                return piece
            self._thoughts.append(piece)
            if self._on_reasoning is not None:
                self._on_reasoning(str(piece))

    @property
    def text(self) -> str:
        return "".join(self._shown)

    @property
    def reasoning(self) -> str | None:
        return "".join(self._thoughts) or None

    def close(self) -> None:
        """Stop now: the connection is closed, the claude process group stopped."""
        self._pieces.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, KeyboardInterrupt):
            try:              # the call stops as if interrupted inside it (the log says so)
                self._pieces.throw(error)
            except KeyboardInterrupt:
                pass
        self.close()


def ask(prompt: str, provider: str | None = None, model: str | None = None,
        system: str | None = None, config=None,
        **options) -> str | dict | list | float | bool | None:
    """Send one prompt and return the answer text; with schema=, the answer's
    parsed JSON value instead. Takes every keyword of Options (provider, model,
    system and config also by position)."""
    options = options_of("ask", dict(options, provider=provider, model=model, system=system,
                                     config=config))
    reply = drain(answer(prompt, options, False))
    return reply.text if options.schema is None else reply.data


class Chat:
    """A conversation: each ask() or stream() sends the earlier turns along.

    chat = omega.Chat(provider="anthropic", system="Be brief")
    chat.ask("Name a colour")                # "Blue."
    chat.ask("Another one")                  # the first exchange goes along
    for piece in chat.stream("One more"): ...

    `history` holds the Messages so far (start from earlier ones with history=),
    `replies` the OutgoingMessages. A failed turn adds nothing. With claude-code
    the CLI session of the last reply is resumed and only the new message sent.
    Chat() takes the keywords of Options and applies them to every turn; ask() and
    stream() take them too, for that turn (but not history or session_id: the Chat
    keeps those). A Chat belongs to one thread at a time: turns made at the same
    time in several threads would not see each other; give each thread its own."""

    def __init__(self, provider: str | None = None, system: str | None = None, config=None,
                 model: str | None = None, on_status=None, history=(), **options):
        self.options = options_of("Chat", dict(options, provider=provider, system=system,
                                               config=config, model=model, on_status=on_status),
                                  CHAT_KEYWORDS)
        self.history = check_history(history)
        self.replies: list[OutgoingMessage] = []
        self._conversation = {"id": None}           # its id in the log, when logged

    def ask(self, prompt: str, **options) -> str:
        """Send prompt with the conversation so far; the answer text."""
        return drain(self._turn("Chat.ask", prompt, options, False)).text

    def stream(self, prompt: str, **options) -> Stream:
        """As ask(), streamed (see stream()); the turn counts once the stream ends well."""
        return Stream(self._turn("Chat.stream", prompt, options, True))

    def _turn(self, function: str, prompt: str, given: dict, streaming: bool):
        options = options_of(function, given, CHAT_KEYWORDS, self.options)
        last = self.replies[-1].metadata if self.replies else None
        session = last.session_id if last and keeps_sessions(last.provider_used) else None
        ctx = Context(prompt, history=tuple(self.history), session_id=session)
        return self._counted(prompt, answer(ctx, options, streaming,
                                            conversation=self._conversation))

    def _counted(self, prompt: str, pieces):
        reply = yield from pieces
        self.history += [Message("user", prompt), Message("assistant", reply.text)]
        self.replies.append(reply)
        return reply


def models(provider: str | None = None, config=None, **options) -> list[str]:
    """The names of the models a provider offers (default: the configured provider),
    as its API lists them, every page: OpenAI-compatible and OpenRouter GET /models,
    Anthropic GET /v1/models, Gemini GET /v1beta/models (those that generate text),
    Ollama GET /api/tags; claude-code: the CLI's aliases and the configured models.
    The same deadline, retries, size limit and typed errors as a call. Takes the
    keywords of Options that apply: timeout, base_url, api_key, max_retries,
    on_status."""
    options = options_of("models", dict(options, provider=provider, config=config),
                         MODELS_KEYWORDS)
    return model_list(options, *read_config(options.config))


def model_list(options: Options, raw: dict, path: str | None) -> list[str]:
    """models() with the config read already (raw, path)."""
    name = options.provider or default_provider(raw)
    check_provider(name, "provider")
    settings = call_settings(options)
    if settings:
        raw = with_call_settings(raw, name, settings)
    settings = usable_settings(raw, name, path)
    seconds = min(settings["timeout_secs"], options.timeout or math.inf)
    call = Call.starting_now(seconds, options.on_status)
    try:
        found = BACKENDS[name].models(settings, call)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise shape_error(settings) from None
    return list(dict.fromkeys(clean(m, 200) for m in found if isinstance(m, str) and m))


# -----------------------------------------------------------------------------
# map(): many prompts at once
# -----------------------------------------------------------------------------
# Worker threads (daemons: a worker stuck in the caller's own fn never keeps the
# process alive) take the items from a queue that the calling thread fills as it
# reads the input, at most `workers` items ahead of the work; each item is one
# whole call (answer(), the config read once for all), logged as its own exchange.
# They share what every call shares: the per-server pause of a 429 (PAUSED_UNTIL)
# above all. Ctrl-C in the calling thread sets the map's stop Event, which every
# call of its workers holds (Call.stop): their connections are shut, their waits and
# claude process groups end, and the workers are given MAP_STOP_SECS to finish.
# Named after Python's map, which it shadows inside this file: use comprehensions.

MAP_STOP_SECS = 0.8          # after Ctrl-C, how long map() waits for its workers to end


class Results(list):
    """What map() returns: a list, in input order, of each item's OutgoingMessage
    or the OmegaError it ended with, with the totals."""

    @property
    def failed(self) -> int:
        """How many items ended with an error."""
        return sum(isinstance(r, OmegaError) for r in self)

    @property
    def cost_usd(self) -> float | None:
        """The known costs of the answers added up; None when no answer's is known."""
        costs = [r.metadata.cost_usd for r in self if isinstance(r, OutgoingMessage)
                 and r.metadata.cost_usd is not None]
        return sum(costs) if costs else None


def map(prompts, fn=None, *, workers: int = 4, on_progress=None, **options) -> Results:
    """Send many prompts at once, `workers` calls in flight: a Results list, in input
    order, of each item's OutgoingMessage or the OmegaError that item ended with
    (one failure loses no other answer). `results.failed` counts the failures,
    `results.cost_usd` adds up the known costs.

    prompts: any iterable of prompts (str or Context), read as the work goes (never
    more than about `workers` items ahead, never copied into a list first); or, as
    with Python's map, map(fn, items) (also map(items, fn=fn)): fn(item) builds each
    prompt, in a worker thread. Takes every keyword of Options, for every item.
    on_progress(done, failed, total), called in the calling thread as each item
    ends: done counts every finished item, failed included; total is len(prompts)
    for a sized input, else None.

    A 429 with Retry-After pauses every worker's requests to that server; each item
    keeps its own deadline (timeout) and retries. Ctrl-C stops handing out work,
    closes the connections and claude processes of the items in flight, and raises
    KeyboardInterrupt within about a second. An exception from fn, or one that is
    not an OmegaError (a bug), stops the map the same way and is raised as it is.
    A ConfigError in the configuration or the provider names is raised before
    anything is sent."""
    if callable(prompts) and not callable(fn):
        prompts, fn = fn, prompts
    if isinstance(prompts, (str, Context)) or prompts is None:
        raise TypeError("map() takes an iterable of prompts (for one prompt: complete())")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers: expected a whole number 1 or more, got {workers!r}")
    options = options_of("map", options)
    raw, path = read_config(options.config)
    provider_chain(raw, options.provider, options.fallback)      # a wrong name fails once
    try:
        total = len(prompts)
    except TypeError:
        total = None
    found, failed = {}, 0
    outcomes = each_answer(prompts, fn, options, workers, (raw, path),
                           log_path(raw, for_cli=False), options.on_status)
    try:
        for index, outcome in outcomes:
            found[index] = outcome
            failed += isinstance(outcome, OmegaError)
            if on_progress is not None:
                on_progress(len(found), failed, total)
    finally:
        outcomes.close()
    return Results(found[index] for index in range(len(found)))


def each_answer(items, fn, options: Options, workers: int, config: tuple, log: str | None,
                warn):
    """(index, outcome) for each item as it ends, in the order they end: the work of
    map() and of the CLI's --each (see map(); config, log and warn as answer() takes
    them). Closed or left by an exception (Ctrl-C), it stops its workers first."""
    import queue
    todo, ended, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    threads = [threading.Thread(target=map_worker, name=f"omega-map-{n + 1}", daemon=True,
                                args=(todo, ended, stop, fn, options, config, log, warn))
               for n in range(workers)]
    for thread in threads:
        thread.start()
    items, index, pending, more = iter(items), 0, 0, True
    try:
        while more or pending:
            while more and pending < 2 * workers:      # `workers` at work, as many waiting
                try:
                    item = next(items)
                except StopIteration:
                    more = False
                    break
                todo.put((index, item))
                index, pending = index + 1, pending + 1
            if pending:
                place, outcome, fatal = ended.get()
                pending -= 1
                if fatal:
                    raise outcome
                yield place, outcome
    finally:
        stop.set()
        WATCHDOG.stop_all(stop)
        for _ in threads:
            todo.put(None)
        end = time.monotonic() + MAP_STOP_SECS
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))


def map_worker(todo, ended, stop: threading.Event, fn, options: Options, config: tuple,
               log: str | None, warn) -> None:
    """One worker of each_answer(): each item's call, until told to stop. Every Call
    made in this thread holds `stop` (see Call)."""
    MAP_WORKER.stop = stop
    while not stop.is_set():
        job = todo.get()
        if job is None:
            return
        index, item = job
        try:
            prompt = item if fn is None else fn(item)
            if not isinstance(prompt, (str, Context)):
                raise TypeError(f"map(): a prompt is a str or a Context, not "
                                f"{type(prompt).__name__}")
            outcome = drain(answer(prompt, options, False, config=config, log=log, warn=warn))
        except OmegaError as e:
            outcome = e
        except BaseException as e:         # a bug, fn's own error, or the stop: map() raises it
            ended.put((index, e, True))
            continue
        ended.put((index, outcome, False))


# =============================================================================
# 10. Tools: the model calls the caller's functions
# =============================================================================
# What a tool is made of (a JSON Schema from type hints and a docstring), how one
# call runs (every failure an error result the model can act on), and the loop
# that rounds() runs for a call with tools: one loop for every HTTP backend, each
# backend adding only its declarations, call reader and round shape (7, 8).
# claude-code runs its own loop: its tools come through the MCP bridge below. The
# HTTP backends' tools may also be the agent tools and MCP servers' tools (below).

# What every API accepts (OpenAI ^[a-zA-Z0-9_-]+$ ≤ 64, Anthropic the same,
# Gemini must start with a letter or _).
TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
HINT_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
# A parameter's line in a docstring: `name: text`, `:param [type] name: text` or,
# in a Google-style Args: block, `name (type): text`.
PARAM_LINE = re.compile(r"(?::param\s+(?:\S+\s+)?)?(\w+)\s*(?:\([^)]*\))?\s*:\s*(\S.*)")
DECLINED = "the user declined this call"
TOOL_STATUS_CHARS = 72          # a call's status line, after "omega: ", fits 80 columns


class ToolFailed(Exception):
    """Raised by a tool to fail in its own words: the model gets the text as it is,
    without an exception name in front (any other exception goes as "Name: text")."""


def tools_from(items) -> list[Tool]:
    """Tools from plain functions or Tool records; a ConfigError naming the function
    for a bad one or a name used twice, before anything is sent."""
    if isinstance(items, (Tool, str)) or callable(items):
        raise ConfigError("tools: expected a list of functions or Tools, got "
                          f"{type(items).__name__}")
    tools = [tool_from(item) for item in items]
    tools_by_name(tools)
    return tools


def tools_by_name(tools) -> dict:
    """{name: Tool}; a ConfigError for a name used twice (the user's functions, the
    agent tools and the MCP servers' tools share one namespace)."""
    by_name = {}
    for tool in tools:
        if by_name.setdefault(tool.name, tool) is not tool:
            raise ConfigError(f"tools: two tools are named {tool.name!r}")
    return by_name


def tool_from(item) -> Tool:
    """A Tool with its description and parameters filled in: the schema from the
    type hints (str, int, float, bool, list, list[T], dict, dict[str, T],
    Literal[...], T | None; a parameter with a default is optional, one without a
    hint takes any JSON value), the description from the docstring's first paragraph,
    each parameter's from its `name: text` line. A ConfigError names what is wrong."""
    if not isinstance(item, Tool):
        if not callable(item):
            raise ConfigError(f"tools: {shorten(repr(item), 60)} is neither a function nor "
                              "a Tool")
        item = Tool(getattr(item, "__name__", repr(item)), item)
    name, fn = item.name, item.fn
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ConfigError(f"tool {shorten(repr(name), 80)}: a tool's name is 1 to 64 letters, "
                          "digits, _ or -, starting with a letter or _")
    if item.parameters is None:
        if fn is None:
            raise ConfigError(f"tool {name}: give it a function or parameters")
        description, parameters = signature_schema(fn, name)
    else:
        try:
            check_schema(item.parameters)
        except ConfigError as e:
            raise ConfigError(f"tool {name}: parameters: {e}") from None
        if not is_object_schema(item.parameters):
            raise ConfigError(f"tool {name}: parameters must be a JSON Schema of an object")
        description, parameters = (docstring_parts(fn, ())[0] if fn else ""), item.parameters
    return Tool(name, fn, item.description or description, parameters)


def signature_schema(fn, name: str) -> tuple[str, dict]:
    """(description, parameters schema) of a function, or a ConfigError naming it."""
    import inspect                      # here: `import omega` and calls without tools
    import typing                       # never need them
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"tool {name}: its parameters cannot be read") from None
    try:    # resolves `from __future__ import annotations` strings in fn's module
        hints = typing.get_type_hints(fn)
    except Exception as e:      # NameError for an unknown name, or whatever a hint raises
        raise ConfigError(f"tool {name}: a type hint cannot be resolved ({e})") from None
    description, notes = docstring_parts(fn, parameters)
    properties, required = {}, []
    for param in parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ConfigError(f"tool {name}: parameter {param} is {param.kind.description}; "
                              "the model passes arguments by name only")
        hint = hints.get(param.name, typing.Any)
        try:
            schema = hint_schema(hint)
        except ValueError as e:
            raise ConfigError(f"tool {name}: parameter {param.name}: no JSON Schema for "
                              f"{inspect.formatannotation(e.args[0])} (use str, int, float, "
                              "bool, list, dict, Literal, X | None or Tool(parameters=...))") \
                from None
        if param.name in notes:
            schema["description"] = notes[param.name]
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    return description, {"type": "object", "properties": properties,
                         **({"required": required} if required else {})}


def hint_schema(hint) -> dict:
    """The JSON Schema of a type hint; ValueError(the part it cannot express)."""
    import types
    import typing
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return {}
    if origin is typing.Annotated:
        return hint_schema(args[0])
    if hint in HINT_TYPES:
        return {"type": HINT_TYPES[hint]}
    if hint is list or origin is list:
        return {"type": "array", **({"items": hint_schema(args[0])} if args else {})}
    if hint is dict or origin is dict and (not args or args[0] is str):
        return {"type": "object",
                **({"additionalProperties": hint_schema(args[1])} if args else {})}
    kinds = list(dict.fromkeys(json_type(a) for a in args))
    if origin is typing.Literal and "unknown" not in kinds:
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        schema = hint_schema(args[args[0] is type(None)])
        if not schema:              # any value already takes null
            return schema
        # A type list, not anyOf: every property keeps a `type` (Gemini refuses one without).
        schema["type"] = [*schema_types(schema), "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        return schema
    raise ValueError(hint)


def docstring_parts(fn, names) -> tuple[str, dict]:
    """(the first paragraph as one line, {parameter: its description}) from fn's
    docstring. A parameter's description may go on in more indented lines."""
    import inspect
    summary, notes, current, depth, reading = [], {}, None, 0, True
    for line in (inspect.getdoc(fn) or "").splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        match = PARAM_LINE.fullmatch(text)
        if match and match[1] in names:
            current, depth, reading = match[1], indent, False
            notes[current] = match[2]
        elif current and text and indent > depth:
            notes[current] += " " + text
        else:
            current = None
            reading = reading and text and not re.fullmatch(r"\w+:", text)   # "Args:" ends it
            if reading:
                summary.append(text)
    return " ".join(summary), notes


def run_tool(tool: Tool | None, call: ToolCall, limit_bytes: int,
             approve: Callable | None = None) -> ToolCall:
    """call with its result and error set. Everything that goes wrong becomes a text
    the model can act on, never an exception of omega's: an unknown tool, arguments
    that are not a JSON object or do not fit the parameters, a call approve() says
    no to, and what the function raises ("ValueError: no such city", no traceback;
    a ToolFailed's own text). approve is asked only for a call that would run.
    KeyboardInterrupt and ProviderTimeout (a tool that waits for the call's
    deadline) are not results: they end the call. A result that is not a str goes
    as JSON; one over limit_bytes (UTF-8) is cut there, with a note."""
    error = True
    if tool is None or tool.fn is None:
        text = f"there is no tool named {call.name!r} that can run"
    elif call.raw_arguments is not None:
        text = f"the arguments are not a JSON object: {call.raw_arguments}"
    elif problem := argument_problem(tool.parameters or {}, call.arguments):
        text = f"invalid arguments for {tool.name}: {problem}"
    elif approve is not None and not approve(call):
        text = DECLINED
    else:
        try:
            result = tool.fn(**call.arguments)
            text = result if isinstance(result, str) else \
                json.dumps(result, default=str, ensure_ascii=False)
            error = False
        except ProviderTimeout:
            raise
        except ToolFailed as e:
            text = str(e)
        except Exception as e:      # the model hears of it; KeyboardInterrupt still stops all
            text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    data = text.encode("utf-8", "replace")
    if len(data) > limit_bytes:
        text = data[:limit_bytes].decode("utf-8", "ignore") + \
            f"\n[cut: the result was {len(data):,} bytes, only the first {limit_bytes:,} are here]"
    return replace(call, result=text, error=error)


def argument_problem(schema: dict, arguments: dict) -> str | None:
    """What is wrong with arguments against the parameters' top level, or None:
    a required one missing, one not among the properties (unless the schema allows
    more), or a value of another JSON type or outside the enum."""
    properties = schema.get("properties") or {}
    missing = [name for name in schema.get("required") or () if name not in arguments]
    if missing:
        return "missing required " + ", ".join(missing)
    unknown = [name for name in arguments if name not in properties]
    if unknown and "properties" in schema and not schema.get("additionalProperties"):
        return f"unknown {', '.join(unknown)} (the parameters are: " \
               f"{', '.join(properties) or 'none'})"
    for name, value in arguments.items():
        spec = properties.get(name)
        if isinstance(spec, dict) and not type_fits(value, spec):
            return f"{name} must be {' or '.join(schema_types(spec))}, not {json_type(value)}"
        if isinstance(spec, dict) and "enum" in spec and value not in spec["enum"]:
            return f"{name} must be one of {json.dumps(spec['enum'], ensure_ascii=False)}"
    return None


def call_text(call: dict) -> str:
    """get_weather(city="Paris"): a call (ToolCall.to_dict(), or one the log holds)
    as the status lines, --approve and --logs show it."""
    arguments = call.get("arguments")
    if not isinstance(arguments, dict):            # the text the model sent, not an object
        return f"{call.get('name')}({arguments})"
    return f"{call.get('name')}(" + ", ".join(
        f"{name}={json.dumps(value, ensure_ascii=False, default=str)}"
        for name, value in arguments.items()) + ")"


def tool_line(call: dict, limit: int = TOOL_STATUS_CHARS) -> str:
    """get_weather(city="Paris") -> 12 degrees…: a call and what it gave, on one
    line, redacted, without control characters, cut to limit characters."""
    outcome = f"failed: {call.get('result')}" if call.get("error") else call.get("result")
    return clean(f"{call_text(call)} -> {outcome}", limit)


@contextlib.contextmanager
def offered_tools(ctx: Context, settings: dict, call: Call):
    """The tools an HTTP backend offers in a call: ctx.tools, the agent tools that
    allowed_tools names and the tools of every MCP server (Context's, else the
    provider's), which run until the block ends."""
    names = requested(ctx, settings, "allowed_tools") or ()
    agent = agent_tools(names, working_dir(settings), settings["max_tool_result_bytes"],
                        call) if names else []
    with mcp_server_tools(requested(ctx, settings, "mcp_servers") or (), settings,
                          call) as relayed:
        yield [*ctx.tools, *agent, *relayed]


def tool_rounds(backend, ctx: Context, settings: dict, call: Call, streaming: bool,
                approve: Callable | None):
    """The tool loop (see rounds()): a generator of the answer's text pieces that
    returns the OutgoingMessage of the last round, its metadata summed over the
    rounds and its tool_calls those of every round.

    The request is built once, with the declarations; each round appends the
    model's turn exactly as it came and the results, in the backend's shapes, and
    sends the whole again: a retry inside a round resends the results already
    computed, and no tool ever runs twice because of omega. The calls of a round
    run in the model's order, in this thread; each is told to call.notify. A
    failure after a tool ran carries partial_text and tool_calls (and is never
    sent to a fallback provider); so does the round limit (max_turns) and the
    deadline passing while a tool ran. Streamed rounds are separated by a blank
    line when text came before, their reasoning likewise. The request, and so the
    reasoning setting, stays the same for the whole loop (Anthropic refuses a
    change), and the model's turn goes back with its reasoning as the API needs it
    (<name>_round); nothing of it reaches another provider."""
    url, headers, body = backend.request(ctx, settings, streaming)
    body["tools"] = backend.tools(ctx.tools)
    tools = tools_by_name(ctx.tools)
    most = requested(ctx, settings, "max_turns")
    replies, ran, texts = [], [], []
    try:
        for turn in range(1, most + 1):
            pieces = attempt(backend, (url, headers, body), settings, call, streaming)
            reply, data = yield from after_blank_line(
                pieces, bool(texts) and streaming, any(r.reasoning for r in replies))
            replies.append(reply)
            texts += [reply.text] * bool(reply.text)
            calls = read_shaped(backend.calls, settings, reply, data)
            if not calls:
                break
            if turn == most:            # those calls are not run: nothing would read them
                raise ProviderError(f"the model still asked for tools after {most} rounds "
                                    "(max_turns); raise max_turns or Context.max_turns",
                                    settings["name"], code="max_turns", reason="max turns")
            done = []
            for asked in calls:
                done.append(run_tool(tools.get(asked.name), asked,
                                     settings["max_tool_result_bytes"], approve))
                ran.append(done[-1])
                call.notify(tool_line(done[-1].to_dict()))
                if call.left() <= 0:
                    raise timed_out(settings, call, f" (the tool {asked.name} ran past it)")
            body[backend.turns] += read_shaped(backend.round, settings, reply, data, done)
        reply = replies[-1]
        if ctx.schema is not None:
            reply.data = json_answer(reply.text, reply.metadata.stop_reason, ctx.schema,
                                     settings)
    except ProviderError as e:
        if not (ran or texts):
            raise
        raise e.with_context(partial_text="\n\n".join(texts) or None, tool_calls=ran) from None
    reply.metadata = replace(
        reply.metadata, num_turns=len(replies), tokens_used=None,
        **{name: total(getattr(r.metadata, name) for r in replies)
           for name in ("input_tokens", "output_tokens", "cost_usd", "attempts")})
    reply.tool_calls = ran
    reply.reasoning = joined_reasoning(r.reasoning for r in replies)
    return reply


def read_shaped(read: Callable, settings: dict, reply: OutgoingMessage, *args):
    """read(*args) of a backend's body, or the error of a body without the shape
    its calls should have (as parsed() says it of its text)."""
    try:
        return read(*args)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise shape_error(settings, reply.metadata.request_id) from None


def after_blank_line(pieces, blank: bool, blank_reasoning: bool = False, text: bool = True):
    """pieces, the first text piece after a blank line when blank, the first
    ReasoningPiece when blank_reasoning (a round after others); text=False leaves
    the text pieces out. Returns what pieces return."""
    try:
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                return end.value
            if type(piece) is ReasoningPiece:
                if blank_reasoning:
                    piece, blank_reasoning = ReasoningPiece("\n\n" + piece), False
            elif not text:
                continue
            elif blank:
                piece, blank = "\n\n" + piece, False
            yield piece
    finally:
        pieces.close()


# -----------------------------------------------------------------------------
# MCP: JSON-RPC 2.0 over stdio, one message a line
# -----------------------------------------------------------------------------
# omega speaks it both ways: it answers the claude CLI (through the bridge) and asks
# the user's MCP servers (the client, for the HTTP backends).

MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")   # newest first
MCP_LINE_BYTES = 16 * MIB       # the longest message read from an MCP peer
MCP_ANSWER_SECS = 10.0          # for a user's server to answer each setup step, and for
                                # the calling omega to take a bridge's secret


class RpcError(Exception):
    """A JSON-RPC error answer: its code and message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def rpc_error(id_, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def rpc_line(message: dict) -> bytes:
    """One message, framed: json.dumps never writes a raw newline (strings escape it)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# -----------------------------------------------------------------------------
# the bridge: claude-code runs the caller's functions
# -----------------------------------------------------------------------------
# The CLI starts `python omega.py --mcp-bridge SOCKET` from the MCP config that
# serve_tools() writes. The bridge proves it was started from that config (the
# secret, which only the 0600 config in the 0700 folder and the bridge's
# environment hold, never an argv), then relays the CLI's MCP lines to the calling
# process and the answers back. Everything MCP is answered in the calling process
# (mcp_reply): the functions run there, with their state, in the thread that reads
# the CLI's output (child_output, 6), one at a time.

BRIDGE_SECRET_ENV = "OMEGA_BRIDGE_SECRET"
BRIDGE_SERVER = "omega"             # the CLI names the tools mcp__omega__<name>
BRIDGE_SECRET_LINE_BYTES = 200      # a first line longer than that is not our secret


@dataclass
class ToolServer:
    """The calling process's end of the bridge while a claude-code call runs: the
    tools by name, the MCP config (in a 0700 folder, beside the socket), the secret,
    the --allowedTools words, the bridges connected (with what each sent that is
    not a whole line yet), and the calls run, in order."""
    tools: dict
    approve: Callable | None
    call: Call
    limit: int
    config: str
    secret: bytes
    listener: object                # socket.socket, listening, non-blocking; None
                                    #   without tools (MCP servers only: no bridge)
    allowed: list
    peers: dict = field(default_factory=dict)      # socket -> bytearray
    trusted: set = field(default_factory=set)      # sockets that gave the secret
    calls: list = field(default_factory=list)


@contextlib.contextmanager
def serve_tools(tools, approve: Callable | None, call: Call, limit: int, mcp_servers=()):
    """A ToolServer for one claude-code call: a fresh 0700 folder holding the MCP
    config that gives the CLI the user's mcp_servers and, with tools, a Unix socket
    and the bridge to start on it, with a new random secret in the config's `env`
    only. On exit, also on an exception, the sockets are closed and the folder
    removed: a bridge still running sees its socket close and ends."""
    import secrets
    import socket
    import tempfile
    folder = tempfile.mkdtemp(prefix="omega-")      # mode 0700, made atomically
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if tools else None
    server = None
    try:
        path = os.path.join(folder, "s")
        secret = secrets.token_hex(32)
        servers = {spec["name"]: {"command": spec["command"], "args": list(spec.get("args", ())),
                                  "env": dict(spec.get("env", {}))} for spec in mcp_servers}
        if listener:
            listener.bind(path)
            listener.listen()
            listener.setblocking(False)
            servers[BRIDGE_SERVER] = {"command": sys.executable,
                                      "args": [os.path.abspath(__file__), "--mcp-bridge", path],
                                      "env": {BRIDGE_SECRET_ENV: secret}}
        config = os.path.join(folder, "mcp.json")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"mcpServers": servers}, f)
        allowed = [f"mcp__{BRIDGE_SERVER}__{tool.name}" for tool in tools] + \
                  [f"mcp__{spec['name']}" for spec in mcp_servers]
        server = ToolServer({tool.name: tool for tool in tools}, approve, call, limit, config,
                            secret.encode(), listener, allowed)
        yield server
    finally:
        for peer in server.peers if server else ():
            peer.close()
        if listener:
            listener.close()
        shutil.rmtree(folder, ignore_errors=True)


def serve_ready(server: ToolServer, sock, selector) -> None:
    """Serve what waits on sock, the listener or a connected bridge, registered in
    selector with `server` as its data: accept a bridge (of our user, where the
    platform tells), or answer what it sent. A peer that hangs up or must not
    stay is dropped; nothing it sent runs."""
    if sock is server.listener:
        try:
            peer, _ = sock.accept()
        except BlockingIOError:         # the peer gave up already
            return
        if not same_user(peer):
            peer.close()
            return
        server.peers[peer] = bytearray()
        selector.register(peer, selectors.EVENT_READ, server)
        return
    try:
        data = sock.recv(READ_SIZE)
        keep = bool(data) and answer_lines(server, sock, data)
    except OSError:                     # the bridge went away mid-answer
        keep = False
    if not keep:
        selector.unregister(sock)
        server.trusted.discard(sock)
        del server.peers[sock]
        sock.close()


def answer_lines(server: ToolServer, sock, data: bytes) -> bool:
    """Answer every whole line a bridge has sent; False when it must go: its first
    line is not the secret, or it sends a longer line than allowed."""
    import hmac
    buffer = server.peers[sock]
    buffer += data
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        # sendall waits while the bridge does not read: never past the deadline
        sock.settimeout(max(min(MCP_ANSWER_SECS, server.call.left()), 0.001))
        if sock in server.trusted:
            if line.strip() and (answer := mcp_reply(server, line)) is not None:
                sock.sendall(rpc_line(answer))
        elif hmac.compare_digest(line, server.secret):
            server.trusted.add(sock)
            sock.sendall(b"ok\n")
        else:
            return False
    return len(buffer) <= (MCP_LINE_BYTES if sock in server.trusted else BRIDGE_SECRET_LINE_BYTES)


def same_user(peer) -> bool:
    """Whether the connected process runs as our user, where the platform says
    (SO_PEERCRED: Linux). Elsewhere the 0700 folder alone keeps other users out."""
    import socket
    import struct
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    credentials = peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1] == os.getuid()


def mcp_reply(server: ToolServer, line: bytes) -> dict | None:
    """The answer to one JSON-RPC line from the CLI; None for a notification, which
    is never answered (`id: 0` is a request), and for a response to nothing asked."""
    message = json_or_none(line)
    if message is None and line.strip() != b"null":
        return rpc_error(None, -32700, "Parse error")
    if not isinstance(message, dict):
        return rpc_error(None, -32600, "Invalid Request")
    if "id" not in message or "method" not in message:
        return None
    method, params = message["method"], message.get("params", {})
    try:
        if not isinstance(method, str) or not isinstance(params, dict):
            raise RpcError(-32600, "Invalid Request")
        if method not in MCP_METHODS:
            raise RpcError(-32601, f"Method not found: {clean(method, 100)}")
        result = MCP_METHODS[method](server, params)
    except RpcError as e:
        return rpc_error(message["id"], e.code, e.message)
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


def mcp_initialize(server: ToolServer, params: dict) -> dict:
    """The client's version when we know it, else our newest (MCP lifecycle)."""
    asked = params.get("protocolVersion")
    return {"protocolVersion": asked if asked in MCP_VERSIONS else MCP_VERSIONS[0],
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": BRIDGE_SERVER, "version": __version__}}


def mcp_list(server: ToolServer, params: dict) -> dict:
    return {"tools": [{"name": tool.name, "description": tool.description,
                       "inputSchema": tool.parameters or {"type": "object", "properties": {}}}
                      for tool in server.tools.values()]}


def mcp_call(server: ToolServer, params: dict) -> dict:
    """Run one call the model made through the CLI, as the tool loop runs one
    (run_tool: approve first; a failure is a result with isError, which the model
    sees); an unknown tool is a JSON-RPC error. ToolCall.name is the user's name."""
    name, arguments = params.get("name"), params.get("arguments") or {}
    if name not in server.tools or not isinstance(arguments, dict):
        raise RpcError(-32602, "arguments: expected an object" if name in server.tools
                       else f"Unknown tool: {clean(name, 100)}")
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    asked = ToolCall(str(meta.get("claudecode/toolUseId") or f"call_{len(server.calls) + 1}"),
                     name, arguments)
    done = run_tool(server.tools[name], asked, server.limit, server.approve)
    server.calls.append(done)
    server.call.notify(tool_line(done.to_dict()))
    return {"content": [{"type": "text", "text": done.result}], "isError": done.error}


MCP_METHODS = {"initialize": mcp_initialize, "ping": lambda server, params: {},
               "tools/list": mcp_list, "tools/call": mcp_call}


def bridge_main(argv: list[str]) -> int:
    """`omega.py --mcp-bridge SOCKET`, started by the claude CLI: connect to the
    calling omega, give it the secret from the environment, then relay MCP lines
    both ways until either side hangs up. Ends quietly on EOF and on the SIGINT
    the CLI sends when it finishes; SIGTERM and SIGHUP end it as they would."""
    import socket
    if len(argv) != 1:
        sys.stderr.write("usage: omega.py --mcp-bridge SOCKET (started by omega for the "
                         "claude CLI, not by hand)\n")
        return 2
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(MCP_ANSWER_SECS)
            sock.connect(argv[0])
            sock.sendall(os.environ.get(BRIDGE_SECRET_ENV, "").encode() + b"\n")
            welcome = b""
            while len(welcome) < 3 and (data := sock.recv(3 - len(welcome))):
                welcome += data
            if welcome != b"ok\n":
                sys.stderr.write("omega --mcp-bridge: the calling omega refused this bridge "
                                 f"(no or wrong {BRIDGE_SECRET_ENV})\n")
                return 1
            sock.settimeout(None)
            relay(sock)
        return 0
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    except OSError as e:
        sys.stderr.write(f"omega --mcp-bridge: {argv[0]}: {e.strerror or e}\n")
        return 1


def relay(sock) -> None:
    """Copy stdin to sock and sock to stdout as bytes come, until the calling
    process hangs up (after the CLI closed stdin, once the answers are out)."""
    import socket
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = memoryview(sock.recv(READ_SIZE))
                    if not data:
                        return
                    while data:
                        data = data[os.write(stdout, data):]
                elif data := os.read(stdin, READ_SIZE):
                    sock.sendall(data)
                else:
                    selector.unregister(stdin)
                    sock.shutdown(socket.SHUT_WR)


# -----------------------------------------------------------------------------
# the MCP client: the user's MCP servers as tools of the HTTP backends
# -----------------------------------------------------------------------------
# Each server runs in its own process group for one call; every read waits in a
# selector, a setup step never past MCP_ANSWER_SECS, nothing past the deadline.

MCP_EXIT_SECS = 1.0             # after its stdin closes, before SIGTERM (MCP shutdown)
MCP_STDERR_KEPT_BYTES = 4096    # the tail of a server's stderr, for the error naming it


@dataclass
class McpServer:
    """A running user MCP server: its name, its process, what it wrote that is not
    a whole line yet, the tail of its stderr, the last request id used."""
    name: str
    child: object                   # subprocess.Popen
    pending: bytearray = field(default_factory=bytearray)
    errors: bytes = b""
    last_id: int = 0


@contextlib.contextmanager
def mcp_server_tools(specs, settings: dict, call: Call):
    """Start every server of specs ({name, command, args, env}), yield their tools
    as `<server>__<tool>` Tools, and stop them all on exit, whatever happens."""
    with contextlib.ExitStack() as running:
        tools = []
        for spec in specs:
            server = start_mcp_server(spec, settings, call)
            running.callback(stop_mcp_server, server, call)
            tools += mcp_tools(server, settings, call)
        yield tools


def start_mcp_server(spec: dict, settings: dict, call: Call) -> McpServer:
    """The server started in its own process group, in working_dir, initialized."""
    import subprocess
    name = spec["name"]
    try:
        child = subprocess.Popen([spec["command"], *spec.get("args", ())], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, **spec.get("env", {})},
                                 cwd=working_dir(settings), start_new_session=True)
    except OSError as e:
        raise mcp_trouble(settings, name, f"cannot start {spec['command']!r}: "
                                          f"{e.strerror or e}") from None
    server = McpServer(name, child)
    for pipe in (child.stdin, child.stdout, child.stderr):
        os.set_blocking(pipe.fileno(), False)
    try:
        result = mcp_setup(server, "initialize", {
            "protocolVersion": MCP_VERSIONS[0], "capabilities": {},
            "clientInfo": {"name": "omega", "version": __version__}}, settings, call)
        if not isinstance(result.get("protocolVersion"), str):
            raise mcp_trouble(settings, name, "answered initialize without a protocolVersion")
        send_all(server, rpc_line({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                 settings, call)
    except BaseException:
        stop_mcp_server(server, call)
        raise
    return server


def mcp_tools(server: McpServer, settings: dict, call: Call) -> list[Tool]:
    """The server's tools (every page), each a Tool named `<server>__<tool>` that
    calls the tool by its own name."""
    tools, cursor = [], None
    for _ in range(MAX_PAGES):
        result = mcp_setup(server, "tools/list", {"cursor": cursor} if cursor else {},
                           settings, call)
        items = result.get("tools")
        if not isinstance(items, list) or not all(
                isinstance(item, dict) and isinstance(item.get("name"), str) for item in items):
            raise mcp_trouble(settings, server.name, "answered tools/list without a tools list")
        for item in items:
            schema, description = item.get("inputSchema"), item.get("description")
            tools.append(Tool(mcp_tool_name(server.name, item["name"]),
                              functools.partial(call_mcp_tool, server, item["name"], settings,
                                                call),
                              description if isinstance(description, str) else "",
                              schema if isinstance(schema, dict) else {"type": "object"}))
        cursor = result.get("nextCursor")
        if not cursor:
            return tools
    raise mcp_trouble(settings, server.name, f"listed more than {MAX_PAGES} pages of tools")


def mcp_setup(server: McpServer, method: str, params: dict, settings: dict, call: Call) -> dict:
    """A request of the setup: answered within MCP_ANSWER_SECS; an error answer is
    the server failing."""
    try:
        return mcp_request(server, method, params, settings, call,
                           time.monotonic() + MCP_ANSWER_SECS)
    except RpcError as e:
        raise mcp_trouble(settings, server.name, f"refused {method}: {e.message}") from None


def mcp_tool_name(server: str, tool: str) -> str:
    """`<server>__<tool>` when that fits the name rule; else (MCP names may have dots
    and be 128 long) the refused characters become `_`, cut to leave room for 8 hex
    of the original's hash: the same tool always gets the same name, two never one."""
    name = f"{server}__{tool}"
    if TOOL_NAME.fullmatch(name):
        return name
    import hashlib
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:55]
    return f"{safe}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def call_mcp_tool(server: McpServer, tool: str, settings: dict, call: Call, /,
                  **arguments) -> str:
    """The tool's text; its isError result or a JSON-RPC error are the tool failing.
    A tool may take its time: it waits for the call's deadline only."""
    try:
        result = mcp_request(server, "tools/call", {"name": tool, "arguments": arguments},
                             settings, call, call.deadline)
    except RpcError as e:
        raise ToolFailed(f"MCP error {e.code}: {clean(e.message, 1000)}") from None
    texts = [str(item.get("text")) if item.get("type") == "text" else
             f"[{item.get('type')} content]"
             for item in result.get("content") or () if isinstance(item, dict)]
    if not texts and "structuredContent" in result:
        texts = [json.dumps(result["structuredContent"], ensure_ascii=False)]
    if result.get("isError"):
        raise ToolFailed("\n".join(texts))
    return "\n".join(texts)


def mcp_request(server: McpServer, method: str, params: dict, settings: dict, call: Call,
                deadline: float) -> dict:
    """Send one request and wait for its answer's result (RpcError for its error),
    answering the server's own requests meanwhile (ping; the rest "not found") and
    skipping its notifications. deadline (monotonic) is cut to the call's."""
    server.last_id += 1
    send_all(server, rpc_line({"jsonrpc": "2.0", "id": server.last_id, "method": method,
                               "params": params}), settings, call)
    deadline = min(deadline, call.deadline)
    while True:
        message = read_message(server, method, settings, call, deadline)
        if "method" in message and "id" in message:         # the server asks us
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {}} \
                if message["method"] == "ping" else \
                rpc_error(message["id"], -32601, "Method not found")
            send_all(server, rpc_line(answer), settings, call)
        elif message.get("id") == server.last_id and "method" not in message:
            if isinstance(message.get("error"), dict):
                raise RpcError(message["error"].get("code"), str(message["error"].get("message")))
            if not isinstance(message.get("result"), dict):
                raise mcp_trouble(settings, server.name, f"answered {method} without a result")
            return message["result"]


def read_message(server: McpServer, method: str, settings: dict, call: Call,
                 deadline: float) -> dict:
    """The server's next message, read in a selector until deadline."""
    child = server.child
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        selector.register(child.stderr, selectors.EVENT_READ)
        while (end := server.pending.find(b"\n")) < 0:
            if len(server.pending) > MCP_LINE_BYTES:
                raise mcp_trouble(settings, server.name, f"wrote a line longer than "
                                                         f"{MCP_LINE_BYTES // MIB} MiB")
            left = deadline - time.monotonic()
            if call.left() <= 0:
                raise timed_out(settings, call, f" (waiting for MCP server {server.name!r})")
            if left <= 0:
                raise mcp_trouble(settings, server.name,
                                  f"did not answer {method} within {MCP_ANSWER_SECS:g} s")
            for key, _ in selector.select(left):
                data = read_some(key.fileobj)
                if key.fileobj is child.stderr:
                    server.errors = (server.errors + (data or b""))[-MCP_STDERR_KEPT_BYTES:]
                    if data == b"":
                        selector.unregister(child.stderr)
                elif data:
                    server.pending += data
                elif data == b"":
                    said = server.errors + (read_some(child.stderr) or b"")  # its last words
                    raise mcp_trouble(settings, server.name, "exited", exit_status(child), said)
    line = bytes(server.pending[:end])
    del server.pending[:end + 1]
    message = json_or_none(line)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        shown = clean(line[:200].decode(errors="replace"), 80)
        raise mcp_trouble(settings, server.name, f"answered garbage: {shown!r}")
    return message


def read_some(pipe) -> bytes | None:
    """What a non-blocking pipe has now: b"" at EOF, None when nothing waits."""
    try:
        return os.read(pipe.fileno(), READ_SIZE)
    except BlockingIOError:
        return None


def send_all(server: McpServer, data: bytes, settings: dict, call: Call) -> None:
    """Write data to the server's stdin, waiting for room until the deadline (a
    server that reads nothing must not hang the call)."""
    view = memoryview(data)
    with selectors.DefaultSelector() as selector:
        selector.register(server.child.stdin, selectors.EVENT_WRITE)
        while view:
            if call.left() <= 0:
                raise timed_out(settings, call, f" (writing to MCP server {server.name!r})")
            if selector.select(call.left()):
                try:
                    view = view[os.write(server.child.stdin.fileno(), view):]
                except BlockingIOError:
                    pass
                except OSError:
                    raise mcp_trouble(settings, server.name, "exited", exit_status(server.child),
                                      server.errors) from None


def exit_status(child) -> int | None:
    """The status of a child that closed its end, given MCP_EXIT_SECS to finish."""
    import subprocess
    try:
        return child.wait(MCP_EXIT_SECS)
    except subprocess.TimeoutExpired:
        return None


def mcp_trouble(settings: dict, name: str, what: str, status: int | None = None,
                said: bytes = b"") -> ProviderError:
    """One line naming the server, with its exit status and last stderr line if any."""
    lines = said.decode(errors="replace").strip().splitlines()
    return ProviderError(f"MCP server {name!r} {what}"
                         + (f" (exit status {status})" if status is not None else "")
                         + (f": {clean(lines[-1], 200)}" if lines else ""),
                         settings["name"], reason="MCP server failed")


def stop_mcp_server(server: McpServer, call: Call) -> None:
    """MCP shutdown: close its stdin, give it MCP_EXIT_SECS to go (none past the
    deadline), then stop its whole process group (6: SIGTERM, SIGKILL after the
    grace), past the deadline within a second."""
    import subprocess
    try:
        server.child.stdin.close()
    except OSError:
        pass
    try:
        server.child.wait(max(min(MCP_EXIT_SECS, call.left()), 0))
    except subprocess.TimeoutExpired:
        pass
    stop_group(server.child, kill_grace(call))


# -----------------------------------------------------------------------------
# the agent tools: Read, Write, Edit, Bash in working_dir
# -----------------------------------------------------------------------------
# Claude Code's names and arguments (models are trained on them). A path must be
# inside working_dir after its symlinks are resolved, and is then opened one
# component at a time with O_NOFOLLOW from the resolved working_dir, so that a
# folder swapped for a symlink between the check and the open fails instead of
# leading out. A hard link inside to a file outside is that file (a path cannot
# tell). Bash is not confined: it runs as the user, in working_dir.

READ_DEFAULT_LINES = 2000       # as Claude Code's Read
READ_LINE_BYTES = 2000          # a longer line is cut there
EDIT_MAX_BYTES = 16 * MIB       # a larger file is not edited in memory
BASH_DEFAULT_SECS = 120.0
BASH_DRAIN_BYTES = MIB          # read after the command ends: what the pipe still holds
BASH_NOTES_BYTES = 100          # kept free under max_tool_result_bytes for the notes

PATH_ARG = {"type": "string", "description": "The path of the file, relative to the working "
                                             "directory or absolute inside it"}
AGENT_TOOLS = {   # name: (description, properties, required)
    "Read": ("Reads a file in the working directory, as `cat -n` shows it (line numbers from "
             f"1), up to {READ_DEFAULT_LINES} lines from offset.",
             {"file_path": PATH_ARG,
              "offset": {"type": "number", "description": "The line number to start reading "
                                                          "from (the first line is 1)"},
              "limit": {"type": "number", "description": "The number of lines to read"}},
             ["file_path"]),
    "Write": ("Writes a file in the working directory (created with its folders, or replaced).",
              {"file_path": PATH_ARG,
               "content": {"type": "string", "description": "The content to write to the file"}},
              ["file_path", "content"]),
    "Edit": ("Replaces old_string by new_string in a file of the working directory. Fails when "
             "old_string is missing, or found more than once without replace_all.",
             {"file_path": PATH_ARG,
              "old_string": {"type": "string", "description": "The text to replace"},
              "new_string": {"type": "string", "description": "The text to replace it with "
                                                              "(different from old_string)"},
              "replace_all": {"type": "boolean", "description": "Replace all occurrences of "
                                                                "old_string (default false)"}},
             ["file_path", "old_string", "new_string"]),
    "Bash": ("Runs a command with `bash -c` in the working directory; stdout and stderr "
             "together, then the exit code. Nothing it starts outlives it.",
             {"command": {"type": "string", "description": "The command to execute"},
              "timeout": {"type": "number", "description": "Optional timeout in milliseconds "
                                                           f"(default {BASH_DEFAULT_SECS:.0f}000)"},
              "description": {"type": "string",
                              "description": "What this command does, in 5-10 words"}},
             ["command"]),
}


def agent_tools(names, folder: str | None, limit: int, call: Call) -> list[Tool]:
    """The agent tools named (others are not offered), working in folder (None: the
    current directory), Bash's output cut at limit bytes and its run ending by
    the call's deadline. A name omega has no tool for is a ConfigError."""
    unknown = [name for name in names if name not in AGENT_TOOLS]
    if unknown:
        raise ConfigError(f"allowed_tools: {shorten(repr(unknown[0]), 60)} is not an agent tool "
                          f"of the HTTP backends (they have {', '.join(AGENT_TOOLS)})")
    root = os.path.realpath(folder or ".")
    runs = {"Read": functools.partial(read_tool, root, limit),
            "Write": functools.partial(write_tool, root),
            "Edit": functools.partial(edit_tool, root),
            "Bash": functools.partial(bash_tool, root, limit, call)}
    return [Tool(name, runs[name], description, {"type": "object", "properties": properties,
                                                 "required": required})
            for name, (description, properties, required) in AGENT_TOOLS.items()
            if name in names]


def open_inside(root: str, file_path: str, flags: int, make_folders: bool = False) -> int:
    """A descriptor of the regular file file_path names inside root (relative to it
    or absolute inside it). Inside means by path components after every symlink
    is resolved (`/srv/work-evil` is not inside `/srv/work`); the open then walks
    the resolved path from root with O_NOFOLLOW at each step."""
    real = os.path.realpath(os.path.join(root, file_path))
    if real == root or os.path.commonpath([root, real]) != root:
        raise ToolFailed(f"{file_path}: outside the working directory {root}")
    *folders, name = os.path.relpath(real, root).split(os.sep)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            if make_folders:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, dir_fd=fd)
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: a FIFO must not hang the call; it is refused below anyway.
        opened = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666,
                         dir_fd=fd)
    except OSError as e:
        raise ToolFailed(f"{file_path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(opened).st_mode):
        os.close(opened)
        raise ToolFailed(f"{file_path}: not a regular file")
    os.set_blocking(opened, True)
    return opened


def read_tool(root: str, max_bytes: int, /, file_path: str, offset: int | None = None,
              limit: int | None = None) -> str:
    """Lines offset.. (from 1) of the file, at most limit of them, numbered as `cat
    -n` does; read a line at a time, each cut at READ_LINE_BYTES, and no more than
    max_bytes in all: a huge file or a huge line costs no memory."""
    first, count = max(int(offset or 1), 1), max(int(limit or READ_DEFAULT_LINES), 1)
    shown, size = [], 0
    with os.fdopen(open_inside(root, file_path, os.O_RDONLY), "rb") as f:
        for number in itertools.count(1):
            line = f.readline(READ_LINE_BYTES)
            if not line or number >= first + count or size > max_bytes:
                break
            rest = line
            while not rest.endswith(b"\n") and (rest := f.readline(READ_LINE_BYTES)):
                pass                                    # the rest of a long line, skipped
            if number >= first:
                shown.append(f"{number:6}\t" + line.rstrip(b"\r\n").decode(errors="replace"))
                size += len(shown[-1]) + 1
    if shown:
        return "\n".join(shown)
    return "(the file is empty)" if first == 1 else f"(the file has fewer than {first} lines)"


def write_tool(root: str, /, file_path: str, content: str) -> str:
    data = content.encode()
    with os.fdopen(open_inside(root, file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                               make_folders=True), "wb") as f:
        f.write(data)
    return f"wrote {len(data):,} bytes to {file_path}"


def edit_tool(root: str, /, file_path: str, old_string: str, new_string: str,
              replace_all: bool = False) -> str:
    """old_string replaced by new_string: once, where it is unique, or everywhere
    with replace_all. Read and written through one descriptor."""
    if not old_string or old_string == new_string:
        raise ToolFailed("old_string must be non-empty and different from new_string")
    with os.fdopen(open_inside(root, file_path, os.O_RDWR), "r+b") as f:
        if os.fstat(f.fileno()).st_size > EDIT_MAX_BYTES:
            raise ToolFailed(f"{file_path}: larger than {EDIT_MAX_BYTES // MIB} MiB, not edited")
        try:
            text = f.read().decode()
        except UnicodeDecodeError:
            raise ToolFailed(f"{file_path}: not UTF-8 text") from None
        found = text.count(old_string)
        if not found:
            raise ToolFailed(f"{file_path}: old_string not found")
        if found > 1 and not replace_all:
            raise ToolFailed(f"{file_path}: old_string found {found} times; give more context "
                             "to make it unique, or set replace_all")
        f.seek(0)
        f.write(text.replace(old_string, new_string, -1 if replace_all else 1).encode())
        f.truncate()
    return f"{file_path}: replaced {found if replace_all else 1} occurrence(s)"


def keyless_environment() -> dict:
    """os.environ without the variables that hold keys: those of SECRET_ENV, and any
    whose value is a key omega has used (one that api_key_env named, say)."""
    return {k: v for k, v in os.environ.items()
            if k not in SECRET_ENV and v.strip() not in _known_secrets}


def bash_tool(root: str, max_bytes: int, call: Call, /, command: str, timeout=None,
              description: str = "") -> str:
    """Run command with `bash -c` in root, in its own process group, stdin empty,
    without the environment's API keys; stdout and stderr together, kept up to
    max_bytes with the notes (the rest counted, not held). The group is stopped
    (6) when bash exits (a `sleep 300 &` dies with it), at the timeout or the
    call's deadline, whichever is first, and on Ctrl-C (SIGTERM and SIGHUP too,
    which the CLI turns into KeyboardInterrupt). description is for the user."""
    import subprocess
    seconds = min(float(timeout) / 1000 if timeout and finite(timeout) else BASH_DEFAULT_SECS,
                  call.left())
    if seconds <= 0:
        raise ToolFailed(f"not run: {seconds:g} s left (the timeout, or the call's deadline)")
    try:
        child = subprocess.Popen(["bash", "-c", command], cwd=root, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=keyless_environment(),
                                 start_new_session=True)
    except OSError as e:
        raise ToolFailed(f"bash: {e.strerror or e}") from None
    room = max(max_bytes - BASH_NOTES_BYTES, 0)
    try:
        kept, total, stopped = command_output(child, time.monotonic() + seconds, room, call)
    finally:
        stop_group(child, kill_grace(call))
    # Cut again after decoding: each byte that is not UTF-8 grows to three.
    text = kept.decode(errors="replace").encode()[:room].decode(errors="ignore")
    notes = [f"[output cut: the first {room:,} of {total:,} bytes]"] if total > room else []
    notes.append(f"[stopped after {round(seconds, 1):g} s]" if stopped else
                 f"[exit code {child.returncode}]")
    text = "\n".join([text.rstrip("\n"), *notes]) if text else "\n".join(notes)
    if stopped or child.returncode:
        raise ToolFailed(text)
    return text


def command_output(child, end: float, max_bytes: int,
                   call: Call) -> tuple[bytearray, int, bool]:
    """(the first max_bytes of the output, its size, whether end or the stop of the
    call's map came first), read until the leader exits (not until the pipe closes:
    a background process may hold it open), then what the pipe still holds, up to
    BASH_DRAIN_BYTES more."""
    fd, kept, total, ended_at = child.stdout.fileno(), bytearray(), 0, None
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if ended_at is None:
                if child.poll() is not None:
                    ended_at = total
                elif time.monotonic() >= end or call.stopped():
                    return kept, total, True
            # Polled, since a leader's exit wakes no selector while others hold the pipe.
            wait = 0 if ended_at is not None else max(min(end - time.monotonic(), 0.1), 0)
            data = read_some(child.stdout) if selector.select(wait) else None
            if data == b"" or ended_at is not None and (
                    data is None or total - ended_at > BASH_DRAIN_BYTES):
                return kept, total, False
            if data:
                total += len(data)
                kept += data[:max(0, max_bytes - len(kept))]


# =============================================================================
# 11. Diagnostics: --check and the first-run hint
# =============================================================================
# What this machine has, found without a paid call: the readiness probes that
# the backend table names (PROBES), each provider's readiness for --check, and for
# an error on a machine not set up, which other providers are ready.

def key_ready(settings: dict, deep: bool = False) -> tuple[bool, str]:
    """Ready when a key is there (or none is needed): no request is made."""
    key, source = settings.get("api_key"), settings["sources"].get("api_key", "none")
    if key:
        return True, f"key {mask(key)} from {source.replace('env ', '$')}"
    try:
        require_key(settings)
    except AuthError:
        name = settings["name"]
        return False, "no API key (" + " or ".join(
            [f"provider.{name}.api_key", *("$" + v for v in BACKENDS[name].key_env)]) + ")"
    return True, f"no key, none needed for {settings['base_url']}"


OLLAMA_PROBE_SECS = 2.0      # --check's look at a local Ollama, body included


def ollama_ready(settings: dict, deep: bool = False) -> tuple[bool | None, str]:
    """GET /api/tags, 2 s in all and a small body at most: never a model call."""
    if not deep:
        return None, "not probed"
    settings = {**settings, "max_retries": 0, "max_response_bytes": 1024 * 1024}
    try:
        models = ollama_models(settings, Call.starting_now(OLLAMA_PROBE_SECS))
    except ProviderError as e:
        return False, f"{settings['base_url']} not answering ({e.reason})"
    except ConfigError as e:
        return False, str(e)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False, f"{settings['base_url']}/api/tags did not list models"
    return True, f"{settings['base_url']} answering, {len(models)} models"


def claude_code_ready(settings: dict, deep: bool = False) -> tuple[bool, str]:
    """The CLI on PATH, and with deep=True its --version (5 s, small output)."""
    command = shlex.split(settings["command"])[0]
    found = shutil.which(command)
    if not found:
        return False, f"{command!r} not found on PATH"
    if not deep:
        return True, found
    try:
        code, out, _ = run_claude([found, "--version"], "", {
            **settings, "max_response_bytes": 65536}, Call.starting_now(5.0))
    except OmegaError as e:
        return False, f"{found} --version failed ({getattr(e, 'reason', e)})"
    version = clean((out.strip().splitlines() or [""])[0], 80)
    return code == 0 and bool(version), f"{version or 'no version'} at {found}"


# The readiness checks a backend's `probe` names: (settings, deep) -> (ready, why).
PROBES = {"key": key_ready, "ollama": ollama_ready, "claude-code": claude_code_ready}


def readiness(settings: dict, deep: bool = False) -> tuple[bool | None, str]:
    """(ready?, why) for one provider, from what this machine has. deep=True also
    asks the CLI for its version and Ollama for its models; never a paid call.
    None: cannot tell without probing."""
    if not settings["enabled"]:
        return False, "disabled in the config"
    return PROBES[BACKENDS[settings["name"]].probe](settings, deep)


def ready_elsewhere(raw: dict, path: str | None, failed: str) -> str:
    """'; ready here: openai ($OPENAI_API_KEY) - use -p openai or set provider.default'
    from local checks only (no network), for an error on a machine not set up."""
    ready = []
    for name in NAMES:
        if name == failed:
            continue
        try:
            settings = provider_settings(raw, name, path)
        except ConfigError:
            continue
        ok, why = readiness(settings)
        source = settings["sources"].get("api_key", "")
        if ok:          # "$OPENAI_API_KEY", "key in config", or claude's path
            ready.append((name, "$" + source[4:] if source.startswith("env ")
                          else "key in config" if source == "file" else why))
    if not ready:
        return "; nothing else is ready here either (see: python3 omega.py --check)"
    listed = ", ".join(f"{n} ({why})" for n, why in ready)
    return f"; ready here: {listed} - use -p {ready[0][0]} or set provider.default"


def check(config, out, provider: str | None = None) -> int:
    """--check: every provider, whether it is ready here and why, and where each
    value came from. Exit 0 when the provider asked about (default: the default
    provider) is ready, else 1."""
    loaded = load_config(config)
    providers, default = loaded["provider"], loaded["provider"]["default"]
    asked = provider or default
    check_provider(asked, "provider")
    out(f"config file: {loaded['_file'] or 'none (built-in defaults)'}")
    older = older_tables(read_config(config)[0])
    if older:
        out(f"note: omega reads {' and '.join(f'[omega.{t}]' for t in older)} now; "
            f"{' and '.join(f'[{t}]' for t in older)} in {loaded['_file']} "
            f"{'is' if len(older) == 1 else 'are'} left to your application")
    out(f"default provider: {default}" + (f", fallback: {', '.join(providers['fallback'])}"
                                          if providers["fallback"] else ""))
    if asked != default:
        out(f"checking: {asked}")
    out("")
    rows, verdict = [("provider", "enabled", "model", "model_complex", "ready", "why")], 1
    for name in NAMES:
        settings = provider_settings(loaded, name, loaded["_file"])
        settings["sources"] = providers[name]["_sources"]
        ok, why = readiness(settings, deep=True)
        rows.append((name, "yes" if settings["enabled"] else "no", settings["model"],
                     settings["model_complex"] or "-", "yes" if ok else "no", why))
        if name == asked and ok:
            verdict = 0
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
            + "  " + row[5])
    out("")
    out("where each value came from (file, env VAR or default):")
    for name in NAMES:
        section, sources = providers[name], providers[name]["_sources"]
        shown = [f"{key}={shown_value(key, section.get(key))} ({sources[key]})"
                 for key in ("model", "model_complex", "base_url", "api_key", "command",
                             "timeout_secs") if key in sources]
        out(f"  {name}: " + ", ".join(shown))
    return verdict


def shown_value(key: str, value) -> str:
    if value is None:
        return "-"
    return mask(value) if key in ("api_key", "oauth_token") else str(value)


# =============================================================================
# 12. Conversation log: every exchange in SQLite, so a conversation can go on
# =============================================================================
# One table, one row per exchange (a prompt and its answer, or its error); the rows
# of a conversation share its id. Only LOG_FIELDS are ever written, so no key can
# reach the file, and known keys are redacted from the text on its way in.
# Several CLI runs may write at once: WAL lets readers and a writer work side by
# side, the busy timeout makes writers queue, and each row is one transaction.
# logged() at the end is how a call writes to it, a CLI call's too (via record()).

LOG_SCHEMA_VERSION = 2       # PRAGMA user_version: 2 added tool_calls; 1 is upgraded
LOG_BUSY_SECS = 5.0          # how long a run waits for another one's write, in all
LOG_OFF = ("0", "false", "no", "off")           # OMEGA_LOG values that turn the log off
LOGGED_RESULT_BYTES = 4096   # of a tool call's result, in the log
LOGGED_CALL_CHARS = 200      # a logged tool call's line in --logs
LOG_FIELDS = ("provider", "model", "system_prompt", "prompt", "answer", "input_tokens",
              "output_tokens", "cost_usd", "duration_ms", "stop_reason", "session_id",
              "error", "asked_model", "tool_calls", "reasoning")
LOG_COLUMNS = ("conversation", "time", *LOG_FIELDS)
LOG_SCHEMA = """CREATE TABLE exchanges (
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
    error TEXT,                      -- one line when it failed or was stopped, else NULL
    asked_model TEXT,                -- the model the user asked for (-m, Context.model),
                                     -- else NULL: what --continue sends
    tool_calls TEXT,                 -- JSON: [{"name", "arguments", "result" (at most
                                     -- 4 KB), "error"}] of every call, or NULL
    reasoning TEXT                   -- the model's reasoning (received), or NULL
)"""
LOG_INDEX = "CREATE INDEX exchanges_by_conversation ON exchanges (conversation, id)"
# What an older file lacks, added the next time it is written (ALTER TABLE, in the
# write's transaction, no row lost); until then it reads as NULL. A version-1 file
# may lack both (asked_model came late in version 1) and becomes version 2; a file
# of either version may lack reasoning, which an older omega leaves alone.
LOG_ADDED_COLUMNS = {"asked_model": "TEXT", "tool_calls": "TEXT", "reasoning": "TEXT"}
# A conversation with an exchange that was answered: one that --continue may go on.
ANSWERED = "answer IS NOT NULL AND error IS NULL"
# The files SQLite keeps for the log: itself, its write-ahead log, its shared
# memory index and its rollback journal. None may be a symbolic link.
LOG_FILES = ("", "-wal", "-shm", "-journal")
LOG_FULL_BELOW = 1024 * 1024    # free bytes under which an I/O error means a full disk

# SQLite's primary result codes that the messages below put in plain words.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, \
    SQLITE_CANTOPEN, SQLITE_NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


def log_path(raw: dict, for_cli: bool) -> str | None:
    """The conversation log's file, or None when the log is off. On for the CLI
    unless `[omega.log] enabled = false` or OMEGA_LOG=0; off for library calls
    unless `[omega.log] enabled = true`. The file is `[omega.log] path`, else
    $OMEGA_LOG_PATH, else ~/.omega/log.db (an empty value counts as unset). raw: the
    config dict, as read_config() or load_config() return it."""
    section = own_table(raw, "log")
    enabled = section.get("enabled")
    if enabled is None:
        # The variable can only turn the log off: a library call is logged only
        # when its own config asks for it, whatever the environment says.
        enabled = for_cli and os.environ.get("OMEGA_LOG", "").strip().lower() not in LOG_OFF
    return log_file(raw) if enabled else None


def log_file(raw: dict) -> str:
    """Where the log is (or would be), whether or not it is on: `[omega.log] path`,
    else $OMEGA_LOG_PATH, else ~/.omega/log.db."""
    path = own_table(raw, "log").get("path") or os.environ.get("OMEGA_LOG_PATH") \
        or os.path.join(omega_folder(), "log.db")
    return os.path.abspath(os.path.expanduser(path))


def log_exchange(path: str, entry: dict) -> str:
    """Append one exchange to the log at path (made when missing) and return the
    conversation id: entry["conversation"] to continue one, or None for a new id.
    entry holds LOG_FIELDS (one left out is NULL) and may hold "time" (seconds
    since the epoch; default: now). Any other field is refused rather than
    dropped, so that a wiring mistake shows and nothing else reaches the file."""
    import sqlite3
    unknown = sorted(str(k) for k in entry if k not in ("conversation", "time", *LOG_FIELDS))
    if unknown:
        raise log_error(path, f"cannot log the field(s) {', '.join(unknown)} "
                              f"(known: conversation, time, {', '.join(LOG_FIELDS)})")
    conversation = entry.get("conversation")
    if conversation is not None:
        conversation = conversation_id(path, conversation)
    when = entry.get("time")
    row = (utc_iso(when if number(when) and 0 <= when < 1e11 else time.time()),
           *log_row(entry))
    try:
        conn = open_log(path, create=True)
        try:
            return with_retries(conn, lambda c: append(c, path, conversation, row))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as e:
        raise log_failure(path, e) from None


def logged_conversation(path: str, conversation: str | None) -> tuple[str, list[dict]]:
    """(id, rows) of a conversation, oldest first: the one whose id is or starts
    with `conversation`, or when that is None the most recent one in which anything
    was answered (a first run that failed is nothing to go on with). Each row is a
    dict of LOG_COLUMNS; a failed or interrupted exchange has its `error` set, and
    as its `answer` the text received before that, if any.
    Never creates the file. NoConversation when there is no such conversation."""
    if conversation is None:
        rows = read_log(path, "WHERE conversation = (SELECT conversation FROM exchanges "
                              f"WHERE {ANSWERED} ORDER BY id DESC LIMIT 1) ORDER BY id", ())
        if not rows and rows is not None and recent_exchanges(path, 1):
            raise NoConversation(clean(f"nothing to continue in {path}: no exchange there "
                                       "was answered yet", 1000))
    else:
        start = conversation_id(path, conversation, prefix=True)
        # The rows of at most two conversations with that start: one, or proof of two.
        rows = read_log(path, "WHERE conversation IN (SELECT DISTINCT conversation FROM "
                              "exchanges WHERE conversation LIKE ? LIMIT 2) ORDER BY id",
                        (start + "%",))
        found = sorted({row["conversation"] for row in rows or ()})
        if len(found) > 1:
            raise NoConversation(clean(f"{start} is the start of more than one conversation "
                                       f"in {path} ({', '.join(found)}, …): give more of "
                                       "its id", 1000))
        if rows:
            return found[0], rows
        if rows is not None and recent_exchanges(path, 1):
            raise NoConversation(clean(f"no conversation {start} in {path}", 1000))
    if not rows:
        raise log_error(path, "nothing to continue: no exchange has been logged there yet",
                        NoConversation)
    return rows[0]["conversation"], rows


def recent_exchanges(path: str, n: int) -> list[dict]:
    """The last n exchanges, of whichever conversations, newest last, each a dict
    of LOG_COLUMNS. No log file yet: [] (and still no file)."""
    if n <= 0:
        return []
    n = min(n, 2 ** 63 - 1)                # "all of them": SQLite's integers end here
    return (read_log(path, "ORDER BY id DESC LIMIT ?", (n,)) or [])[::-1]


def new_conversation_id() -> str:
    """8 random lowercase hex characters: short enough to type, and 4 billion of
    them, so that the check for one already taken almost never has to try again."""
    return os.urandom(4).hex()


def conversation_id(path: str, value, prefix: bool = False) -> str:
    """value as a conversation id (case and surrounding spaces forgiven), or with
    prefix=True as the start of one (1 to 8 of its characters)."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9a-f]{1,8}" if prefix else r"[0-9a-f]{8}", text):
        raise NoConversation(clean(f"no conversation {value!r} in {path} (an id is 8 hex "
                                   "characters, such as 3f9a0c12)", 1000))
    return text


def utc_iso(seconds: float) -> str:
    """2026-12-02T09:50:23.123Z: UTC, ISO 8601, which sorts as text sorts in time."""
    millis = int(seconds * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) \
        + f".{millis % 1000:03d}Z"


def log_row(entry: dict) -> tuple:
    """entry's LOG_FIELDS as the columns take them: text as text with the keys
    omega knows redacted, counts as whole numbers, None for anything else. An
    exchange that failed or was interrupted keeps its error, on one line, beside
    the text received before it."""
    error = entry.get("error")
    error = clean(error, 1000) or None if error is not None else None
    values = []
    for name in LOG_FIELDS:
        value = entry.get(name)
        if name == "error":
            value = error
        elif name == "tool_calls":
            value = logged_calls(value) if value else None
        elif name in ("input_tokens", "output_tokens", "duration_ms"):
            value = round(value) if number(value) and math.isfinite(value) and value >= 0 \
                else None
        elif name == "cost_usd":
            value = float(value) if number(value) and math.isfinite(value) else None
        else:
            value = redact(value) if isinstance(value, str) else None
        values.append(value)
    return tuple(values)


def logged_calls(calls) -> str:
    """ToolCalls (or their dicts) as the tool_calls column holds them: JSON of name,
    arguments, result (its first LOGGED_RESULT_BYTES, whole characters) and error,
    every key omega knows redacted."""
    rows = []
    for call in calls:
        call = call.to_dict() if isinstance(call, ToolCall) else call
        result = call.get("result")
        if isinstance(result, str) and len(result.encode()) > LOGGED_RESULT_BYTES:
            result = result.encode()[:LOGGED_RESULT_BYTES].decode("utf-8", "ignore") + "…"
        rows.append({"name": call.get("name"), "arguments": call.get("arguments"),
                     "result": result, "error": bool(call.get("error"))})
    return redact(json.dumps(rows, ensure_ascii=False, default=str))


def open_log(path: str, create: bool, as_it_stands: bool = False):
    """A connection to the log, or None when there is no file and create is False:
    reading opens the file read-only, so it never makes one. as_it_stands: read it
    as immutable, for a log nothing can write to (see read_log)."""
    import sqlite3
    refuse_links(path)
    if os.path.isdir(path):
        raise log_error(path, "is a directory, not a file")
    if not create:
        if not os.path.exists(path):
            return None
        return sqlite3.connect(f"file:{quote(path)}?mode=ro" + "&immutable=1" * as_it_stands,
                               uri=True, timeout=LOG_BUSY_SECS, isolation_level=None)
    # Prompts and answers are private: the folder and the file are the owner's
    # alone (SQLite would make the file 0644; its -wal and -shm copy its mode).
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if folder == omega_folder():          # a folder of the user's own choosing is theirs
            tighten(folder, 0o700)
    try:                                      # an empty file is a new db; never through a link
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        tighten(path, 0o600)
    return sqlite3.connect(path, timeout=LOG_BUSY_SECS, isolation_level=None)


def omega_folder() -> str:
    """~/.omega: omega's own folder, for the log and a config file."""
    return os.path.abspath(os.path.join(os.path.expanduser("~"), ".omega"))


def refuse_links(path: str) -> None:
    """The log is never reached through a symbolic link: one planted at its path
    (or at a file SQLite keeps beside it) could make omega write into, or create,
    another file, with the rights of whoever runs it (root included)."""
    for name in (path + suffix for suffix in LOG_FILES):
        if os.path.islink(name):
            which = "is" if name == path else f"has {os.path.basename(name)} beside it as"
            raise log_error(path, f"{which} a symbolic link, which omega does not follow "
                                  "(remove it, or set [omega.log] path)")


def tighten(path: str, most: int) -> None:
    """Take away every permission beyond `most` (0600, 0700) that path has: a log
    made by an older omega, or by hand, may be readable by everyone."""
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~most and not stat.S_ISLNK(info.st_mode):
        try:
            os.chmod(path, mode & most)
        except PermissionError:           # not ours to change: it stays as it is
            pass


def with_retries(conn, work):
    """work(conn), tried again while SQLite says the database is busy, for up to
    LOG_BUSY_SECS in all. The busy timeout covers most waits but not every one:
    switching a new file to WAL while another process sets it up fails with
    "database is locked" at once, without the busy handler being asked."""
    import sqlite3
    deadline = time.monotonic() + LOG_BUSY_SECS
    while True:
        try:
            return work(conn)
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.rollback()        # nothing of a failed try stays: a retry never writes twice
            left = deadline - time.monotonic()
            if sqlite_code(e) not in (SQLITE_BUSY, SQLITE_LOCKED) or left < 0.05:
                raise
            time.sleep(random.uniform(0.01, 0.05))     # apart, so as not to collide again
            conn.execute(f"PRAGMA busy_timeout = {int((left - 0.05) * 1000)}")


def append(conn, path: str, conversation: str | None, row: tuple) -> str:
    """One attempt at writing row: set the file up if it is new, pick an id if
    none is given, insert; one transaction. Returns the conversation id."""
    schema_version(conn, path)           # refuse a newer or foreign file before changing it
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")     # stays with the file: once per log
    # No fsync: a sync costs 5-20 ms, more than the rest of the log together. An
    # application crash still loses nothing; an OS crash or power cut may lose or
    # damage the newest rows (the log is a convenience, not a ledger).
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN IMMEDIATE")      # the write lock first: id check and insert are one step
    version = schema_version(conn, path)  # asked again: another run may just have set it up
    if version == 0:
        conn.execute(LOG_SCHEMA)
        conn.execute(LOG_INDEX)
    present = log_columns(conn)
    for column, kind in LOG_ADDED_COLUMNS.items():
        if column not in present:        # a file from before it was added
            conn.execute(f"ALTER TABLE exchanges ADD COLUMN {column} {kind}")
    if version < LOG_SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {LOG_SCHEMA_VERSION}")
    while conversation is None:
        candidate = new_conversation_id()
        if not conn.execute("SELECT 1 FROM exchanges WHERE conversation = ? LIMIT 1",
                            (candidate,)).fetchone():
            conversation = candidate
    conn.execute(f"INSERT INTO exchanges ({', '.join(LOG_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(LOG_COLUMNS))})", (conversation, *row))
    conn.execute("COMMIT")
    return conversation


def read_log(path: str, query: str, params: tuple) -> list[dict] | None:
    """The rows `SELECT <LOG_COLUMNS> FROM exchanges <query>` gives, as dicts;
    [] for a log with nothing in it yet, None when there is no file. A log on a
    read-only disk or in a read-only folder is read too: reading a WAL file wants to
    make its -shm index beside it, and where that cannot be done nobody can write
    the log either, so it is read as it stands (immutable)."""
    import sqlite3

    def select(conn):
        if schema_version(conn, path) == 0:
            return []
        present = log_columns(conn)
        columns = ", ".join(c if c in present else f"NULL AS {c}" for c in LOG_COLUMNS)
        found = conn.execute(f"SELECT {columns} FROM exchanges {query}", params)
        rows = [dict(zip(LOG_COLUMNS, row, strict=True)) for row in found.fetchall()]
        for row in rows:
            row["tool_calls"] = json_or_none(row["tool_calls"]) if row["tool_calls"] else None
        return rows

    def read(as_it_stands):
        conn = open_log(path, create=False, as_it_stands=as_it_stands)
        if conn is None:
            return None
        try:
            return with_retries(conn, select)
        finally:
            conn.close()
    try:
        try:
            return read(False)
        except sqlite3.Error as e:
            if sqlite_code(e) not in (SQLITE_CANTOPEN, SQLITE_READONLY):
                raise
        return read(True)
    except (sqlite3.Error, OSError) as e:
        raise log_failure(path, e) from None


def log_columns(conn) -> set:
    """The columns the file's exchanges table has (LOG_ADDED_COLUMNS may be missing)."""
    return {row[1] for row in conn.execute("PRAGMA table_info(exchanges)")}


def schema_version(conn, path: str) -> int:
    """The file's schema version: 0 for a new, empty file. A file from a newer
    release, or another program's database, is refused: it is not ours to change."""
    # One statement, so one snapshot: read apart, another run could set the file
    # up in between, and its table would show without its version number.
    version, tables = conn.execute("SELECT user_version, EXISTS (SELECT 1 FROM sqlite_master)"
                                   " FROM pragma_user_version").fetchone()
    if version > LOG_SCHEMA_VERSION:
        raise log_error(path, f"written by a newer omega (log schema {version}, this one "
                              f"knows {LOG_SCHEMA_VERSION}): upgrade omega.py or set "
                              "[omega.log] path")
    if version < 0 or version == 0 and tables:
        raise log_error(path, "is another program's database, not an omega log: "
                              "set [omega.log] path to another file")
    return version


def sqlite_code(e: Exception) -> int | None:
    """SQLite's primary result code of an sqlite3 error (Python 3.11 names it)."""
    code = getattr(e, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def log_failure(path: str, e: Exception) -> LogError:
    """An OSError or sqlite3.Error from the log, as one line a user can act on."""
    if isinstance(e, OSError):       # from making the file or its folder
        where = os.fspath(e.filename) if e.filename is not None else None
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        return log_error(path, what if where is None else f"cannot create it: {what}"
                         if where == path else f"cannot create its folder {where}: {what}")
    plain = {SQLITE_BUSY: f"locked by another process for more than {LOG_BUSY_SECS:g} s",
             SQLITE_LOCKED: f"locked by another process for more than {LOG_BUSY_SECS:g} s",
             SQLITE_READONLY: "cannot write to it or beside it (read-only file or folder)",
             SQLITE_CORRUPT: "corrupt (move it aside and a new log starts)",
             SQLITE_NOTADB: "not an SQLite database (move it aside and a new log starts)",
             SQLITE_FULL: "the disk is full",
             SQLITE_CANTOPEN: "cannot open it (are the file and its folder writable?)",
             }.get(sqlite_code(e))
    if sqlite_code(e) == SQLITE_IOERR and disk_full(path):
        plain = "the disk is full"     # SQLite says "disk I/O error" when its -shm cannot grow
    return log_error(path, plain or f"{type(e).__name__}: {e}")


def disk_full(path: str) -> bool:
    try:
        disk = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize < LOG_FULL_BELOW


def log_error(path: str, what: str, kind: type = LogError) -> LogError:
    return kind(clean(f"conversation log {path}: {what}", 1000))


def interruption(stop: BaseException) -> str:
    """What ended a call that did not end by itself, in the words the CLI uses:
    interrupted (Ctrl-C), stopped by SIGTERM or SIGHUP (see stopped_by_signal), or
    closed by its caller before the answer ended (a stream left or closed)."""
    if isinstance(stop, GeneratorExit):
        return "closed before the answer ended"
    signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
    return "interrupted" if signum == signal.SIGINT else \
        f"stopped by {signal.Signals(signum).name}"


def record(log: str, ctx: Context, provider: str, outcome, received: str, started: float,
           conversation: dict | None, warn, thought: str | None = None) -> None:
    """Write one exchange to the log. outcome: the reply, or the error or the
    interruption (KeyboardInterrupt, GeneratorExit) it ended with, after the text
    `received` and the reasoning `thought`; provider: the one asked first, for a row
    that nothing else names a provider for. A failure to write is said to warn (or
    the debug log), not raised."""
    reply = outcome if isinstance(outcome, OutgoingMessage) else None
    meta = reply.metadata if reply else MessageMetadata()
    error = None if reply else str(outcome) if isinstance(outcome, OmegaError) \
        else interruption(outcome)
    entry = {"conversation": (conversation or {}).get("id"), "time": started,
             "provider": meta.provider_used or getattr(outcome, "provider", None) or provider,
             "model": meta.model or ctx.model, "asked_model": ctx.model,
             "system_prompt": ctx.system_prompt,
             "prompt": ctx.current_message,
             "answer": reply.text if reply else received or getattr(outcome, "partial_text",
                                                                    None) or None,
             "input_tokens": meta.input_tokens, "output_tokens": meta.output_tokens,
             "cost_usd": meta.cost_usd, "duration_ms": round((time.time() - started) * 1000),
             "stop_reason": meta.stop_reason,
             "session_id": meta.session_id or getattr(outcome, "session_id", None),
             "error": error,
             "tool_calls": reply.tool_calls if reply else getattr(outcome, "tool_calls", None),
             "reasoning": reply.reasoning if reply else thought}
    try:
        written = log_exchange(log, entry)
    except OmegaError as e:
        if warn is not None:
            warn(f"warning: {e}")
        log_debug("log: %s", e)
        return
    if conversation is not None:
        conversation["id"] = written


def logged(pieces, log: str | None, ctx: Context, provider: str, conversation: dict | None,
           warn, show: Callable | None = None):
    """pieces, with the exchange written to the log at its end, when log names the
    file: the answer; or the text received and the error that ended it; or,
    interrupted (Ctrl-C, SIGTERM, SIGHUP, the stream closed before its end), the
    text received and how it was stopped. A ConfigError asked nothing of a
    provider: no row. A log that cannot be written never fails the call. show: told
    the reply once it is whole, before its row is written (the CLI prints it there,
    so that the log never delays the answer)."""
    started, received, thoughts, outcome = time.time(), [], [], None
    try:
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                outcome = end.value
                break
            (thoughts if type(piece) is ReasoningPiece else received).append(piece)
            yield piece
        if show is not None:
            show(outcome)
        return outcome
    except ConfigError:
        raise
    except (OmegaError, KeyboardInterrupt, GeneratorExit) as e:
        if outcome is None:        # an answer that arrived whole stays what is logged
            outcome = e
        raise
    finally:
        pieces.close()          # hung up before the row is written, not after
        if log and outcome is not None:
            record(log, ctx, provider, outcome, "".join(received), started, conversation,
                   warn, "".join(thoughts) or None)


# =============================================================================
# 13. Command line
# =============================================================================
# parse_args, prompt reading, main(): a thin layer over the public API (9) and the
# conversation log, with one line per error and an exit code per error class; then
# --each, one prompt per stdin line through map()'s workers (each_answer).

def parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog="omega", description="Send a prompt to an AI backend and print the answer.",
        epilog="The prompt is the words given; with none (or -) it is read from stdin; "
               "with both, stdin follows the words after a blank line. Exit codes: "
               "0 ok, 1 provider error or unreadable log, 2 config/usage (an unknown "
               "conversation too), 3 auth, 4 rate limit, "
               "5 timeout, 6 empty answer, 7 unavailable, 130 interrupted "
               "(129 SIGHUP, 143 SIGTERM).")

    def usage_error(message):                  # one line, like every other error
        raise ConfigError(f"{message} (see --help)")
    parser.error = usage_error
    add = parser.add_argument
    add("prompt", nargs="*", type=text_arg, help="the prompt words")
    add("-p", "--provider", choices=NAMES, metavar="PROVIDER",
        help="one of: " + ", ".join(NAMES))
    add("-m", "--model", type=text_arg, help="the model for this request")
    add("-s", "--system", default="", type=text_arg, help="system prompt")
    add("-c", "--config", help="config file (default: $OMEGA_CONFIG, else the first of "
                               f"{', '.join(config_paths())} that sets anything)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--complex", action="store_true", help="use the provider's model_complex")
    group.add_argument("--auto-route", action="store_true",
                       help="ask the fast model first whether the request is complex "
                            "(one extra call)")
    add("--max-tokens", type=int, metavar="N", help="maximum answer tokens")
    add("--temperature", type=float, metavar="T", help="sampling temperature")
    add("--timeout", type=float, metavar="SECS",
        help="deadline for the whole call in seconds, fallbacks included")
    add("--fallback", metavar="P,P", type=provider_list,
        help="providers to try in order if the first fails (with -p, only these)")
    add("--json", action="store_true", help="print {\"text\", \"metadata\"} (and \"tool_calls\") "
                                            "as JSON (never streamed)")
    add("--no-stream", action="store_true", help="print the answer when it is complete "
                                                 "(default: as it is written)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--continue", dest="go_on", action="store_true",
                      help="continue the most recent conversation in the log")
    talk.add_argument("--chat", metavar="ID", help="continue the logged conversation ID")
    talk.add_argument("--logs", nargs="?", const=3, type=int, metavar="N",
                      help="print the last N logged exchanges (default 3), newest last; "
                           "with --json as JSON lines")
    talk.add_argument("--each", action="store_true",
                      help="one prompt per stdin line, the words its template ({} is the "
                           "line, else the line follows them after a blank line); the answers "
                           "one a line, in order, newlines written \\n (--json: JSON lines)")
    add("-j", "--jobs", type=int, metavar="N", help="with --each: N calls at once (default 4)")
    add("--no-log", action="store_true", help="do not write this exchange to the log "
                                              "(~/.omega/log.db)")
    add("-q", "--quiet", action="store_true", help="no status lines on stderr")
    add("-v", "--verbose", action="store_true", help="debug log and tracebacks on stderr")
    add("--check", action="store_true", help="show which providers are ready here, and why")
    add("--version", action="version", version=f"omega {__version__}")
    # Attachments, JSON answers, model listing
    add("-a", "--attach", action="append", metavar="FILE", type=attachment_arg,
        help="send FILE with the prompt: an image (PNG, JPEG, GIF, WebP), a PDF or a text "
             "file; repeatable; - reads one from stdin (the prompt is then the words)")
    add("--schema", metavar="FILE|JSON", type=schema_arg,
        help="answer as JSON following this JSON Schema (a file, or the JSON itself); "
             "prints the JSON alone, compact")
    add("--models", action="store_true", help="list the provider's models, one a line")
    # Reasoning
    add("-r", "--reasoning", metavar="EFFORT|N",
        type=lambda v: check_reasoning(int(v) if v.isdecimal() else v, "-r"),
        help="how much the model may think: off, low, medium, high, or N tokens "
             "(default: the backend's own)")
    add("--show-reasoning", action="store_true",
        help="write the model's reasoning to stderr as it arrives (dim on a terminal)")
    # Tools
    add("--functions", action="append", metavar="FILE.py|CODE", type=text_arg,
        help="offer the model every top-level public function of this Python file (or "
             "code) as a tool it may call; repeatable; one status line on stderr per call")
    add("--approve", action="store_true",
        help="ask on the terminal before each tool call runs (no terminal: declined)")
    args = parser.parse_args(argv)
    if any(isinstance(a, Attachment) for a in args.attach or ()) and args.prompt in ([], ["-"]):
        usage_error("-a - reads the attachment from stdin: give the prompt as words")
    alone = next((flag for flag, given in (("--logs", args.logs is not None),
                                           ("--models", args.models), ("--check", args.check))
                  if given), None)
    if alone and args.prompt:
        usage_error(f"{alone} takes no prompt, and {shorten(' '.join(args.prompt), 40)!r} "
                    "would go nowhere")
    if args.logs is not None and args.logs < 0:
        usage_error(f"--logs: expected a number 0 or more, got {args.logs}")
    if args.each and (alone or any(isinstance(a, Attachment) for a in args.attach or ())):
        usage_error(f"--each reads stdin for its lines: not with {alone or '-a -'}")
    if args.each and args.approve:     # many workers cannot share one terminal's questions
        usage_error("--approve asks one call at a time: not with --each")
    if args.each and args.show_reasoning:   # many answers' thoughts would interleave
        usage_error("--show-reasoning shows one call's reasoning: not with --each "
                    "(--each --json keeps each line's)")
    if args.jobs is not None and (not args.each or args.jobs < 1):
        usage_error("-j: expected a number 1 or more, with --each" if args.each
                    else "-j goes with --each")
    return args


def text_arg(text: str) -> str:
    """A prompt word, -s or -m: text. A byte that is not UTF-8 (Python keeps it as a
    surrogate) could go in no request and no log: refused before anything is sent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        shown = raw.decode("utf-8", "backslashreplace")
        raise ConfigError(f"the argument '{shorten(shown, 60)}' is not UTF-8 text (byte "
                          f"0x{ord(text[e.start]) - 0xdc00:02x}); give text, or a file with -a"
                          ) from None
    return text


def attachment_arg(text: str) -> str | Attachment:
    """-a FILE: the path (read later, once, under the provider's limit); -a -: stdin's
    bytes, read now, before anything could take stdin for a prompt."""
    if text != "-":
        return text
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        raise ConfigError("-a -: there is no stdin to read the attachment from")
    return Attachment(stdin.read(), name="stdin")


def schema_arg(text: str) -> dict:
    """--schema: JSON text when it looks like JSON, else a file holding it."""
    where = "--schema"
    if text.lstrip().startswith(("{", "[")):
        text_arg(text)
    else:
        where = f"--schema {text}"
        try:
            with open(text, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file (give a file or the schema as JSON)") \
                from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read it as UTF-8 text "
                              f"({getattr(e, 'strerror', None) or e.reason})") from None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    check_schema(schema)
    return schema


def functions_from(sources: list[str]) -> list:
    """--functions: every top-level public function (not an imported one) of each
    Python file or piece of code, in the order they are defined. The code runs
    here, once, as a module of its own; an error in it is a ConfigError naming it."""
    import types
    found = []
    for number, source in enumerate(sources, 1):
        is_path = os.path.isfile(source) or re.fullmatch(r"[^\s()=:;'\"]+\.py", source)
        shown = shorten(source if is_path else " ".join(source.split()), 60)
        try:
            if is_path:
                with open(source, "rb") as f:
                    code = f.read().decode("utf-8")
            else:
                code = source
            name = f"omega_functions_{number}"
            module = types.ModuleType(name)
            module.__file__ = os.path.abspath(source) if is_path else "<--functions>"
            sys.modules[name] = module     # dataclasses and typing find a module by name
            exec(compile(code, module.__file__, "exec"), vars(module))
        except FileNotFoundError:
            raise ConfigError(f"--functions {shown}: no such file (give a .py file or the "
                              "code itself)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--functions {shown}: cannot read it as UTF-8 text "
                              f"({getattr(e, 'strerror', None) or e.reason})") from None
        except Exception as e:             # a syntax error, a failed import, what it raises
            raise ConfigError(f"--functions {shown}: {type(e).__name__}: {e}") from None
        functions = [value for key, value in vars(module).items() if not key.startswith("_")
                     and isinstance(value, types.FunctionType) and value.__module__ == name]
        if not functions:
            raise ConfigError(f"--functions {shown}: defines no public function")
        found += functions
    return found


def terminal_approval(warn: Callable, tty_path: str = "/dev/tty") -> Callable:
    """--approve: approve(call), which asks `Run get_weather(city="Paris")? [y/N]` on
    the terminal (never stdin, which may be the prompt's pipe). Where there is no
    terminal, every call is declined, and warn hears so once."""
    warned = []

    def approve(call: ToolCall) -> bool:
        try:       # unbuffered: a terminal cannot seek; and never made our controlling one
            with open(tty_path, "r+b", buffering=0,
                      opener=lambda path, flags: os.open(path, flags | os.O_NOCTTY)) as tty:
                return asked_on(tty, call)
        except OSError:
            if not warned:
                warned.append(True)
                warn("warning: --approve: no terminal to ask on, so every tool call is declined")
            return False
    return approve


def asked_on(tty, call: ToolCall) -> bool:
    """Ask on tty (a binary file) whether call may run, on one line, redacted; yes is
    y or yes."""
    tty.write(f"Run {clean(call_text(call.to_dict()), 500)}? [y/N] ".encode())
    return tty.readline().decode(errors="replace").strip().lower() in ("y", "yes")


def print_models(args, raw: dict, path: str | None) -> int:
    """--models: the provider's models, one a line (with --json, a JSON list)."""
    names = model_list(Options(provider=args.provider), raw, path)
    sys.stdout.write(json.dumps(names) + "\n" if args.json else "".join(n + "\n" for n in names))
    sys.stdout.flush()
    return 0


def provider_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        check_provider(name, "--fallback")
    return names


def read_prompt(words: list[str]) -> str:
    """The words, stdin, or the words then stdin after a blank line. Piped text
    loses its surrounding blank lines but keeps its indentation (code)."""
    if words in ([], ["-"]):
        return read_stdin()
    prompt = " ".join(words)
    if stdin_is_piped():
        piped = read_stdin()
        if piped:
            prompt += "\n\n" + piped
    return prompt


def read_stdin() -> str:
    if sys.stdin is None:
        return ""
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("stdin is not UTF-8 text (binary data cannot be a prompt)") from None
    return text.strip("\r\n").rstrip()


def stdin_is_piped() -> bool:
    """True for a pipe or a redirected file; a terminal or nothing is not."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def tell(line: str) -> None:
    """One line on stderr, if there is a stderr: never on stdout instead."""
    write_stderr(line + "\n")


def continued(log: str, conversation: str | None, ctx: Context, provider: str | None):
    """(id, ctx with the logged turns as history, provider) to go on with a logged
    conversation: its provider, and the model the user asked for in it (never the
    one a server said it used), unless -p / -m say otherwise; claude-code resumes
    its CLI session instead of resending the turns."""
    conversation, rows = logged_conversation(log, conversation)
    done = [r for r in rows if r["answer"] is not None and r["error"] is None]   # ANSWERED
    history = tuple(Message(role, text) for r in done
                    for role, text in (("user", r["prompt"]), ("assistant", r["answer"])))
    last = done[-1] if done else rows[-1]
    chosen = provider or last["provider"]
    if chosen not in NAMES:
        chosen = provider
    same = chosen == last["provider"]
    session = next((r["session_id"] for r in reversed(done) if r["session_id"]), None)
    ctx = replace(ctx, history=history,
                  system_prompt=ctx.system_prompt or last["system_prompt"] or "",
                  model=ctx.model or (last["asked_model"] if same else None),
                  session_id=session if same and keeps_sessions(chosen) else None)
    return conversation, ctx, chosen


def print_logs(log: str, n: int, as_json: bool) -> int:
    """--logs: the last n exchanges, newest last, each with its conversation id.
    What a server or a paste once wrote is shown without its terminal escapes: an
    answer must not write to the clipboard or clear the screen every time it is
    shown again (JSON escapes C0 controls itself; C1 controls are escaped here)."""
    for row in recent_exchanges(log, n):
        if as_json:
            print(re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}",
                         json.dumps(row, ensure_ascii=False)))
            continue
        calls = [f"  {tool_line(c, LOGGED_CALL_CHARS)}" for c in row["tool_calls"] or ()
                 if isinstance(c, dict)]
        row = {k: printable(v) if isinstance(v, str) else v for k, v in row.items()}
        what = "\n".join(x for x in (*calls, row["answer"],
                                     row["error"] and f"error: {row['error']}") if x)
        cost = dollars(row["cost_usd"]) if number(row["cost_usd"]) else ""
        print(" ".join(x for x in (f"[{row['conversation']}]", row["time"], row["provider"],
                                   row["model"], cost) if x))
        print(f"> {row['prompt']}\n{what}\n")
    return 0


class ReasoningShown:
    """--show-reasoning: the reasoning on stderr as it arrives, dim on a terminal,
    redacted and without escape sequences as any text from a server; a line break
    ends it before answer text follows (stdout and stderr may share a terminal)."""

    def __init__(self):
        self.open = False

    def __call__(self, piece: str) -> None:
        piece = printable(piece)
        dim = sys.stderr is not None and sys.stderr.isatty()
        write_stderr(f"\x1b[2m{piece}\x1b[0m" if dim else piece)
        self.open = True

    def end(self) -> None:
        if self.open:
            write_stderr("\n")
            self.open = False


def print_stream(answer: Stream, thought: ReasoningShown | None = None) -> None:
    """Write each piece as it arrives, then a newline. When the answer breaks off
    (an error, Ctrl-C), the line is ended and the error says how much arrived; the
    stream is closed whatever happens (the connection, the claude process group).
    thought: shows the reasoning (Stream's on_reasoning)."""
    with answer:
        try:
            for piece in answer:
                if thought is not None:
                    thought.end()
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (OmegaError, KeyboardInterrupt) as e:
            if answer.text:
                sys.stdout.write("\n")
                sys.stdout.flush()
                if isinstance(e, ProviderError):
                    raise e.with_context(message=f"{e.message} (the answer broke off after "
                                                 f"{len(answer.text):,} characters)") from None
            raise
    sys.stdout.write("\n")


def print_reply(reply: OutgoingMessage, args, thought: ReasoningShown | None = None) -> None:
    """A whole answer, as reply_text() gives it, on stdout; thought: shows its
    reasoning first."""
    if thought is not None and reply.reasoning:
        thought(reply.reasoning)
        thought.end()
    sys.stdout.write(reply_text(reply, args) + "\n")
    sys.stdout.flush()


def reply_text(reply: OutgoingMessage, args) -> str:
    """A whole answer: its text; with --json, {"text", "metadata"}; with a schema,
    the JSON answer alone, compact, so that it pipes into jq."""
    if args.json:               # redacted: a tool's result may hold a key it read
        return redact(json.dumps(reply.to_dict(), ensure_ascii=False, allow_nan=False))
    if args.schema is not None:
        return json.dumps(reply.data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return reply.text


# -----------------------------------------------------------------------------
# --each: one prompt per stdin line, through map()'s workers
# -----------------------------------------------------------------------------

PROGRESS_EVERY_SECS = 0.1    # the progress line is redrawn at most this often


def print_each(args, ctx: Context, options: Options, config: tuple, log: str | None) -> int:
    """--each: a call per stdin line (ctx with the line's prompt), -j at a time. Each
    answer is printed on its own line as soon as the lines before it have theirs; a
    failed line prints an empty line (--json: {"error"}) and `omega: line N: error` on
    stderr. On a terminal stderr shows one progress line; the totals end it (with -q,
    nothing). Ctrl-C leaves the answers of the lines before the first unfinished one
    printed. 0 when every line was answered, else 1."""
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        raise ConfigError("--each: there is no stdin to read the lines from")
    template = "" if args.prompt == ["-"] else " ".join(args.prompt)
    progress = {"total": lines_left(stdin), "done": 0, "failed": 0, "cost": None,
                "started": time.monotonic(), "drawn": None, "quiet": args.quiet,
                "terminal": sys.stderr is not None and sys.stderr.isatty()}
    warned = set()

    def warn(message):                 # a log warning, once, above the progress line
        if message not in warned:
            warned.add(message)
            tell_above(progress, f"omega: {message}")
    outcomes = each_answer(stdin, each_prompt(template, ctx), options, args.jobs or 4,
                           config, log, warn)
    held, printed = {}, 0
    try:
        for index, outcome in outcomes:
            held[index] = outcome
            progress["done"] += 1
            if isinstance(outcome, OmegaError):
                progress["failed"] += 1
            elif outcome.metadata.cost_usd is not None:
                progress["cost"] = (progress["cost"] or 0.0) + outcome.metadata.cost_usd
            while printed in held:
                outcome, printed = held.pop(printed), printed + 1
                if isinstance(outcome, OmegaError):
                    tell_above(progress, f"omega: line {printed}: {outcome}")
                sys.stdout.write(each_line(outcome, args) + "\n")
                sys.stdout.flush()
            draw_progress(progress)
    finally:
        outcomes.close()
        draw_progress(progress, final=True)
    return 1 if progress["failed"] else 0


def each_prompt(template: str, ctx: Context) -> Callable:
    """--each: the function from a stdin line (bytes) to its prompt, ctx with the
    template's {} replaced by the line, or else the line after the template and a
    blank line. A line that is not UTF-8, or leaves no prompt, is that line's error."""
    def prompt(line: bytes) -> Context:
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start})") from None
        if "{}" in template:
            text = template.replace("{}", text)
        elif template:
            text = f"{template}\n\n{text}"
        if not text.strip():
            raise ConfigError("an empty line: no prompt")
        return replace(ctx, current_message=text)
    return prompt


def each_line(outcome, args) -> str:
    """One line of --each's output: the answer as print_reply() shows it, its line
    breaks written \\n (and \\r); for a failure, nothing (--json: {"error"})."""
    if isinstance(outcome, OmegaError):
        return json.dumps({"error": str(outcome)}, ensure_ascii=False) if args.json else ""
    return reply_text(outcome, args).replace("\r", "\\r").replace("\n", "\\n")


def lines_left(stdin) -> int | None:
    """The lines left in stdin when it is a regular file (a redirect), counted and
    then read again; None for a pipe or a terminal, whose lines are not known yet."""
    try:
        if not stat.S_ISREG(os.fstat(stdin.fileno()).st_mode):
            return None
        start = stdin.tell()
        lines, last = 0, b"\n"
        while block := stdin.read(READ_SIZE):
            lines, last = lines + block.count(b"\n"), block[-1:]
        stdin.seek(start)
    except (OSError, ValueError):
        return None
    return lines + (last != b"\n")


def draw_progress(progress: dict, final: bool = False) -> None:
    """--each's progress on stderr (see print_each's progress dict): on a terminal
    one line, redrawn in place at most every PROGRESS_EVERY_SECS, and the totals
    ending it (final); elsewhere only the totals; with -q nothing."""
    now = time.monotonic()
    if progress["quiet"] or not (final or progress["terminal"] and (
            progress["drawn"] is None or now - progress["drawn"] >= PROGRESS_EVERY_SECS)):
        return
    progress["drawn"] = now
    text = "omega: " + progress_text(progress["done"], progress["failed"], progress["total"],
                                     now - progress["started"], progress["cost"])
    write_stderr(("\r\x1b[K" if progress["terminal"] else "") + text + ("\n" if final else ""))


def tell_above(progress: dict, line: str) -> None:
    """A line on stderr above --each's progress line, which is then drawn again."""
    if progress["terminal"] and progress["drawn"] is not None and not progress["quiet"]:
        write_stderr("\r\x1b[K")
        tell(line)
        progress["drawn"] = None
        draw_progress(progress)
    else:
        tell(line)


def write_stderr(text: str) -> None:
    if sys.stderr is not None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def progress_text(done: int, failed: int, total: int | None, seconds: float,
                  cost: float | None) -> str:
    """'37/500 done, 2 failed, 4.1/s, ETA 1m53s, $0.042': without the total and the
    ETA when the total is not known, and without what is not known yet."""
    parts = [f"{done}/{total} done" if total is not None else f"{done} done"]
    if failed:
        parts.append(f"{failed} failed")
    rate = done / seconds if seconds > 0 else 0.0
    if rate:
        parts.append(f"{rate:.1f}/s")
        if total is not None and total > done:
            parts.append("ETA " + duration_text((total - done) / rate))
    if cost is not None:
        parts.append(dollars(cost))
    return ", ".join(parts)


def duration_text(seconds: float) -> str:
    """42s, 1m53s, 2h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def dollars(cost: float) -> str:
    """$0.042, $0.00012, $12.35."""
    return f"${cost:.2f}" if cost >= 1 else f"${cost:.3g}"


def stopped_by_signal(signum, frame):
    """SIGTERM and SIGHUP (`timeout`, CI runners, a closed terminal) end the call
    as Ctrl-C does: the claude process group is stopped, nothing is left behind."""
    raise KeyboardInterrupt(signum)


def main(argv=None) -> int:
    """The command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mcp-bridge"]:        # started by the claude CLI for its tools (10)
        return bridge_main(argv[1:])
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, stopped_by_signal)
    try:
        return run_cli(argv)
    except KeyboardInterrupt as e:     # another Ctrl-C while the first was being reported
        return interrupted_exit(e)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def interrupted_exit(stop: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the call: 130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
    return 128 + (stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT)


def run_cli(argv) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:                    # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except ConfigError as e:
        tell(f"omega: {e}")
        return e.exit_code
    if args.verbose:
        import logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("omega: %(levelname)s %(message)s"))
        logger = logging.getLogger("omega")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    thought = ReasoningShown() if args.show_reasoning else None

    def note(message) -> None:                 # a status line or the error, on a line of
        if thought is not None:                # its own after any reasoning shown
            thought.end()
        tell(f"omega: {message}")
    say = None if args.quiet else note
    try:
        if sys.stdout is None:
            raise ConfigError("stdout is closed: there is nowhere to write the answer")
        if args.check:
            return check(args.config, print, args.provider)
        raw, path = read_config(args.config)
        log = None if args.no_log else log_path(raw, for_cli=True)
        if args.logs is not None:
            return print_logs(log_file(raw), args.logs, args.json)   # also with the log off
        if args.models:
            return print_models(args, raw, path)
        tools = functions_from(args.functions) if args.functions else None
        prompt = "" if args.each else read_prompt(args.prompt)
        if not prompt.strip() and not args.each:
            raise ConfigError("no prompt: give it as words or on stdin (see --help)")
        for flag, value, key, kind in (("--max-tokens", args.max_tokens, "max_tokens", int),
                                       ("--temperature", args.temperature, "temperature", NUMBER),
                                       ("--timeout", args.timeout, "timeout_secs", NUMBER)):
            if value is not None:                  # checked as the config's keys are
                check_value(key, value, kind, flag)
        if args.auto_route:
            raw = {**raw, "provider": {**raw.get("provider", {}), "auto_route": True}}
        ctx = Context(prompt, system_prompt=args.system, model=args.model,
                      complex=args.complex, max_tokens=args.max_tokens,
                      temperature=args.temperature, reasoning=args.reasoning)
        provider, conversation = args.provider, None
        if args.go_on or args.chat:
            if not log:
                raise ConfigError(f"--{'continue' if args.go_on else 'chat'} needs the log, "
                                  "which is off (--no-log, OMEGA_LOG=0 or [omega.log] "
                                  "enabled = false)")
            conversation, ctx, provider = continued(log, args.chat, ctx, provider)
        if args.attach or args.schema is not None:
            ctx = replace(ctx, attachments=tuple(args.attach or ()), schema=args.schema)
        if args.each:
            return print_each(args, ctx, Options(provider=provider, fallback=args.fallback,
                                                 timeout=args.timeout, tools=tools),
                              (raw, path), log)
        # The config was read and checked above: the call takes it as it is, and
        # logs the exchange itself (a log warning shows even with -q).
        approve = terminal_approval(note) if args.approve else None
        options = Options(provider=provider, on_status=say, fallback=args.fallback,
                          timeout=args.timeout, tools=tools, approve=approve)
        streaming = args.schema is None and not args.json and not args.no_stream
        pieces = answer(ctx, options, streaming, conversation={"id": conversation},
                        config=(raw, path), log=log, warn=note,
                        show=None if streaming else lambda reply: print_reply(reply, args,
                                                                             thought))
        if streaming:
            print_stream(Stream(pieces, thought), thought)
        else:
            drain(pieces)                    # printed by print_reply, before the log
        sys.stdout.flush()
        return 0
    except BrokenPipeError:                    # `omega ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OmegaError as e:
        if args.verbose:
            import traceback
            traceback.print_exc(file=sys.stderr)
        note(e)
        return e.exit_code
    except KeyboardInterrupt as e:
        note(interruption(e))
        return interrupted_exit(e)
    except Exception as e:                     # a bug of ours: still one line, no traceback
        if args.verbose:
            import traceback
            traceback.print_exc(file=sys.stderr)
        note(f"internal error: {type(e).__name__}: {clean(e, 300)} "
             "(run with -v for details)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
