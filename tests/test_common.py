"""common.py: atomic JSON, and how a script's main turns a UserError into one line and exit status 1."""
import json
import os
import subprocess
import sys

import common
from conftest import ROOT


def test_save_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "report.json"
    common.save_json({"accuracy": 0.5, "text": "café ✅"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"accuracy": 0.5, "text": "café ✅"}
    assert "café ✅" in path.read_text(encoding="utf-8") and os.listdir(tmp_path) == ["report.json"]


def test_run_main_prints_one_line_and_exits_1(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text("from common import UserError, run_main\n"
                      "def main():\n    raise UserError('the data folder is empty: run prepare.py')\n"
                      "if __name__ == '__main__':\n    run_main(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1
    assert proc.stderr == "demo.py: error: the data folder is empty: run prepare.py\n"
