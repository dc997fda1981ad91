"""
Serve a trained model over HTTP: the OpenAI chat API, and a chat page for the browser.

    python serve.py                                  # out/best.pt (else out/ckpt.pt) on http://127.0.0.1:8000
    python serve.py --ckpt out/best.pt --port 8080   # then open http://127.0.0.1:8080 in a browser
    NANOFORGE_API_KEY=secret python serve.py --host 0.0.0.0     # reachable from other machines: require a key
    python serve.py --host 0.0.0.0 --allowed_hosts gpu.lan      # also answer http://gpu.lan:8000/ (not only IPs)

    POST /v1/chat/completions  the OpenAI chat API, streamed as server-sent events with "stream": true.
                               Extensions: "reasoning" (on | off | auto, as chat.py's /reason) and "top_k";
                               the thinking comes back apart from the answer, as "reasoning_content"
    GET  /v1/models            the one model served
    GET  /health               {"status": "ok", ...}, without a key
    GET  /                     the chat page, static/chat.html: one file, no build step, works offline

The standard library's ThreadingHTTPServer: a thread per connection reads and checks its request, waits for a place
in the batch, then generates its reply with replies.generate_reply (model.generate: its own KV cache, sampling and
stop tokens), the conversation fitted to the context as chat.py does (tokenizer.fit_to_window). The replies decode
together (continuous batching, Engine): one decode thread runs the model for all of them, a forward pass a token.
A request must name this server in its Host header (localhost, an IP address, --host or --allowed_hosts), so a web
page that points its own name at this machine (DNS rebinding) is refused: its requests carry that name.
"""
import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from common import UserError, run_main
from inference import (add_model_args, add_sampling_args, checkpoint_path, load_model, make_generator, prompt_budget,
                       sampling_kwargs)
from replies import generate_reply
from tokenizer import fit_to_window, render_prompt

API_KEY_ENV = "NANOFORGE_API_KEY"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")
# What one request may ask for; anything past these is refused with a 4xx, never queued for the model.
MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 16 * MAX_BODY_BYTES  # a refused body up to this size is read and dropped, keeping the connection
MAX_MESSAGES = 256  # fitting re-renders the conversation once per dropped exchange: keep that bounded
MAX_STOPS = 4       # as OpenAI's API
MAX_BATCH = 16      # replies decoded together; more wait for a place in the batch
MAX_WAITING = 64    # requests queued for the model past this are turned away (503) instead of piling up
SOCKET_TIMEOUT = 30  # seconds a client may stall mid-request (or idle between requests on a kept-alive connection)
REASONING = ("auto", "on", "off")
REASONING_EFFORT = {"low": 64, "medium": 256, "high": None}  # OpenAI's reasoning_effort -> max_thinking_tokens
HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(:\d*)?")  # a Host header: a name or [IPv6], then maybe a port


class ApiError(Exception):
    """A request the server refuses: the HTTP status and an OpenAI-style error body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def short(value):
    """A value from a request, quoted in an error message without echoing a megabyte back."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def host_of(value):
    """The host a Host header (or an --allowed_hosts entry) names, lowercased, without its port and brackets:
    "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1"; None when it names none."""
    match = HOST.fullmatch(value.strip().lower())
    return match[1].strip("[]") if match else None


def host_allowed(name, allowed):
    """Whether this server answers a request naming the host name: one in allowed, or an IP address (a page cannot
    rebind an address: a browser sends the host of the page's URL, and an address in it is no site's name)."""
    if name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def parse_allowed_hosts(text):
    """--allowed_hosts "a.example,b.example:8080" -> ["a.example", "b.example"]; None for "*": any host."""
    names = [host_of(entry) for entry in text.split(",") if entry.strip()]
    if None in names:
        raise UserError(f"--allowed_hosts takes host names separated by commas (a.example,b.example), not {text!r}")
    return None if "*" in names else names


# ----------------------------------------------------------------------------- requests

