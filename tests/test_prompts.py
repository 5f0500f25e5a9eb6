"""Prompt writers: the offline template writer, and the chat client against a local OpenAI-compatible server
on 127.0.0.1 that also answers with errors and timeouts."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gen1.config import ConfigError
from gen1.prompts import (
    ChatConfig,
    ChatWriter,
    PromptSpec,
    PromptWriterError,
    Secret,
    TemplateWriter,
    clean_caption,
    make_prompt_writer,
    parse_prompt_list,
    read_prompt_file,
    replace_subject,
)

API_KEY = "sk-test-7f3a9c-do-not-log"
CAPTION = "a man walking a dog on the street"


# ------------------------------------------------------------------------------------------ templates


def test_template_writer_is_deterministic_and_follows_the_recipe():
    w = TemplateWriter()
    prompts = w.write(CAPTION, 4)
    assert prompts == TemplateWriter().write(CAPTION, 4)  # reruns find the same edit keys
    assert len(set(prompts)) == 4
    style, env, time_of_day, subject = prompts
    assert style.endswith(f"of {CAPTION}") or style.endswith(f"showing {CAPTION}")
    assert env.startswith(f"{CAPTION}, ") and time_of_day.startswith(f"{CAPTION}, ")
    assert subject.endswith("walking a dog on the street") and not subject.startswith("a man")
    # prefix-stable: asking for more keeps the first ones
    assert TemplateWriter().write(CAPTION, 7)[:4] == prompts
    # a different seed or caption chooses differently
    assert TemplateWriter(seed=1).write(CAPTION, 4) != prompts
    assert TemplateWriter().write("a red car driving down a road", 4) != prompts


def test_template_writer_limits():
    with pytest.raises(ValueError, match="n must be >= 1"):
        TemplateWriter().write(CAPTION, 0)
    assert len(set(TemplateWriter().write(CAPTION, 24))) == 24
    with pytest.raises(ValueError, match="asked for 25"):
        TemplateWriter().write(CAPTION, 25)
    assert TemplateWriter().write("", 1)[0]  # an empty caption still gives a prompt


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A young man walking a dog on the street.", "a robot walking a dog on the street"),
        ("there is a car driving down the road", "a robot driving down the road"),
        ("arafed woman in a red dress dancing", "a robot in a red dress dancing"),
        ("two dogs playing in the snow", "a robot playing in the snow"),
        ("aerial view of a city", "a robot in place of the main subject of aerial view of a city"),
    ],
)
def test_replace_subject(caption, expected):
    assert replace_subject(clean_caption(caption), "a robot") == expected


def test_make_prompt_writer_defaults_to_templates(monkeypatch):
    for var in ("GEN1_LLM_BASE_URL", "GEN1_LLM_MODEL", "GEN1_LLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # a key alone configures no endpoint
    assert isinstance(make_prompt_writer(), TemplateWriter)
    monkeypatch.setenv("GEN1_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    writer = make_prompt_writer()
    assert isinstance(writer, ChatWriter)
    assert writer.config.api_key == Secret(API_KEY)
    assert API_KEY not in repr(writer) and API_KEY not in repr(writer.config)


def test_prompt_specs_and_files(tmp_path):
    assert PromptSpec.parse("image: s3://refs/knight.png") == PromptSpec(image_uri="s3://refs/knight.png")
    assert PromptSpec.parse(" a dog ").kind == "text"
    assert PromptSpec(image_uri="x.png").key == "image:x.png"
    with pytest.raises(ValueError, match="exactly one"):
        PromptSpec()
    f = tmp_path / "prompts.txt"
    f.write_text("# edits\n\na watercolor painting of a street\nimage:/refs/knight.png\n")
    assert read_prompt_file(str(f)) == [
        PromptSpec(text="a watercolor painting of a street"),
        PromptSpec(image_uri="/refs/knight.png"),
    ]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('["a", "b c"]', ["a", "b c"]),
        ('Sure!\n```json\n["x", "y"]\n```', ["x", "y"]),
        ("1. first prompt\n2) second\n- third\n* fourth", ["first prompt", "second", "third", "fourth"]),
    ],
)
def test_parse_prompt_list(reply, expected):
    assert parse_prompt_list(reply) == expected


# ------------------------------------------------------------------------------- chat against a server


class FakeChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1. ``script`` is a list of behaviours, one per
    request (the last repeats): ("ok", [prompts]), ("status", code[, retry_after]), ("sleep", seconds),
    ("garbage", text)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []  # (headers, body) per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                server.requests.append((dict(self.headers), body, self.path))
                kind, *args = server.script[min(len(server.requests) - 1, len(server.script) - 1)]
                if kind == "sleep":
                    time.sleep(args[0])
                    kind, args = "ok", [["late"] * 10]
                if kind == "status":
                    payload = json.dumps({"error": {"message": f"fake error {args[0]}"}}).encode()
                    self.send_response(args[0])
                    if len(args) > 1:
                        self.send_header("Retry-After", str(args[1]))
                elif kind == "garbage":
                    payload = json.dumps({"choices": [{"message": {"content": args[0]}}]}).encode()
                    self.send_response(200)
                else:
                    content = json.dumps(args[0])
                    payload = json.dumps(
                        {
                            "object": "chat.completion",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                        }
                    ).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def writer_for(server, sleeps, **kw) -> ChatWriter:
    cfg = ChatConfig(base_url=server.url, model="fake-gpt", api_key=API_KEY, backoff_s=0.5, **kw)
    return ChatWriter(cfg, sleep=sleeps.append)


def test_chat_writer_success_sends_model_caption_and_key():
    with FakeChatServer([("ok", ["p1", "p2", "p3"])]) as server:
        prompts = writer_for(server, []).write("A man walking a dog.", 2)
    assert prompts == ["p1", "p2"]
    ((headers, body, path),) = server.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert body["model"] == "fake-gpt"
    assert "a man walking a dog" in body["messages"][-1]["content"]
    assert "2" in body["messages"][0]["content"]


def test_chat_writer_retries_errors_and_timeouts_with_backoff(caplog):
    script = [
        ("status", 500),
        ("sleep", 2.0),
        ("status", 429, 3),
        ("garbage", "only one prompt"),
        ("ok", ["a", "b"]),
    ]
    sleeps = []
    with FakeChatServer(script) as server, caplog.at_level(logging.DEBUG):
        writer = writer_for(server, sleeps, timeout_s=0.5, max_retries=4)
        t0 = time.perf_counter()
        assert writer.write(CAPTION, 2) == ["a", "b"]
        elapsed = time.perf_counter() - t0
    assert len(server.requests) == 5 and writer.attempts == 5
    # exponential backoff 0.5, 1, 2, 4; Retry-After (3 s) raises the third delay to 3
    assert sleeps == [0.5, 1.0, 3.0, 4.0]
    assert elapsed < 1.9  # the 2 s server stall was cut by the 0.5 s client timeout
    logged = caplog.text
    assert (
        "HTTP 500" in logged
        and "timed out" in logged
        and "HTTP 429" in logged
        and "1 distinct prompts" in logged
    )
    assert API_KEY not in logged


def test_chat_writer_gives_up_after_max_retries():
    sleeps = []
    with FakeChatServer([("status", 503)]) as server:
        with pytest.raises(PromptWriterError, match="failed 3 times") as err:
            writer_for(server, sleeps, max_retries=2).write(CAPTION, 2)
    assert len(server.requests) == 3 and sleeps == [0.5, 1.0]
    assert API_KEY not in str(err.value)


def test_chat_writer_does_not_retry_auth_errors(caplog):
    with FakeChatServer([("status", 401)]) as server, caplog.at_level(logging.DEBUG):
        with pytest.raises(PromptWriterError, match="HTTP 401") as err:
            writer_for(server, []).write(CAPTION, 2)
    assert len(server.requests) == 1
    assert API_KEY not in str(err.value) and API_KEY not in caplog.text


def test_chat_writer_connection_refused_is_retried_then_reported():
    with FakeChatServer([("ok", ["x"])]) as server:
        url = server.url
    sleeps = []
    cfg = ChatConfig(base_url=url, api_key=API_KEY, max_retries=1, backoff_s=0.1, timeout_s=1)
    with pytest.raises(PromptWriterError, match="connection failed"):
        ChatWriter(cfg, sleep=sleeps.append).write(CAPTION, 1)
    assert sleeps == [0.1]


def test_chat_config_from_env():
    env = {"GEN1_LLM_BASE_URL": "http://127.0.0.1:1/v1", "GEN1_LLM_MODEL": "m", "OPENAI_API_KEY": API_KEY}
    cfg = ChatConfig.from_env(env, timeout_s=5)
    assert (cfg.base_url, cfg.model, cfg.timeout_s, cfg.api_key.value) == (
        "http://127.0.0.1:1/v1",
        "m",
        5,
        API_KEY,
    )
    assert cfg.describe()["api_key_set"] is True and API_KEY not in json.dumps(cfg.describe())
    assert ChatConfig.from_env({"OPENAI_API_KEY": API_KEY}) is None
    assert ChatConfig.from_env({}, base_url="http://x/v1").api_key is None
    with pytest.raises(ValueError, match="http"):
        ChatConfig(base_url="127.0.0.1:8000")


# ------------------------------------------------------------------- secrets in the URL (issue 17, item 6)


def test_chat_writer_never_logs_or_records_the_base_url_verbatim(caplog):
    """A base URL's userinfo and query values stay out of logs, errors and the edit job's run record; the
    request itself goes to the real URL, the query after the endpoint path."""
    from pipelines.edit import EditJobConfig

    with FakeChatServer([("status", 500), ("ok", ["a", "b"])]) as server:
        host_and_path = server.url.split("://", 1)[1]  # 127.0.0.1:PORT/v1
        cfg = ChatConfig(base_url=f"http://user:pass-9x7@{host_and_path}?token=tok-5q2", api_key=API_KEY)
        with caplog.at_level(logging.INFO):  # (urllib3's own DEBUG lines show the request path and query)
            writer = make_prompt_writer(cfg)
            writer.sleep = lambda s: None
            assert writer.write(CAPTION, 2) == ["a", "b"]
        with pytest.raises(PromptWriterError) as err:  # the server is down: the error names the URL
            server.httpd.shutdown()
            server.httpd.server_close()
            ChatWriter(ChatConfig(base_url=cfg.base_url, max_retries=0, timeout_s=1)).write(CAPTION, 2)
    assert [r[2] for r in server.requests] == ["/v1/chat/completions?token=tok-5q2"] * 2
    record = json.dumps(EditJobConfig(src="s", dst="d", auto_prompts=2, llm=cfg).as_dict(), default=str)
    for text in (caplog.text, str(err.value), record, repr(cfg), repr(writer)):
        assert "pass-9x7" not in text and "tok-5q2" not in text and "user:" not in text
    assert "http://***@127.0.0.1" in caplog.text and "token=***" in record


@pytest.mark.parametrize("base_url", ["http://10.0.0.5:8000/v1", "http://api.example.com/v1", "http://[fe80::1]/v1"])
def test_chat_config_refuses_an_api_key_over_plain_http_to_another_host(base_url):
    with pytest.raises(ConfigError, match="refusing to send the API key over plain http"):
        ChatConfig(base_url=base_url, api_key=API_KEY)
    with pytest.raises(ConfigError, match="plain http"):
        ChatConfig.from_env({"GEN1_LLM_BASE_URL": base_url, "OPENAI_API_KEY": API_KEY})
    assert ChatConfig(base_url=base_url).api_key is None  # no key: nothing to leak


@pytest.mark.parametrize(
    "base_url", ["https://api.example.com/v1", "http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:9/v1"]
)
def test_chat_config_sends_an_api_key_over_https_or_to_this_machine(base_url):
    assert ChatConfig(base_url=base_url, api_key=API_KEY).api_key.value == API_KEY
