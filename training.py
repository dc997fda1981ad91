"""
What train.py and rl.py share: the optimizer (AdamW, or Muon + AdamW) and its step, resuming it, the metrics log,
and stopping cleanly (the exit after common.StopFlag was set).
"""
import itertools
import json
import math
import os
import sys

import torch

from checkpoints import save_checkpoint
from common import UserError, run_main
from lora import adapter_state


def adamw(params, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not norms). The fused kernel (CUDA and CPU) updates every
    parameter in one pass instead of a dozen small ones."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.0,
                        ns_dtype=torch.bfloat16):
    """The optimizer of model's trainable parameters: AdamW; with optimizer="muon", Muon at muon_lr (0:
    learning_rate) for the matrices inside the blocks (attention and MLP projections) and AdamW for the rest: the
    embedding (tied: also the output layer), a factorized embedding's projection, the norm gains. model may be
    any nn.Module for AdamW (bench.py gives the same one to its transformers peer); Muon needs a Forge. ns_dtype:
    the dtype of Muon's Newton-Schulz iteration (newton_schulz_dtype; bf16 is torch.optim.Muon's own)."""
    if optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer={optimizer!r}: expected adamw or muon")
    params = [p for p in model.parameters() if p.requires_grad]
    # LoRA's adapters stay with AdamW (so a LoRA run is all AdamW): its recipes and the alpha / rank scale assume Adam
    matrices = [p for n, p in model.blocks.named_parameters() if p.requires_grad and p.dim() == 2
                and "lora_" not in n] if optimizer == "muon" else []
    if not matrices:
        return adamw(params, weight_decay, learning_rate, betas, device_type)
    in_muon = {id(p) for p in matrices}
    rest = adamw([p for p in params if id(p) not in in_muon], weight_decay, learning_rate, betas, device_type)
    # Muon orthogonalizes each update (singular values near 1): its RMS is 1/sqrt(max(rows, cols)), whatever
    # the gradient's scale. "match_rms_adamw" multiplies it by 0.2 * sqrt(max(rows, cols)), an update RMS of
    # 0.2 * lr for every shape, that of a typical AdamW step; and the decoupled weight decay multiplies the
    # unadjusted lr as AdamW's does. So learning_rate and weight_decay tuned for AdamW carry over (Moonshot,
    # "Muon is Scalable for LLM Training"), which is why muon_lr defaults to learning_rate. torch's default,
    # Keller Jordan's "original" sqrt(max(1, rows/cols)), gives an RMS of lr / sqrt(fan_in): it would need a
    # learning rate 0.2 * sqrt(fan_in) times larger (3x at n_embd=256), and that would multiply the decay too.
    muon = Muon(matrices, ns_dtype, lr=muon_lr or learning_rate, weight_decay=weight_decay,
                adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, rest, muon_lr / learning_rate if muon_lr else 1.0)


def newton_schulz_dtype(device_type, amp):
    """The dtype of Muon's Newton-Schulz matmuls for a run on device_type with autocast dtype amp (device.amp_dtype's
    choice, measured on a CPU): bf16 on GPUs and where the run trains in bf16, as torch.optim.Muon always does;
    fp32 on a CPU that trains in fp32 (bf16 matmuls measured slower there: emulated, up to 100x slower, they made
    Muon's step 6x the forward and backward, docs/training.md) and on MPS."""
    return torch.bfloat16 if amp == torch.bfloat16 or device_type == "cuda" else torch.float32


