"""serve.py: the official openai client against a live server (a subprocess on a random port, the tiny
checkpoint) checked against the same reply generated in-process; hostile requests, 16 concurrent clients,
clients that hang up and the time limit; and the chat page in a real headless Chromium. Replies whose thinking
must be known come from a scripted model served in-process."""
import base64
import contextlib
import fcntl
import http.client
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlsplit

import openai  # a test dependency (requirements-dev.txt): the official client is the reference
import pytest

import serve
from checkpoints import load_checkpoint
from inference import make_generator
from replies import generate_reply
from conftest import BYTE, ROOT, SP, ScriptedModel, run_script, text_ids, tiny_model
from tokenizer import fit_to_window, render_prompt

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIVE_MAX_TOKENS = 24  # the live server's default and the tests' replies: short, the tiny model is untrained
USER = [{"role": "user", "content": "What is 12+30?"}]
THINKING = "12+30: 2+0=2, 1+3=4"
THINKING_REPLY = text_ids(THINKING) + [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids("42") + [SP["<|/assistant|>"]]


class Scripted(ScriptedModel):
    """ScriptedModel counting the tokens it yields and taking delay seconds for each: a model still generating
    when a client leaves or time runs out."""

    forward = None  # serve.Engine takes over a model's forward passes: a scripted model makes none

    def __init__(self, script, delay=0.0):
        super().__init__(script)
        self.delay, self.produced = delay, 0

    def generate(self, *args, **kwargs):
        for step in super().generate(*args, **kwargs):
            time.sleep(self.delay)
            self.produced += len(step)
            yield step


def endless(prompt):
    return itertools.cycle(text_ids("la "))


def by_reasoning(prompt):
    """Thinks when the prompt opens the think block (reasoning on) or lets the model choose (auto); answers
    directly when the prompt says <|no_think|><|assistant|> (off)."""
    if prompt[-1] == SP["<|assistant|>"]:
        return text_ids("42") + [SP["<|/assistant|>"]]
    return THINKING_REPLY if prompt[-1] == SP["<|think|>"] else [SP["<|think|>"]] + THINKING_REPLY


@contextlib.contextmanager
def scripted_server(model, timeout=30, api_key=None, allowed_hosts=()):
    """serve.py's server in this process, on a free port, for a scripted model."""
    defaults = dict(max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, max_thinking_tokens=None)
    engine = serve.Engine(model, BYTE, "scripted", defaults, seed=0, timeout=timeout)
    server = serve.make_server(engine, "127.0.0.1", 0, api_key, allowed_hosts=allowed_hosts)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/", engine=engine, model=model)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def live(tiny_ckpt, tmp_path_factory):
    """python serve.py on a random port, as a user starts it; its log goes to a file."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(serve.API_KEY_ENV, None)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", tiny_ckpt, "--port", "0",
                                 "--device", "cpu", "--max_new_tokens", str(LIVE_MAX_TOKENS),
                                 "--allowed_hosts", "a.example"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err)
    found = re.search(r" at (http://\S+/) ", proc.stdout.readline().decode())
    assert found, f"serve.py did not start: {log.read_text()}"
    yield SimpleNamespace(url=found[1], log=log, proc=proc, ckpt=tiny_ckpt)
    assert proc.poll() is None, f"the server died: {log.read_text()}"
    proc.terminate()
    proc.wait(timeout=30)


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=60)


def complete(url, stream=False, key="unused", **kwargs):
    """One chat completion through the openai client -> (content, reasoning_content, finish_reason, usage),
    a stream's deltas concatenated."""
    kwargs = {"model": "any", "messages": USER} | kwargs
    if not stream:
        r = client(url, key).chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].message.reasoning_content, r.choices[0].finish_reason, \
            r.usage.model_dump()
    content, thinking, finish, usage = "", None, None, None
    for chunk in client(url, key).chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                          **kwargs):
        usage = chunk.usage.model_dump() if chunk.usage else usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if getattr(choice.delta, "reasoning_content", None) is not None:
                thinking = (thinking or "") + choice.delta.reasoning_content
            finish = choice.finish_reason or finish
    return content, thinking, finish, usage


