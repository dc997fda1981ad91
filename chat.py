"""
Chat with a trained model in the terminal.

    python chat.py                          # out/best.pt, else out/ckpt.pt
    python chat.py --ckpt out/best.pt --show_thinking --system "You are Forge."
    printf 'What is 12+30?\\n/save t.json\\n/quit\\n' | python chat.py     # scripted: no prompt decoration

Every turn the whole conversation is rendered again in the chat format (tokenizer.py) and the reply
streams out of model.generate's KV cache. When the conversation outgrows the context window the
oldest exchanges are left out (the system prompt stays, tokenizer.fit_to_window). Type /help for the commands.

Replies come from replies.generate_reply, the same code eval.py scores the model with.
"""
import argparse
import sys
import time

from common import UserError, robust_stdio, run_main, save_json
from inference import (add_model_args, add_sampling_args, checkpoint_path, load_model, make_generator, prompt_budget,
                       sampling_kwargs)
from replies import generate_reply
from tokenizer import fit_to_window, render_prompt

CONTROL_CHARS = {c: None for c in [*range(32), 127] if chr(c) not in "\n\t"}
HELP = """commands:
  /help               this list
  /think              show or hide the model's thinking
  /reason on|off|auto force thinking, force a direct answer, or let the model choose
  /save [file]        write the conversation (thinking included) as JSON
  /clear              start a new conversation (the system prompt stays)
  /history            show the conversation so far
  /quit               leave (also: quit, exit, Ctrl-D)
Ctrl-C stops a reply and keeps the chat."""


class Chat:
    def __init__(self, model, enc, sampling, generator, system=None, reasoning="auto", show_thinking=False,
                 out=None, ansi=False, info=None):
        self.model, self.enc, self.sampling, self.generator = model, enc, sampling, generator
        self.system, self.reasoning, self.show_thinking = system, reasoning, show_thinking
        self.out, self.ansi, self.info = out or sys.stdout, ansi, info or {}
        self.turns = []            # the whole conversation, for /save and /history
        self.told_dropped = False  # the user is told once that old turns no longer fit
        block_size = model.config.block_size
        # Keep room for a reply: the prompt may use the context minus max_new_tokens (at most half of it).
        self.max_prompt_tokens = prompt_budget(block_size, sampling["max_new_tokens"])
        shortest = render_prompt(self.messages()[:1] + [{"role": "user", "content": ""}], enc, "on")
        if system and len(shortest) > self.max_prompt_tokens:
            raise UserError(f"the system prompt takes {len(shortest)} tokens; the model's context holds "
                            f"{block_size} and a reply needs room: shorten --system")

    def messages(self):
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def write(self, text, dim=False):
        text = text.translate(CONTROL_CHARS)  # text from the model or the user never drives the terminal
        self.out.write(f"\033[2m{text}\033[0m" if dim and self.ansi and text else text)
        self.out.flush()

    def note(self, text):
        self.write(text, dim=True)
        self.write("\n")

    def handle(self, line):
        """One line of input. Returns False when the user wants to leave."""
        line = line.strip()
        if not line:
            return True
        if line in ("quit", "exit", "/quit", "/exit"):
            return False
        if line.startswith("/"):
            self.command(*line[1:].partition(" ")[::2])
        else:
            self.respond(line)
        return True

    def command(self, name, arg):
        arg = arg.strip()
        if name == "help":
            self.note(HELP)
        elif name == "think":
            self.show_thinking = not self.show_thinking
            self.note(f"thinking is now {'shown' if self.show_thinking else 'hidden'}")
        elif name == "reason" and arg in ("on", "off", "auto"):
            self.reasoning = arg
            self.note({"on": "the model will think before every answer", "off": "the model will answer directly",
                       "auto": "the model chooses whether to think"}[arg])
        elif name == "reason":
            self.note(f"reasoning is {self.reasoning}: use /reason on, /reason off or /reason auto")
        elif name == "save":
            self.save(arg or time.strftime("chat-%Y%m%d-%H%M%S.json"))
        elif name == "clear":
            self.turns, self.told_dropped = [], False
            self.note("conversation cleared")
        elif name == "history":
            self.history()
        else:
            self.note(f"unknown command /{name}: type /help for the list")

    def save(self, path):
        transcript = {**self.info, "reasoning": self.reasoning, "messages": self.messages()}
        try:
            save_json(transcript, path)
        except OSError as e:
            self.note(f"cannot save to {path}: {e.strerror}")
            return
        self.note(f"saved {len(self.turns)} messages to {path}")

    def history(self):
        if not self.messages():
            self.note("(no conversation yet)")
        for m in self.messages():
            if m.get("thinking") is not None and self.show_thinking:
                self.write(f"[thinking] {m['thinking']}\n", dim=True)
            self.write(f"{m['role']}: {m['content']}\n")

    def respond(self, text):
        self.turns.append({"role": "user", "content": text})
        window, dropped, cut = fit_to_window(self.messages(), self.enc, self.reasoning, self.max_prompt_tokens)
        if dropped and not self.told_dropped:
            self.note(f"(the conversation is longer than the model's {self.model.config.block_size}-token context: "
                      "it no longer sees the oldest turns; /clear starts afresh)")
            self.told_dropped = True
        if cut:
            self.note("(your message does not fit the context: the model sees only its end)")
        prompt = render_prompt(window, self.enc, self.reasoning)
        printer = ReplyPrinter(self)
        reply = generate_reply(self.model, self.enc, prompt, self.sampling, self.generator,
                               on_text=printer, interruptible=True)
        printer.finish(reply)
        self.turns.append({"role": "assistant", "content": reply.answer, "thinking": reply.thinking})


