"""
Settings for training scripts, nanoGPT style: a script's module-level defaults are its documentation; config
files and --key=value arguments override them, in the order given.

    python train.py config/nano_3050ti.py --batch_size=1 --compile=False

A config file is Python: its top-level assignments (names without a leading _) are overrides. A command-line
value is a Python literal (1e-3, True, [(0, 256, 8)]) where it parses as one, except that text settings keep
the text as typed (--out_dir=123 is the folder "123"); a bare --flag means True. Every value is checked against
its default's type, or against the setting's choices where the script lists them: unknown names and wrong
types are refused in one line, with a did-you-mean hint.
"""
import ast
import builtins
import difflib
import os
from types import SimpleNamespace

from checkpoints import read_checkpoint
from common import UserError
from lora import parse_targets

LORA = ("lora_rank", "lora_alpha", "lora_targets")  # the settings that give adapters their shape


def defaults_of(namespace):
    """The settings of a script: its module-level names (without a leading _) holding plain values."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))}


def parse_args(argv, defaults, choices=None):
    """Config files and --key=value arguments, in order -> {key: value}, each one checked."""
    choices = choices or {}
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            value = parse_value(text, defaults.get(key), choices.get(key, ())) if has_value else True
            overrides[key] = check_value(key, value, defaults, choices, "command line")
        else:
            overrides.update(read_config_file(arg, defaults, choices))
    return overrides


def parse_value(text, default, choices):
    """A Python literal where text is one, but text settings keep their text unless it names a choice."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a literal: check_value reports a type mismatch
    if isinstance(default, str) and not is_choice(value, choices):
        return text
    return value


def read_config_file(path, defaults, choices=None):
    """The overrides of a config file, each one checked."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found (arguments are config files or --key=value)")
    namespace = {}
    try:
        exec(builtins.compile(open(path).read(), path, "exec"), namespace)  # `compile` may be a setting's name
    except Exception as e:
        line = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        raise UserError(f"{path}{line}: {type(e).__name__}: {e}")
    return {k: check_value(k, v, defaults, choices or {}, path) for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}


def is_choice(value, choices):
    return any(type(value) is type(c) and value == c for c in choices)  # so that 1 is not True


def check_value(key, value, defaults, choices, where):
    """The value if key is a setting and value fits it: one of its choices where it has some, else its
    default's type (an int is fine for a float; lists become lists of tuples)."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else "see the defaults at the top of the script"
        raise UserError(f"unknown setting {key!r} ({where}): {hint}")
    default = defaults[key]
    if key in choices:
        ok = is_choice(value, choices[key])
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple))
        value = [tuple(item) if isinstance(item, (list, tuple)) else item for item in value] if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        names = [str(c) for c in choices.get(key, ())]
        want = f"{', '.join(names[:-1])} or {names[-1]}" if names else f"{type(default).__name__} (like {default!r})"
        raise UserError(f"{key}={value!r} ({where}): expected {want}")
    return value


def check_ranges(cfg, at_least_one=(), non_negative=()):
    """Settings that must be at least 1 (counts, sizes) or not negative (rates, iterations), each one checked."""
    for key in at_least_one:
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be at least 1")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise UserError(f"{key}={getattr(cfg, key)} must not be negative")


def settings_and_checkpoint(argv, defaults, choices, init_hint):
    """(settings, checkpoint) of a script that starts from a checkpoint (train.py, rl.py): out_dir/ckpt.pt with
    resume, else init_from (None when that is empty). defaults < a resumed run's stored settings < config files
    and --key=value; a resumed run must keep the optimizer whose state the checkpoint holds, and a resumed LoRA run
    the adapters' shape (its stored LORA settings win)."""
    overrides = parse_args(argv, defaults, choices)
    config = defaults | overrides
    path = os.path.join(config["out_dir"], "ckpt.pt") if config["resume"] else config["init_from"]
    if not path:
        return config, None
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)"
                        if config["resume"] else f"init_from={path}: no checkpoint there: {init_hint}")
    ckpt = read_checkpoint(path)  # on the CPU; the script builds its model from it (checkpoints.build_model)
    if config["resume"]:
        if "optimizer" not in ckpt:
            raise UserError(f"{path} has no optimizer state: use --init_from={path} instead")
        trained_with = ckpt["config"].get("optimizer", "adamw")  # checkpoints from before Muon: AdamW
        stored = {k: v for k, v in ckpt["config"].items() if k in defaults} | {"optimizer": trained_with}
        config = defaults | stored | overrides
        if config["optimizer"] != trained_with:
            raise UserError(f"{path} holds {trained_with} state: resume with --optimizer={trained_with}, or "
                            f"start {config['optimizer']} from its weights with --init_from={path}")
        if "lora" in ckpt:
            config |= {k: ckpt["config"][k] for k in LORA}
    return config, ckpt


def policy_settings(argv, defaults, choices, script):
    """(cfg, ckpt) of a script that improves a trained chat model (rl.py, dpo.py): settings_and_checkpoint, with a
    checkpoint it must have, data_dir (the tasks' difficulty) the checkpoint's own unless given, and the LoRA
    settings checked now rather than after the model is loaded."""
    config, ckpt = settings_and_checkpoint(
        argv, defaults, choices, "train one first (python prepare.py && python train.py) or pass --init_from=PATH")
    if ckpt is None:
        raise UserError(f"init_from is empty: {script} improves a trained checkpoint (default out/best.pt)")
    config["data_dir"] = config["data_dir"] or ckpt.get("config", {}).get("data_dir", "")
    cfg = SimpleNamespace(**config)
    check_ranges(cfg, non_negative=("lora_rank",))
    parse_targets(cfg.lora_targets)
    return cfg, ckpt
