"""bench.py: the quick run completes and its numbers are finite, positive and consistent with each other (the
rates with the times, the ratios with the rates, MFU with the measured peak; no timing assertions: CI machines
are noisy), its peer computes what we compute, and bad flags get a one-line error."""
import glob
import importlib.util
import json
import math
import os
from dataclasses import replace

import pytest
import torch

import bench
import train
from common import UserError, run_main
from conftest import ROOT, run_script


def numbers(tree):
    """Every int and float in a JSON tree (booleans excluded)."""
    if isinstance(tree, dict):
        return [n for v in tree.values() for n in numbers(v)]
    if isinstance(tree, list):
        return [n for v in tree for n in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_quick_run_reports_finite_positive_numbers(tmp_path):
    out = tmp_path / "bench.json"
    env = {"NANOFORGE_GPT2_RANKS": ""}  # byte tokenizer only: no ranks file needed
    rc, stdout, err = run_script("bench.py", "--quick", "--json", out, env=env, timeout=900)
    assert rc == 0, err[-2000:]
    results = json.loads(out.read_text())
    assert set(bench.SECTIONS) <= results.keys()
    for section in ("peak", "train", "generate", "data"):
        values = numbers(results[section])
        assert values and all(math.isfinite(v) and v > 0 for v in values), section
    assert {r["model"] for r in results["train"]} == {"ours", "peer"}
    check_train_rows(results)
    llama_cpp = ({"llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"}  # the anchors
                 if importlib.util.find_spec("llama_cpp") else set())
    assert {r["model"] for r in results["generate"]} == {"ours, KV cache", "ours, recompute", "peer generate",
                                                         *llama_cpp}
    # same weights, same prompt, greedy: the peer is the same model, so the comparison is fair
    assert all(r["same ids as peer"] for r in results["generate"] if "same ids as peer" in r)
    check_generate_rows(results)
    assert any(r["unit"] == "tokens" and "prepare.py" in r["what"] for r in results["data"])
    assert all(r["vs training step"] > 0 for r in results["data"] if r["unit"] == "batches")
    assert "skipped" in results["memory"]  # CUDA only
    assert "### train" in stdout and "ours/peer" in stdout  # the readable table


def check_train_rows(results):
    """tokens/s is the batch over the step time, ours/peer the ratio of the step times, and MFU the model's FLOPs
    per second over the peak the same run measured (bench.py's only peak: device.peak_flops)."""
    peaks = {r["dtype"]: r["TFLOP/s"] * 1e12 for r in results["peak"]}
    peak = peaks[results["env"]["dtype"]]  # the dtype the run resolved
    steps = {(r["size"], r["batch x context"], r["model"]): r["ms/step"] for r in results["train"]}
    for r in results["train"]:
        batch, context = map(int, r["batch x context"].split("x"))
        assert r["tokens/s"] == pytest.approx(batch * context / (r["ms/step"] / 1e3), rel=1e-9)
        flops = bench.Forge(replace(bench.MODELS[r["size"]], block_size=context)).flops_per_token(context)
        assert r["MFU %"] == pytest.approx(100 * flops * r["tokens/s"] / peak, rel=1e-9)
        if r["model"] == "ours":
            peer = steps[r["size"], r["batch x context"], "peer"]
            assert r["ours/peer"] == pytest.approx(peer / r["ms/step"], rel=1e-9)


def check_generate_rows(results):
    """Each length's ratios are those of its rows' decode rates."""
    by_length = {}
    for r in results["generate"]:
        by_length.setdefault((r["size"], r["length"]), {})[r["model"]] = r
    for rows in by_length.values():
        for r in rows.values():
            assert r["decode vs peer"] == pytest.approx(r["decode tok/s"] / rows["peer generate"]["decode tok/s"])
            assert r["decode vs recompute"] == pytest.approx(
                r["decode tok/s"] / rows["ours, recompute"]["decode tok/s"])
        ours = rows["ours, KV cache"]
        for name in rows.keys() - {"ours, KV cache", "ours, recompute", "peer generate"}:  # llama.cpp
            assert ours[f"ours / {name}"] == pytest.approx(ours["decode tok/s"] / rows[name]["decode tok/s"])


def test_race_alternates_and_takes_medians(monkeypatch):
    clock, calls = [0.0], []
    durations = {"a": [9, 1, 1, 50, 1], "b": [9, 2, 2, 2, 3]}  # warm-up first; a has one slow run

    def contender(name):
        def run():
            calls.append(name)
            clock[0] += durations[name][calls.count(name) - 1]
        return run
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    medians = bench.race({"a": contender("a"), "b": contender("b")}, reps=4, warmup=1, device="cpu")
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert medians == {"a": 1, "b": 2}  # the warm-up is not timed, and one slow run does not count


def test_the_peer_is_the_same_model():
    ours, peer = bench.build_pair(bench.ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4,
                                                    n_kv_head=2, n_embd=64), "cpu")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    assert peer.config._attn_implementation == "sdpa" and peer.config.tie_word_embeddings