class ReplyPrinter:
    """Streams a reply: the thinking dimmed under a "thinking" label when it is shown, otherwise one
    line "(thought for N tokens)" once the answer starts; then the answer."""

    def __init__(self, chat):
        self.chat, self.shown = chat, None  # the part whose text was printed last

    def __call__(self, reply, text):
        chat = self.chat
        if reply.part == "thinking":
            if chat.show_thinking:
                if self.shown != "thinking":
                    chat.note("thinking")
                chat.write(text, dim=True)
            elif chat.ansi and self.shown != "thinking":
                chat.write("thinking…", dim=True)  # a placeholder on a terminal, replaced by the summary
        else:
            if self.shown == "thinking":
                self.end_thinking(reply)
            chat.write(text)
        self.shown = reply.part

    def end_thinking(self, reply):
        if self.chat.show_thinking:
            self.chat.write("\n")
        else:
            if self.chat.ansi:
                self.chat.out.write("\r\033[K")  # erase the "thinking…" placeholder
            n = reply.thinking_tokens
            self.chat.note(f"(thought for {n} token{'s' * (n != 1)})")

    def finish(self, reply):
        if self.shown == "thinking":
            self.end_thinking(reply)
        ending = {"interrupted": "[stopped]", "length": "[cut off: max_new_tokens or the context is full]"}
        if reply.finish in ending:
            self.chat.write(" " * (self.shown == "answer") + ending[reply.finish], dim=True)
        self.chat.write("\n")


def main():
    parser = argparse.ArgumentParser(description="Chat with a trained nanoforge checkpoint (/help inside).")
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=512, temperature=0.6)
    parser.add_argument("--system", help="a system prompt, kept at the start of every conversation")
    parser.add_argument("--show_thinking", action="store_true", help="print the thinking (dimmed)")
    parser.add_argument("--reason", choices=["auto", "on", "off"], default="auto",
                        help="on: always think first, off: answer directly, auto: the model chooses")
    args = parser.parse_args()
    robust_stdio()
    sampling = sampling_kwargs(args)
    model, enc, ckpt = load_model(args)
    interactive = sys.stdin.isatty()
    info = {"checkpoint": checkpoint_path(args), "iter_num": ckpt.get("iter_num"), "tokenizer": enc.name,
            "sampling": sampling}
    chat = Chat(model, enc, sampling, make_generator(model, args.seed), system=args.system,
                reasoning=args.reason, show_thinking=args.show_thinking, ansi=sys.stdout.isatty(), info=info)
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input(), where the platform has it
        except ImportError:
            pass
        n_params = model.num_params()["total"]
        chat.note(f"{info['checkpoint']}: {n_params / 1e6:.1f}M parameters, {model.config.block_size}-token context, "
                  f"reasoning {args.reason}. /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            chat.write("\n")
            continue
        try:
            if not chat.handle(line):
                break
        except KeyboardInterrupt:  # a Ctrl-C that arrived just outside the reply's own handler
            chat.write("\n")
    if interactive:
        chat.write("\n")


if __name__ == "__main__":
    run_main(main)
