"""training.py: the optimizers (AdamW; Muon for the block matrices with AdamW for the rest), their step under a
GradScaler, and the metrics log of a resumed run."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import training
from common import UserError
from conftest import tiny_model
from model import RMSNorm


def test_metrics_log_drops_what_an_interrupted_run_logged_past_its_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = training.MetricsLog(path)
    for it in range(6):
        log.write(iter=it, loss=float("nan") if it == 2 else 1.0 / (it + 1))
    training.MetricsLog(path, resume_iter=4)  # resumed from a checkpoint at iteration 4
    records = [json.loads(line) for line in open(path)]
    assert [r["iter"] for r in records] == [0, 1, 2, 3] and records[2]["loss"] is None  # NaN is written as null


@pytest.mark.parametrize("emb_rank", [0, 16])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(emb_rank):
    """optimizer="muon": every linear layer inside the blocks in Muon; the embedding (tied: it is the output layer
    too), a factorized embedding's projection and the norm gains in AdamW, decayed as in plain AdamW; each parameter
    in exactly one group, none left out; each optimizer at its own learning rate, both on one schedule."""
    model = tiny_model(vocab_size=128, block_size=96, emb_rank=emb_rank)
    opt = training.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 2e-2)
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
    training.set_lr(opt, 5e-4)  # a point of the schedule: Muon at the same fraction of its own peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4])
    with pytest.raises(UserError, match="expected adamw or muon"):
        training.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "sgd")


def test_muon_and_adamw_step_as_one_under_a_grad_scaler():
    """torch.amp.GradScaler takes the pair as one optimizer: unscale_ reaches the gradients of both, a step moves
    both, and an overflow in either one's gradients skips both steps (and halves the scale)."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=128, block_size=96).train()
    opt = training.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
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


def test_adamw_decays_only_the_matrices():
    model = tiny_model()
    decay, no_decay = training.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def muon_pair(ns_dtype, **settings):
    """Two copies of a tiny Forge, the block matrices of one in torch.optim.Muon (the reference) and of the other in
    training.Muon with its Newton-Schulz iteration in ns_dtype, both with settings."""
    models = [tiny_model(vocab_size=128, block_size=96).train() for _ in range(2)]
    matrices = [[p for p in m.blocks.parameters() if p.dim() == 2] for m in models]
    settings = dict(lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw") | settings
    return models, [torch.optim.Muon(matrices[0], **settings), training.Muon(matrices[1], ns_dtype, **settings)]


def train_steps(models, optimizers, steps, seed=0):
    """steps steps of each model with its optimizer on the same batches."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 128, (2, 24), generator=generator)
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            model(idx, idx)[1].backward()
            opt.step()


@pytest.mark.parametrize("settings", [{}, dict(nesterov=False, adjust_lr_fn="original", momentum=0.9)])
def test_muon_with_bf16_newton_schulz_is_torch_muon_bit_for_bit(settings):
    """ns_dtype=bf16 (GPUs, CPUs that train in bf16): every weight and momentum buffer equals torch.optim.Muon's
    after each of a few steps, the matrices wide and tall (the iteration runs on the wide orientation)."""
    models, (reference, ours) = muon_pair(torch.bfloat16, **settings)
    for _ in range(3):
        train_steps(models, (reference, ours), 1)
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
        assert all(torch.equal(reference.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"])
                   for p, q in zip(reference.param_groups[0]["params"], ours.param_groups[0]["params"]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_with_fp32_newton_schulz_is_torch_muon_up_to_bf16_rounding(nesterov):
    """ns_dtype=fp32 (CPUs that train in fp32): one step of random full-rank matrices, wide and tall, moves them as
    torch.optim.Muon's bf16 iteration does up to bf16's rounding; the momentum buffers are torch's exactly (the
    fp32 iteration works on a copy, even of the buffer itself without nesterov)."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in [(64, 176), (176, 64), (32, 64)]]
    grads = [torch.randn(w.shape, generator=generator) for w in start]
    params = [[torch.nn.Parameter(w.clone()) for w in start] for _ in range(2)]
    settings = dict(lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", nesterov=nesterov)
    optimizers = [torch.optim.Muon(params[0], **settings), training.Muon(params[1], torch.float32, **settings)]
    for ps, opt in zip(params, optimizers):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    for w, p, q in zip(start, *params):
        assert not torch.equal(p, q)  # fp32 really ran
        assert torch.linalg.norm((q - w) - (p - w)) < 0.03 * torch.linalg.norm(p - w)
        assert torch.equal(optimizers[0].state[p]["momentum_buffer"], optimizers[1].state[q]["momentum_buffer"])


def test_newton_schulz_in_fp32_orthogonalizes():
    """The fp32 iteration against the SVD: the result keeps the input's singular vectors (U^T O V is diagonal) and
    its singular values lie in the quintic iteration's band, roughly [0.5, 1.5] (for inputs whose singular values
    are not near 0, as a rectangular random matrix's are not: five steps can only lift so much)."""
    generator = torch.Generator().manual_seed(1)
    for shape in [(64, 176), (176, 64), (32, 64)]:
        grad = torch.randn(shape, generator=generator)
        ortho = training.orthogonalize(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
        assert ortho.dtype == torch.float32 and ortho.shape == grad.shape
        U, S, Vh = torch.linalg.svd(grad, full_matrices=False)
        core = U.T @ ortho @ Vh.T
        assert torch.linalg.norm(core - torch.diag(torch.diagonal(core))) < 1e-4 * torch.linalg.norm(core)
        assert 0.5 < torch.diagonal(core).min() and torch.diagonal(core).max() < 1.5


def test_muon_state_dicts_load_both_ways_with_torch_muon():
    """A checkpoint's Muon state from torch.optim.Muon (runs before training.Muon) resumes in training.Muon, and
    back: the same groups and state keys, and the runs go on as one (bf16: bit for bit). Loading keeps ns_dtype."""
    models, (reference, ours) = muon_pair(torch.bfloat16)
    train_steps(models, (reference, ours), 2)
    assert ours.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    assert [sorted(s) for s in ours.state_dict()["state"].values()] == [["momentum_buffer"]] * 14
    resumed = training.Muon(ours.param_groups[0]["params"], torch.bfloat16)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    back = torch.optim.Muon(reference.param_groups[0]["params"])
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    train_steps(models, (back, resumed), 2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    in_fp32 = training.Muon(ours.param_groups[0]["params"], torch.float32)
    in_fp32.load_state_dict(reference.state_dict())
    assert in_fp32.ns_dtype == torch.float32 and in_fp32.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize("device_type, amp, expected", [
    ("cpu", None, torch.float32), ("cpu", torch.bfloat16, torch.bfloat16), ("mps", None, torch.float32),
    ("cuda", torch.bfloat16, torch.bfloat16), ("cuda", torch.float16, torch.bfloat16)])
def test_make_optimizer_runs_newton_schulz_in_the_runs_fast_dtype(device_type, amp, expected):
    """make_optimizer gives Muon the dtype the run trains fast in: the measured autocast dtype on a CPU (fp32 where
    bf16 matmuls measured slower), bf16 on a GPU as torch.optim.Muon does."""
    assert training.newton_schulz_dtype(device_type, amp) == expected
    cfg = SimpleNamespace(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95, optimizer="muon", muon_lr=0.0,
                          resume=False)
    optimizer, _ = training.make_optimizer(tiny_model(), cfg, "cpu", amp, None)
    assert optimizer.muon.ns_dtype == (torch.bfloat16 if amp == torch.bfloat16 else torch.float32)
