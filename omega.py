#!/usr/bin/env python3
"""omega: one small, dependable client for six AI backends.

    import omega
    omega.ask("Say hi")                                  # -> "Hi!"
    omega.ask("Say hi", provider="ollama", model="qwen3", system="Be brief")
    reply = omega.complete(omega.Context("Say hi"))      # -> OutgoingMessage

    python omega.py "Say hi"                             # the same from a shell

Backends: the local `claude` CLI (claude-code), Ollama, OpenAI and every
OpenAI-compatible server, Anthropic, OpenRouter and Gemini. Needs Python 3.11+
and `requests`; nothing else. Copy this file into your project and go.

The file reads top to bottom the way a request flows: errors, data types,
configuration, the HTTP transport, the six backends (each a request builder and
a response parser side by side), the PROVIDERS table, the status timer,
routing and fallback, the public API, and the command line.
"""

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

__version__ = "0.1.0"
__all__ = [
    "ask", "complete", "classify", "route", "load_config", "Message", "Context",
    "MessageMetadata", "OutgoingMessage", "PROVIDERS", "OmegaError", "ConfigError",
    "ProviderError", "AuthError", "RateLimitError", "ProviderTimeout", "EmptyResponse",
    "ProviderUnavailable",
]

USER_AGENT = f"omega/{__version__}"


# =============================================================================
# Errors
# =============================================================================

class OmegaError(Exception):
    """Base of every error omega raises. `exit_code` is what the CLI exits with."""
    exit_code = 1


class ConfigError(OmegaError):
    """Bad configuration or usage: malformed TOML, unknown key or provider, bad value."""
    exit_code = 2


class ProviderError(OmegaError):
    """A backend failed. Carries what is known: provider, HTTP status, the backend's
    own error code and message, its request id, and how long it asked us to wait."""
    exit_code = 1

    def __init__(self, message: str, provider: str = "", status: int | None = None,
                 code: str | None = None, request_id: str | None = None,
                 retry_after: float | None = None):
        self.provider, self.status, self.code = provider, status, code
        self.message, self.request_id, self.retry_after = message, request_id, retry_after
        self.fallbacks: list[str] = []   # "provider: error" for providers tried after this one
        self.not_set_up = False          # missing key or CLI: nothing was sent anywhere
        self.session_id = self.partial_text = None   # claude-code: where to resume, what was said
        super().__init__(str(self))

    def __str__(self) -> str:
        head = " ".join(str(x) for x in (self.status, self.code) if x not in (None, ""))
        text = f"{head}: {self.message}" if head else self.message
        if self.provider:
            text = f"{self.provider}: {text}"
        if self.request_id:
            text += f" (request_id={self.request_id})"
        return text


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
    """Nothing to talk to: connection refused, unknown host, `claude` not installed."""
    exit_code = 7


class Secret(str):
    """A str whose repr shows only its last four characters, so that a key inside
    a printed dict, a log record or a traceback's locals stays private."""

    def __repr__(self) -> str:
        return repr(mask(self))


def mask(secret: str) -> str:
    """'…abcd': enough to tell two keys apart, too little to use one."""
    return "…" + secret[-4:] if len(secret) >= 12 else "…"


# Environment variables whose values are credentials: redacted from anything
# omega shows, even when omega itself did not send them (claude's stderr).
SECRET_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "GEMINI_API_KEY",
              "GOOGLE_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")


def redact(text: str, settings: dict | None = None) -> str:
    """Replace every credential we know of in text (server messages can echo keys)."""
    secrets = [os.environ.get(name) for name in SECRET_ENV]
    if settings:
        secrets += [settings.get("api_key"), settings.get("oauth_token")]
        secrets += [os.environ.get(settings["api_key_env"])] if settings.get("api_key_env") else []
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, mask(secret))
    return text


# =============================================================================
# Data types
# =============================================================================

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
    max_turns: int | None = None     # claude-code: agent turns (disables auto-resume)
    allowed_tools: list | None = None  # claude-code: overrides the configured list
    max_tokens: int | None = None
    temperature: float | None = None

    def to_api_messages(self) -> tuple[str, list[dict]]:
        """(system prompt, [{"role", "content"}, ...]) ready for a chat API: history
        then the current message, same-role neighbours merged, empty ones dropped,
        history `system` messages folded into the system prompt."""
        system = [self.system_prompt] if self.system_prompt else []
        messages: list[dict] = []
        turns = [*self.history, Message("user", self.current_message)]
        for turn in turns:
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
class MessageMetadata:
    """What happened. None wherever the backend did not say (never a made-up 0)."""
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

    def __post_init__(self):
        if self.tokens_used is None and None not in (self.input_tokens, self.output_tokens):
            self.tokens_used = self.input_tokens + self.output_tokens


@dataclass
class OutgoingMessage:
    text: str
    metadata: MessageMetadata

    def to_dict(self) -> dict:
        """Plain JSON-able data: {"text": ..., "metadata": {...}}."""
        return {"text": self.text, "metadata": asdict(self.metadata)}


# =============================================================================
# Configuration
# =============================================================================

NAMES = ("claude-code", "ollama", "openai", "anthropic", "openrouter", "gemini")

NUMBER = (int, float)
_COMMON = {"enabled": bool, "model": str, "model_complex": str, "timeout_secs": NUMBER,
           "max_tokens": int, "temperature": NUMBER}
_HTTP = {**_COMMON, "base_url": str, "max_retries": int}
_KEYED = {**_HTTP, "api_key": str, "api_key_env": str}

# The keys each [provider.<name>] section may hold, and their types.
SCHEMA = {
    "claude-code": {**_COMMON, "command": str, "max_turns": int, "allowed_tools": list,
                    "skip_permissions": bool, "max_resume_attempts": int,
                    "resume_delay_secs": NUMBER, "working_dir": str, "oauth_token": str},
    "ollama": {**_HTTP, "num_ctx": int, "keep_alive": (str, int)},
    "openai": _KEYED,
    "anthropic": _KEYED,
    "openrouter": {**_KEYED, "referer": str, "title": str},
    "gemini": _KEYED,
}
PROVIDER_KEYS = {"default": str, "fallback": list, "auto_route": bool}
STATUS_KEYS = {"delay_secs": NUMBER, "repeat_secs": NUMBER, "message": str,
               "repeat_message": str}
# Keys whose value must be > 0 (or >= 0), checked after the type.
POSITIVE = {"timeout_secs", "max_tokens", "max_turns", "num_ctx", "delay_secs", "repeat_secs"}
NOT_NEGATIVE = {"max_retries", "max_resume_attempts", "resume_delay_secs", "temperature"}

_COMMON_DEFAULTS = {"enabled": True, "model_complex": None, "max_tokens": None,
                    "temperature": None}
