"""The omega test suite: offline, deterministic, real local servers.

Every HTTP backend is exercised through a threaded stdlib HTTP server on
127.0.0.1 that answers in the real API's wire format (see the canned bodies
below) and records what it was sent. The claude-code backend runs a fake
`claude` executable that the tests write: JSON on stdout, exit 1 on errors,
sessions for --resume, the prompt read from stdin.
"""
import http.server
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import omega

HERE = os.path.dirname(os.path.abspath(__file__))
OMEGA_PY = os.path.join(HERE, "omega.py")
KEY = "sk-test-SECRET-0123456789abcdef"          # never to be seen in any output
ENV_KEY = "sk-env-SECRET-fedcba9876543210"
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "GEMINI_API_KEY",
            "GOOGLE_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "OLLAMA_HOST",
            "OMEGA_CONFIG", "OMEGA_PROVIDER", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN",
            "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy",
            "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "CLAUDECODE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real keys, no real config, no proxies, no real waiting."""
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(omega, "config_paths", lambda: [str(tmp_path / "none.toml")])
    monkeypatch.setattr(omega, "RETRY_BASE_SECS", 0.01)
    monkeypatch.setattr(omega, "KILL_GRACE_SECS", 0.5)
    omega._local.__dict__.clear()      # every test starts with fresh sessions
    yield


# =============================================================================
# A scriptable fake API server
# =============================================================================

class Recorded:
    def __init__(self, method, path, headers, raw):
        self.method, self.path, self.headers, self.raw = method, path, headers, raw
        try:
            self.body = json.loads(raw) if raw else None
        except ValueError:
            self.body = None


class FakeAPI(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests, self.replies, self.default = [], [], None
        self.release = threading.Event()     # ends a stalled reply early
        self.lock = threading.Lock()
        self.connections = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reply(self, body=None, status=200, headers=None, action=None, raw=None, delay=0):
        """Queue one answer. action: "close" (hang up before answering),
        "stall" (wait for release or 10 s), "trickle" (body a byte at a time),
        "truncate" (send half the promised body, then hang up)."""
        self.replies.append(dict(body=body, status=status, headers=headers or {},
                                 action=action, raw=raw, delay=delay))
        return self

    def last(self):
        return self.requests[-1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self):
        self.do_POST()

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
            spec = {"headers": {}, "action": None, "raw": None, "delay": 0, "status": 200, **spec}
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
        self.send_response(spec["status"])
        headers = {"Content-Type": "application/json", **spec["headers"]}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if spec["action"] == "trickle":
            for i in range(len(data)):
                if self.server.release.wait(0.05):
                    return
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
        elif spec["action"] == "truncate":
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(data)


@pytest.fixture
def api():
    server = FakeAPI()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def refused_url():
    """A local port with nothing listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# Canned answers in each API's real wire format (see ../shared/wire-formats.md).
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


# =============================================================================
# 1. Data types
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


def test_to_prompt_string_blocks_and_session_form():
    ctx = omega.Context("What next?", system_prompt="Be brief",
                        history=[omega.Message("user", "Hi"), omega.Message("assistant", "Hello")])
    assert ctx.to_prompt_string() == ("[System]\nBe brief\n\n[User]\nHi\n\n[Assistant]\nHello"
                                      "\n\n[User]\nWhat next?")
    resumed = omega.Context("What next?", system_prompt="Be brief", session_id="s1",
                            history=[omega.Message("user", "Hi")])
    assert resumed.to_prompt_string() == "[User]\nBe brief\n\nWhat next?"
    assert omega.Context("Q", session_id="s1").to_prompt_string() == "[User]\nQ"


def test_metadata_sums_tokens_only_when_both_known_and_to_dict_is_json():
    assert omega.MessageMetadata(input_tokens=3, output_tokens=4).tokens_used == 7
    assert omega.MessageMetadata(input_tokens=3).tokens_used is None
    reply = omega.OutgoingMessage("hi", omega.MessageMetadata(provider_used="x", fallbacks=["a"]))
    data = json.loads(json.dumps(reply.to_dict()))
    assert data["text"] == "hi" and data["metadata"]["provider_used"] == "x"
    assert data["metadata"]["fallbacks"] == ["a"] and data["metadata"]["cost_usd"] is None


# =============================================================================
# 2. Configuration
# =============================================================================

def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


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
    assert config["status"]["delay_secs"] == 15


