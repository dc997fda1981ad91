"""LoRA (lora.py, train.py lora_*) and distillation (distill.py, train.py teacher=): adapters against the merged
weights and a naive reference, frozen bases, small checkpoints that every loader merges, bit-exact resume, the
one-line errors; the distillation loss against a hand computation, and real tiny runs."""
import os
import re

import pytest
import torch

import lora
from checkpoints import load_checkpoint, read_checkpoint
from common import UserError
from conftest import all_logits, greedy_ids, run_script, tiny_model, write_checkpoint
from distill import distillation_loss, load_teacher

TINY = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--block_size=64", "--batch_size=8",
        "--eval_iters=2", "--compile=False", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"]


def run_train(*args, check=True):
    rc, out, err = run_script("train.py", *TINY, *args)
    if check:
        assert rc == 0, err[-3000:]
    return rc, out, err


def adapted(rank=4, targets="all", seed=0):
    """A tiny model with adapters whose B is random (at init B = 0 and the adapters do nothing)."""
    model = tiny_model(seed=seed, random_norms=True)
    torch.manual_seed(seed + 1)
    lora.add_lora(model, rank, 8.0, lora.parse_targets(targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.1)
    return model


def test_adapters_start_as_the_base_and_compute_w_plus_scaled_ba():
    base = tiny_model(random_norms=True)
    model = tiny_model(random_norms=True)
    lora.add_lora(model, 4, 8.0, lora.TARGETS)
    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(all_logits(model, idx), all_logits(base, idx))  # B = 0: exactly the base
        layer = model.blocks[0].attn.q_proj
        layer.lora_b.normal_()
        x = torch.randn(3, 64)
        naive = x @ (layer.weight + (8.0 / 4) * layer.lora_b @ layer.lora_a).T
        torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-5)


def test_merged_weights_compute_what_the_adapted_model_does():
    model = adapted()
    merged = tiny_model(seed=1)  # other weights: all of them come from the merge
    merged.load_state_dict(lora.merge_adapters(tiny_model(random_norms=True).state_dict(), lora.adapter_state(model),
                                               8.0 / 4))
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(merged, idx), all_logits(model, idx), rtol=1e-4, atol=1e-4)
    assert greedy_ids(merged, idx[0, :4].tolist(), 16) == greedy_ids(model, idx[0, :4].tolist(), 16)


def test_only_adapters_train_and_their_count_is_rank_times_in_plus_out():
    model = tiny_model()
    trained = lora.add_lora(model, 8, 16.0, lora.parse_targets("q_proj, down_proj"))
    cfg = model.config
    per_layer = 8 * (cfg.n_embd + cfg.n_head * cfg.head_dim) + 8 * (cfg.ffn_hidden + cfg.n_embd)
    assert trained == cfg.n_layer * per_layer
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{part}.lora_{ab}" for i in range(cfg.n_layer) for part in ("attn.q_proj", "mlp.down_proj")
        for ab in "ab"}
    mem = model.estimate_memory(4, 32, 4)  # gradients and AdamW's moments for the adapters alone
    assert mem["grads"] == 4 * trained and mem["optimizer"] == 8 * trained
    assert mem["weights"] == 4 * model.num_params()["total"]


def test_adapters_are_drawn_from_their_seed_alone():
    models = [tiny_model() for _ in range(3)]
    for model, seed in zip(models, (5, 5, 6)):
        torch.manual_seed(seed * 7)  # the global RNG plays no part
        lora.add_lora(model, 4, 8.0, lora.TARGETS, seed)
    a = [lora.adapter_state(m)["blocks.1.mlp.up_proj.lora_a"] for m in models]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])


@pytest.mark.parametrize("targets", ["qproj", "", "all,q_proj", "q_proj,wq"])
def test_targets_that_match_no_matrix_are_refused(targets):
    with pytest.raises(UserError, match="matches no block matrix"):
        lora.parse_targets(targets)