@pytest.mark.parametrize("argv, message", [
    (["--sections", "train,speed"], "unknown section(s) speed"),
    (["--sizes", "huge"], "unknown size(s) huge"),
    (["--lengths", "256,big"], "--lengths takes comma-separated integers"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--dtype", "float16", "--device", "cpu"], "float16 is not native on this cpu"),
    (["--lengths", "16", "--new_tokens", "32"], "must exceed --new_tokens"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_flags_get_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_main(bench.main, argv)
    text = str(exit_info.value.code)
    assert text.startswith("bench.py: error:") and message in text and "\n" not in text


def test_a_preset_trains_as_train_py_runs_it(tmp_path):
    """The memory section's runs on CPU (its peak is CUDA only): train.py trains a config file with a
    curriculum at every micro-batch shape it trains at, and reports the settings it ran with."""
    config = tmp_path / "small.py"
    config.write_text("n_layer = 1\nn_head = 2\nn_kv_head = 1\nn_embd = 32\nblock_size = 64\nbatch_size = 2\n"
                      "dtype = 'float32'\ncompile = False\nseq_curriculum = [(10, 16, 4), (100, 32, 3)]\n")
    shapes, cfg, ptdtype = bench.preset_memory(str(config), "cpu")
    assert [s[:2] for s in shapes] == [(4, 16), (3, 32), (2, 64)] and ptdtype is None
    assert all(s[2] is None for s in shapes) and cfg["n_embd"] == 32
    assert cfg["seq_curriculum"] == [(10, 16, 4), (100, 32, 3)]  # the preset's settings, as train.py ran them
    assert cfg["max_iters"] == 2 and cfg["device"] == "cpu"  # in a short run on the requested device


# ----------------------------------------------------------------------------- the GPU check

def test_gpu_check_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # so on a GPU machine too
    with pytest.raises(SystemExit) as exit_info:
        run_main(bench.main, ["--gpu_check", "--json", "never-written.json"])
    text = exit_info.value.code  # a message: exit status 1
    assert isinstance(text, str) and text.startswith("bench.py: error: no CUDA GPU here: ") and "\n" not in text


def test_train_settings_are_train_pys():
    """The GPU check reads train.py's defaults from its source (bench.py imports no script): the same as train.py's."""
    defaults, architecture = bench.train_settings()
    assert defaults == train.DEFAULTS and architecture == train.ARCHITECTURE


def test_preset_estimate_is_the_dry_runs(capsys):
    """The memory check's estimate is the one `train.py --dry_run` prints, at the largest micro-batch of the preset's
    curriculum (yxanul_4090's last stage), bf16 as the dry run assumes of a GPU."""
    train.main(["config/yxanul_4090.py", "--dry_run", "--data_dir=/nonexistent"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory estimate"))
    plan = bench.check_plan(smoke=False)
    (batch, context), _, estimate = bench.preset_estimate(
        plan, bench.preset_settings(os.path.join(ROOT, "config", "yxanul_4090.py"), plan), torch.bfloat16)
    assert f"= {estimate / 2**30:.2f} GiB (micro-batch {batch} x {context} tokens, bfloat16" in line


def test_a_failed_check_is_its_rows_not_the_runs():
    """An exception (a compiler missing, a driver error) or running out of memory fails that row, in one line."""
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    def broken():
        raise RuntimeError("no C++ compiler\nfound on PATH")
    rows = [bench.run_check({"model": "a", "estimate GiB": 3.0}, "cpu", out_of_memory),
            bench.run_check({"model": "b"}, "cpu", broken),
            bench.run_check({"model": "c"}, "cpu", lambda: {"ok": True})]
    assert rows[0]["ok"] is False and rows[0]["note"].startswith("out of memory")  # on a CPU: nothing is too big
    assert rows[1] == {"model": "b", "ok": False, "note": "RuntimeError: no C++ compiler"}
    assert rows[2] == {"model": "c", "ok": True}
    assert bench.failed_checks({"compile": rows}) == ["compile a", "compile b"]


def test_gpu_check_runs_on_a_cpu_at_toy_sizes(monkeypatch):
    """The GPU check's code at toy sizes (smoke: one tiny layer, dynamo's eager backend): every check passes, every
    preset train.py trains from scratch gets its estimate and two real steps, and the rates are consistent."""
    peak = 1e11  # device.peak_flops is tested in test_device.py; a CPU's emulated bf16 takes seconds to measure
    monkeypatch.setattr(bench, "peak_flops", lambda device, dtype=None: peak)
    results = bench.gpu_check("cpu", smoke=True)
    assert bench.failed_checks(results) == []
    (compiled,) = results["compile"]
    assert compiled["ok"] and compiled["max loss difference"] <= 1e-4 * compiled["last loss, eager"]
    bf16, fp16 = results["precision"]
    assert bf16["ok"] and fp16["ok"] and fp16["grad scale"] > 0 and fp16["updates applied"] >= 1
    assert fp16["first loss"] == pytest.approx(fp16["fp32 first loss"], rel=1e-2)
    trains = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
        try:
            if train.settings([path])[1] is None:  # not a fine-tuning (its model is its checkpoint's)
                trains.add(os.path.basename(path)[:-3])
        except UserError:  # another script's settings, or a fine-tuning without its checkpoint
            pass
    assert {r["preset"] for r in results["memory"] if "estimate GiB" in r} == trains
    for row in results["memory"]:
        assert row["preset"] in trains or row["note"]
        assert row["preset"] not in trains or (row["ok"] and row["estimate GiB"] > 0 and row["measured GiB"] is None)
    assert next(r for r in results["memory"] if r["preset"] == "mini_t4")["dtype"] == "float16"
    (mfu,) = results["mfu"]
    batch, context = map(int, mfu["micro-batch"].split("x"))
    assert mfu["tokens/s"] == pytest.approx(batch * context / (mfu["ms/step"] / 1e3))
    flops = bench.Forge(bench.check_plan(smoke=True).nano).flops_per_token(context)
    assert mfu["MFU %"] == pytest.approx(100 * flops * mfu["tokens/s"] / peak)
    assert [r["model"] for r in results["decode"]] == ["train.py's default", "nano"]
    assert all(math.isfinite(r["decode tok/s"]) and r["decode tok/s"] > 0 for r in results["decode"])