def test_search_order(tmp_path, monkeypatch):
    beside = write(tmp_path / "beside.toml", '[provider]\ndefault = "ollama"\n')
    home = write(tmp_path / "home.toml", '[provider]\ndefault = "gemini"\n')
    env = write(tmp_path / "env.toml", '[provider]\ndefault = "openai"\n')
    explicit = write(tmp_path / "explicit.toml", '[provider]\ndefault = "anthropic"\n')
    monkeypatch.setattr(omega, "config_paths", lambda: [str(tmp_path / "missing"), beside, home])
    assert omega.load_config()["provider"]["default"] == "ollama"
    monkeypatch.setattr(omega, "config_paths", lambda: [str(tmp_path / "missing"), home])
    assert omega.load_config()["provider"]["default"] == "gemini"
    monkeypatch.setenv("OMEGA_CONFIG", env)
    assert omega.load_config()["provider"]["default"] == "openai"
    assert omega.load_config(explicit)["provider"]["default"] == "anthropic"
    assert omega.load_config(explicit)["_file"] == explicit


def test_default_paths_are_beside_the_module_and_in_home(monkeypatch):
    monkeypatch.undo()
    paths = omega.config_paths()
    assert paths[0] == os.path.join(HERE, "config.toml")
    assert paths[1].endswith(os.path.join(".omega", "config.toml"))


