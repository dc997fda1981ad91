"""train.py: settings, batches and masks, memory estimate, and real (tiny) runs on the CPU: loss goes down,
resume is bit-exact, SIGKILL and Ctrl-C leave loadable checkpoints, DDP ranks agree, the non-finite guard."""
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import configurator
import train
import training
from checkpoints import load_checkpoint
from common import UserError
from device import autocast
from data import get_batch, random_starts
from conftest import ROOT, all_logits, run_script, tiny_model, write_checkpoint
from model import Forge, ModelConfig
from tokenizer import QWEN2_PATTERN

# A tiny model; one thread per process keeps the runs quick on a busy 2-core machine.
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--block_size=64", "--batch_size=8",
        "--eval_iters=2", "--compile=False", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # for the runs that are not run_script's


def run_train(*args, env=None, check=True):
    """train.py with the TINY settings and args -> (exit code, stdout, stderr)."""
    rc, out, err = run_script("train.py", *TINY, *args, env=env)
    if check:
        assert rc == 0, err[-3000:]
    return rc, out, err


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return [(r["iter"], r["loss"]) for r in metrics(out_dir) if "loss" in r and "skipped" not in r]


@pytest.fixture(scope="module")
def trained(reasoning_data, tmp_path_factory):
    """A 40-iteration run, shared by the tests that need a checkpoint -> (out_dir, its stdout)."""
    out = str(tmp_path_factory.mktemp("trained"))
    _, stdout, _ = run_train("--max_iters=40", "--eval_interval=20", f"--data_dir={reasoning_data}", f"--out_dir={out}")
    return out, stdout


# ----------------------------------------------------------------------------- settings

def test_train_settings_and_their_types(tmp_path):
    """train.py's settings through configurator (tests/test_configurator.py has the general rules)."""
    preset = tmp_path / "preset.py"
    preset.write_text("batch_size = 4\nlearning_rate = 1e-3 * 3\n")
    cfg, ckpt = train.settings([str(preset), "--batch_size=7", "--resume=False", "--dtype=bfloat16", "--out_dir=123",
                                "--compile=False", "--device=cpu", "--seq_curriculum=[[0, 32, 8], (10, 64, 4)]"])
    assert ckpt is None
    assert (cfg.batch_size, cfg.learning_rate, cfg.dtype, cfg.out_dir, cfg.compile, cfg.device) == \
        (7, pytest.approx(3e-3), "bfloat16", "123", False, "cpu")
    assert cfg.seq_curriculum == [(0, 32, 8), (10, 64, 4)]  # stages are tuples, whichever brackets were typed
    assert vars(cfg).keys() == train.DEFAULTS.keys() and cfg.n_layer == train.n_layer
    assert train.settings(["--compile=auto"])[0].compile == "auto" and train.settings(["--compile"])[0].compile


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=4"], "unknown setting 'batch_sise' (command line): did you mean batch_size"),
    (["--compile=maybe"], "compile='maybe' (command line): expected auto, True or False"),
    (["--device=tpu"], "device='tpu' (command line): expected auto, cpu, cuda or mps"),
    (["--dtype=float8"], "dtype='float8' (command line): expected auto, float32, bfloat16 or float16"),
    (["--learning_rate=-1"], "learning_rate=-1.0 must not be negative"),
    (["--eval_iters=0"], "eval_iters=0 must be at least 1"),
    (["--optimizer=sgd"], "optimizer='sgd' (command line): expected adamw or muon"),
    (["--lr_schedule=linear"], "lr_schedule='linear' (command line): expected cosine or wsd"),
    (["--muon_lr=-1"], "muon_lr=-1.0 must not be negative"),
    (["--decay_frac=1.5"], "decay_frac=1.5 is a share of the iterations: at most 1"),
    (["--optimizer=muon", "--muon_lr=0.02", "--learning_rate=0"], "muon_lr is a multiple of learning_rate's"),
])
def test_bad_train_settings_are_reported(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train.settings(argv)


def test_a_checkpoints_architecture_is_the_runs(tmp_path):
    """init_from and resume: cfg (printed, stored, given to wandb) holds the checkpoint's architecture, whatever the
    defaults, a stored config or the command line say; a resumed run's stored settings come between the
    defaults and the command line."""
    path = write_checkpoint(tiny_model(), tmp_path / "ckpt.pt", with_optimizer=True,
                            config={"batch_size": 3, "learning_rate": 0.5, "n_layer": 9})
    assert train.DEFAULTS["n_layer"] == 4 and train.DEFAULTS["n_embd"] == 256
    cfg, ckpt = train.settings([f"--init_from={path}", "--n_layer=3"])
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden) == (2, 64, 4, 2, 192)
    assert ckpt["iter_num"] == 7 and cfg.batch_size == 16  # init_from takes the weights, not the settings
    cfg, ckpt = train.settings(["--resume", f"--out_dir={tmp_path}", "--learning_rate=0.1", "--n_layer=3"])
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden) == (2, 64, 4, 2, 192)
    assert (cfg.batch_size, cfg.learning_rate, cfg.resume) == (3, 0.1, True) and ckpt["iter_num"] == 7
    (tmp_path / "weights").mkdir()
    weights = write_checkpoint(tiny_model(), tmp_path / "weights" / "ckpt.pt")  # no optimizer: not resumable
    with pytest.raises(UserError, match=re.escape(f"{weights} has no optimizer state: use --init_from={weights}")):
        train.settings(["--resume", f"--out_dir={tmp_path}/weights"])