def request(url, path="/v1/chat/completions", body=b"", method="POST", headers=None, content_length=True):
    """A raw HTTP request, every header under the test's control (Host too; None: leave a header out)
    -> (status, headers, JSON body or text)."""
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)
    conn.putrequest(method, path, skip_host="Host" in (headers or {}))
    for name, value in ({"Content-Type": "application/json"} | (headers or {})).items():
        if value is not None:
            conn.putheader(name, value)
    if content_length:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    res = conn.getresponse()
    data = res.read().decode()
    conn.close()
    is_json = res.getheader("Content-Type", "").startswith("application/json")
    return res.status, dict(res.getheaders()), json.loads(data) if is_json else data


def address(url):
    return urlsplit(url).hostname, urlsplit(url).port


def read_until(sock, marker):
    seen = b""
    while marker not in seen:
        data = sock.recv(4096)
        assert data, f"the connection closed before {marker}: {seen}"
        seen += data


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- the API, live

@pytest.mark.parametrize("reasoning, temperature, seed", [("on", 0.0, None), ("auto", 0.9, 7), ("off", 1.0, 123)])
def test_replies_match_the_same_generation_in_process_streamed_or_not(live, reasoning, temperature, seed):
    model, _ = load_checkpoint(live.ckpt)
    prompt = render_prompt(USER, BYTE, reasoning)
    parts = {"thinking": "", "answer": ""}
    sampling = dict(max_new_tokens=LIVE_MAX_TOKENS, temperature=temperature, top_k=None, top_p=None)
    reply = generate_reply(model, BYTE, prompt, sampling, make_generator(model, seed or 0),
                           on_text=lambda r, text: parts.__setitem__(r.part, parts[r.part] + text))
    expected = (parts["answer"], parts["thinking"] or None, reply.finish,
                {"prompt_tokens": len(prompt), "completion_tokens": len(reply.ids),
                 "total_tokens": len(prompt) + len(reply.ids),
                 "completion_tokens_details": {"reasoning_tokens": reply.thinking_tokens}})
    kwargs = dict(temperature=temperature, seed=seed, extra_body={"reasoning": reasoning})
    for stream in (False, True):
        content, thinking, finish, usage = complete(live.url, stream=stream, **kwargs)
        reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
        usage = {k: v for k, v in usage.items() if k != "prompt_tokens_details"}  # the client's fields, all None
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        assert (content, thinking, finish, usage) == expected


def test_a_mistake_in_the_flags_is_one_line():
    rc, _, err = run_script("serve.py", "--port", "70000")
    assert rc == 1 and err == "serve.py: error: --port must be between 0 (any free port) and 65535\n"
    rc, _, err = run_script("serve.py", "--allowed_hosts", "a.example,[::1")
    assert rc == 1 and err.startswith("serve.py: error: --allowed_hosts takes host names") and err.count("\n") == 1


def test_models_health_and_the_page(live):
    models = client(live.url).models.list().data
    assert [m.id for m in models] == [live.ckpt] and models[0].max_model_len == 128
    status, _, health = request(live.url, "/health", method="GET")
    assert status == 200 and health["status"] == "ok"
    status, headers, page = request(live.url, "/", method="GET")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and 'id="composer"' in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # the page loads nothing from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


# ----------------------------------------------------------------------------- replies, scripted

def test_reasoning_content_is_the_thinking_and_reasoning_switches_it():
    with scripted_server(Scripted(by_reasoning)) as srv:
        for reasoning in ("on", "auto"):
            for stream in (False, True):
                content, thinking, finish, usage = complete(srv.url, stream, extra_body={"reasoning": reasoning})
                assert (content, thinking, finish) == ("42", THINKING, "stop")
                assert usage["completion_tokens_details"]["reasoning_tokens"] == len(text_ids(THINKING))
        assert complete(srv.url, extra_body={"reasoning": "off"})[:2] == ("42", None)


def test_a_thinking_budget_from_max_thinking_tokens_or_reasoning_effort():
    with scripted_server(Scripted(lambda prompt: itertools.cycle(text_ids("hm ")))) as srv:
        for stream in (False, True):
            for extra, budget in (({"max_thinking_tokens": 5}, 5), ({"reasoning_effort": "low"}, 64),
                                  ({"reasoning_effort": "high"}, None)):
                _, thinking, finish, usage = complete(srv.url, stream, max_tokens=100,
                                                      extra_body={"reasoning": "on"} | extra)
                spent = usage["completion_tokens_details"]["reasoning_tokens"]
                assert finish == "length" and spent == (budget or 100), extra
                assert thinking == ("hm " * 40)[:budget or 100].strip()