_HTTP_DEFAULTS = {**_COMMON_DEFAULTS, "timeout_secs": 600, "max_retries": 2}
DEFAULTS = {
    "claude-code": {**_COMMON_DEFAULTS, "model": "claude-sonnet-4-6",
                    "model_complex": "claude-opus-4-6", "timeout_secs": 3600,
                    "command": "claude", "max_turns": 25, "allowed_tools": [],
                    "skip_permissions": False, "max_resume_attempts": 5,
                    "resume_delay_secs": 2, "working_dir": None, "oauth_token": None},
    "ollama": {**_HTTP_DEFAULTS, "model": "llama3", "base_url": "http://localhost:11434",
               "num_ctx": None, "keep_alive": None},
    "openai": {**_HTTP_DEFAULTS, "model": "gpt-4o", "base_url": "https://api.openai.com/v1"},
    "anthropic": {**_HTTP_DEFAULTS, "model": "claude-sonnet-4-20250514", "max_tokens": 8192,
                  "base_url": "https://api.anthropic.com"},
    "openrouter": {**_HTTP_DEFAULTS, "model": "anthropic/claude-sonnet-4",
                   "base_url": "https://openrouter.ai/api/v1", "referer": None, "title": None},
    "gemini": {**_HTTP_DEFAULTS, "model": "gemini-2.0-flash",
               "base_url": "https://generativelanguage.googleapis.com"},
}
STATUS_DEFAULTS = {"delay_secs": 15, "repeat_secs": 120,
                   "message": "This is taking a moment...",
                   "repeat_message": "Still working on your request..."}
KEY_ENV = {"openai": ("OPENAI_API_KEY",), "anthropic": ("ANTHROPIC_API_KEY",),
           "openrouter": ("OPENROUTER_API_KEY",), "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL",
                "ollama": "OLLAMA_HOST"}


def config_paths() -> list[str]:
    """Where a config file is looked for when none is named, in order."""
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.toml"),
            os.path.join(os.path.expanduser("~"), ".omega", "config.toml")]


def read_config(config=None) -> tuple[dict, str | None]:
    """(the raw, validated config dict, the file it came from or None).
    config: a path, a dict shaped like the file, or None for the usual search."""
    if isinstance(config, dict):
        validate(config, "config")
        return config, config.get("_file")
    path = os.fspath(config) if config is not None else os.environ.get("OMEGA_CONFIG") or None
    if path is None:
        path = next((p for p in config_paths() if os.path.isfile(p)), None)
        if path is None:
            return {}, None
    import tomllib
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    validate(raw, path)
    return raw, path


def validate(raw: dict, where: str) -> None:
    """Raise a one-line ConfigError naming the file, the key and what is expected."""
    check_keys(raw, {"provider": dict, "status": dict}, where, "")
    providers = raw.get("provider", {})
    check_keys(providers, {**PROVIDER_KEYS, **{n: dict for n in NAMES}}, where, "provider.")
    for name in NAMES:
        section = providers.get(name, {})
        check_keys(section, SCHEMA[name], where, f"provider.{name}.")
        if not all(isinstance(x, str) for x in section.get("allowed_tools", [])):
            raise ConfigError(f"{where}: provider.{name}.allowed_tools: expected a list of "
                              "strings")
        url = section.get("base_url")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: provider.{name}.base_url: expected an http:// or "
                              "https:// URL")
    if "default" in providers:
        check_provider(providers["default"], f"{where}: provider.default")
    for name in providers.get("fallback", []):
        check_provider(name, f"{where}: provider.fallback")
    check_keys(raw.get("status", {}), STATUS_KEYS, where, "status.")


def check_keys(section: dict, schema: dict, where: str, prefix: str) -> None:
    for key, value in section.items():
        if key.startswith("_"):           # load_config's own notes (_file, _sources)
            continue
        if key not in schema:
            known = ", ".join(k for k in schema if k not in NAMES)
            raise ConfigError(f"{where}: unknown key {prefix}{key} (known: {known})")
        kind = schema[key]
        if value is None or isinstance(value, bool) != (kind is bool) \
                or not isinstance(value, kind):
            expected = {bool: "true or false", str: "a string", int: "an integer",
                        list: "a list", dict: "a table", NUMBER: "a number",
                        (str, int): "a string or an integer"}[kind]
            raise ConfigError(f"{where}: {prefix}{key}: expected {expected}, "
                              f"got {type(value).__name__}")
        if key in POSITIVE and value <= 0 or key in NOT_NEGATIVE and value < 0:
            sign = "greater than 0" if key in POSITIVE else "0 or more"
            raise ConfigError(f"{where}: {prefix}{key}: expected a number {sign}, got {value}")


def check_provider(name, where: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"{where}: unknown provider {name!r} (choose from {', '.join(NAMES)})")


def provider_settings(raw: dict, name: str, path: str | None = None) -> dict:
    """Everything one backend needs: defaults, then the file's section, then the
    environment fallbacks, with the API key resolved. `sources` says where each
    value came from ("file", "env NAME" or "default")."""
    check_provider(name, "provider")
    section = {k: v for k, v in raw.get("provider", {}).get(name, {}).items() if k[0] != "_"}
    settings = {**DEFAULTS[name], **section, "name": name, "config_file": path}
    sources = {k: "file" for k in section}
    var = BASE_URL_ENV.get(name)
    if var and "base_url" not in section and os.environ.get(var):
        url = os.environ[var] if name != "ollama" else ollama_host(os.environ[var])
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"environment variable {var}: expected an http:// or https:// URL")
        settings["base_url"], sources["base_url"] = url, f"env {var}"
    if "base_url" in settings:
        settings["base_url"] = settings["base_url"].rstrip("/")
    if name in KEY_ENV:
        key, sources["api_key"] = find_key(name, section, settings["base_url"])
        settings["api_key"] = Secret(key) if key else None
    if settings.get("oauth_token"):
        settings["oauth_token"] = Secret(settings["oauth_token"])
    settings["sources"] = {k: sources.get(k, "default") for k in DEFAULTS[name]}
    if "api_key" in sources:
        settings["sources"]["api_key"] = sources["api_key"]
    return settings


def find_key(name: str, section: dict, base_url: str) -> tuple[str | None, str]:
    """(the API key, where it came from). A base_url written in the config file
    gets only a key written beside it (or named by api_key_env): the user's key
    for the official service never goes to a server they did not give it to."""
    if section.get("api_key"):
        return section["api_key"], "file"
    if section.get("api_key_env"):
        var = section["api_key_env"]
        return os.environ.get(var) or None, f"env {var}"
    if "base_url" not in section or base_url == DEFAULTS[name]["base_url"]:
        for var in KEY_ENV[name]:
            if os.environ.get(var):
                return os.environ[var], f"env {var}"
    return None, "none"


def ollama_host(value: str) -> str:
    """OLLAMA_HOST may be 'host', 'host:port' or a URL; make it a URL with a port."""
    url = value if "://" in value else "http://" + value
    host = url.split("://", 1)[1].split("/", 1)[0]
    if not host.rsplit("]", 1)[-1].count(":"):    # no port (IPv6 brackets aside)
        url = url.replace(host, host + ":11434", 1)
    return url


