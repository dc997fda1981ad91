"""
Knowledge distillation: a student learns a teacher's token distributions alongside the data (train.py teacher=...).
"""
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint
from common import UserError
from tokenizer import tokenizer_name


def load_teacher(path, meta, device, compile=False):
    """The teacher checkpoint's model, frozen, in eval mode on device (None for no path), compiled where the student
    is (its forward pass: 2.3x faster on a CPU, docs/adapt.md). It must read the data's tokens as the student does
    (meta: the prepared data's meta.json): distillation compares distributions over one vocabulary."""
    if not path:
        return None
    teacher, ckpt = load_checkpoint(path, device)
    theirs, ours = tokenizer_name(ckpt.get("tokenizer")), tokenizer_name(meta["tokenizer"])
    if theirs != ours or teacher.config.vocab_size != meta["vocab_size"]:
        raise UserError(f"teacher {path} uses the {theirs} tokenizer ({teacher.config.vocab_size} tokens), the data "
                        f"{ours} ({meta['vocab_size']}): distill on data prepared with the teacher's tokenizer")
    teacher.requires_grad_(False)
    return torch.compile(teacher, dynamic=False) if compile else teacher


def distillation_loss(model, teacher, x, y, coef, temperature):
    """Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): (1 - coef) x
    the cross-entropy of the data's targets y + coef x T^2 KL(teacher || student), both distributions softened by
    T = temperature, over the supervised tokens (y != -1) alone. T^2 keeps the soft part's gradients at the scale
    of the hard part's whatever T. Every supervised position's logits are materialized (model.py's chunked loss
    never does that): tokens x vocabulary floats, for both models; fine for the byte tokenizer's 320 tokens, large
    for GPT-2's 50,304 (lower batch_size)."""
    keep = y != -1
    student = model(x, all_logits=True)[0][keep].float()
    with torch.no_grad():
        soft_targets = (teacher(x, all_logits=True)[0][keep].float() / temperature).log_softmax(-1)
    data = F.cross_entropy(student, y[keep])
    kl = F.kl_div((student / temperature).log_softmax(-1), soft_targets, log_target=True, reduction="batchmean")
    return (1 - coef) * data + coef * temperature ** 2 * kl