def test_earlier_thinking_is_rendered_back_into_the_history():
    with scripted_server(Scripted(by_reasoning)) as srv:
        history = [*USER, {"role": "assistant", "content": "42", "reasoning_content": THINKING},
                   {"role": "user", "content": "And 1+1?"}]
        complete(srv.url, messages=history, extra_body={"reasoning": "on"})
        as_chat_py = [*USER, {"role": "assistant", "content": "42", "thinking": THINKING}, history[-1]]
        assert srv.model.prompts[-1] == render_prompt(as_chat_py, BYTE, "on")


@pytest.mark.parametrize("stop, content, tokens", [
    (["is 4"], "The answer ", len("The answer is 4")),  # the stop string is cut across tokens: one byte each
    ("42.", "The answer is ", len("The answer is 42.")),
    (["is 5", "zzz"], "The answer is 42.", len("The answer is 42.") + 1),  # held back, then released at the end
])
def test_stop_strings_end_the_answer_and_are_never_sent(stop, content, tokens):
    model = Scripted([SP["<|no_think|>"], SP["<|assistant|>"]] + text_ids("The answer is 42.")
                     + [SP["<|/assistant|>"]])
    with scripted_server(model) as srv:
        for stream in (False, True):
            model.produced = 0
            assert complete(srv.url, stream, stop=stop)[:3] == (content, None, "stop")
            assert model.produced == 2 + tokens  # generation ended at the stop string


def test_dropping_unreachable_turns_first_leaves_fit_to_window_the_same_window():
    rng = random.Random(0)
    for _ in range(500):
        roles = [rng.choice(["user", "assistant"]) for _ in range(rng.randint(0, 12))] + ["user"]
        messages = [{"role": "system", "content": "s" * rng.randint(0, 20)}] * (rng.random() < 0.5) + [
            {"role": r, "content": "x" * rng.randint(0, 60)}
            | ({"thinking": rng.choice([None, "t" * rng.randint(0, 30)])} if r == "assistant" else {}) for r in roles]
        max_prompt, reasoning = rng.randint(30, 200), rng.choice(serve.REASONING)
        system = messages[:1] if messages[0]["role"] == "system" else []
        if len(render_prompt(system + [{"role": "user", "content": ""}], BYTE, reasoning)) > max_prompt:
            continue  # refused before fitting (400)
        fewer = serve.unreachable_dropped(messages, BYTE, max_prompt)
        window, _, cut = fit_to_window(messages, BYTE, reasoning, max_prompt)
        assert fit_to_window(fewer, BYTE, reasoning, max_prompt)[::2] == (window, cut)


# ----------------------------------------------------------------------------- hostile requests

def body(**fields):
    return {"messages": USER, "max_tokens": 4} | fields