def load_config(path=None) -> dict:
    """The merged, validated configuration: every provider's settings filled in
    from the file, the environment and the defaults, `_sources` saying where each
    value came from. `path`: a file path, a dict shaped like the file, or None
    for the usual search (SPEC §3). The result is itself a valid `config=`."""
    raw, file = read_config(path)
    providers = raw.get("provider", {})
    merged = {"default": default_provider(raw), "fallback": list(providers.get("fallback", [])),
              "auto_route": providers.get("auto_route", False)}
    for name in NAMES:
        settings = provider_settings(raw, name, file)
        merged[name] = {k: v for k, v in settings.items() if k in SCHEMA[name] and v is not None}
        merged[name]["_sources"] = settings["sources"]
    return {"provider": merged, "status": {**STATUS_DEFAULTS, **raw.get("status", {})},
            "_file": file}


def default_provider(raw: dict) -> str:
    """provider.default, else $OMEGA_PROVIDER, else claude-code."""
    name = raw.get("provider", {}).get("default")
    if name is None:
        name = os.environ.get("OMEGA_PROVIDER") or "claude-code"
        check_provider(name, "environment variable OMEGA_PROVIDER")
    return name


# =============================================================================
# HTTP transport: one requests.Session per thread, a real deadline, retries
# =============================================================================

_local = threading.local()
RETRY_BASE_SECS = 0.5      # backoff: RETRY_BASE_SECS × 2ⁿ, capped, times 0.75–1
RETRY_CAP_SECS = 8.0
RETRY_AFTER_MAX_SECS = 60  # a server asking for a longer wait is not retried
RETRY_STATUS = {408, 409, 429} | set(range(500, 600))


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
        _local.environ = {}
    return session, _local.environ


def environ_for(base_url: str, cache: dict) -> dict:
    """The proxies and CA bundle the environment sets for this base_url, as
    requests finds them (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE …)."""
    found = cache.get(base_url)
    if found is None:
        from requests.utils import get_environ_proxies
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        found = cache[base_url] = {"proxies": get_environ_proxies(base_url),
                                   "verify": verify}
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


def post_json(settings: dict, url: str, headers: dict, body: dict) -> tuple[dict, dict, int]:
    """POST body as JSON with retries inside the call's deadline.
    Returns (parsed JSON, response headers, number of requests made)."""
    name, deadline = settings["name"], settings["deadline"]
    payload = json.dumps(body).encode()
    headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json", **headers}
    attempt, retries = 0, settings.get("max_retries", 0)
    while True:
        attempt += 1
        try:
            status, reply_headers, content = send(url, headers, payload, settings)
        except ProviderUnavailable as e:          # refused, reset, cut short: try again
            status, error, wait = None, e, "backoff"
        if status is not None and status < 300:
            return parse_json(content, status, reply_headers, settings), reply_headers, attempt
        if status is not None:
            error, wait = http_error(status, reply_headers, content, settings)
        if wait == "backoff":
            wait = min(RETRY_CAP_SECS, RETRY_BASE_SECS * 2 ** (attempt - 1)) * jitter()
        if wait is None or attempt > retries or time.monotonic() + wait >= deadline:
            raise error
        reason = error.status or "connection error"
        notify(settings, f"{name}: {reason}, retrying in {wait:.1f} s ({attempt + 1}/{retries + 1})")
        log_debug("%s: attempt %d failed (%s); waiting %.2f s", name, attempt, reason, wait)
        time.sleep(wait)


def jitter() -> float:
    """A factor in 0.75–1, so that many clients do not retry in step."""
    import random
    return random.uniform(0.75, 1.0)


def send(url: str, headers: dict, payload: bytes, settings: dict) -> tuple[int, dict, bytes]:
    """One request, straight to the Session's adapter: no per-request merging of
    session defaults, cookies or environment. The body is read in small pieces
    with the socket timeout set to the time left, so a server that trickles
    bytes cannot stretch the call past its deadline."""
    import requests
    import urllib3
    deadline = settings["deadline"]
    session, cache = thread_session()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timed_out(settings)
    started = time.monotonic()
    try:
        request = requests.PreparedRequest()
        request.method, request.url, request.body = "POST", prepared_url(url, cache), payload
        request.headers = {**headers, "Content-Length": str(len(payload))}
        response = session.get_adapter(request.url).send(
            request, stream=True, timeout=remaining, **environ_for(settings["base_url"], cache))
        raw, chunks = response.raw, []
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                response.close()
                raise TimeoutError
            if sock is not None:
                sock.settimeout(remaining)
            chunk = raw.read1(65536, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
        raw.release_conn()
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as e:
        raise ConfigError(f"{settings['name']}: invalid base_url: {e}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise connection_error(e, settings) from None
    log_debug("%s: POST %s -> %d in %.0f ms", settings["name"], url, response.status_code,
              (time.monotonic() - started) * 1000)
    return response.status_code, response.headers, b"".join(chunks)


def timed_out(settings: dict, detail: str = "") -> ProviderTimeout:
    return ProviderTimeout(f"no answer within {settings['timeout_secs']} s{detail}",
                           settings["name"])


def connection_error(e: Exception, settings: dict) -> ProviderError:
    """Turn what requests, urllib3 or the socket raised into one of our errors."""
    import requests
    import urllib3
    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)) \
            or time.monotonic() >= settings["deadline"]:
        return timed_out(settings)
    return ProviderUnavailable(f"cannot get an answer from {settings['base_url']} "
                               f"({connection_trouble(e)})", settings["name"])


def connection_trouble(e: Exception) -> str:
    text = str(e)
    if "refused" in text.lower():
        return "connection refused"
    if "NameResolution" in text or "Name or service not known" in text:
        return "host not found"
    if "SSL" in type(e).__name__ or "CERTIFICATE" in text:
        return "TLS error"
    if "timed out" in text.lower() or "Timeout" in type(e).__name__:
        return "timed out"
    return "connection closed before a complete answer"


def not_json(content: bytes) -> str:
    """What a body that should have been JSON was instead (never the body itself)."""
    if not content.strip():
        return "an empty body"
    return "an HTML page" if content.lstrip()[:1] == b"<" else "something that is not JSON"


def parse_json(content: bytes, status: int, headers, settings: dict):
    try:
        return json.loads(content)
    except ValueError:
        raise ProviderError(f"the server sent {not_json(content)} instead of JSON",
                            settings["name"], status, request_id=request_id_of(headers)) from None


def request_id_of(headers) -> str | None:
    return headers.get("x-request-id") or headers.get("request-id")


