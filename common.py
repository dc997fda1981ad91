"""
What every script needs before anything else, and nothing heavy (no torch: prepare.py starts in a blink).

    errors      UserError: a mistake the user can fix, in one line; run_main turns it into `name: error: …`;
                load_tokenizer (its problems as UserError)
    files       save_json (atomic), robust_stdio

Library functions raise UserError; only a script's main turns it into a message and exit status 1. The other
shared files are named by their job: device.py, checkpoints.py, data.py, inference.py, replies.py, training.py.
"""
import json
import os
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


def load_tokenizer(name):
    """tokenizer.get_tokenizer, with its problems (an unknown name, no GPT-2 ranks offline) as UserError."""
    try:
        return get_tokenizer(name)
    except ValueError as e:
        raise UserError(str(e)) from None


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