@dataclass
class Request:
    messages: list       # {role, content[, thinking]}: the chat format's messages (tokenizer.render_prompt)
    reasoning: str
    sampling: dict       # model.generate's keyword arguments and max_thinking_tokens (replies.generate_replies)
    seed: "int | None"
    stops: list
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_request(body, defaults, block_size):
    """The JSON body of POST /v1/chat/completions -> Request, every field checked (ApiError 400 otherwise).
    Fields this server does not know are ignored, as OpenAI-compatible servers do, except those that would
    change what a reply is (several choices, tool calls, log-probabilities, a JSON format): those are refused."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: this server gives one reply per request", "n")
    for name in ("tools", "functions", "logprobs"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server", name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "response_format must be text: this server cannot constrain replies", "response_format")
    if not isinstance(body.get("model", ""), str):
        raise ApiError(400, "model must be a string", "model")
    reasoning = body.get("reasoning", "auto")
    if reasoning not in REASONING:
        raise ApiError(400, f"reasoning must be one of {', '.join(REASONING)}, not {short(reasoning)}", "reasoning")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = dict(
        max_new_tokens=number(max_tokens, "max_tokens", defaults["max_new_tokens"], 1, block_size, integer=True),
        temperature=number(body.get("temperature"), "temperature", defaults["temperature"], 0, 2),
        top_p=number(body.get("top_p"), "top_p", defaults["top_p"], 0, 1, above_low=True),
        top_k=number(body.get("top_k"), "top_k", defaults["top_k"], 1, None, integer=True),
        max_thinking_tokens=thinking_budget_of(body, defaults, block_size))
    seed = number(body.get("seed"), "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True)  # torch's seed range
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    return Request(parse_messages(body.get("messages")), reasoning, sampling, seed, stops, stream,
                   options.get("include_usage", False))


def thinking_budget_of(body, defaults, block_size):
    """max_thinking_tokens, else OpenAI's reasoning_effort as a budget, else the server's --max_thinking_tokens."""
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORT:
        raise ApiError(400, f"reasoning_effort must be one of {', '.join(REASONING_EFFORT)}, not {short(effort)}",
                       "reasoning_effort")
    default = REASONING_EFFORT[effort] if effort else defaults["max_thinking_tokens"]
    return number(body.get("max_thinking_tokens"), "max_thinking_tokens", default, 0, block_size, integer=True)


def number(value, name, default, low, high, integer=False, above_low=False):
    """A numeric field in [low, high] (low excluded with above_low, no high with None), or default when absent."""
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    in_range = (value > low if above_low else value >= low) and (high is None or value <= high) \
        if isinstance(value, (int, float)) and not isinstance(value, bool) else False
    if integer and not isinstance(value, int) or not in_range:
        where = f"{'above' if above_low else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
        raise ApiError(400, f"{name} must be {kind} {where}, not {short(value)}", name)
    return value


def parse_messages(messages):
    """OpenAI messages -> the chat format's: system (first only), user and assistant turns, the last one the
    user's. An assistant turn may carry its thinking back as reasoning_content, rendered as chat.py does.
    Content is plain text, so a "<|think|>" typed by a user stays text (render_prompt's encode_ordinary)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"at most {MAX_MESSAGES} messages per request, got {len(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{param} must be an object with role and content", param)
        role, thinking = m.get("role"), m.get("reasoning_content")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{param}.role must be system, user or assistant, not {short(role)}", f"{param}.role")
        if role == "system" and i > 0:
            raise ApiError(400, "only the first message may be a system message", f"{param}.role")
        if thinking is not None and (role != "assistant" or not isinstance(thinking, str)):
            raise ApiError(400, f"{param}.reasoning_content must be a string, on assistant messages only",
                           f"{param}.reasoning_content")
        out.append({"role": role, "content": message_text(m.get("content"), param)}
                   | ({"thinking": thinking} if role == "assistant" else {}))
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the reply answers it", "messages")
    return out


def message_text(content, param):
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{param}.content must be a string or a list of text parts (this model reads text only)",
                   f"{param}.content")


# ----------------------------------------------------------------------------- replies