@pytest.fixture(scope="module")
def base_ckpt(reasoning_data, tmp_path_factory):
    """A 20-iteration full run: the base the adapters adapt."""
    out = tmp_path_factory.mktemp("base")
    run_train("--max_iters=20", "--eval_interval=10", f"--data_dir={reasoning_data}", f"--out_dir={out}")
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def lora_run(base_ckpt, reasoning_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    _, stdout, _ = run_train("--max_iters=12", "--eval_interval=6", f"--init_from={base_ckpt}", "--lora_rank=4",
                             f"--data_dir={reasoning_data}", f"--out_dir={out}")
    return str(out), stdout


def test_lora_run_trains_only_adapters_and_saves_only_them(lora_run, base_ckpt):
    out, stdout = lora_run
    assert "trainable:" in stdout and "of the model (LoRA rank 4 on all)" in stdout
    raw = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert raw["model"] and all(k.endswith((".lora_a", ".lora_b")) for k in raw["model"])
    assert raw["lora"]["base"] == base_ckpt and raw["lora"]["base_sha256"] == lora.file_sha256(base_ckpt)
    assert os.path.getsize(os.path.join(out, "ckpt.pt")) < os.path.getsize(base_ckpt) / 2
    assert any(v.abs().sum() > 0 for k, v in raw["model"].items() if k.endswith("lora_b"))  # B has moved from 0
    base, _ = load_checkpoint(base_ckpt)
    merged, ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))  # what sample/chat/serve/eval/export load
    adapted_model, _ = load_checkpoint(base_ckpt)
    lora.add_lora(adapted_model, 4, ckpt["lora"]["alpha"], lora.TARGETS)
    adapted_model.load_state_dict(ckpt["adapters"], strict=False)
    idx = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(merged, idx), all_logits(adapted_model, idx), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(all_logits(merged, idx), all_logits(base, idx))
    for name in ("tok_emb.weight", "norm.weight", "blocks.0.attn_norm.weight"):  # frozen: the base's, bit for bit
        assert torch.equal(merged.state_dict()[name], base.state_dict()[name])


def test_lora_checkpoint_loads_in_the_scripts_and_exports_merged(lora_run, tmp_path):
    from transformers import LlamaForCausalLM
    out, _ = lora_run
    rc, _, err = run_script("sample.py", "--out_dir", out, "--max_new_tokens", 8, "--num_samples", 1)
    assert rc == 0, err
    rc, _, err = run_script("export.py", "--ckpt", os.path.join(out, "best.pt"), "--format", "hf", "--out_dir",
                            tmp_path / "x")
    assert rc == 0, err
    hf_dir = next(d for d, _, files in os.walk(tmp_path / "x") if "config.json" in files)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, _ = load_checkpoint(os.path.join(out, "best.pt"))
    prompt = [256, 261] + list(b"What is 2 + 3?")
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert theirs == greedy_ids(ours, prompt, 16)


def test_lora_resume_is_bit_exact(base_ckpt, reasoning_data, tmp_path):
    common = [f"--init_from={base_ckpt}", "--lora_rank=4", "--lora_targets=q_proj,v_proj,down_proj",
              "--eval_interval=4", "--lr_decay_iters=8", f"--data_dir={reasoning_data}"]
    run_train("--max_iters=8", f"--out_dir={tmp_path}/straight", *common)
    run_train("--max_iters=4", f"--out_dir={tmp_path}/halves", *common)
    run_train("--resume", "--max_iters=8", f"--out_dir={tmp_path}/halves")
    a = torch.load(f"{tmp_path}/straight/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/halves/ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 8 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["model"]) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)


def test_changed_or_missing_base_is_a_one_line_error(lora_run, base_ckpt, tmp_path):
    out, _ = lora_run
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    elsewhere = write_checkpoint(tiny_model(), tmp_path / "other.pt")
    moved = dict(ckpt, lora=dict(ckpt["lora"], base=str(tmp_path / "gone.pt")))
    changed = dict(ckpt, lora=dict(ckpt["lora"], base=elsewhere))
    for bad, message in ((moved, "which is missing"), (changed, "has changed since")):
        path = str(tmp_path / "adapters.pt")
        torch.save(bad, path)
        with pytest.raises(UserError, match=message):
            read_checkpoint(path)
        rc, _, err = run_script("eval.py", "--ckpt", path, "--items", 1)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--lora_rank=-1"], "lora_rank"),
    (["--lora_rank=4"], "give it one with --init_from"),
    (["--lora_rank=4", "--lora_targets=qkv", "--init_from=BASE"], "matches no block matrix"),
])
def test_bad_lora_settings_are_one_line_errors(args, message, reasoning_data, tiny_ckpt):
    args = [a.replace("BASE", tiny_ckpt) for a in args]
    rc, _, err = run_train(*args, f"--data_dir={reasoning_data}", "--max_iters=1", check=False)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- distillation