def test_resume_keeps_the_optimizer_it_was_trained_with(tmp_path):
    """A checkpoint's optimizer state is AdamW's or Muon's: resuming it with the other is refused in one line (a
    checkpoint from before the setting existed holds AdamW's), and a muon run resumes as muon without the flag."""
    old = write_checkpoint(tiny_model(), tmp_path / "ckpt.pt", with_optimizer=True)
    with pytest.raises(UserError, match=re.escape(f"{old} holds adamw state: resume with --optimizer=adamw")):
        train.settings(["--resume", f"--out_dir={tmp_path}", "--optimizer=muon"])
    assert train.settings(["--init_from=" + old, "--optimizer=muon"])[0].optimizer == "muon"  # weights only: fine
    write_checkpoint(tiny_model(), tmp_path / "ckpt.pt", with_optimizer=True, config={"optimizer": "muon"})
    assert train.settings(["--resume", f"--out_dir={tmp_path}"])[0].optimizer == "muon"
    with pytest.raises(UserError, match="holds muon state: resume with --optimizer=muon"):
        train.settings(["--resume", f"--out_dir={tmp_path}", "--optimizer=adamw"])


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path):
    for args, expected in [(["--n_layr=3"], "did you mean n_layer"),
                           (["--compile=maybe"], "compile='maybe' (command line): expected auto, True or False"),
                           ([f"--data_dir={tmp_path}/nothing"], "run `python prepare.py [DATASET ...] --out_dir"),
                           ([f"--out_dir={tmp_path}", "--resume"], "nothing to resume"),
                           ([f"--init_from={tmp_path}/missing.pt"], "init_from="),
                           (["--lr_schedule=linear"], "expected cosine or wsd")]:
        rc, _, err = run_script("train.py", *args)
        assert rc != 0
        assert err.count("\n") == 1 and err.startswith("train.py: error:"), err
        assert expected in err


def test_learning_rate_schedule():
    assert (train.DEFAULTS["lr_schedule"], train.DEFAULTS["optimizer"]) == ("cosine", "muon")
    cfg = SimpleNamespace(**train.DEFAULTS | dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                                                   max_iters=110, lr_decay_iters=0))
    lrs = [train.get_lr(cfg, it) for it in range(130)]
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # cosine: peak, then halfway
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110:] == pytest.approx([0.1] * 20)