def http_error(status: int, headers, content: bytes, settings: dict):
    """(the error for a non-2xx answer, how long to wait before a retry: seconds,
    "backoff", or None for do-not-retry)."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
        error = ProviderError(f"the server sent {not_json(content)}, not JSON",
                              settings["name"], status, request_id=request_id_of(headers))
        retryable = status in RETRY_STATUS
    else:
        error, retryable = error_from_body(data, status, settings, headers)
    asked = error.retry_after = retry_after(headers, data)
    if not retryable or headers.get("x-should-retry") == "false":
        return error, None
    if asked is None:
        return error, "backoff"
    return error, (asked if asked <= RETRY_AFTER_MAX_SECS else None)


# Markers of exhausted quota or credit: a RateLimitError that waiting will not fix.
QUOTA_CODES = {"insufficient_quota", "billing_error", "enforced_spend_limit_reached"}


def error_from_body(data, status: int, settings: dict, headers=None) -> tuple:
    """The backend's own code and message, from any of the five error body shapes:
    OpenAI {error:{message,type,code}}, Anthropic {type,error:{type,message}},
    Gemini {error:{code,message,status,details}}, Ollama {error:"..."},
    OpenRouter {error:{code:int,message,metadata}}.
    Returns (the error, whether a retry may help)."""
    name = settings["name"]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]                                   # Gemini sometimes wraps it
    err = data.get("error") if isinstance(data, dict) else None
    code, reasons = None, None
    if isinstance(err, dict):
        message = str(err.get("message") or "")
        code = next((c for c in (err.get("code"), err.get("type"), err.get("status"))
                     if isinstance(c, str) and c), None)
        details = err.get("details")
        if isinstance(details, dict) and details.get("error_code"):   # Anthropic spend cap
            code = details["error_code"]
        for detail in details if isinstance(details, list) else ():
            if isinstance(detail, dict) and detail.get("reason"):        # Gemini ErrorInfo
                code = detail["reason"]
        meta = err.get("metadata") if isinstance(err.get("metadata"), dict) else {}
        reasons = meta.get("reasons")
        if meta.get("raw"):                                             # OpenRouter upstream
            raw = meta["raw"] if isinstance(meta["raw"], str) else json.dumps(meta["raw"])
            message += f" ({meta.get('provider_name') or 'upstream'}: {raw[:300]})"
    elif isinstance(err, str):
        message = err
    else:
        message = str(data.get("message") or data.get("detail") or "") \
            if isinstance(data, dict) else ""
    message = redact(" ".join(message.split())[:500] or f"HTTP {status}", settings)
    rid = request_id_of(headers or {}) or (data.get("request_id") if isinstance(data, dict) else None)
    if status == 403 and reasons:                   # OpenRouter moderation
        kind, retryable = EmptyResponse, False
        message = f"prompt blocked by moderation: {', '.join(map(str, reasons))}"
    else:
        kind, retryable = error_class(status, code, message)
    return kind(message, name, status, code, rid), retryable


def error_class(status: int | None, code: str | None, message: str) -> tuple[type, bool]:
    """(the error class for a failure, whether a retry may help): one policy for
    HTTP error bodies and for the API errors the claude CLI reports."""
    if status == 402 or code in QUOTA_CODES or "credit balance is too low" in message.lower():
        return RateLimitError, False               # waiting will not bring credit back
    if status in (401, 403) or code == "API_KEY_INVALID":
        return AuthError, False
    return (RateLimitError if status == 429 else ProviderError), status in RETRY_STATUS


def retry_after(headers, data) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, Retry-After (seconds
    or an HTTP date), or Gemini's RetryInfo.retryDelay ("27s") in the body."""
    value = headers.get("retry-after-ms")
    try:
        if value:
            return max(0.0, float(value) / 1000)
        value = headers.get("retry-after")
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                from email.utils import parsedate_to_datetime
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    for detail in (err or {}).get("details") or () if isinstance(err, dict) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None


def notify(settings: dict, message: str) -> None:
    on_status = settings.get("on_status")
    if on_status is not None:
        on_status(message)


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


def http_backend(build, parse):
    """A backend made of a request builder and a response parser: both plain
    functions, so each can be tested without a network."""
    def call(ctx: Context, settings: dict) -> OutgoingMessage:
        settings.setdefault("deadline", time.monotonic() + settings["timeout_secs"])
        url, headers, body = build(ctx, settings)
        data, reply_headers, attempts = post_json(settings, url, headers, body)
        try:
            reply = parse(data, settings)
        except ProviderError as e:
            e.request_id = e.request_id or request_id_of(reply_headers)
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise ProviderError("the answer did not have the expected shape",
                                settings["name"], request_id=request_id_of(reply_headers)) from None
        reply.metadata.attempts = attempts
        reply.metadata.request_id = reply.metadata.request_id or request_id_of(reply_headers)
        return reply
    call.request, call.response = build, parse
    return call


def require_key(settings: dict, required: bool = True) -> str | None:
    """The API key, or an AuthError (before any request) naming where to put one."""
    key = settings.get("api_key")
    if key or not required:
        return key
    name = settings["name"]
    where = f"set provider.{name}.api_key"
    if settings.get("api_key_env"):
        where += f" or the {settings['api_key_env']} environment variable"
    elif settings.get("sources", {}).get("base_url") == "file" \
            and settings["base_url"] != DEFAULTS[name]["base_url"]:
        where += (f" or api_key_env (a base_url from the config file never gets "
                  f"{KEY_ENV[name][0]})")
    else:
        where += " or " + " / ".join(KEY_ENV[name]) + " in the environment"
    error = AuthError(f"no API key: {where}", name)
    error.not_set_up = True
    raise error


def model_of(ctx: Context, settings: dict) -> str:
    """Context.model wins; else complex=True picks model_complex; else model."""
    if ctx.model:
        return ctx.model
    if ctx.complex and settings.get("model_complex"):
        return settings["model_complex"]
    return settings["model"]


def limit(ctx: Context, settings: dict, key: str):
    """max_tokens / temperature: the request's value, else the configured one."""
    value = getattr(ctx, key)
    return settings.get(key) if value is None else value


def chat_messages(ctx: Context) -> list[dict]:
    """OpenAI/OpenRouter/Ollama shape: the system prompt as the first message."""
    system, messages = ctx.to_api_messages()
    return [{"role": "system", "content": system}, *messages] if system else messages


def counts(input_tokens, output_tokens) -> tuple:
    """Gemini and Ollama leave a count out when it is 0: next to a present count,
    a missing one is 0; with neither present, both are unknown."""
    if input_tokens is None and output_tokens is None:
        return None, None
    return input_tokens or 0, output_tokens or 0


def empty(settings: dict, why: str) -> EmptyResponse:
    return EmptyResponse(f"no answer text ({why})", settings["name"])


# =============================================================================
# Backend: openai (and every OpenAI-compatible server)
# =============================================================================

