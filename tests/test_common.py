"""common.py: device and precision choices, checkpoints and their one-line errors, the prepared-data reader,
the metrics log, and how a script's main turns a UserError into one line and exit status 1."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from common import UserError
from conftest import ROOT, tiny_model, write_checkpoint


def test_device_and_dtype_choices_refuse_what_cannot_run_here():
    assert common.resolve_device("cpu") == "cpu" and common.resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        common.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda:1' is not available on this machine"):
            common.resolve_device("cuda:1")
    with pytest.raises(UserError, match="float16 is emulated on CPUs"):
        common.amp_dtype("cpu", "float16")
    with pytest.raises(UserError, match="dtype must be auto, float32, bfloat16 or float16, not 'fp8'"):
        common.amp_dtype("cpu", "fp8")
    assert common.amp_dtype("cpu", "float32") is None and common.amp_dtype("cpu", "bfloat16") == torch.bfloat16


def test_inference_dtype_keeps_small_models_in_fp32_on_a_cpu():
    assert common.inference_dtype("cpu", "auto", 3e6) == torch.float32
    assert common.inference_dtype("cpu", "bfloat16", 3e6) == torch.bfloat16
    assert common.inference_dtype("cpu", "float32", 200e6) == torch.float32
    assert common.inference_dtype("cpu", "auto", 200e6) == (common.amp_dtype("cpu") or torch.float32)


def test_checkpoint_round_trip_and_one_line_errors(tmp_path):
    model = tiny_model(seed=3)
    path = write_checkpoint(model, tmp_path / "ok.pt", with_optimizer=True)
    loaded, ckpt = common.load_checkpoint(path)
    assert not loaded.training and ckpt["iter_num"] == 7 and ckpt["tokenizer"] == "byte"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not os.path.exists(f"{path}.tmp")  # written under a temporary name, then renamed

    (tmp_path / "truncated.pt").write_bytes(open(path, "rb").read()[:1000])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    bad_args = torch.load(path, weights_only=True) | {"model_args": {**model.config.__dict__, "n_layer": 3}}
    torch.save(bad_args, tmp_path / "mismatch.pt")
    for name, message in [("missing.pt", "no checkpoint at"), ("truncated.pt", "truncated or not a torch file"),
                          ("other.pt", "is not a nanoforge checkpoint"), ("mismatch.pt", "do not fit its model_args")]:
        with pytest.raises(UserError, match=message) as e:
            common.load_checkpoint(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_find_checkpoint_prefers_best(tmp_path):
    assert common.find_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "ckpt.pt")
    (tmp_path / "best.pt").write_bytes(b"")
    assert common.find_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "best.pt")


def test_save_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "report.json"
    common.save_json({"accuracy": 0.5, "text": "café ✅"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"accuracy": 0.5, "text": "café ✅"}
    assert "café ✅" in path.read_text(encoding="utf-8") and os.listdir(tmp_path) == ["report.json"]


def write_data(folder, tokens, mask=None, meta=None):
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
        if mask is not None:
            np.asarray(mask, dtype=np.uint8).tofile(os.path.join(folder, f"{split}_mask.bin"))
    common.save_json(meta or {"tokenizer": "byte", "vocab_size": 320}, os.path.join(folder, "meta.json"))


def test_load_data_and_consecutive_windows(tmp_path):
    tokens, mask = np.arange(100) % 300, (np.arange(100) % 3 != 0)
    write_data(tmp_path, tokens, mask)
    meta, bins = common.load_data(str(tmp_path))
    assert meta["vocab_size"] == 320 and set(bins) == {"train", "val"}
    x, y = common.get_batch(*bins["val"], starts=[0, 10, 20], block_size=10)  # the val loss's consecutive windows
    assert x.dtype == y.dtype == torch.int64 and x.shape == (3, 10)
    assert x.flatten().tolist() == list(range(30))
    expected = [t if t % 3 else -1 for t in range(1, 31)]  # targets whose mask is 0 are ignored (-1)
    assert y.flatten().tolist() == expected


@pytest.mark.parametrize("breakage, message", [
    ("no meta", "meta.json is missing): run `python prepare.py [DATASET ...] --out_dir"),
    ("bad meta", "has no tokenizer / vocab_size"),
    ("no val", "val.bin is missing"),
    ("short mask", "entries for 100 tokens"),
])
def test_load_data_errors_say_what_to_run(tmp_path, breakage, message):
    write_data(tmp_path, np.arange(100), np.ones(100))
    if breakage == "no meta":
        os.remove(tmp_path / "meta.json")
    elif breakage == "bad meta":
        common.save_json({"tokens": 1}, tmp_path / "meta.json")
    elif breakage == "no val":
        os.remove(tmp_path / "val.bin")
    else:
        np.ones(99, dtype=np.uint8).tofile(tmp_path / "train_mask.bin")
    with pytest.raises(UserError, match=re.escape(message)):
        common.load_data(str(tmp_path))


def test_metrics_log_drops_what_an_interrupted_run_logged_past_its_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = common.MetricsLog(path)
    for it in range(6):
        log.write(iter=it, loss=float("nan") if it == 2 else 1.0 / (it + 1))
    common.MetricsLog(path, resume_iter=4)  # resumed from a checkpoint at iteration 4
    records = [json.loads(line) for line in open(path)]
    assert [r["iter"] for r in records] == [0, 1, 2, 3] and records[2]["loss"] is None  # NaN is written as null


def test_load_tokenizer_errors_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown tokenizer 'llama'"):
        common.load_tokenizer("llama")


def test_run_main_prints_one_line_and_exits_1(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text("from common import UserError, run_main\n"
                      "def main():\n    raise UserError('the data folder is empty: run prepare.py')\n"
                      "if __name__ == '__main__':\n    run_main(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1
    assert proc.stderr == "demo.py: error: the data folder is empty: run prepare.py\n"
