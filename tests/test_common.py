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
from model import RMSNorm


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


@pytest.mark.parametrize("bf16, fp32, expected", [(396.0, 156.0, torch.bfloat16), (142.0, 233.0, None)])
def test_cpu_auto_dtype_follows_the_measured_matmul_speed(monkeypatch, bf16, fp32, expected):
    """dtype=auto on a CPU picks whichever matmul measured faster (not what the CPU flags promise); an explicit
    dtype is never measured."""
    monkeypatch.setattr(common, "cpu_matmul_gflops", lambda: {"float32": fp32, "bfloat16": bf16})
    choice, reason = common.cpu_auto_dtype()
    assert choice == expected and common.amp_dtype("cpu") == expected and common.amp_dtype("cpu", "auto") == expected
    assert reason.startswith(f"{'bfloat16' if expected else 'float32'} (bf16 matmul {bf16:.0f} GFLOP/s vs fp32 "
                             f"{fp32:.0f} on this CPU")
    monkeypatch.setattr(common, "cpu_matmul_gflops", lambda: pytest.fail("an explicit dtype was measured"))
    assert common.amp_dtype("cpu", "float32") is None and common.amp_dtype("cpu", "bfloat16") == torch.bfloat16


def test_cpu_matmul_speed_is_measured_once_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(common, "_MATMUL_GFLOPS", {})
    state = torch.get_rng_state()
    speed = common.cpu_matmul_gflops(n=64, reps=1)
    assert set(speed) == {"float32", "bfloat16"} and all(v > 0 for v in speed.values())
    assert common.cpu_matmul_gflops() is speed and torch.equal(torch.get_rng_state(), state)


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