def openai_request(ctx: Context, settings: dict) -> tuple[str, dict, dict]:
    official = settings["base_url"] == DEFAULTS["openai"]["base_url"]
    key = require_key(settings, required=official or settings["name"] != "openai")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model_of(ctx, settings), "messages": chat_messages(ctx)}
    max_tokens, temperature = limit(ctx, settings, "max_tokens"), limit(ctx, settings, "temperature")
    if max_tokens is not None:
        # Official OpenAI rejects max_tokens for o-series/gpt-5; other servers know only it.
        body["max_completion_tokens" if official and settings["name"] == "openai"
             else "max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return settings["base_url"] + "/chat/completions", headers, body


def openai_response(data: dict, settings: dict) -> OutgoingMessage:
    if isinstance(data.get("error"), dict):            # OpenRouter: an error in a 200
        status = data["error"].get("code")
        raise error_from_body(data, status if isinstance(status, int) else 200, settings)[0]
    if not data.get("choices"):
        raise empty(settings, "no choices")
    choice = data["choices"][0]
    if isinstance(choice.get("error"), dict):          # OpenRouter: a failed choice
        status = choice["error"].get("code")
        raise error_from_body(choice, status if isinstance(status, int) else 200, settings)[0]
    message = choice.get("message") or {}
    text, stop = message.get("content"), choice.get("finish_reason")
    if isinstance(text, list):                         # some compatible servers send parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if not text and message.get("refusal"):
        text, stop = message["refusal"], "refusal"
    if not text:
        raise empty(settings, f"finish_reason={stop}")
    usage = data.get("usage") or {}
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"),
        stop_reason=stop, cost_usd=usage.get("cost")))


# =============================================================================
# Backend: openrouter (the OpenAI format, plus attribution and cost)
# =============================================================================

def openrouter_request(ctx: Context, settings: dict) -> tuple[str, dict, dict]:
    url, headers, body = openai_request(ctx, settings)
    if settings.get("referer"):
        headers["HTTP-Referer"] = settings["referer"]
    if settings.get("title"):
        headers["X-OpenRouter-Title"] = settings["title"]
    return url, headers, body


openrouter_response = openai_response   # usage.cost and errors-in-200 are handled there


# =============================================================================
# Backend: anthropic
# =============================================================================

def anthropic_request(ctx: Context, settings: dict) -> tuple[str, dict, dict]:
    headers = {"x-api-key": require_key(settings), "anthropic-version": "2023-06-01"}
    system, messages = ctx.to_api_messages()
    body = {"model": model_of(ctx, settings), "max_tokens": limit(ctx, settings, "max_tokens"),
            "messages": messages}
    if system:
        body["system"] = system
    if limit(ctx, settings, "temperature") is not None:
        body["temperature"] = limit(ctx, settings, "temperature")
    return settings["base_url"] + "/v1/messages", headers, body


def anthropic_response(data: dict, settings: dict) -> OutgoingMessage:
    text = "".join(b.get("text", "") for b in data.get("content") or ()
                   if isinstance(b, dict) and b.get("type") == "text")
    stop = data.get("stop_reason")
    if not text:
        details = data.get("stop_details") or {}
        why = f"stop_reason={stop}" + (f", {details['category']}" if details.get("category") else "")
        raise empty(settings, why)
    usage = data.get("usage") or {}
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=anthropic_input_tokens(usage), output_tokens=usage.get("output_tokens"),
        stop_reason=stop))


def anthropic_input_tokens(usage: dict) -> int | None:
    """All input: fresh tokens plus cache writes plus cache reads (the claude CLI
    reports the same usage object)."""
    if usage.get("input_tokens") is None:
        return None
    return sum(usage.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens",
                                           "cache_read_input_tokens"))


# =============================================================================
# Backend: gemini
# =============================================================================

def gemini_request(ctx: Context, settings: dict) -> tuple[str, dict, dict]:
    from urllib.parse import quote
    # The key travels in a header: URLs end up in proxy logs and tracebacks.
    headers = {"x-goog-api-key": require_key(settings)}
    system, messages = ctx.to_api_messages()
    body = {"contents": [{"role": "model" if m["role"] == "assistant" else "user",
                          "parts": [{"text": m["content"]}]} for m in messages]}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config = {}
    if limit(ctx, settings, "max_tokens") is not None:
        config["maxOutputTokens"] = limit(ctx, settings, "max_tokens")
    if limit(ctx, settings, "temperature") is not None:
        config["temperature"] = limit(ctx, settings, "temperature")
    if config:
        body["generationConfig"] = config
    model = quote(model_of(ctx, settings).removeprefix("models/"), safe="")
    return f"{settings['base_url']}/v1beta/models/{model}:generateContent", headers, body


def gemini_response(data: dict, settings: dict) -> OutgoingMessage:
    if not data.get("candidates"):
        feedback = data.get("promptFeedback") or {}
        why = f"prompt blocked: {feedback.get('blockReason', 'no candidates')}"
        if feedback.get("blockReasonMessage"):
            why += f": {feedback['blockReasonMessage']}"
        raise empty(settings, why)
    candidate = data["candidates"][0]
    parts = (candidate.get("content") or {}).get("parts") or ()
    text = "".join(p.get("text", "") for p in parts if not p.get("thought"))
    stop = candidate.get("finishReason")
    if not text:
        why = f"finishReason={stop}"
        if candidate.get("finishMessage"):
            why += f": {candidate['finishMessage']}"
        raise empty(settings, why)
    usage = data.get("usageMetadata")
    tokens_in, tokens_out = counts(*(None, None) if usage is None else (
        usage.get("promptTokenCount"),
        None if "candidatesTokenCount" not in usage and "thoughtsTokenCount" not in usage
        else usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)))
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("modelVersion") or settings["model"],
        input_tokens=tokens_in, output_tokens=tokens_out, stop_reason=stop,
        request_id=data.get("responseId")))


# =============================================================================
# Backend: ollama
# =============================================================================

def ollama_request(ctx: Context, settings: dict) -> tuple[str, dict, dict]:
    body = {"model": model_of(ctx, settings), "messages": chat_messages(ctx), "stream": False}
    options = {"num_predict": limit(ctx, settings, "max_tokens"),
               "temperature": limit(ctx, settings, "temperature"),
               "num_ctx": settings.get("num_ctx")}
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        body["options"] = options
    if settings.get("keep_alive") is not None:
        body["keep_alive"] = settings["keep_alive"]
    return settings["base_url"] + "/api/chat", {}, body


def ollama_response(data: dict, settings: dict) -> OutgoingMessage:
    text = (data.get("message") or {}).get("content")   # `thinking` is not the answer
    if not text:
        raise empty(settings, f"done_reason={data.get('done_reason')}")
    tokens_in, tokens_out = counts(data.get("prompt_eval_count"), data.get("eval_count"))
    return OutgoingMessage(text, MessageMetadata(
        provider_used=settings["name"], model=data.get("model") or settings["model"],
        input_tokens=tokens_in, output_tokens=tokens_out, stop_reason=data.get("done_reason")))


# =============================================================================
# Backend: claude-code (the local `claude` CLI, run as a subprocess)
# =============================================================================

RESUME_PROMPT = "Continue where you left off. Complete the remaining work."
TURN_SEPARATOR = "\n\n---\n\n"   # between the texts of resumed runs
KILL_GRACE_SECS = 2.0      # between SIGTERM and SIGKILL for a CLI past its deadline