def orthogonalize(update, coefficients, steps, eps, dtype):
    """Muon's quintic Newton-Schulz iteration, its matmuls in dtype: update with its singular values pushed to
    roughly [0.5, 1.5] (the coefficients favour few steps over convergence to exactly 1), its singular vectors
    kept. Runs on the wide orientation, whose Gram matrix is the smaller one."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.to(dtype).T if tall else update.to(dtype)
    x = x / x.norm().clamp(min=eps)  # the Frobenius norm bounds the spectral one: singular values now <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (a + b G + c G^2) x
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in ns_dtype instead of always bf16: the same settings,
    state ("momentum_buffer" per matrix) and checkpoints, and with ns_dtype=torch.bfloat16 the same updates, bit
    for bit. ns_dtype is an attribute, not a group setting, so a checkpoint's param groups never overwrite it."""

    def __init__(self, params, ns_dtype=torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                rows, cols = p.shape
                if group["adjust_lr_fn"] == "match_rms_adamw":  # an update RMS of 0.2 * lr, whatever the shape
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:  # Keller Jordan's "original", torch's default
                    scale = math.sqrt(max(1, rows / cols))
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, on the unadjusted lr (as AdamW)
                p.add_(update, alpha=-(lr * scale))
        return loss


class MuonAdamW:
    """Two optimizers stepped as one (configure_optimizer's optimizer="muon"). torch.amp.GradScaler takes it as one
    optimizer: unscale_ walks its param_groups and step() runs only when no gradient of either overflowed, so an
    fp16 overflow skips both together. The checkpoint holds both states. muon_scale is Muon's peak learning rate
    over AdamW's, for set_lr; kept here rather than in the param groups, which load_state_dict would overwrite with
    a checkpoint's (a resumed run's muon_lr is the one it is given)."""

    def __init__(self, muon, adamw, muon_scale):
        self.muon, self.adamw, self.muon_scale = muon, adamw, muon_scale

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces each optimizer's group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def stage_at(cfg, it):
    """(block_size, batch_size) for iteration it of a run with cfg's seq_curriculum: the last stage started, else
    cfg's own (train.py; bench.py for the memory of each stage)."""
    T, B = cfg.block_size, cfg.batch_size
    for start, stage_T, stage_B in cfg.seq_curriculum:
        if it >= start:
            T, B = stage_T, stage_B
    return T, B


def get_lr(cfg, it):
    """Linear warmup to learning_rate, then down to min_lr at lr_decay_iters (0: max_iters), then min_lr. Down by a
    cosine, or (wsd) constant until the last decay_frac of the iterations and down by 1 - sqrt over those."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        # The stable phase is the same whatever max_iters, so a run can be extended (--resume --max_iters=N)
        # until its decay begins. 1 - sqrt rather than linear: it drops fast, then spends longer near min_lr,
        # and it beat a linear decay and matched cosine in Hägele et al. 2024 ("Scaling Laws and
        # Compute-Optimal Training Beyond Fixed Training Durations").
        decay_start = max(cfg.warmup_iters, decay_iters - round(cfg.decay_frac * decay_iters))
        if it < decay_start:
            return cfg.learning_rate
        progress = (it - decay_start) / (decay_iters - decay_start)
        return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def check_optimizer_settings(cfg):
    if cfg.muon_lr and not cfg.learning_rate:
        raise UserError("muon_lr is a multiple of learning_rate's schedule: set learning_rate > 0 (or muon_lr=0)")


def make_optimizer(model, cfg, device_type, amp, ckpt):
    """(optimizer, GradScaler) for cfg's optimizer settings; with cfg.resume, the states ckpt holds. The scaler is
    on for fp16 autocast only (amp: the autocast dtype): bf16 needs no scaling."""
    optimizer = configure_optimizer(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                    cfg.optimizer, cfg.muon_lr, newton_schulz_dtype(device_type, amp))
    scaler = torch.amp.GradScaler(device_type, enabled=amp == torch.float16)
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
    return optimizer, scaler


def clip_gradients(model, optimizer, scaler, grad_clip):
    """Unscale the gradients (fp16) and clip their norm to grad_clip (0: no clipping) -> the norm before
    clipping, as a tensor: reading it is the caller's one host sync."""
    scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))


def optimizer_step(optimizer, scaler, loss, grad_norm):
    """Apply the update unless the loss or the gradients are not finite -> whether it was applied. An fp16
    overflow is the GradScaler's business (its step skips the update and lowers the scale); any other
    non-finite value is skipped here, and the caller decides when too many in a row end the run."""
    applied = math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())
    if applied:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return applied


def save_run(path, model, model_args, tokenizer, config, optimizer, scaler, iter_num, lora=None, **extra):
    """A training run's checkpoint (checkpoints.py has the format): the weights and what builds them, the settings,
    and what resuming needs, plus the script's own extra entries. A LoRA run (lora: its record) stores only the
    adapters: a few percent of the weights."""
    weights = {"model": adapter_state(model), "lora": lora} if lora else {"model": model.state_dict()}
    save_checkpoint({**weights, "model_args": model_args, "tokenizer": tokenizer, "config": config,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num, **extra},
                    path)


def set_lr(optimizer, lr):
    """Set the learning rate of an optimizer from configure_optimizer -> lr: lr for AdamW, lr scaled to Muon's own
    peak for its matrices (the same schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * optimizer.muon_scale
    return lr


class MetricsLog:
    """One JSON object per line in out_dir/metrics.jsonl, and to wandb when given a project (wandb_log=True)."""

    def __init__(self, path, resume_iter=None, wandb_project=None, wandb_run_name="", config=None):
        self.path, self.wandb = path, None
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # the run's out_dir, for its checkpoints too
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
        kept = []
        if resume_iter is not None and os.path.isfile(path):  # drop what an interrupted run logged past its ckpt
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["iter"] < resume_iter]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, **record):
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])


NAN_ITERS_ENV = "NANOFORGE_NAN_ITERS"


def add_nan_hook(train_model, first_iter, grad_accum):
    """A test hook for the non-finite guard (optimizer_step): for the iterations listed in $NANOFORGE_NAN_ITERS, a
    forward hook turns the loss of every micro-step into NaN. Training passes are counted: grad_accum per iteration
    from first_iter on."""
    nan_iters = {int(i) for i in os.environ.get(NAN_ITERS_ENV, "").split(",") if i.strip()}
    if not nan_iters:
        return
    passes = itertools.count(first_iter * grad_accum)

    def poison(module, args, output):
        if module.training and next(passes) // grad_accum in nan_iters:  # not the evaluation's passes
            return output[0], output[1] * float("nan")
    train_model.register_forward_hook(poison)


def exit_if_stopped(stop, message, say=print):
    """After a run saved its last checkpoint: a Ctrl-C or SIGTERM exits 128 + the signal, saying message."""
    if stop.signum:
        say(message)
        sys.exit(128 + stop.signum)


def run_training(main, argv):
    """A training script's entry point: run_main, and a second Ctrl-C (StopFlag lets it through) ends the run at
    once, without saving."""
    try:
        run_main(main, argv)
    except KeyboardInterrupt:
        script = os.path.basename(sys.modules[main.__module__].__file__)
        sys.exit(f"{script}: interrupted twice: stopped without saving (the last ckpt.pt is intact)")
