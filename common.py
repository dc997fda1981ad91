"""
What every script needs before anything else, and nothing heavy (no torch: prepare.py starts in a blink).

    errors      UserError: a mistake the user can fix, in one line; run_main turns it into `name: error: …`;
                load_tokenizer (its problems as UserError); StopFlag: Ctrl-C and SIGTERM, acted on between steps
    files       save_json (atomic), robust_stdio

Library functions raise UserError; only a script's main turns it into a message and exit status 1. The other
shared files are named by their job: device.py, checkpoints.py, data.py, inference.py, replies.py, training.py.
"""
import json
import os
import signal
import sys

from tokenizer import get_tokenizer

# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad setting), explained in one line."""


def run_main(main, *args):
    """Run a script's main: a UserError ends it with `script.py: error: message` and exit status 1."""
    try:
        return main(*args)
    except UserError as e:
        script = os.path.basename(sys.modules[main.__module__].__file__)
        sys.exit(f"{script}: error: {e}")


def load_tokenizer(spec):
    """tokenizer.get_tokenizer, with its problems (an unknown name, no GPT-2 ranks offline, a corrupt trained
    tokenizer) as UserError."""
    try:
        return get_tokenizer(spec)
    except ValueError as e:
        raise UserError(str(e)) from None


class StopFlag:
    """Set by Ctrl-C (SIGINT) or SIGTERM; a loop checks it between steps, saves and exits: a training loop between
    iterations, so no checkpoint ever holds a half-applied optimizer step; prepare.py between documents. A second
    Ctrl-C quits at once (single process only: torchrun passes every signal on to its workers, who get the
    terminal's too)."""

    def __init__(self, ddp=False):
        self.signum, self.ddp = 0, ddp
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signum and not self.ddp:
            raise KeyboardInterrupt
        self.signum = signum


# ----------------------------------------------------------------------------- files and text

def save_json(obj, path):
    """Readable JSON written like checkpoints: to a temporary name, then renamed over the old file."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


def robust_stdio():
    """Never crash on text: undecodable input bytes and unprintable output characters become U+FFFD / '?'."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