def claude_code_argv(ctx: Context, settings: dict, session_id: str | None) -> list[str]:
    import shlex
    argv = [*shlex.split(settings["command"]), "-p", "--output-format", "json",
            "--max-turns", str(ctx.max_turns or settings["max_turns"]),
            "--model", model_of(ctx, settings)]
    if session_id:
        argv += ["--resume", session_id]
    if settings["skip_permissions"]:
        argv.append("--dangerously-skip-permissions")
    tools = settings["allowed_tools"] if ctx.allowed_tools is None else ctx.allowed_tools
    if tools:
        # Last and as one word: list flags swallow every following word.
        argv += ["--allowedTools", ",".join(tools)]
    return argv


def claude_code_env(settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}  # nested-session guard
    if settings.get("oauth_token"):
        env["CLAUDE_CODE_OAUTH_TOKEN"] = str.__str__(settings["oauth_token"])
    return env


def run_claude(argv: list[str], prompt: str, settings: dict) -> tuple[int, str, str]:
    """Run the CLI once in its own process group; (exit code, stdout, stderr).
    At the deadline or on Ctrl-C the whole group goes: no orphaned grandchildren."""
    import signal
    import subprocess
    name = settings["name"]
    remaining = settings["deadline"] - time.monotonic()
    if remaining <= 0:
        raise timed_out(settings)
    cwd = settings.get("working_dir")
    if cwd and not os.path.isdir(cwd):
        raise ConfigError(f"provider.claude-code.working_dir: {cwd!r} is not a directory")
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, cwd=cwd,
                                 env=claude_code_env(settings), start_new_session=True)
    except FileNotFoundError:
        error = ProviderUnavailable(
            f"{argv[0]!r} not found on PATH; install Claude Code "
            "(npm install -g @anthropic-ai/claude-code) or set provider.claude-code.command", name)
        error.not_set_up = True
        raise error from None
    except PermissionError:
        raise ProviderUnavailable(f"{argv[0]!r} is not executable", name) from None

    def kill_group():
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECS), (signal.SIGKILL, None)):
            try:
                os.killpg(child.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                return child.communicate(timeout=wait or 5)
            except subprocess.TimeoutExpired:
                continue
        return b"", b""

    try:
        out, err = child.communicate(prompt.encode(), timeout=remaining)
    except subprocess.TimeoutExpired:
        kill_group()
        raise timed_out(settings, " (the claude process group was stopped)") from None
    except BaseException:                      # Ctrl-C and friends: leave nothing behind
        kill_group()
        raise
    return child.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def claude_code_result(code: int, out: str, err: str, settings: dict) -> dict:
    """The CLI's result object, or the error it stands for. stdout is parsed
    whatever the exit code: the CLI exits 1 with valid JSON on errors."""
    name = settings["name"]
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        if code == 0:                          # not JSON but a clean exit: the answer itself
            return {"subtype": "success", "is_error": False, "result": out.strip()}
        data = None
    if isinstance(data, list):                 # --verbose turns the output into events
        data = next((e for e in reversed(data) if isinstance(e, dict)
                     and e.get("type") == "result"), None)
    if not isinstance(data, dict):
        tail = redact(" ".join(err.strip().splitlines()[-3:])[-400:], settings)
        message = tail or f"exited with code {code} and no result"
        cls = AuthError if looks_like_login_error(message) else ProviderError
        raise cls(message, name)
    return data


def looks_like_login_error(text: str) -> bool:
    low = text.lower()
    return any(s in low for s in ("not logged in", "/login", "invalid api key",
                                  "failed to authenticate", "oauth token"))


def claude_code_error(data: dict, settings: dict) -> ProviderError:
    """The error an is_error result stands for, by api_error_status and text."""
    name, status = settings["name"], data.get("api_error_status")
    message = data.get("result") or "; ".join(map(str, data.get("errors") or ())) \
        or data.get("subtype") or "error"
    message = redact(" ".join(str(message).split())[:500], settings)
    code = None if data.get("subtype") == "success" else data.get("subtype")
    cls = error_class(status, code, message)[0]
    if cls is ProviderError and looks_like_login_error(message):
        cls = AuthError
    if code and data.get("session_id"):           # so the user can --resume it
        message += f" (session_id={data['session_id']})"
    error = cls(message, name, status, code)
    error.session_id = data.get("session_id")
    return error


def claude_code(ctx: Context, settings: dict) -> OutgoingMessage:
    """Run `claude -p` with the prompt on stdin; resume on error_max_turns."""
    settings.setdefault("deadline", time.monotonic() + settings["timeout_secs"])
    prompt, session_id = ctx.to_prompt_string(), ctx.session_id
    texts, results, resumes = [], [], 0
    while True:
        argv = claude_code_argv(ctx, settings, session_id)
        log_debug("claude-code: running %s", argv[:4] + ["…"])
        data = claude_code_result(*run_claude(argv, prompt, settings), settings)
        results.append(data)
        session_id = data.get("session_id") or session_id
        stopped = data.get("subtype") == "error_max_turns"
        done = data.get("subtype") == "success" and not data.get("is_error")
        if (done or stopped) and data.get("result"):   # older CLIs say something when they stop
            texts.append(data["result"])
        if done:
            break
        if not (stopped and session_id and ctx.max_turns is None
                and resumes < settings["max_resume_attempts"]):
            error = claude_code_error(data, settings)
            error.partial_text = TURN_SEPARATOR.join(texts) or None
            raise error
        resumes += 1
        wait = settings["resume_delay_secs"] * 2 ** (resumes - 1)
        if time.monotonic() + wait >= settings["deadline"]:
            raise timed_out(settings, f" (resume {resumes} would pass the deadline; "
                                      f"session_id={session_id})")
        notify(settings, f"claude-code: reached max turns, resuming ({resumes}/"
                         f"{settings['max_resume_attempts']})")
        time.sleep(wait)
        prompt = RESUME_PROMPT
    if not texts:
        raise empty(settings, "the CLI returned an empty result")
    return OutgoingMessage(TURN_SEPARATOR.join(texts),
                           claude_code_metadata(results, settings, session_id, ctx))


def claude_code_metadata(results: list[dict], settings: dict, session_id, ctx) -> MessageMetadata:
    def total(values):
        values = [v for v in values if v is not None]
        return sum(values) if values else None
    usages = [r.get("usage") or {} for r in results]
    inputs = [anthropic_input_tokens(u) for u in usages]
    model = model_of(ctx, settings)
    used = results[-1].get("modelUsage") or {}
    if used and model not in used:      # the CLI names the model only here
        model = max(used, key=lambda m: (used[m] or {}).get("outputTokens", 0)).split("[")[0]
    return MessageMetadata(
        provider_used=settings["name"], model=model, input_tokens=total(inputs),
        output_tokens=total(u.get("output_tokens") for u in usages),
        stop_reason=results[-1].get("stop_reason") or results[-1].get("subtype"),
        session_id=session_id,
        cost_usd=total(r.get("total_cost_usd", r.get("cost_usd")) for r in results),
        num_turns=total(r.get("num_turns") for r in results), attempts=len(results))


# =============================================================================
# PROVIDERS: name -> fn(ctx, settings) -> OutgoingMessage
# =============================================================================

PROVIDERS = {
    "claude-code": claude_code,
    "ollama": http_backend(ollama_request, ollama_response),
    "openai": http_backend(openai_request, openai_response),
    "anthropic": http_backend(anthropic_request, anthropic_response),
    "openrouter": http_backend(openrouter_request, openrouter_response),
    "gemini": http_backend(gemini_request, gemini_response),
}


# =============================================================================
# Status timer: tell a waiting human that work is still going on
# =============================================================================

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


# =============================================================================
# Routing and fallback
# =============================================================================

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
    import re
    return len(re.findall(r"(?m)^\s*\d{1,3}[.)]\s+\S", answer))


def classify(ctx: Context, config=None, provider: str | None = None) -> bool:
    """True when the provider's fast model calls this request genuinely complex
    (two or more steps). One extra call, no tools, one turn; any failure: False."""
    raw, path = read_config(config)
    name = provider or default_provider(raw)
    question = Context(CLASSIFIER_PROMPT + ctx.current_message, max_turns=1, allowed_tools=[])
    try:
        settings = usable_settings(raw, name, path)
        settings["max_resume_attempts"] = 0
        answer = PROVIDERS[name](question, settings).text
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
    name = provider or default_provider(raw)
    hard = classify(ctx, {**raw, "_file": path}, name)
    return replace(ctx, model=model_of(replace(ctx, complex=hard),
                                       provider_settings(raw, name, path)))


# Failures worth trying another provider for; a bad request would fail there too.
FALLBACK_ERRORS = (ProviderUnavailable, ProviderTimeout, RateLimitError, AuthError)


def worth_falling_back(error: ProviderError) -> bool:
    return isinstance(error, FALLBACK_ERRORS) or (error.status or 0) >= 500


def usable_settings(raw: dict, name: str, path: str | None) -> dict:
    """provider_settings plus a fresh deadline; a disabled provider is a ConfigError."""
    settings = provider_settings(raw, name, path)
    if not settings["enabled"]:
        raise ConfigError(f"{path or 'config'}: provider {name} is disabled "
                          f"(provider.{name}.enabled = false)")
    settings["deadline"] = time.monotonic() + settings["timeout_secs"]
    return settings


def failure_label(error: ProviderError) -> str:
    """'unavailable (connection refused)': one step of the fallback story."""
    kind = {ProviderUnavailable: "unavailable", ProviderTimeout: "timed out",
            RateLimitError: "rate-limited", AuthError: "not authorized"}.get(type(error), "failed")
    if error.message.endswith(")") and "(" in error.message:
        why = error.message.rsplit("(", 1)[1][:-1]
    else:
        why = " ".join(str(x) for x in (error.status, error.code) if x) or error.message[:60]
    return f"{kind} ({why})"


def readiness(settings: dict, probe: bool = False) -> tuple[bool | None, str]:
    """(ready?, why) for one provider, from what this machine has: the claude
    CLI on PATH, a key, and with probe=True `claude --version` (5 s) and Ollama's
    GET /api/tags (2 s). Never a paid call. None: cannot tell without probing."""
    name = settings["name"]
    if not settings["enabled"]:
        return False, "disabled in the config"
    if name == "claude-code":
        import shlex
        import shutil
        command = shlex.split(settings["command"])[0]
        found = shutil.which(command)
        if not found:
            return False, f"{command!r} not found on PATH"
        return (True, found) if not probe else claude_version(found)
    if name == "ollama":
        return (None, "not probed") if not probe else ollama_answers(settings)
    key, source = settings.get("api_key"), settings["sources"].get("api_key", "none")
    if key:
        return True, f"key {mask(key)} from {source.replace('env ', '$')}"
    if name == "openai" and settings["base_url"] != DEFAULTS["openai"]["base_url"]:
        return True, f"no key, none needed for {settings['base_url']}"
    return False, "no API key (" + " or ".join(
        [f"provider.{name}.api_key", *("$" + v for v in KEY_ENV[name])]) + ")"


def claude_version(path: str) -> tuple[bool, str]:
    import subprocess
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{path} --version failed ({type(e).__name__})"
    version = (out.stdout.strip().splitlines() or [""])[0]
    return (out.returncode == 0 and bool(version)), f"{version or 'no version'} at {path}"


def ollama_answers(settings: dict) -> tuple[bool, str]:
    session, cache = thread_session()
    url = settings["base_url"] + "/api/tags"
    try:
        reply = session.get(url, timeout=2, **environ_for(settings["base_url"], cache))
        models = len(reply.json().get("models", [])) if reply.ok else None
    except Exception as e:                   # any failure just means "not ready"
        return False, f"{settings['base_url']} not answering ({connection_trouble(e)})"
    if models is None:
        return False, f"{url} answered {reply.status_code}"
    return True, f"{settings['base_url']} answering, {models} models"


def ready_elsewhere(raw: dict, path: str | None, failed: str) -> str:
    """'; ready here: openai ($OPENAI_API_KEY) - use -p openai or set provider.default'
    from local checks only (no network), for an error on a machine not set up."""
    ready = []
    for name in NAMES:
        if name == failed:
            continue
        settings = provider_settings(raw, name, path)
        ok, why = readiness(settings)
        source = settings["sources"].get("api_key", "")
        if ok:          # "$OPENAI_API_KEY", "key in config", or claude's path
            ready.append((name, "$" + source[4:] if source.startswith("env ")
                          else "key in config" if source == "file" else why))
    if not ready:
        return "; nothing else is ready here either (see: python omega.py --check)"
    listed = ", ".join(f"{n} ({why})" for n, why in ready)
    return f"; ready here: {listed} - use -p {ready[0][0]} or set provider.default"


# =============================================================================
# Public API
# =============================================================================

def complete(ctx: Context, provider: str | None = None, config=None,
             on_status=None) -> OutgoingMessage:
    """Send ctx to a backend and return its answer with metadata.

    provider: one of PROVIDERS (default: provider.default, $OMEGA_PROVIDER,
    "claude-code"); config: a TOML path, a dict shaped like the file, or None for
    the usual search; on_status: called with short progress messages (slow call,
    retries, fallbacks), from the calling thread or the status timer's thread.
    Raises a ProviderError subclass (or ConfigError) with a one-line message;
    when fallbacks were tried too, the first provider's error, with err.fallbacks."""
    started = time.monotonic()
    if isinstance(ctx, str):
        ctx = Context(ctx)
    raw, path = read_config(config)
    first = provider or default_provider(raw)
    check_provider(first, "provider")
    options = raw.get("provider", {})
    chain = [first] + [name for name in options.get("fallback", ()) if name != first]
    stop_status = start_status_timer(on_status, {**STATUS_DEFAULTS, **raw.get("status", {})})
    failures = []                                  # (provider, error), in order
    try:
        for index, name in enumerate(chain):
            if index > 0:
                ctx = replace(ctx, model=None)     # a chosen model means nothing elsewhere
            try:
                settings = usable_settings(raw, name, path)
                settings["on_status"] = on_status
                if index == 0 and options.get("auto_route") and not ctx.model and not ctx.complex:
                    ctx = route(ctx, {**raw, "_file": path}, name)
                reply = PROVIDERS[name](ctx, settings)
            except ProviderError as e:
                failures.append((name, e))
                if not worth_falling_back(e) or index == len(chain) - 1:
                    break
                notify(settings, f"{name} {failure_label(e)}, trying {chain[index + 1]}")
                continue
            except ConfigError:
                if index == 0:
                    raise
                continue                           # a disabled fallback is skipped
            meta = reply.metadata
            meta.provider_used, meta.fallbacks = name, [str(e) for _, e in failures]
            meta.processing_time_ms = round((time.monotonic() - started) * 1000)
            return reply
    finally:
        stop_status()
    error = failures[0][1]
    error.fallbacks = [str(e) for _, e in failures[1:]]
    if error.not_set_up and len(failures) == 1:
        error.message += ready_elsewhere(raw, path, first)
    raise error


def ask(prompt: str, provider: str | None = None, model: str | None = None,
        system: str = "", config=None, **options) -> str:
    """Send one prompt and return the answer text.
    options: any other Context field (history, complex, max_tokens, temperature …)."""
    ctx = Context(prompt, system_prompt=system, model=model, **options)
    return complete(ctx, provider=provider, config=config).text


# =============================================================================
# Command line
# =============================================================================

def parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog="omega", description="Send a prompt to an AI backend and print the answer.",
        epilog="The prompt is the words given; with none (or -) it is read from stdin; "
               "with both, stdin follows the words after a blank line. Exit codes: "
               "0 ok, 1 provider error, 2 config/usage, 3 auth, 4 rate limit, "
               "5 timeout, 6 empty answer, 7 unavailable, 130 interrupted.")
    def usage_error(message):                  # one line, like every other error
        raise ConfigError(f"{message} (see --help)")
    parser.error = usage_error
    add = parser.add_argument
    add("prompt", nargs="*", help="the prompt words")
    add("-p", "--provider", choices=NAMES, metavar="PROVIDER",
        help="one of: " + ", ".join(NAMES))
    add("-m", "--model", help="the model for this request")
    add("-s", "--system", default="", help="system prompt")
    add("-c", "--config", help="config file (default: $OMEGA_CONFIG, ./config.toml beside "
                               "omega.py, ~/.omega/config.toml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--complex", action="store_true", help="use the provider's model_complex")
    group.add_argument("--auto-route", action="store_true",
                       help="ask the fast model first whether the request is complex "
                            "(one extra call)")
    add("--max-tokens", type=int, metavar="N", help="maximum answer tokens")
    add("--temperature", type=float, metavar="T", help="sampling temperature")
    add("--timeout", type=float, metavar="SECS", help="whole-call deadline in seconds")
    add("--json", action="store_true", help="print {\"text\", \"metadata\"} as JSON")
    add("-q", "--quiet", action="store_true", help="no status lines on stderr")
    add("-v", "--verbose", action="store_true", help="debug log and tracebacks on stderr")
    add("--check", action="store_true", help="show which providers are ready here, and why")
    add("--version", action="version", version=f"omega {__version__}")
    return parser.parse_args(argv)