HOSTILE = {
    "malformed JSON": (b'{"messages": [', 400),
    "invalid UTF-8": (b'{"messages": "\xff"}', 400),
    "NaN is not JSON": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    "deep nesting": (b"[" * 100_000, 400),
    "not an object": ([], 400),
    "no messages": ({"max_tokens": 4}, 400),
    "messages a string": (body(messages="hi"), 400),
    "no message": (body(messages=[]), 400),
    "a message not an object": (body(messages=["hi"]), 400),
    "role tool": (body(messages=[{"role": "tool", "content": "x"}]), 400),
    "no role": (body(messages=[{"content": "x"}]), 400),
    "system not first": (body(messages=USER + [{"role": "system", "content": "x"}] + USER), 400),
    "last message not the user's": (body(messages=USER + [{"role": "assistant", "content": "x"}]), 400),
    "content a number": (body(messages=[{"role": "user", "content": 5}]), 400),
    "an image": (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    "reasoning_content from the user": (body(messages=[{"role": "user", "content": "x", "reasoning_content": "y"}]),
                                        400),
    "temperature a string": (body(temperature="hot"), 400),
    "temperature negative": (body(temperature=-1), 400),
    "temperature true": (body(temperature=True), 400),
    "max_tokens 0": (body(max_tokens=0), 400),
    "max_tokens past the context": (body(max_tokens=10 ** 9), 400),
    "max_tokens a float": (body(max_tokens=1.5), 400),
    "top_p 0": (body(top_p=0), 400),
    "top_k 0": (body(top_k=0), 400),
    "seed a string": (body(seed="x"), 400),
    "unknown reasoning": (body(reasoning="maybe"), 400),
    "unknown reasoning_effort": (body(reasoning_effort="extreme"), 400),
    "max_thinking_tokens negative": (body(max_thinking_tokens=-1), 400),
    "five stop strings": (body(stop=list("abcde")), 400),
    "an empty stop string": (body(stop=[""]), 400),
    "stream a string": (body(stream="yes"), 400),
    "n 2": (body(n=2), 400),
    "tools": (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    "too many messages": (body(messages=USER * (serve.MAX_MESSAGES + 1)), 400),
    "a system message longer than the context": (body(messages=[{"role": "system", "content": "x" * 500}] + USER),
                                                  400),
    "body too large": (b" " * (serve.MAX_BODY_BYTES + 1), 413),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_body_gets_a_4xx_with_an_openai_error_and_the_server_goes_on(live, name):
    payload, expected = HOSTILE[name]
    status, _, error = request(live.url, body=payload)
    assert status == expected, error
    assert isinstance(error["error"]["message"], str) and error["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in error["error"]["message"]
    assert complete(live.url, max_tokens=4)[2] in ("stop", "length")


def test_wrong_requests_get_4xx_json_errors(live):
    cases = [(dict(headers={"Content-Type": "text/plain"}), 415), (dict(content_length=False), 411),
             (dict(method="GET"), 405), (dict(path="/v1/models", method="POST"), 405),
             (dict(path="/v1/completions"), 404), (dict(method="PUT"), 405)]
    for kwargs, expected in cases:
        status, _, error = request(live.url, **{"body": body()} | kwargs)
        assert status == expected and error["error"]["message"], (kwargs, error)
    with socket.create_connection(address(live.url)) as sock:  # refused by http.server before serve.py sees it
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b"")).decode()  # up to the server's hanging up
    assert reply.split()[1] == "431" and reply.endswith('"param": null, "code": null}}')
    assert complete(live.url, max_tokens=4)[2] in ("stop", "length")


def test_special_token_strings_stay_text_and_long_input_is_fitted(live):
    text = "<|/user|><|think|>"
    _, _, _, usage = complete(live.url, messages=[{"role": "user", "content": text}])
    assert usage["prompt_tokens"] == 3 + len(text.encode())  # <|bos|><|user|>, one token a byte, <|/user|>
    room = 128 - min(LIVE_MAX_TOKENS, 64)
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 5} for i in range(41)]
    for messages in ([{"role": "user", "content": "x" * 5000}], long_chat):  # cut / oldest exchanges dropped
        assert 0 < complete(live.url, messages=messages)[3]["prompt_tokens"] <= room


def test_sixteen_concurrent_clients_get_the_replies_they_would_get_alone(live):
    prompts = ["Hi", "What is 12+30?", "Which is larger, 385 or 358?", "Count the letters"]
    kwargs = [dict(messages=[{"role": "user", "content": p}], temperature=0) for p in prompts]
    alone = [complete(live.url, **k)[:3] for k in kwargs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: complete(live.url, stream=i % 2 == 0, **kwargs[i % 4])[:3], range(16)))
    assert together == [alone[i % 4] for i in range(16)]  # one shared KV cache would have mixed them up


def test_concurrent_replies_share_the_batch_and_get_what_they_get_alone():
    """Continuous batching with a real model: eight clients at once, prompts of different lengths, greedy and seeded
    sampling, streamed or not, share the model's forward passes (several rows in one) and each gets the reply it
    gets alone (tests/test_model.py's exactness, end to end)."""
    model = tiny_model(seed=3, random_norms=True)
    rows = []  # the rows of each forward pass
    model.tok_emb.register_forward_hook(lambda module, args, out: rows.append(args[0].size(0)))
    questions = ["Hi", "What is 12+30?", "Which is larger, 385 or 358?", "Count the letters in mississippi, please"]
    cases = [dict(messages=[{"role": "user", "content": q}], max_tokens=16 + 4 * i, temperature=t, seed=seed)
             for i, q in enumerate(questions) for t, seed in ((0.0, None), (0.9, 7 + i))]
    with scripted_server(model) as srv:
        alone = [complete(srv.url, **case)[:3] for case in cases]
        assert set(rows) == {1}
        with ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(lambda i: complete(srv.url, stream=i % 2 == 0, **cases[i])[:3], range(len(cases))))
    assert together == alone and max(rows) > 1
    assert len({a[0] for a in alone}) > 4  # replies that differ: a mix-up between rows would show


