"""configurator.py: config files and --key=value arguments, checked against a script's defaults (here a small
stand-in for a script's settings; tests/test_train.py checks train.py's own)."""
import os
import re

import pytest

import configurator
from common import UserError

DEFAULTS = {"batch_size": 16, "learning_rate": 2e-3, "resume": False, "out_dir": "out", "compile": "auto",
            "device": "auto", "schedule": []}
CHOICES = {"compile": ("auto", True, False), "device": ("auto", "cpu", "cuda")}


def parse(*argv):
    return configurator.parse_args(list(argv), DEFAULTS, CHOICES)


def test_defaults_are_the_plain_module_level_values():
    namespace = {"batch_size": 16, "lr": 1e-3, "name": "x", "flag": True, "stages": [], "_private": 1,
                 "os": os, "parse": parse, "ARCH": ("n_layer",), "__doc__": "text"}
    assert configurator.defaults_of(namespace) == {"batch_size": 16, "lr": 1e-3, "name": "x", "flag": True,
                                                   "stages": []}


def test_overrides_config_files_and_types(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("import math\n# a comment\nbatch_size = 4\nlearning_rate = 1e-3 * 3\n_scratch = 1\n"
                      "def helper():\n    pass\n")
    got = parse(str(preset), "--batch_size=7", "--learning_rate=1", "--resume", "--out_dir=123", "--compile=False",
                "--device=cpu", "--schedule=[[0, 32, 8], (10, 64, 4)]")
    assert got == {"batch_size": 7, "learning_rate": 1.0, "resume": True, "out_dir": "123", "compile": False,
                   "device": "cpu", "schedule": [(0, 32, 8), (10, 64, 4)]}
    assert isinstance(got["learning_rate"], float)  # an int is fine for a float setting, and becomes one
    assert parse(str(preset)) == {"batch_size": 4, "learning_rate": pytest.approx(3e-3)}
    assert configurator.read_config_file(str(preset), DEFAULTS) == parse(str(preset))
    assert parse("--batch_size=1", str(preset))["batch_size"] == 4  # later arguments win
    assert parse(str(preset), "--batch_size=1")["batch_size"] == 1


def test_literal_rules():
    """Text settings keep the text as typed, unless it names one of their choices; other settings take literals."""
    assert parse("--out_dir=[1, 2]", "--device=cuda") == {"out_dir": "[1, 2]", "device": "cuda"}
    assert parse("--compile=auto") == {"compile": "auto"}
    assert parse("--compile=True") == {"compile": True}
    assert parse("--compile") == {"compile": True}  # a bare flag means True
    assert parse("--out_dir=") == {"out_dir": ""}
    assert parse("--learning_rate=3e-4")["learning_rate"] == 3e-4


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=4"], "unknown setting 'batch_sise' (command line): did you mean batch_size"),
    (["--zzz=1"], "unknown setting 'zzz' (command line): see the defaults at the top of the script"),
    (["--batch_size=4.5"], "batch_size=4.5 (command line): expected int (like 16)"),
    (["--batch_size=big"], "batch_size='big' (command line): expected int (like 16)"),
    (["--batch_size=True"], "batch_size=True (command line): expected int (like 16)"),
    (["--learning_rate=True"], "learning_rate=True (command line): expected float (like 0.002)"),
    (["--resume=1"], "resume=1 (command line): expected bool (like False)"),
    (["--schedule=5"], "schedule=5 (command line): expected list (like [])"),
    (["--compile=maybe"], "compile='maybe' (command line): expected auto, True or False"),
    (["--device=tpu"], "device='tpu' (command line): expected auto, cpu or cuda"),
    (["config/nosuch.py"], "config file config/nosuch.py not found (arguments are config files or --key=value)"),
])
def test_bad_settings_are_reported(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse(*argv)


def test_bad_config_files_are_reported(tmp_path):
    cases = {"typo.py": ("batch_sise = 4\n", "unknown setting 'batch_sise' ({path}): did you mean batch_size"),
             "type.py": ("resume = 'yes'\n", "resume='yes' ({path}): expected bool (like False)"),
             "syntax.py": ("batch_size = 4\nlearning_rate = (\n", "{path} line 2: SyntaxError"),
             "raises.py": ("batch_size = undefined * 2\n", "{path}: NameError: name 'undefined' is not defined")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message.format(path=path))):
            parse(str(path))