@pytest.mark.parametrize("lr_decay_iters, decay_start, decay_end", [(0, 88, 110), (100, 80, 100)])
def test_warmup_stable_decay_schedule(lr_decay_iters, decay_start, decay_end):
    """wsd: cosine's warmup, then the peak until the last decay_frac (20%) of the iterations (up to lr_decay_iters,
    else max_iters), then 1 - sqrt down to min_lr, then min_lr."""
    cfg = SimpleNamespace(**train.DEFAULTS | dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110,
                                                   lr_decay_iters=lr_decay_iters, lr_schedule="wsd", decay_frac=0.2))
    lrs = [train.get_lr(cfg, it) for it in range(130)]
    cosine = SimpleNamespace(**vars(cfg) | {"lr_schedule": "cosine"})
    assert lrs[:10] == [train.get_lr(cosine, it) for it in range(10)]  # the same warmup
    assert lrs[10:decay_start + 1] == [1.0] * (decay_start - 9)  # stable: the peak, up to the decay's first step
    length = decay_end - decay_start
    assert lrs[decay_start:decay_end] == pytest.approx([0.1 + 0.9 * (1 - math.sqrt(i / length)) for i in range(length)])
    assert all(a > b for a, b in zip(lrs[decay_start:decay_end + 1], lrs[decay_start + 1:decay_end + 1]))
    assert lrs[decay_end:] == [0.1] * (130 - decay_end)
    cfg.decay_frac = 0.0  # no decay: the peak to the end
    assert [train.get_lr(cfg, it) for it in range(10, decay_end)] == [1.0] * (decay_end - 10)


def test_curriculum_stages():
    cfg = SimpleNamespace(**train.DEFAULTS | dict(block_size=256, batch_size=4,
                                                   seq_curriculum=[(0, 64, 16), (100, 128, 8)]))
    assert [train.stage_at(cfg, it) for it in (0, 99, 100, 5000)] == [(64, 16), (64, 16), (128, 8), (128, 8)]
    cfg.seq_curriculum = [(0, 512, 2)]
    with pytest.raises(UserError, match="within 1..block_size=256"):
        train.check_config(cfg)
    with pytest.raises(UserError, match=r"expected a list of \(from_iter, block_size, batch_size\)"):
        train.settings(["--seq_curriculum=[5, 6]"])
    with pytest.raises(UserError, match="in order of their from_iter"):
        train.settings(["--seq_curriculum=[(10, 64, 4), (0, 32, 8)]"])


@pytest.mark.parametrize("bf16, fp32, expected", [(396.0, 156.0, "autocast bfloat16, compile off"),
                                                   (142.0, 233.0, "float32, compile off")])
def test_dtype_auto_on_a_cpu_follows_the_measurement_and_says_why(reasoning_data, tmp_path, monkeypatch, capsys,
                                                                  bf16, fp32, expected):
    """The measured-faster matmul decides dtype=auto (and with it compile=auto: off in fp32); the run prints the
    choice and the measurement. An explicit dtype is neither measured nor explained."""
    monkeypatch.setattr("device.cpu_matmul_gflops", lambda: {"float32": fp32, "bfloat16": bf16})
    compile_flag = "--compile=False" if expected.startswith("autocast") else "--compile=auto"
    args = [*TINY, compile_flag, "--device=cpu", "--max_iters=1", f"--data_dir={reasoning_data}",
            f"--out_dir={tmp_path}"]
    train.main([*args, "--dtype=auto"])
    out = capsys.readouterr().out
    assert f"dtype auto: {expected.split(',')[0].removeprefix('autocast ')} (bf16 matmul {bf16:.0f} GFLOP/s vs " \
           f"fp32 {fp32:.0f} on this CPU" in out and expected in out
    monkeypatch.setattr("device.cpu_matmul_gflops", lambda: pytest.fail("an explicit dtype was measured"))
    train.main([*args, "--dtype=float32"])
    out = capsys.readouterr().out
    assert "dtype auto" not in out and "float32, compile off" in out