def read_prompt(words: list[str]) -> str:
    """The words, stdin, or the words then stdin after a blank line. Piped text
    loses its surrounding blank lines but keeps its indentation (code)."""
    if words in ([], ["-"]):
        return sys.stdin.read().strip("\r\n").rstrip() if sys.stdin else ""
    prompt = " ".join(words)
    if stdin_is_piped():
        piped = sys.stdin.read().strip("\r\n").rstrip()
        if piped:
            prompt += "\n\n" + piped
    return prompt


def stdin_is_piped() -> bool:
    """True for a pipe or a redirected file; a terminal or nothing is not."""
    import stat
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def cli_config(args) -> dict:
    """The config with the command line's overrides applied (flags beat the file)."""
    raw, path = read_config(args.config)
    raw = {**raw, "provider": dict(raw.get("provider", {})), "_file": path}
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout: expected a number greater than 0")
        for name in NAMES:
            raw["provider"][name] = {**raw["provider"].get(name, {}), "timeout_secs": args.timeout}
    if args.auto_route:
        raw["provider"]["auto_route"] = True
    return raw


def main(argv=None) -> int:
    """The command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except SystemExit as e:                    # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except ConfigError as e:
        print(f"omega: {e}", file=sys.stderr)
        return e.exit_code
    if args.verbose:
        import logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("omega: %(levelname)s %(message)s"))
        logger = logging.getLogger("omega")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    say = None if args.quiet else (lambda m: print(f"omega: {m}", file=sys.stderr, flush=True))
    try:
        if args.check:
            return check(args.config, print)
        config = cli_config(args)
        prompt = read_prompt(args.prompt)
        if not prompt.strip():
            raise ConfigError("no prompt: give it as words or on stdin (see --help)")
        if args.max_tokens is not None and args.max_tokens <= 0:
            raise ConfigError("--max-tokens: expected a number greater than 0")
        ctx = Context(prompt, system_prompt=args.system, model=args.model,
                      complex=args.complex, max_tokens=args.max_tokens,
                      temperature=args.temperature)
        reply = complete(ctx, provider=args.provider, config=config, on_status=say)
        out = json.dumps(reply.to_dict(), ensure_ascii=False) if args.json else reply.text
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
        return 0
    except OmegaError as e:
        if args.verbose:
            import traceback
            traceback.print_exc(file=sys.stderr)
        print(f"omega: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("omega: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                     # a bug of ours: still one line, no traceback
        if args.verbose:
            import traceback
            traceback.print_exc(file=sys.stderr)
        print(f"omega: internal error: {type(e).__name__}: {redact(str(e))} "
              "(run with -v for details)", file=sys.stderr)
        return 1
    except BrokenPipeError:                    # `omega ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def check(config, out) -> int:
    """--check: every provider, whether it is ready here and why, and where each
    value came from. Exit 0 when the default provider is ready, else 1."""
    loaded = load_config(config)
    providers, default = loaded["provider"], loaded["provider"]["default"]
    out(f"config file: {loaded['_file'] or 'none (built-in defaults)'}")
    out(f"default provider: {default}" + (f", fallback: {', '.join(providers['fallback'])}"
                                          if providers["fallback"] else ""))
    out("")
    rows, verdict = [("provider", "enabled", "model", "model_complex", "ready", "why")], 1
    for name in NAMES:
        settings = provider_settings(loaded, name, loaded["_file"])
        settings["sources"] = providers[name]["_sources"]
        ok, why = readiness(settings, probe=True)
        rows.append((name, "yes" if settings["enabled"] else "no", settings["model"],
                     settings["model_complex"] or "-", "yes" if ok else "no", why))
        if name == default and ok:
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


if __name__ == "__main__":
    sys.exit(main())