def test_a_failed_forward_pass_fails_its_reply_and_the_batch_goes_on():
    model = tiny_model()
    with scripted_server(model) as srv:
        run = srv.engine.run

        def fail_once(idx, caches):  # out of memory, say
            srv.engine.run = run
            raise RuntimeError("no memory left")
        srv.engine.run = fail_once
        status, _, error = request(srv.url, body=body())
        assert status == 500 and error["error"]["message"].startswith("internal error")
        assert complete(srv.url, max_tokens=4)[2] in ("stop", "length")


def test_a_client_that_hangs_up_mid_stream_leaves_a_working_server(live):
    with socket.create_connection(address(live.url)) as sock:
        data = json.dumps(body(stream=True, max_tokens=100)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        read_until(sock, b'"delta"')
    assert complete(live.url, max_tokens=4)[2] in ("stop", "length")


# ----------------------------------------------------------------------------- disconnects, time, queue, keys

def test_a_client_that_hangs_up_stops_its_generation():
    model = Scripted(endless, delay=0.02)  # would take 4 s for its 200 tokens
    with scripted_server(model) as srv:
        for stream in (True, False):
            model.produced = 0
            with socket.create_connection(address(srv.url)) as sock:
                data = json.dumps(body(stream=stream, max_tokens=200)).encode()
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                if stream:
                    read_until(sock, b'"content"')
                else:
                    wait_until(lambda: model.produced > 0)
            wait_until(lambda: not srv.engine.lock.locked())
            stopped_at = model.produced
            assert stopped_at < 100
            time.sleep(0.1)
            assert model.produced == stopped_at
        assert complete(srv.url, max_tokens=5)[:3] == ("la la", None, "length")


def test_the_time_limit_ends_a_reply_and_a_full_queue_is_refused(monkeypatch):
    model = Scripted(endless, delay=0.02)
    with scripted_server(model, timeout=0.5) as srv:
        t0 = time.monotonic()
        content, _, finish, _ = complete(srv.url, max_tokens=200)
        assert finish == "length" and 0 < len(content) < 3 * 100 and time.monotonic() - t0 < 3
        with srv.engine.lock:  # the model busy with another reply
            status, headers, error = request(srv.url, body=body())
            assert status == 503 and headers["Retry-After"] and "time limit" in error["error"]["message"]
            monkeypatch.setattr(serve, "MAX_WAITING", 0)
            status, _, error = request(srv.url, body=body())
            assert status == 503 and "busy" in error["error"]["message"]


def test_an_api_key_is_required_when_set():
    with scripted_server(Scripted(by_reasoning), api_key="sekret") as srv:
        with pytest.raises(openai.AuthenticationError):
            complete(srv.url, key="wrong")
        assert complete(srv.url, key="sekret")[0] == "42"
        assert request(srv.url, "/v1/models", method="GET")[0] == 401
        assert request(srv.url, "/health", method="GET")[0] == 200 and request(srv.url, "/", method="GET")[0] == 200


# ----------------------------------------------------------------------------- the Host header: DNS rebinding

def test_a_host_that_names_another_site_is_refused_even_with_the_key():
    """A page on evil.example that points its name at this machine (DNS rebinding) sends Host: evil.example."""
    with scripted_server(Scripted(by_reasoning), api_key="sekret") as srv:
        port, key = urlsplit(srv.url).port, {"Authorization": "Bearer sekret"}
        for host in ("evil.example", f"evil.example:{port}", "EVIL.example:80", "localhost.evil.example",
                     "127.0.0.1.evil.example", "evil.example@localhost"):
            for path, method in (("/", "GET"), ("/health", "GET"), ("/v1/models", "GET"),
                                 ("/v1/chat/completions", "POST"), ("/nowhere", "GET")):
                status, _, error = request(srv.url, path, body(), method, {"Host": host} | key)
                assert status == 403 and error["error"]["code"] == "host_not_allowed", (host, path)
                assert set(error["error"]) == {"message", "type", "param", "code"}
        for host in ("localhost", f"localhost:{port}", "LocalHost", "127.0.0.1", f"127.0.0.1:{port}", "[::1]",
                     f"[::1]:{port}", "192.168.1.5:8000"):  # an address cannot be rebound: no page's name
            assert request(srv.url, "/v1/models", method="GET", headers={"Host": host} | key)[0] == 200, host
        status, _, reply = request(srv.url, body=body(reasoning="off"), headers={"Host": f"localhost:{port}"} | key)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "42"


def test_allowed_hosts_admits_the_names_it_lists_and_star_any(live):
    port = urlsplit(live.url).port  # the live server runs with --allowed_hosts a.example
    for host, expected in (("a.example", 200), (f"a.example:{port}", 200), ("A.Example", 200),
                           ("b.example", 403), ("example", 403), ("evil.a.example", 403)):
        assert request(live.url, "/health", method="GET", headers={"Host": host})[0] == expected, host
    assert serve.parse_allowed_hosts(" a.example, B.example:8080,") == ["a.example", "b.example"]
    with scripted_server(Scripted(by_reasoning), allowed_hosts=serve.parse_allowed_hosts("a.example,*")) as srv:
        assert request(srv.url, "/health", method="GET", headers={"Host": "evil.example"})[0] == 200


def raw_request(url, data):
    """Bytes sent as they are, read up to the server's hanging up -> (status, the body)."""
    with socket.create_connection(address(url)) as sock:
        sock.sendall(data)
        reply = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    return int(reply.split()[1]), reply.partition("\r\n\r\n")[2]


def test_a_request_needs_one_host_header_except_in_http_1_0():
    with scripted_server(Scripted(by_reasoning)) as srv:
        assert request(srv.url, "/health", method="GET", headers={"Host": None})[0] == 400
        for hosts in (b"Host: localhost\r\nHost: evil.example\r\n", b"Host: \r\n", b"Host: [::1\r\n"):
            status, error = raw_request(srv.url, b"GET /health HTTP/1.1\r\n%sConnection: close\r\n\r\n" % hosts)
            assert status == 400 and json.loads(error)["error"]["message"], hosts
        # HTTP/1.0 came before Host, and no browser leaves it out: nothing a rebinding page could send
        status, health = raw_request(srv.url, b"GET /health HTTP/1.0\r\n\r\n")
        assert status == 200 and json.loads(health)["status"] == "ok"
        assert raw_request(srv.url, b"GET /health HTTP/1.0\r\nHost: evil.example\r\n\r\n")[0] == 403


# ----------------------------------------------------------------------------- the page, in a real browser

class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): JSON messages
    ended by a NUL byte, into the browser on its fd 3 and out of it on its fd 4, so no websocket client is needed."""

    def __init__(self, profile_dir):
        to_browser, self.out = os.pipe()
        self.inp, from_browser = os.pipe()
        # The ends go to the browser's fds 3 and 4, from copies above 9 so that the two dup2s cannot overwrite
        # each other; posix_spawn maps them without running Python in the child (this process has threads).
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        actions = [(os.POSIX_SPAWN_DUP2, ends[0], 3), (os.POSIX_SPAWN_DUP2, ends[1], 4)] + [
            (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
        argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"]
        self.pid = os.posix_spawn(CHROMIUM, argv, os.environ, file_actions=actions)
        for fd in (to_browser, from_browser, *ends):
            os.close(fd)
        self.next_id, self.buffer, self.session, self.messages = 0, b"", None, []

    def send(self, method, **params):
        """Send a command without waiting for its answer; returns the command's id."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        os.write(self.out, json.dumps(message | ({"sessionId": self.session} if self.session else {})).encode() + b"\0")
        return self.next_id

    def call(self, method, timeout=60, **params):
        sent = self.send(method, **params)
        reply = self.receive(lambda m: m.get("id") == sent, method, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def event(self, method, timeout=30):
        """The next event called method (its domain enabled), kept from earlier calls or still to come."""
        return self.receive(lambda m: m.get("method") == method, method, timeout)

    def receive(self, wanted, what, timeout):
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if wanted(m):
                    self.messages.remove(m)
                    return m
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.inp], [], [], max(0.0, deadline - time.monotonic()))
                data = os.read(self.inp, 1 << 20) if ready else None
                if not data:
                    raise RuntimeError(f"{what}: Chromium did not answer")
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            if "id" in message or message.get("method", "").startswith("Page."):  # other events: not needed
                self.messages.append(message)

    def open(self, url, width, height):
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.getElementById('send') !== null")

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.03)

    def type(self, text):
        """Type into the message box and press Enter, as a user does."""
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        enter = dict(key="Enter", code="Enter", windowsVirtualKeyCode=13)
        self.call("Input.dispatchKeyEvent", type="keyDown", **enter)
        # Not waited for: if the key press opened a dialog (the page asking for an API key), Chromium answers
        # the key-up only once the dialog is closed.
        self.send("Input.dispatchKeyEvent", type="keyUp", **enter)

    def screenshot(self):
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        os.close(self.out)
        os.close(self.inp)