class Answer:
    """A reply as it streams: emit(field, text) gets the thinking ("reasoning_content") and the answer
    ("content") as they arrive. Answer text that may be the start of a stop string is held back until it
    cannot be; a stop string ends the reply and is never sent. Streaming and non-streaming requests both go
    through this, so they say the same for the same seed."""

    def __init__(self, stops, emit):
        self.stops, self.emit = stops, emit
        self.thinking = None  # None: no thinking text (no think block, or an empty one), as a stream shows it
        self.content, self.sent, self.stopped = "", 0, False

    def __call__(self, reply, text):  # generate_reply's on_text
        if reply.part == "thinking":
            self.thinking = (self.thinking or "") + text
            self.emit("reasoning_content", text)
            return
        self.content += text
        # A stop string cannot start before self.sent: text is released only once no stop can start in it.
        hits = [i for i in (self.content.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.content, self.stopped = self.content[:min(hits)], True
        self.release(len(self.content) if self.stopped else self.safe_end())

    def safe_end(self):
        """Where the answer may be cut for sending: before the first suffix that begins a stop string."""
        for i in range(self.sent, len(self.content)):
            if any(s.startswith(self.content[i:]) for s in self.stops):
                return i
        return len(self.content)

    def release(self, end):
        if end > self.sent:
            self.emit("content", self.content[self.sent:end])
            self.sent = end

    def finish(self):
        self.release(len(self.content))


class Seat:
    """A request's place in the batch. Its reply is generated in the request's own thread by model.generate, as ever,
    but the model's forward passes there are the decode thread's to run (Engine.forward): with the other replies'."""

    def __init__(self):
        self.given = self.left = self.started = False  # a place given; the place left; a first forward pass asked
        self.call, self.results = None, queue.SimpleQueue()  # the forward pass asked for (idx, caches); its logits


class Engine:
    """The model and the replies it generates together (continuous batching): each reply decodes in its request's
    thread (model.generate, its own KV cache, sampling, stop tokens and thinking budget), and a decode thread runs
    their forward passes, a new reply's prompt at once, and the next token of all the others as one batch (a list
    of caches: model.py) once each has asked for it. It holds the model (self.lock) while any request has a place;
    at most MAX_BATCH at once, the others waiting their turn (at most MAX_WAITING, each no longer than its time
    limit). A reply joins at the next step and leaves when it ends, its client hangs up or its time runs out."""

    def __init__(self, model, enc, model_id, defaults, seed, timeout):
        self.model, self.enc, self.model_id = model, enc, model_id
        self.defaults, self.timeout = defaults, timeout
        self.generator = make_generator(model, seed)  # for requests without a seed: torch locks it for each draw
        self.run, model.forward = model.forward, self.forward  # generate's forward passes come to the decode thread
        self.lock = threading.Lock()  # held by the decode thread while requests hold or wait for places: busy
        self.changed = threading.Condition()  # guards the lists below and the seats' fields
        self.seats, self.queue, self.local = [], [], threading.local()  # in the batch; waiting; a thread's seat
        threading.Thread(target=self.decode, name="decode", daemon=True).start()

    @property
    def waiting(self):
        return len(self.queue)

    def prompt(self, req):
        """The conversation fitted to the context as chat.py fits it: room for the reply (max_tokens, at most
        half the context), then the system message and the newest exchanges that fit."""
        block_size = self.model.config.block_size
        max_prompt = prompt_budget(block_size, req.sampling["max_new_tokens"])
        system = [m for m in req.messages[:1] if m["role"] == "system"]
        shortest = len(render_prompt(system + [{"role": "user", "content": ""}], self.enc, req.reasoning))
        if shortest > max_prompt:  # fit_to_window needs room for at least an empty user turn
            raise ApiError(400, f"the system message takes {shortest} tokens; with max_tokens "
                           f"{req.sampling['max_new_tokens']} the model's {block_size}-token context leaves "
                           f"{max_prompt} for the prompt", "messages[0].content")
        messages = unreachable_dropped(req.messages, self.enc, max_prompt)
        window, _, _ = fit_to_window(messages, self.enc, req.reasoning, max_prompt)
        return render_prompt(window, self.enc, req.reasoning)

    @contextlib.contextmanager
    def turn(self, deadline):
        """A place in the batch: wait for one until deadline (ApiError 503 when the queue is full or time runs out)."""
        seat = self.local.seat = Seat()
        with self.changed:
            if len(self.queue) >= MAX_WAITING:
                raise ApiError(503, f"the server is busy ({len(self.queue)} requests waiting): try again later",
                               headers={"Retry-After": "1"})
            self.queue.append(seat)
            self.changed.notify_all()
            if not self.changed.wait_for(lambda: seat.given, max(0.0, deadline - time.monotonic())):
                self.queue.remove(seat)
                raise ApiError(503, f"the model stayed busy for the request's whole time limit ({self.timeout:g} s)",
                               headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self.post(seat, left=True)

    def post(self, seat, **fields):
        """A request's news for the decode thread: seat's fields set. Only the decode thread waits for news, so it is
        woken only when it has something to do: once a step, not once for each reply asking for its next token."""
        with self.changed:
            vars(seat).update(fields)
            if self.due():
                self.changed.notify_all()

    def forward(self, idx, caches):
        """model.forward while serving, called by model.generate in a request's thread: a prompt, or the next token,
        of one reply, run by the decode thread with the other replies' -> (logits, None)."""
        seat = self.local.seat
        self.post(seat, call=(idx, caches))
        logits = seat.results.get()
        if isinstance(logits, Exception):
            raise RuntimeError("the batch's forward pass failed") from logits
        return logits, None

    def decode(self):
        """The decode thread: idle until a request waits, then holding the model until none has or waits for a place."""
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.queue)
            with self.lock, torch.inference_mode():
                while self.seats or self.queue:
                    self.step()

    def due(self):
        """Whether the decode thread has something to do: a place to give, a seat to clear, a new reply's prompt to
        run, the next token of all the others (each has asked for it) or nothing left."""
        started = [s for s in self.seats if s.started]
        return (self.queue and len(self.seats) < MAX_BATCH or not (self.seats or self.queue)
                or any(s.left or (s.call and not s.started) for s in self.seats)
                or started and all(s.call for s in started))

    def step(self):
        """Once something is due: give places, clear the seats of replies that have ended, run each new reply's
        prompt alone (so its first token comes at once) and, once every other reply has asked for its next
        token, those of them all in one forward pass."""
        with self.changed:
            self.changed.wait_for(self.due)
            while self.queue and len(self.seats) < MAX_BATCH:
                self.seats.append(self.queue.pop(0))
                self.seats[-1].given = True
            self.changed.notify_all()
            self.seats = [s for s in self.seats if not s.left]
            started = [s for s in self.seats if s.started]
            batch = [(s, s.call) for s in started] if started and all(s.call for s in started) else []
            prompts = [(s, s.call) for s in self.seats if s.call and not s.started]
            for s, _ in batch + prompts:
                s.call, s.started = None, True
        for calls in ([batch] if batch else []) + [[call] for call in prompts]:  # a forward pass each
            idx, caches = zip(*(call for _, call in calls))
            try:
                logits, _ = self.run(torch.cat(idx), caches=[c for group in caches for c in group])
                parts = logits.split([len(i) for i in idx])
            except Exception as e:  # a bug, or out of memory: the replies in this pass fail (a 500), the server goes on
                parts = [e] * len(calls)
            for (s, _), part in zip(calls, parts):
                s.results.put(part)

    def reply(self, prompt, req, emit, deadline, client_left):
        """Generate in the batch -> (Answer, Reply). The reply ends early at a stop string ("stop"), when the
        client has left ("left") or at the deadline ("time")."""
        answer = Answer(req.stops, emit)

        def should_stop(reply):
            return ("stop" if answer.stopped else "left" if client_left()
                    else "time" if time.monotonic() > deadline else None)

        generator = self.generator if req.seed is None else make_generator(self.model, req.seed)
        reply = generate_reply(self.model, self.enc, prompt, req.sampling, generator, on_text=answer,
                               should_stop=should_stop)
        answer.finish()
        return answer, reply


def unreachable_dropped(messages, enc, max_prompt):
    """The messages without those fit_to_window would drop anyway, found by encoding each message once:
    fit_to_window renders the conversation again for every exchange it drops, which takes seconds for a long
    history. A rendered prompt holds at least its messages' text tokens, so no window can start before the point
    where the newest messages' text alone overflows; from the first user turn after it, fit_to_window takes the
    same steps it would have taken from the start."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]

    def text_tokens(m):
        return len(enc.encode_ordinary(m["content"])) + len(enc.encode_ordinary(m.get("thinking") or ""))
    room = max_prompt - sum(map(text_tokens, system))
    start = len(turns)
    while start > 0 and (room := room - text_tokens(turns[start - 1])) >= 0:
        start -= 1
    if start == 0:
        return messages
    start = next((i for i in range(start, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
    return system + turns[start:]


def usage(prompt, reply):
    return {"prompt_tokens": len(prompt), "completion_tokens": len(reply.ids),
            "total_tokens": len(prompt) + len(reply.ids),
            "completion_tokens_details": {"reasoning_tokens": reply.thinking_tokens}}


# ----------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer for streams
    server_version = "nanoforge"
    timeout = SOCKET_TIMEOUT

    def setup(self):
        super().setup()
        # A token goes out when it is written, not after Nagle's algorithm waits for the previous one's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.write_failed = False

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_other(self):  # a 405 with the allowed method rather than the base class's 501
        self.route(self.command)

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_other

    def route(self, method):
        self.write_failed, self.headers_sent, self.body_read = False, False, False
        routes = {"/": ("GET", self.page), "/health": ("GET", self.health), "/v1/models": ("GET", self.models),
                  "/v1/chat/completions": ("POST", self.chat_completions)}
        path = urlsplit(self.path).path
        try:
            self.check_host()  # first: a refused page learns nothing, not even which paths exist
            if path not in routes:
                raise ApiError(404, f"no such endpoint: {method} {path[:100]}")
            allowed, handle = routes[path]
            if method != allowed:
                raise ApiError(405, f"{path} takes {allowed}, not {method}", headers={"Allow": allowed})
            if path.startswith("/v1/") and self.server.api_key and not self.key_ok():
                raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            handle()
        except ApiError as e:
            self.fail(e)
        except TimeoutError:
            self.close_connection = True
            self.fail(ApiError(408, f"the request was not sent within {SOCKET_TIMEOUT} s"))
        except Exception:  # a bug: logged here in full, a one-line 500 for the client, and the server goes on
            self.log_error("%s", traceback.format_exc().rstrip())
            self.fail(ApiError(500, "internal error: the server's log says more"))

    def check_host(self):
        """Refuse (ApiError) a request whose Host header does not name this server: DNS rebinding's way in, a page
        whose own name now resolves to this machine. Missing (HTTP/1.1), repeated or malformed is a 400, as RFC 9112
        section 3.2 requires; missing in HTTP/1.0 is let through, as no browser sends a request without one."""
        hosts = self.headers.get_all("Host") or []
        if not hosts and self.request_version in ("HTTP/0.9", "HTTP/1.0"):
            return
        name = host_of(hosts[0]) if len(hosts) == 1 else None
        if name is None:
            raise ApiError(400, "the request needs one Host header naming this server, such as 'Host: localhost'")
        if self.server.allowed_hosts is not None and not host_allowed(name, self.server.allowed_hosts):
            # 403 as Ollama and Jupyter answer it: a 421 would invite the client to retry over another connection
            raise ApiError(403, f"this server does not answer to the host {short(name)}, to keep out other sites' "
                           "pages (DNS rebinding): allow it with --allowed_hosts", code="host_not_allowed")

    def fail(self, error):
        if self.headers_sent:  # mid-stream: the status is long gone, so say it as an event, then hang up
            self.write_event(error.body())
            self.close_connection = True
            return
        if not self.body_read and not self.close_connection:
            self.discard_body()
        self.send_json(error.status, error.body(), error.headers)

    def discard_body(self):
        """Read past a body the request will not use, so it is not taken for the next request, and so closing
        with it unread does not reset the connection before the client reads the error. Past DRAIN_BYTES (or a
        chunked body), just hang up."""
        length = self.headers.get("Content-Length")
        if length is None and "Transfer-Encoding" not in self.headers:
            return  # no body
        try:
            if length and length.isdigit() and int(length) <= DRAIN_BYTES and "Transfer-Encoding" not in self.headers:
                self.body_read = len(self.rfile.read(int(length))) == int(length)
        except OSError:
            pass
        if not self.body_read:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (a malformed request line, an unknown method) as JSON, not an HTML page."""
        self.close_connection, self.headers_sent, self.write_failed = True, False, False
        self.send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

    def key_ok(self):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.server.api_key.encode())

    def send_json(self, status, obj, headers=None):
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def send_body(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.write(data)

    def write(self, data):
        if not self.write_failed:
            try:
                self.wfile.write(data)
            except OSError:  # the client left: noticed by client_left, before the next token
                self.write_failed = True

    def client_left(self):
        """Whether the client has closed its connection: readable, with nothing to read. Asked after every
        token, so a client that hangs up frees the model at once, streaming or not."""
        if self.write_failed:
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def read_json(self):
        if self.headers.get_content_type() != "application/json":
            # also keeps other sites' pages from posting here: a JSON post from them needs CORS, never granted
            raise ApiError(415, "send the body as JSON, with the header 'Content-Type: application/json'")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "the request needs a Content-Length header (chunked bodies are not accepted)")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes, not {short(length)}")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted")
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            self.close_connection = True
            raise ApiError(400, "the body is shorter than its Content-Length")
        self.body_read = True
        try:
            return json.loads(raw, parse_constant=reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the body is not valid JSON ({str(e)[:100]})") from None

    # --------------------------------------------------------------------------- endpoints

    def page(self):
        self.send_body(200, self.server.page, "text/html; charset=utf-8", {
            # the page needs nothing but itself and this server: no CDN, and no injected script could run
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"})

    def health(self):
        engine = self.server.engine
        self.send_json(200, {"status": "ok", "model": engine.model_id, "busy": engine.lock.locked(),
                             "waiting": engine.waiting})

    def models(self):
        engine = self.server.engine
        self.send_json(200, {"object": "list", "data": [{
            "id": engine.model_id, "object": "model", "created": self.server.created, "owned_by": "nanoforge",
            "max_model_len": engine.model.config.block_size}]})

    def chat_completions(self):
        engine = self.server.engine
        deadline = time.monotonic() + engine.timeout
        req = parse_request(self.read_json(), engine.defaults, engine.model.config.block_size)
        prompt = engine.prompt(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(kind, **fields):  # in OpenAI's order
            return {"id": cid, "object": kind, "created": created, "model": engine.model_id, **fields}

        def chunk(delta, finish=None):
            return envelope("chat.completion.chunk", choices=[{"index": 0, "delta": delta, "finish_reason": finish}])

        def emit(field, text):  # a non-streaming reply is read from the Answer at the end
            if req.stream:
                self.write_event(chunk({field: text}))

        with engine.turn(deadline):
            if req.stream:
                self.start_stream()
                emit("role", "assistant")
            answer, reply = engine.reply(prompt, req, emit, deadline, self.client_left)
        finish = {"stop": "stop", "left": None}.get(reply.finish, "length")  # "time" is a limit, as "length"
        self.log_message("reply: %d prompt tokens, %d generated in %.2f s, %s", len(prompt), len(reply.ids),
                         reply.seconds, "client left: stopped" if finish is None else f"finish {reply.finish}")
        if finish is None:
            self.close_connection = True
        elif req.stream:
            self.write_event(chunk({}, finish))
            if req.include_usage:
                self.write_event(envelope("chat.completion.chunk", choices=[], usage=usage(prompt, reply)))
            self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")  # the chunked body's end: the connection stays open for the next request
        else:
            message = {"role": "assistant", "content": answer.content, "reasoning_content": answer.thinking}
            self.send_json(200, envelope("chat.completion", choices=[{"index": 0, "message": message,
                                                                      "finish_reason": finish}],
                                         usage=usage(prompt, reply)))

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # a proxy in front (nginx) must not buffer the events
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.headers_sent = True

    def write_event(self, obj):
        self.write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def write_chunk(self, data):
        self.write(b"%x\r\n%s\r\n" % (len(data), data))


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


class Server(ThreadingHTTPServer):  # a thread per connection, daemonic: a stalled client never blocks exiting
    pass


class Server6(Server):
    address_family = socket.AF_INET6


def make_server(engine, host="127.0.0.1", port=8000, api_key=None, page_path=PAGE, allowed_hosts=()):
    """An HTTP server for engine on host:port (port 0: any free one), not yet serving. It answers requests whose
    Host header names localhost, host, an IP address or one of allowed_hosts (None: any host)."""
    try:
        with open(page_path, "rb") as f:
            page = f.read()
    except OSError as e:
        raise UserError(f"cannot read the chat page {page_path}: {e.strerror}") from None
    try:
        server = (Server6 if ":" in host else Server)((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}: pick another --port or --host") from None
    server.engine, server.api_key, server.page, server.created = engine, api_key, page, int(time.time())
    server.allowed_hosts = None if allowed_hosts is None else frozenset({"localhost", host.lower(), *allowed_hosts})
    return server


def main():
    parser = argparse.ArgumentParser(description="Serve a nanoforge checkpoint: the OpenAI chat API and a chat page.")
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=512, temperature=0.6)  # defaults for requests that do not say
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--allowed_hosts", default="",
                        help="host names, comma-separated, that requests may name in their Host header besides "
                             "localhost, --host and IP addresses ('*': any); others get a 403 (DNS rebinding)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds a request may take, its wait for the model included (default 120)")
    args = parser.parse_args()
    sampling = sampling_kwargs(args)
    allowed_hosts = parse_allowed_hosts(args.allowed_hosts)
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be between 0 (any free port) and 65535")
    model, enc, _ = load_model(args)
    # The decode thread and every reply's thread hand each other the GIL at every token: at Python's default 5 ms
    # interval, a thread whose torch op has ended can wait that long for one running Python code (docs/serving.md)
    sys.setswitchinterval(2e-4)
    model_id = checkpoint_path(args)
    engine = Engine(model, enc, model_id, sampling, args.seed, args.timeout)
    server = make_server(engine, args.host, args.port, args.api_key, allowed_hosts=allowed_hosts)
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"serving {model_id} ({model.config.block_size}-token context) at {url}  (OpenAI API: {url}v1)", flush=True)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use "
              f"the model (--api_key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