def test_cpu_preset_spells_out_the_defaults():
    preset = configurator.read_config_file(os.path.join(ROOT, "config/cpu_reasoning.py"), train.DEFAULTS, train.CHOICES)
    assert preset and all(train.DEFAULTS[k] == v for k, v in preset.items())
    assert {"n_layer", "n_embd", "batch_size", "block_size", "max_iters", "learning_rate"} <= preset.keys()


# ----------------------------------------------------------------------------- batches, masks, memory

def test_batches_are_shifted_windows_with_masked_targets(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, 1000).astype(np.uint16)
    mask = (rng.random(1000) < 0.5).astype(np.uint8)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(tokens, mask, random_starts(tokens, 16, 32, g), 32)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):  # reference: find each window and rebuild its targets
        start = next(s for s in range(len(tokens) - 32) if tokens[s:s + 32].tolist() == row_x)
        expected = [int(t) if mask[start + 1 + i] else -1 for i, t in enumerate(tokens[start + 1:start + 33])]
        assert row_y == expected
    assert (y == -1).any() and (y != -1).any()
    x2, y2 = get_batch(tokens, None, random_starts(tokens, 16, 32, torch.Generator().manual_seed(0)), 32)
    assert torch.equal(x2, x) and (y2 >= 0).all()  # same windows; no mask: every target counts