def test_explicit_missing_file_is_config_error(tmp_path, monkeypatch):
    with pytest.raises(omega.ConfigError, match="not found"):
        omega.load_config(str(tmp_path / "nope.toml"))
    monkeypatch.setenv("OMEGA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(omega.ConfigError, match="nope.toml"):
        omega.load_config()


def test_env_fallbacks_for_provider_keys_and_urls(monkeypatch):
    monkeypatch.setenv("OMEGA_PROVIDER", "gemini")
    monkeypatch.setenv("GOOGLE_API_KEY", "g-key-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://proxy.local:9000/v1/")
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box")
    config = omega.load_config()
    p = config["provider"]
    assert p["default"] == "gemini"
    assert p["gemini"]["api_key"] == "g-key-0123456789"
    assert p["gemini"]["_sources"]["api_key"] == "env GOOGLE_API_KEY"
    monkeypatch.setenv("GEMINI_API_KEY", "gem-key-0123456789")
    assert omega.provider_settings({}, "gemini")["api_key"] == "gem-key-0123456789"
    # An env base URL comes with the env key (the SDKs' convention).
    assert p["openai"]["base_url"] == "http://proxy.local:9000/v1"
    assert p["openai"]["api_key"] == ENV_KEY
    assert p["openai"]["_sources"]["base_url"] == "env OPENAI_BASE_URL"
    assert p["ollama"]["base_url"] == "http://gpu-box:11434"


@pytest.mark.parametrize("value, url", [
    ("gpu-box", "http://gpu-box:11434"), ("gpu-box:8080", "http://gpu-box:8080"),
    ("https://ollama.example.com", "https://ollama.example.com:11434"),
    ("http://10.0.0.2:11434/", "http://10.0.0.2:11434"), ("[::1]", "http://[::1]:11434")])
def test_ollama_host_gets_scheme_and_port(monkeypatch, value, url):
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert omega.provider_settings({}, "ollama")["base_url"] == url


def test_custom_base_url_in_file_never_gets_the_environment_key(monkeypatch, api):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    # OpenAI-compatible local server: no key is fine, and none is sent.
    api.reply(openai_ok())
    omega.complete(omega.Context("hi"), "openai",
                   {"provider": {"openai": {"base_url": api.url + "/v1"}}})
    assert "authorization" not in api.last().headers
    # Anthropic behind a custom URL: an AuthError before any request, not a leak.
    with pytest.raises(omega.AuthError, match="api_key_env") as err:
        omega.complete(omega.Context("hi"), "anthropic",
                       {"provider": {"anthropic": {"base_url": api.url}}})
    assert len(api.requests) == 1 and ENV_KEY not in str(err.value)
    # api_key_env names the variable to use for that server.
    monkeypatch.setenv("TOGETHER_API_KEY", "together-0123456789")
    api.reply(openai_ok())
    omega.complete(omega.Context("hi"), "openai", {"provider": {"openai": {
        "base_url": api.url + "/v1", "api_key_env": "TOGETHER_API_KEY"}}})
    assert api.last().headers["authorization"] == "Bearer together-0123456789"
    # The official URL written out in full still gets the environment key.
    s = omega.provider_settings({"provider": {"openai": {
        "base_url": "https://api.openai.com/v1/"}}}, "openai")
    assert s["api_key"] == ENV_KEY


def test_empty_api_key_counts_as_unset(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    s = omega.provider_settings({"provider": {"openai": {"api_key": ""}}}, "openai")
    assert s["api_key"] == ENV_KEY and s["sources"]["api_key"] == "env OPENAI_API_KEY"


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
    ('[status]\ndelay_secs = "soon"', "status.delay_secs: expected a number"),
    ('colour = 1', "unknown key colour"),
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


def test_secret_values_are_never_echoed_by_validation(tmp_path):
    path = write(tmp_path / "bad.toml", f'[provider.openai]\napi_key = ["{KEY}"]\n')
    with pytest.raises(omega.ConfigError) as err:
        omega.load_config(path)
    assert KEY not in str(err.value) and "api_key: expected a string" in str(err.value)


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


# =============================================================================
# 3. The HTTP backends: what is sent, what comes back
# =============================================================================

CTX = omega.Context("What is 2+2?", system_prompt="Be brief",
                    history=[omega.Message("user", "Hi"), omega.Message("assistant", "Hello")],
                    max_tokens=50, temperature=0.3)


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


def test_unset_limits_are_left_out(api):
    for name in HTTP_NAMES:
        api.reply(OK[name]())
        ask_via(name, api, omega.Context("hi"))
        body = api.last().body
        flat = json.dumps(body)
        assert "temperature" not in flat and "num_predict" not in flat
        assert ("max_tokens" in body) == (name == "anthropic")


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


def test_gemini_blocked_prompt_and_safety_stops(api):
    api.reply({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
               "usageMetadata": {"promptTokenCount": 5}})
    with pytest.raises(omega.EmptyResponse, match="prompt blocked: SAFETY"):
        ask_via("gemini", api)
    api.reply({"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]}]})
    with pytest.raises(omega.EmptyResponse, match="finishReason=SAFETY"):
        ask_via("gemini", api)
    api.reply(gemini_ok({"text": "Partial answer"}, finish="SAFETY"))
    reply = ask_via("gemini", api)
    assert reply.text == "Partial answer" and reply.metadata.stop_reason == "SAFETY"
    api.reply({"candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}],
               "usageMetadata": {"promptTokenCount": 9, "thoughtsTokenCount": 100}})
    with pytest.raises(omega.EmptyResponse, match="MAX_TOKENS"):
        ask_via("gemini", api)
    api.reply({"candidates": [{"finishReason": "OTHER", "finishMessage": "Unable to answer"}]})
    with pytest.raises(omega.EmptyResponse, match="Unable to answer"):
        ask_via("gemini", api)


def test_gemini_partial_and_missing_usage(api):
    api.reply(gemini_ok(usage={"promptTokenCount": 6}))
    m = ask_via("gemini", api).metadata
    assert (m.input_tokens, m.output_tokens, m.tokens_used) == (6, 0, 6)
    body = gemini_ok()
    del body["usageMetadata"]
    api.reply(body)
    m = ask_via("gemini", api).metadata
    assert (m.input_tokens, m.output_tokens, m.tokens_used) == (None, None, None)


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


def test_trailing_slash_on_base_url_is_ignored(api):
    api.reply(ollama_ok())
    ask_via("ollama", api, base_url=api.url + "/")
    assert api.last().path == "/api/chat"


def test_model_override_and_complex_model(api):
    api.reply(openai_ok())
    ask_via("openai", api, omega.Context("hi", model="gpt-4.1-mini"), model_complex="o3")
    assert api.last().body["model"] == "gpt-4.1-mini"
    api.reply(openai_ok())
    ask_via("openai", api, omega.Context("hi", complex=True), model_complex="o3")
    assert api.last().body["model"] == "o3"
    api.reply(openai_ok())
    ask_via("openai", api, omega.Context("hi", complex=True))         # none configured
    assert api.last().body["model"] == "gpt-4o"


def test_request_and_response_functions_are_plain_and_separate():
    settings = omega.provider_settings({"provider": {"gemini": {"api_key": KEY}}}, "gemini")
    url, headers, body = omega.gemini_request(omega.Context("hi"), settings)
    assert url.endswith("/v1beta/models/gemini-2.0-flash:generateContent")
    assert omega.gemini_response(gemini_ok(), settings).text == "Hello from Gemini"
    assert omega.PROVIDERS["gemini"].request is omega.gemini_request
    assert set(omega.PROVIDERS) == set(omega.NAMES)


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