def test_distillation_loss_against_a_hand_computation():
    student, teacher = tiny_model(seed=0, random_norms=True), tiny_model(seed=1, random_norms=True)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    y[0, :5] = -1  # not supervised: in neither part
    loss = distillation_loss(student, teacher, x, y, 0.3, 2.0)
    s, t = all_logits(student, x), all_logits(teacher, x).detach()
    terms_ce, terms_kl = [], []
    for b in range(2):
        for i in range(12):
            if y[b, i] == -1:
                continue
            terms_ce.append(-s[b, i].log_softmax(-1)[y[b, i]])
            p, q = (t[b, i] / 2).softmax(-1), (s[b, i] / 2).log_softmax(-1)
            terms_kl.append((p * (p.log() - q)).sum())
    expected = 0.7 * torch.stack(terms_ce).mean() + 0.3 * 4 * torch.stack(terms_kl).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    loss.backward()  # the student learns; the teacher is not touched
    assert student.tok_emb.weight.grad is not None and teacher.tok_emb.weight.grad is None
    same = distillation_loss(student, student, x, y, 1.0, 2.0)  # a student equal to its teacher: nothing to learn
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    ce = distillation_loss(student, teacher, x, y, 0.0, 2.0)
    torch.testing.assert_close(ce, student(x, y)[1], rtol=1e-4, atol=1e-5)


def test_teacher_with_another_tokenizer_is_a_one_line_error(tmp_path, reasoning_data):
    other = write_checkpoint(tiny_model(), tmp_path / "teacher.pt", tokenizer="gpt2")
    with pytest.raises(UserError, match="uses the gpt2 tokenizer"):
        load_teacher(other, {"tokenizer": "byte", "vocab_size": 320}, "cpu")
    rc, _, err = run_train(f"--teacher={other}", f"--data_dir={reasoning_data}", "--max_iters=1",
                           f"--out_dir={tmp_path}/o", check=False)
    assert rc == 1 and "uses the gpt2 tokenizer" in err and len(err.strip().splitlines()) == 1


def test_distilled_run_learns_toward_its_teacher(base_ckpt, reasoning_data, tmp_path):
    """A smaller student distilled from the tiny base, both compiled: runs, says so, and its loss falls."""
    _, out, _ = run_train(f"--teacher={base_ckpt}", "--distill_coef=1.0", "--n_layer=1", "--max_iters=15",
                          "--eval_interval=15", f"--data_dir={reasoning_data}", f"--out_dir={tmp_path}/s",
                          "--compile=True", "--dtype=bfloat16")  # where it runs by default: the teacher compiled too
    assert f"distilling {base_ckpt}" in out
    losses = [float(v) for v in re.findall(r"iter \d+: train loss [\d.]+, val loss ([\d.]+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0]  # the eval loss is the data's: it falls with the teacher's help
    student, _ = load_checkpoint(f"{tmp_path}/s/ckpt.pt")
    assert student.config.n_layer == 1


def test_dry_run_estimates_a_lora_run_without_a_checkpoint():
    """Will LoRA fit my card? Forge-1 Mini's dry run, with and without rank-8 adapters: the gradients and AdamW
    moments shrink to the adapters' (1.07% of the model)."""
    full = run_train("config/mini_t4.py", "--dry_run")[1]
    adapted = run_train("config/mini_t4.py", "--dry_run", "--lora_rank=8")[1]
    assert "trainable: 3,489,792 parameters, 1.07% of the model" in adapted
    gib = [float(re.search(r"= ([\d.]+) GiB", out)[1]) for out in (full, adapted)]
    assert gib[1] < 4 < gib[0]  # a 4 GB card: not a full fine-tune of Mini, but its LoRA
