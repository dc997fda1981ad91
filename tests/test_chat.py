"""chat.py: a scripted session through a real subprocess with piped stdin, the reply display against
exact expected output (a scripted model), Ctrl-C, and the notes when a conversation outgrows the context.
Which part of a long conversation the model sees (tokenizer.fit_to_window) is tested in test_tokenizer.py."""
import io
import json

import pytest

from chat import Chat
from conftest import BYTE, SP, ScriptedModel, run_script, text_ids

GREEDY = dict(max_new_tokens=100, temperature=0.0, top_k=None, top_p=None)


def new_chat(model, **kwargs):
    out = io.StringIO()
    chat = Chat(model, BYTE, sampling=GREEDY, generator=None, out=out, **kwargs)
    return chat, out


THINKING = "12+30: 2+0=2, 1+3=4"
THINKING_REPLY = text_ids(THINKING) + [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids("42") + [SP["<|/assistant|>"]]


def test_thinking_is_summarized_and_the_answer_streams():
    model = ScriptedModel(THINKING_REPLY + [SP["<|eos|>"]])
    chat, out = new_chat(model, reasoning="on")
    chat.handle("What is 12+30?")
    assert model.prompts[0][-1] == SP["<|think|>"]  # reasoning on: the prompt opens the think block
    assert out.getvalue() == f"(thought for {len(text_ids(THINKING))} tokens)\n42\n"
    assert chat.turns[-1] == {"role": "assistant", "content": "42", "thinking": THINKING}


def test_show_thinking_prints_it_under_a_label():
    chat, out = new_chat(ScriptedModel(THINKING_REPLY), reasoning="on", show_thinking=True)
    chat.handle("What is 12+30?")
    assert out.getvalue() == f"thinking\n{THINKING}\n42\n"


def test_ansi_dims_thinking_only_on_a_terminal():
    chat, out = new_chat(ScriptedModel(THINKING_REPLY), reasoning="on", show_thinking=True, ansi=True)
    chat.handle("What is 12+30?")
    assert "\033[2m" in out.getvalue() and "\033[2m42" not in out.getvalue()


def test_reply_stops_at_a_fake_user_turn_and_never_prints_special_tokens():
    script = [SP["<|no_think|>"], SP["<|assistant|>"]] + text_ids("Hi!") + [SP["<|user|>"]] + text_ids("fake turn")
    chat, out = new_chat(ScriptedModel(script))  # reasoning auto: the model chooses <|no_think|>
    chat.handle("Hello")
    assert out.getvalue() == "Hi!\n"
    assert chat.turns[-1] == {"role": "assistant", "content": "Hi!", "thinking": None}


def test_a_reply_ending_in_a_stray_end_of_user_token_keeps_its_answer():
    script = [SP["<|no_think|>"], SP["<|assistant|>"]] + text_ids("Hi!") + [SP["<|/user|>"]]
    chat, out = new_chat(ScriptedModel(script))
    chat.handle("Hello")
    assert out.getvalue() == "Hi!\n"
    assert chat.turns[-1] == {"role": "assistant", "content": "Hi!", "thinking": None}


def test_ctrl_c_stops_the_reply_and_keeps_the_chat():
    model = ScriptedModel([SP["<|no_think|>"], SP["<|assistant|>"]] + text_ids("Hello there") + [SP["<|/assistant|>"]],
                          interrupt_after=5)
    chat, out = new_chat(model)
    chat.handle("Hi")
    assert out.getvalue() == "Hel [stopped]\n"
    assert chat.turns[-1]["content"] == "Hel"
    model.interrupt_after = None
    assert chat.handle("Hi again") is True
    assert out.getvalue().endswith("Hello there\n") and len(chat.turns) == 4


def test_commands():
    chat, out = new_chat(ScriptedModel([]), system="Be brief.")
    for line in ["", "/help", "/think", "/reason off", "/reason sometimes", "/nope", "/clear"]:
        assert chat.handle(line) is True
    assert chat.show_thinking and chat.reasoning == "off"
    printed = out.getvalue()
    assert "/save [file]" in printed and "reasoning is off" in printed and "unknown command /nope" in printed
    assert chat.handle("/quit") is False and chat.handle("exit") is False and chat.handle("quit") is False


def test_scripted_session_through_a_pipe(tiny_ckpt, tmp_path):
    saved, cleared, never = tmp_path / "t.json", tmp_path / "cleared.json", tmp_path / "never.json"
    lines = [b"/help", b"", b"/reason on", b"What is 12+30?", b"/reason off", b"Hello there",
             b"/reason auto", b"\xff\xfe\xc3 invalid utf-8 \xe2\x82", "x".encode() * 100_000, b"/bogus",
             b"/think", b"/history", f"/save {saved}".encode(), b"/clear", f"/save {cleared}".encode()]
    stdin = b"\n".join(lines) + b"\n"  # ends without /quit: EOF (Ctrl-D) must end the chat cleanly
    rc, out, err = run_script("chat.py", "--ckpt", tiny_ckpt, "--system", "You are Forge.", "--max_new_tokens", 24,
                              "--device", "cpu", stdin=stdin)
    assert rc == 0, err
    assert "Traceback" not in err
    assert not out.startswith(">") and "\n> " not in out and "\033[" not in out  # no decoration when piped
    assert "/save [file]" in out and "unknown command /bogus" in out and "thinking is now shown" in out
    assert out.count("no longer sees the oldest turns") == 1  # told once
    assert "the model sees only its end" in out

    transcript = json.loads(saved.read_text(encoding="utf-8"))
    messages = transcript["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4
    assert messages[0]["content"] == "You are Forge."
    assert messages[1]["content"] == "What is 12+30?" and isinstance(messages[2]["thinking"], str)  # forced on
    assert messages[4]["thinking"] is None  # forced off
    assert all(isinstance(m["content"], str) for m in messages)
    assert "\ufffd" in messages[5]["content"]  # invalid bytes became U+FFFD, not a crash
    assert messages[7]["content"] == "x" * 100_000  # the transcript keeps everything the user typed
    assert json.loads(cleared.read_text(encoding="utf-8"))["messages"] == [messages[0]]

    rc, out, err = run_script("chat.py", "--ckpt", tiny_ckpt, stdin=f"/quit\n/save {never}\n".encode())
    assert rc == 0 and not never.exists()


@pytest.mark.parametrize("args, message", [(["--temperature", "-1"], "--temperature"),
                                           (["--system", "y" * 5000], "shorten --system")])
def test_bad_flags_are_one_line_errors(tiny_ckpt, args, message):
    rc, _, err = run_script("chat.py", "--ckpt", tiny_ckpt, *args)
    assert rc != 0 and message in err and err.strip().count("\n") == 0
    assert err.startswith("chat.py: error: ")


def test_show_thinking_has_one_spelling(tiny_ckpt):
    rc, _, err = run_script("chat.py", "--ckpt", tiny_ckpt, "--show-thinking", stdin=b"/quit\n")
    assert rc == 2 and "unrecognized arguments: --show-thinking" in err