def test_token_file_slices_like_an_array(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    f = common.TokenFile(str(tmp_path / "train.bin"), np.uint16)
    assert len(f) == 1000
    for s in (slice(0, 10), slice(990, 1010), slice(-5, None), slice(500, 400), slice(None), slice(2000, 2010)):
        assert np.array_equal(f[s], tokens[s])
    with pytest.raises(TypeError, match="contiguous slices only"):
        f[[1, 2]]
    (tmp_path / "val.bin").write_bytes(b"")  # np.memmap refuses a 0-byte file; here it is an empty split
    empty = common.TokenFile(str(tmp_path / "val.bin"), np.uint16)
    assert len(empty) == 0 and len(empty[0:10]) == 0


def rss_file():
    """Bytes of mapped files resident in this process (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def rss_file_growth(data_dir):
    """{reader: RssFile growth in bytes} while get_batch reads windows that touch every page of data_dir's
    train.bin and train_mask.bin, in random order: through load_data, then through memmaps kept open for the
    whole run (the reader before issue #16). Run in a fresh process (test_batches_keep_no_pages_of_the_bins)."""
    _, bins = common.load_data(data_dir, splits=("train",))
    kept_open = tuple(np.memmap(os.path.join(data_dir, name), dtype, mode="r")
                      for name, dtype in (("train.bin", np.uint16), ("train_mask.bin", np.uint8)))
    T = 2047  # windows of 2048 tokens: a 4 KiB page each, so starts one window apart touch every page
    starts = np.random.default_rng(0).permutation(np.arange(0, len(kept_open[0]) - T, T + 1))
    growth = {}
    for reader, (tokens, mask) in (("load_data", bins["train"]), ("memmap", kept_open)):
        common.get_batch(tokens, mask, starts[:64], T)  # warm up: libraries loaded on first use are not the data
        before = rss_file()
        for i in range(0, len(starts), 64):
            common.get_batch(tokens, mask, starts[i:i + 64], T)
        growth[reader] = rss_file() - before
    return growth


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads RssFile from Linux's /proc/self/status")
def test_batches_keep_no_pages_of_the_bins(tmp_path):
    # Sparse files, written at once: their holes read as zeros, yet a mapped page of a hole is resident
    # (RssFile) like any other, so a reader that keeps its map open grows by the files' size.
    n_tokens = 128 << 20
    for name, size in (("train.bin", 2 * n_tokens), ("train_mask.bin", n_tokens)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    common.save_json({"tokenizer": "byte", "vocab_size": 320}, tmp_path / "meta.json")
    code = f"import json, test_common; print(json.dumps(test_common.rss_file_growth({str(tmp_path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    for name in ("train.bin", "train_mask.bin"):
        os.remove(tmp_path / name)  # and with them the page cache their zeros took
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.splitlines()[-1])
    # The bound: load_data's reader maps nothing, so anything it gains is a library loaded late, not data. 64 MB
    # is a quarter of train.bin, while the memmap kept open holds nearly all 384 MB of the two files.
    assert growth["memmap"] > 0.75 * 3 * n_tokens, growth
    assert growth["load_data"] < 64 << 20, growth


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


@pytest.mark.parametrize("emb_rank", [0, 16])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(emb_rank):
    """optimizer="muon": every linear layer inside the blocks in Muon; the embedding (tied: it is the output layer
    too), a factorized embedding's projection and the norm gains in AdamW, decayed as in plain AdamW; each parameter
    in exactly one group, none left out; each optimizer at its own learning rate, both on one schedule."""
    model = tiny_model(vocab_size=128, block_size=96, emb_rank=emb_rank)
    opt = common.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 2e-2)
    name = {id(p): n for n, p in model.named_parameters()}
    (muon,) = opt.muon.param_groups
    decay, no_decay = opt.adamw.param_groups
    names = lambda group: [name[id(p)] for p in group["params"]]  # noqa: E731
    block_linears = [f"{n}.weight" for n, m in model.named_modules() if n.startswith("blocks.")
                     and isinstance(m, torch.nn.Linear)]  # the reference: the modules, not the shapes
    assert names(muon) == block_linears and len(block_linears) == 2 * 7
    assert names(decay) == ["tok_emb.weight"] + (["emb_proj.weight"] if emb_rank else [])
    assert names(no_decay) == [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    everything = names(muon) + names(decay) + names(no_decay)
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()["total"]
    assert (muon["weight_decay"], decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.1, 0.0)
    assert muon["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 1e-3, 1e-3]
    common.set_lr(opt, 5e-4)  # a point of the schedule: Muon at the same fraction of its own peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4])
    with pytest.raises(UserError, match="expected adamw or muon"):
        common.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "sgd")


def test_muon_and_adamw_step_as_one_under_a_grad_scaler():
    """torch.amp.GradScaler takes the pair as one optimizer: unscale_ reaches the gradients of both, a step moves
    both, and an overflow in either one's gradients skips both steps (and halves the scale)."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=128, block_size=96).train()
    opt = common.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    idx = torch.randint(0, 128, (2, 24))
    params = list(model.parameters())
    reference = torch.autograd.grad(model(idx, idx)[1], params)
    scaler.scale(model(idx, idx)[1]).backward()
    scaler.unscale_(opt)
    assert all(torch.allclose(p.grad, g) for p, g in zip(params, reference))
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
    for overflowing in (model.norm.weight, model.blocks[0].attn.q_proj.weight):  # AdamW's, then Muon's
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(idx, idx)[1]).backward()
        overflowing.grad.view(-1)[0] = float("inf")
        before, scale = [p.detach().clone() for p in params], scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert all(torch.equal(p, b) for p, b in zip(params, before)) and scaler.get_scale() == scale / 2


def test_generate_replies_equal_generate_reply_under_greedy_decoding():
    """Batched replies (prompts grouped by length, several batches) read exactly as one-at-a-time replies:
    ids, finish, thinking, answer and thinking length, whether the prompt forced thinking on, off or neither."""
    from conftest import BYTE
    from tokenizer import render_prompt
    model = tiny_model(seed=3, random_norms=True)
    questions = ["What is 1 + 2?", "What is 3 + 4?", "Sort: 5, 2", "Hi", "What is 9 + 9?", "Count the r in rare"]
    prompts = [render_prompt([{"role": "user", "content": q}], BYTE, mode)
               for q in questions for mode in ("on", "off", "auto")]
    sampling = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=None)
    batched = common.generate_replies(model, BYTE, prompts, sampling, batch_size=2)
    for prompt, reply in zip(prompts, batched):
        one = common.generate_reply(model, BYTE, prompt, sampling)
        assert (reply.ids, reply.finish, reply.thinking, reply.answer, reply.thinking_tokens) == \
               (one.ids, one.finish, one.thinking, one.answer, one.thinking_tokens)
    assert {r.finish for r in batched} == {"stop", "length"}  # rows left their batches at different steps
    assert any(r.thinking is not None for r in batched[2::3])  # the model chose to think where it could
