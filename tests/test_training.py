"""training.py: the optimizers (AdamW; Muon for the block matrices with AdamW for the rest), their step under a
GradScaler, and the metrics log of a resumed run."""
import json

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