def test_masked_targets_do_not_contribute_to_the_loss():
    torch.manual_seed(0)
    model = Forge(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    tokens = np.random.default_rng(1).integers(0, 64, 500).astype(np.uint16)
    mask = np.zeros(500, np.uint8)
    mask[::3] = 1
    x, y = get_batch(tokens, mask, random_starts(tokens, 4, 32, torch.Generator().manual_seed(0)), 32)
    loss = model(x, y)[1]
    scrambled = torch.where(y == -1, torch.randint(0, 64, y.shape), y)  # change only what is masked...
    keep = y != -1
    reference = torch.nn.functional.cross_entropy(all_logits(model, x)[keep], y[keep])
    assert loss.item() == pytest.approx(reference.item())
    assert model(x, torch.where(keep, scrambled, -1))[1].item() == pytest.approx(loss.item())  # ...and nothing moves


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_activation_estimate_matches_what_autograd_saves(dtype, grad_checkpoint):
    """The per-token activation bytes of the memory estimate against the bytes autograd really keeps for
    backward (saved-tensor hooks), per token: the difference between two sequence lengths."""
    cfg = ModelConfig(vocab_size=512, block_size=128, n_layer=3, n_head=6, n_kv_head=3, n_embd=96, ffn_hidden=256,
                      grad_checkpoint=grad_checkpoint)

    def saved_bytes(T):
        model = Forge(cfg).train()
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randint(0, cfg.vocab_size, (2, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("cpu", dtype):
            model(x, x)
        return sum(saved.values())
    per_token = (saved_bytes(128) - saved_bytes(64)) / (2 * 64)
    assert Forge(cfg).activation_bytes(2 if dtype else 4)[0] == per_token


# ----------------------------------------------------------------------------- real runs

def test_short_run_learns_and_writes_checkpoints(trained):
    out, stdout = trained
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals  # from ~ln(320) down by well over a nat
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert {"model", "model_args", "tokenizer", "config", "optimizer", "scaler", "iter_num", "best_val_loss",
            "rng"} <= ckpt.keys()
    assert ckpt["iter_num"] == 40 and ckpt["tokenizer"] == "byte" and ckpt["config"]["max_iters"] == 40
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    model, best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["best_val_loss"] == ckpt["best_val_loss"] and model.config.n_layer == 2
    assert "tokens per step: 8 micro-batch x 64 context x 1 accumulation x 1 process = 512" in stdout
    assert "memory estimate per device" in stdout and "done: iteration 40" in stdout


def flat_tensors(state):
    """The tensors of a (nested) optimizer state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for item in items for t in flat_tensors(item)]


@pytest.mark.parametrize("optimizer", [["--optimizer=adamw"], ["--optimizer=muon", "--lr_schedule=wsd"],
                                       ["--optimizer=adamw", "--windows=documents"]],
                         ids=["adamw", "muon", "documents"])
def test_resume_is_bit_exact(reasoning_data, tmp_path, optimizer):
    """2N iterations straight == N, stop, --resume, N more: same losses, same weights, same optimizer state (dropout
    on, 2 micro-batches). Muon: both optimizers' states come back; the settings come from the checkpoint."""
    common = ["--dropout=0.1", "--grad_accum=2", "--eval_interval=5", "--lr_decay_iters=16",
              f"--data_dir={reasoning_data}", *optimizer]
    run_train("--max_iters=16", f"--out_dir={tmp_path}/straight", *common)
    run_train("--max_iters=8", f"--out_dir={tmp_path}/halves", *common)
    _, out, _ = run_train("--resume", "--max_iters=16", f"--out_dir={tmp_path}/halves")  # the rest: the checkpoint's
    assert "resuming" in out and "will be overwritten" not in out
    assert train_losses(f"{tmp_path}/halves") == train_losses(f"{tmp_path}/straight")
    assert len(train_losses(f"{tmp_path}/straight")) == 16
    a = torch.load(f"{tmp_path}/straight/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/halves/ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert set(a["optimizer"]) == ({"muon", "adamw"} if "--optimizer=muon" in optimizer else {"state", "param_groups"})
    state_a, state_b = flat_tensors(a["optimizer"]), flat_tensors(b["optimizer"])
    assert len(state_a) == len(state_b) > 0 and all(torch.equal(x, y) for x, y in zip(state_a, state_b))


def test_compiled_runs_are_bit_exact_on_a_cpu(reasoning_data, tmp_path):
    """compile=True in bf16 on two threads (where Inductor's kernels could race): the same run twice, and the run
    stopped halfway and resumed, end with the same weights bit for bit."""
    args = [*TINY, "--compile=True", "--dtype=bfloat16", "--device=cpu", "--eval_interval=100", "--lr_decay_iters=8",
            f"--data_dir={reasoning_data}"]
    two_threads = {"OMP_NUM_THREADS": "2"}
    _, out, _ = run_train(*args, "--max_iters=8", f"--out_dir={tmp_path}/a", env=two_threads)
    if "torch.compile failed here" in out:
        pytest.skip("torch.compile does not work on this machine")
    run_train(*args, "--max_iters=8", f"--out_dir={tmp_path}/b", env=two_threads)
    run_train(*args, "--max_iters=4", f"--out_dir={tmp_path}/halves", env=two_threads)
    run_train("--resume", *args, "--max_iters=8", f"--out_dir={tmp_path}/halves", env=two_threads)
    a = torch.load(f"{tmp_path}/a/ckpt.pt", weights_only=True)["model"]
    for other in ("b", "halves"):
        b = torch.load(f"{tmp_path}/{other}/ckpt.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), other


def test_sigkill_leaves_a_checkpoint_that_loads_and_resumes(reasoning_data, tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--max_iters=100000", "--ckpt_interval=1",
                             "--eval_interval=1000", f"--data_dir={reasoning_data}", f"--out_dir={out}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(f"{out}/ckpt.pt") and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # keep saving a checkpoint every iteration for a while, then kill it mid-flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, ckpt = load_checkpoint(f"{out}/ckpt.pt")
    stopped_at = ckpt["iter_num"]
    assert stopped_at >= 1
    run_train("--resume", f"--max_iters={stopped_at + 3}", f"--out_dir={out}")
    assert load_checkpoint(f"{out}/ckpt.pt")[1]["iter_num"] == stopped_at + 3
    assert [it for it, _ in train_losses(out)][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


def test_ctrl_c_saves_and_exits_cleanly(reasoning_data, tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--max_iters=100000", "--eval_interval=1000",
                             f"--data_dir={reasoning_data}", f"--out_dir={out}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(f"{out}/metrics.jsonl") or len(train_losses(out)) < 3:
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted: saved" in stdout
    assert load_checkpoint(f"{out}/ckpt.pt")[1]["iter_num"] == train_losses(out)[-1][0] + 1 >= 3


def test_nonfinite_loss_is_skipped_then_stops_the_run(reasoning_data, tmp_path):
    _, stdout, _ = run_train("--max_iters=6", "--eval_interval=100", f"--data_dir={reasoning_data}",
                             f"--out_dir={tmp_path}/once", env={training.NAN_ITERS_ENV: "2"})
    assert "iter 2: non-finite loss (nan)" in stdout
    records = metrics(f"{tmp_path}/once")
    assert [r["iter"] for r in records if r.get("skipped")] == [2]
    weights = torch.load(f"{tmp_path}/once/ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())

    rc, _, stderr = run_train("--max_iters=50", "--max_nonfinite=3", "--eval_interval=100",
                              f"--data_dir={reasoning_data}", f"--out_dir={tmp_path}/always",
                              env={training.NAN_ITERS_ENV: "4,5,6,7,8"}, check=False)
    assert rc != 0
    assert stderr.strip().splitlines()[-1].startswith("train.py: 3 non-finite losses or gradients in a row")
    ckpt = torch.load(f"{tmp_path}/always/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 7  # iterations 4, 5, 6 were skipped, then it stopped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_init_from_loads_weights_and_trains(trained, reasoning_data, tmp_path):
    source, _ = trained
    source_ckpt = torch.load(f"{source}/ckpt.pt", weights_only=True)
    _, stdout, _ = run_train(f"--init_from={source}/ckpt.pt", "--n_layer=3", "--max_iters=6", "--eval_interval=3",
                             f"--data_dir={reasoning_data}", f"--out_dir={tmp_path}")
    evals = [r for r in metrics(str(tmp_path)) if "val_loss" in r]
    source_final = [r for r in metrics(source) if "val_loss" in r][-1]["val_loss"]
    assert evals[0]["val_loss"] == pytest.approx(source_final, rel=1e-6)  # the same weights on the same windows
    ckpt = torch.load(f"{tmp_path}/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_args"]["n_layer"] == 2 == ckpt["config"]["n_layer"]  # its architecture
    assert ckpt["optimizer"]["adamw"]["state"][0]["step"].item() == 6  # a fresh optimizer (Muon + AdamW, the default)
    assert not torch.equal(ckpt["model"]["norm.weight"], source_ckpt["model"]["norm.weight"])  # and it trained
    assert "initialized from" in stdout


def test_a_trained_tokenizer_travels_in_the_checkpoint(trained, reasoning_data, tmp_path):
    """prepare.py --tokenizer bpe:N, then train.py: the checkpoint holds the whole tokenizer, so sample.py and
    export.py work with the data folder gone; data in another tokenizer is refused by name (train.py, eval.py)."""
    data = tmp_path / "data"
    rc, _, err = run_script("prepare.py", "--max_samples", 1500, "--tokenizer", "bpe:600", "--out_dir", data)
    assert rc == 0, err
    run_train("--max_iters=4", "--eval_interval=4", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}")
    spec = json.loads((data / "bpe.json").read_text())
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == spec and ckpt["model_args"]["vocab_size"] == 640
    rc, _, err = run_train("--max_iters=2", f"--init_from={trained[0]}/ckpt.pt", f"--data_dir={data}",
                           f"--out_dir={tmp_path / 'mixed'}", check=False)
    assert rc != 0 and err.strip().splitlines()[-1] == (
        f"train.py: error: {data} holds {spec['name']} tokens but the checkpoint uses the byte tokenizer: prepare "
        "the data with --tokenizer byte")
    evaluate = ("eval.py", "--ckpt", tmp_path / "out" / "ckpt.pt", "--items", 1, "--max_new_tokens", 8, "--val_tokens",
                2048, "--device", "cpu")
    rc, out, err = run_script(*evaluate, "--data", data)
    assert rc == 0 and "val loss" in out, err
    rc, _, err = run_script(*evaluate, "--data", reasoning_data)
    assert rc != 0 and err.strip().splitlines()[-1] == (
        f"eval.py: error: {reasoning_data} holds byte tokens but the checkpoint uses the {spec['name']} tokenizer: "
        "prepare the data with --tokenizer FOLDER (the data the model was trained on, with its bpe.json)")
    shutil.rmtree(data)
    rc, out, err = run_script("sample.py", "--ckpt", tmp_path / "out" / "ckpt.pt", "--start", "What is 2 + 3?",
                              "--num_samples", 1, "--max_new_tokens", 8, "--seed", 1)
    assert rc == 0 and out.startswith("What is 2 + 3?"), err
    rc, out, err = run_script("export.py", "--ckpt", tmp_path / "out" / "ckpt.pt", "--format", "hf",
                              "--out_dir", tmp_path / "export")
    tokenizer = json.loads((tmp_path / "export" / "hf" / "tokenizer.json").read_text())
    assert rc == 0 and len(tokenizer["model"]["vocab"]) == 588 and tokenizer["pre_tokenizer"]["pretokenizers"][0][
        "pattern"]["Regex"] == QWEN2_PATTERN, err


def test_torchrun_two_processes_end_with_identical_weights(reasoning_data, tmp_path):
    """DDP on CPU (gloo) with gradient accumulation (no_sync) and a curriculum stage change."""
    script = tmp_path / "run_and_dump.py"
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {ROOT!r})\nimport train\n"
                      f"model = train.main(sys.argv[1:])\n"
                      f"torch.save(model.state_dict(),\n"
                      f"           os.path.join({str(tmp_path)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *TINY, "--max_iters=6", "--eval_interval=3", "--grad_accum=2",
                             "--seq_curriculum=[(0, 32, 8), (3, 64, 8)]", f"--data_dir={reasoning_data}",
                             f"--out_dir={tmp_path}/out"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 accumulation x 2 processes" in result.stdout and "curriculum stage: context 64" in result.stdout
    rank0, rank1 = (torch.load(f"{tmp_path}/rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    saved = torch.load(f"{tmp_path}/out/ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 6 and all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)


# ----------------------------------------------------------------------------- presets

TARGET_GIB = {"nano_3050ti": 4, "mini_t4": 15, "yxanul_4090": 24, "cogni_4gb": 4, "cogni_8gb": 8, "cogni_12gb": 12,
              "h100_ddp": 80}


TRAIN_PRESETS = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{ROOT}/config/*.py")
                       if not os.path.basename(p).startswith("rl_"))  # rl_*.py configure rl.py (tests/test_rl.py)


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_presets_parse_and_fit_their_cards(preset, capsys):
    """Every preset is valid, and the GPU ones fit their card by the estimate (CUDA context not counted)."""
    no_checkpoint = ["--init_from="] if preset == "sft_chat" else []  # its stage-one checkpoint does not exist here
    model = train.main([f"config/{preset}.py", "--dry_run", "--data_dir=/nonexistent", *no_checkpoint])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory estimate"))
    total_gib = float(line.split(" = ")[1].split()[0])
    assert model.num_params()["total"] > 0
    if preset in TARGET_GIB:
        assert total_gib < 0.9 * TARGET_GIB[preset], line