def page_script(prompt):
    """Thinks, then answers 42 (reasoning on); a question with "forever" in it gets an answer that never ends."""
    question = prompt[len(prompt) - prompt[::-1].index(SP["<|user|>"]):]
    if b"forever" in bytes(t for t in question if t < 256):
        return itertools.chain([SP["<|/think|>"], SP["<|assistant|>"]], endless(prompt))
    return by_reasoning(prompt)


needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="no Chromium to run the page in: apt-get install chromium (Debian)")


@needs_chromium
def test_the_page_streams_the_reply_collapses_the_thinking_and_stops(tmp_path):
    model = Scripted(page_script, delay=0.03)
    with scripted_server(model) as srv:
        browser = Browser(tmp_path / "profile")
        try:
            browser.open(srv.url, 390, 844)  # a phone-sized window
            assert browser.js("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
            browser.js("document.getElementById('reasoning').value = 'on'")
            browser.type("What is 12+30?")
            # while the model thinks, its thinking shows live in an open block, before any answer
            browser.wait("(d => d && d.open && d.textContent.includes('12+30'))"
                         "(document.querySelector('.assistant details'))")
            assert browser.js("document.querySelector('.assistant .answer').textContent") == ""
            browser.wait("document.body.dataset.state === 'idle'")
            shown = browser.js("""(m => ({answer: m.querySelector('.answer').textContent,
                open: m.querySelector('details').open, summary: m.querySelector('summary').textContent,
                thinking: m.querySelector('.thinking-text').textContent}))(document.querySelector('.assistant'))""")
            assert shown == {"answer": "42", "open": False, "thinking": THINKING,
                             "summary": f"Thought for {len(THINKING)} tokens"}
            assert model.prompts[-1][-1] == SP["<|think|>"]  # the page's reasoning switch reached the server

            browser.type("Count forever")  # the stop button ends a reply that would go on
            browser.wait("document.querySelectorAll('.assistant .answer')[1].textContent.length > 6")
            browser.js("document.getElementById('send').click()")
            browser.wait("document.body.dataset.state === 'idle'")
            assert browser.js("document.querySelectorAll('.assistant .note')[1].textContent") == "[stopped]"
            wait_until(lambda: not srv.engine.lock.locked())
            assert model.produced < 150

            browser.type("And now?")  # the conversation so far goes with the next message
            browser.wait("document.body.dataset.state === 'idle'")
            history = bytes(t for t in model.prompts[-1] if t < 256).decode()
            assert all(s in history for s in ("What is 12+30?", THINKING, "42", "Count forever", "la la", "And now?"))
            browser.js("document.getElementById('new').click()")
            assert browser.js("document.querySelectorAll('.assistant, .user').length") == 0
        finally:
            browser.close()


@needs_chromium
def test_the_page_asks_for_the_api_key(tmp_path):
    with scripted_server(Scripted(by_reasoning), api_key="sekret") as srv:
        browser = Browser(tmp_path / "profile")
        try:
            browser.open(srv.url.replace("127.0.0.1", "localhost"), 800, 600)  # its requests: Host: localhost:PORT
            browser.call("Page.enable")  # to be told when the page asks for the key (window.prompt)
            browser.type("What is 12+30?")
            browser.event("Page.javascriptDialogOpening")
            browser.call("Page.handleJavaScriptDialog", accept=True, promptText="sekret")
            browser.wait("document.body.dataset.state === 'idle'")
            assert browser.js("document.querySelector('.assistant .answer').textContent") == "42"
        finally:
            browser.close()
