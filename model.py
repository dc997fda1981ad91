"""
The Forge transformer: a LLaMA-style decoder in one file, read top to bottom.

    config -> RMSNorm -> rotary embeddings -> grouped-query attention -> SwiGLU MLP -> block -> chunked loss
           -> model -> generation (one batched loop, KV cache) -> FLOPs and memory -> sampling

Pre-norm blocks, no biases, input and output embeddings tied. The layout and the maths are those of
Hugging Face's LlamaForCausalLM, so export.py only has to rename tensors.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 50304      # padded to a multiple of 64 for fast matmuls
    block_size: int = 1024       # context length
    n_layer: int = 12
    n_head: int = 12             # query heads
    n_kv_head: int = 4           # key/value heads, shared by n_head // n_kv_head query heads each
    n_embd: int = 768
    ffn_hidden: int = 0          # 0 = 8/3 * n_embd rounded up to a multiple of 64
    emb_rank: int = 0            # 0 = full embedding; r > 0 = factorized E = A (V x r) @ B (r x d)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        self.ffn_hidden = self.ffn_hidden or 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight. F.rms_norm accumulates in fp32 even for half-precision inputs (the mean of
    squares would underflow in fp16), and is one call instead of eight: decoding is bound by op overhead."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(cfg):
    """cos/sin of every position's rotation angles, computed once. Rotate-half (GPT-NeoX / HF Llama)
    layout: the first and second halves of each head form the rotated pairs."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its positions' angles; cos/sin are (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # the rotated half


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for one generation. It holds only
    n_kv_head heads per layer: that is grouped-query attention's memory saving."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layer)]  # per-layer views, made once
        self.pos = 0  # number of tokens already cached

    def keep(self, rows):
        """Keep only these batch rows (a LongTensor of indices): finished generations leave the batch."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.layers = [(self.k[i], self.v[i]) for i in range(len(self.layers))]

    def update(self, layer, k, v):
        """Store this step's k, v (B, n_kv_head, T, head_dim); return all keys and values so far."""
        k_all, v_all = self.layers[layer]
        end = self.pos + k.size(2)
        k_all[:, :, self.pos:end], v_all[:, :, self.pos:end] = k, v
        return k_all[:, :, :end], v_all[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, ropes, caches=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # Each cache's rows turn by their own positions and attend to their own keys: replies of different lengths
        # decode together (serve.py). A prompt (T > 1) attends causally, a new token to everything cached
        rows, ys = [c.k.size(1) for c in caches] if caches else [B], []
        for (cos, sin), cache, qc, kc, vc in zip(ropes, caches or [None], q.split(rows), k.split(rows), v.split(rows)):
            qc, kc = apply_rope(qc, cos, sin), apply_rope(kc, cos, sin)
            kc, vc = cache.update(self.layer, kc, vc) if cache else (kc, vc)
            ys.append(F.scaled_dot_product_attention(qc, kc, vc, is_causal=T > 1, enable_gqa=True,  # GQA: no copies
                                                     dropout_p=self.dropout if self.training else 0.0))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ropes, caches=None):
        x = x + self.drop(self.attn(self.attn_norm(x), ropes, caches))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class ChunkedLoss(torch.autograd.Function):
    """Summed cross-entropy of logits x @ weight.T against targets (-1: ignored), `rows` rows at a time: never a
    batch's fp32 logits (12 bytes x vocabulary per token). With grads, forward computes each chunk's gradients
    while its logits exist and backward only scales them: nothing kept per logit, nothing recomputed."""
    CHUNK_BYTES = 2**26  # one chunk's fp32 logits: 64 MiB (docs/performance.md measures the choice)

    @staticmethod
    def forward(ctx, x, weight, targets, rows, grads):
        total, (grad_x, grad_w) = 0, (torch.empty_like(x), torch.zeros_like(weight)) if grads else (None, None)
        for i in range(0, len(x), rows):
            xc, tc, keep = x[i:i + rows], targets[i:i + rows, None].clamp(min=0), targets[i:i + rows, None] != -1
            logp = F.linear(xc, weight).float().log_softmax(-1)
            total -= logp.gather(1, tc).mul_(keep).sum()
            if grads:  # d loss / d logits = softmax - one-hot on the rows that count, 0 on the others
                g = logp.exp_().scatter_add_(1, tc, -keep.float()).mul_(keep).to(xc.dtype)
                grad_x[i:i + rows] = g @ weight
                grad_w += g.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad):  # scaled in place: no copy (a second backward through the graph raises)
        grad_x, grad_w = ctx.saved_tensors
        return grad_x.mul_(grad), grad_w.mul_(grad), None, None, None


class Forge(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_rank or cfg.n_embd)
        if cfg.emb_rank:  # Yxanul-style factorized embedding: V x r table, then an r -> d projection
            self.emb_proj = nn.Linear(cfg.emb_rank, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        for name, table in zip(("rope_cos", "rope_sin"), rope_tables(cfg)):
            self.register_buffer(name, table, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.emb_rank:  # std 1/sqrt(r) keeps the product A @ B at the usual 0.02 scale
            nn.init.normal_(self.emb_proj.weight, mean=0.0, std=cfg.emb_rank ** -0.5)

    def num_params(self):
        """Total parameters (tied weights counted once) and how many of them are the embedding."""
        embedding = self.tok_emb.weight.numel() + (self.emb_proj.weight.numel() if self.config.emb_rank else 0)
        return {"total": sum(p.numel() for p in self.parameters()), "embedding": embedding}

    @property
    def device(self):
        return self.rope_cos.device

    def forward(self, idx, targets=None, caches=None, reduction="mean", all_logits=False):
        """idx (B, T) ids -> (logits, loss). No targets: the last position's logits (B, 1, V), all generation needs
        (caches: KV caches whose rows in turn are idx's), or every position's with all_logits. Targets: the loss alone,
        chunk by chunk, -1 ignored; "mean" averages the rest, "none" gives each position's (B, T), 0 where ignored."""
        B, T = idx.shape
        starts = [c.pos for c in caches] if caches else [0]  # where each cache's rows are
        if max(starts) + T > self.config.block_size:
            raise ValueError(f"sequence of {max(starts) + T} tokens exceeds block_size={self.config.block_size}")
        ropes = [(self.rope_cos[p:p + T], self.rope_sin[p:p + T]) for p in starts]  # views of the tables: no copies
        x = self.tok_emb(idx)
        x = self.drop(self.emb_proj(x) if self.config.emb_rank else x)
        recompute = self.config.grad_checkpoint and self.training  # each block again in backward: less memory
        for block in self.blocks:
            x = checkpoint(block, x, ropes, use_reentrant=False) if recompute else block(x, ropes, caches)
        for c in caches or []:
            c.pos += T
        x = self.norm(x) if targets is not None or all_logits else self.norm(x)[:, -1:, :]
        if self.config.emb_rank:  # the tied output matrix: E^T = B^T @ A^T, applied right to left
            x = F.linear(x, self.emb_proj.weight.t())
        if targets is None:
            return F.linear(x, self.tok_emb.weight), None
        x, t, w = x.flatten(0, 1), targets.flatten(), self.tok_emb.weight
        rows = max(1, ChunkedLoss.CHUNK_BYTES // (4 * w.size(0)))
        if reduction == "none":  # each position has its own gradient: backward recomputes each chunk's logits
            def losses(a, b):  # -log p(target) of each row, 0 where ignored
                return F.cross_entropy(F.linear(a, w).float(), b, ignore_index=-1, reduction="none")
            chunks = [checkpoint(losses, a, b, use_reentrant=False) for a, b in zip(x.split(rows), t.split(rows))]
            return None, torch.cat(chunks).view(B, T)
        return None, ChunkedLoss.apply(x, w, t, rows, torch.is_grad_enabled()) / (t != -1).sum()

    @torch.inference_mode()  # no_grad without autograd's version counters: faster small-model decoding
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, force=None):
        """Decode B prompts of equal length together, (B, T) ids ([prompt] for one), yielding after every step {row:
        new token id} for the rows still generating. The prompts fill the KV cache once; later steps feed only the
        newest tokens. A row stops after a token in stop_ids (yielded: the caller sees why), after max_new_tokens or
        at a full context (block_size), and leaves the batch with its cache rows. Rows need no padding: G copies of
        one prompt (a GRPO group), or prompts grouped by length (replies.py). force(rows, tokens) may change the
        sampled tokens of rows (the caller's numbers): replies.py closes a think block out of budget."""
        idx = torch.as_tensor(prompts, dtype=torch.long, device=self.device)
        B, T = idx.shape
        max_len = min(self.config.block_size, T + max_new_tokens)
        if T >= max_len:
            return
        dev = idx.device.type  # the cache's dtype: autocast's when it is on, else the weights'
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.tok_emb.weight.dtype
        cache = KVCache(self.config, B, max_len, idx.device, dtype)
        live = list(range(B))  # the row of the caller's batch that each row of the running batch belongs to
        for _ in range(max_len - T):
            logits, _ = self(idx, caches=[cache])
            next_ids = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            tokens = next_ids.tolist()  # one device sync per step
            if force and (forced := force(live, tokens)) != tokens:
                tokens, next_ids = forced, torch.tensor(forced, device=idx.device)
            yield dict(zip(live, tokens))
            keep = [i for i, token in enumerate(tokens) if token not in stop_ids]
            if not keep:
                return
            if len(keep) < len(live):
                rows = torch.tensor(keep, device=idx.device)
                cache.keep(rows)
                next_ids, live = next_ids[rows], [live[i] for i in keep]
            idx = next_ids.view(-1, 1)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores,
        12 * layers * d_model * seq_len (PaLM appendix B)."""
        return 6 * self.num_params()["total"] + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def estimate_mfu(self, tokens_per_iter, seq_len, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s as a fraction of the hardware peak you pass in."""
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    def activation_bytes(self, act_bytes):
        """(saved, transient) activation bytes per token of a training step: what autograd keeps from the forward
        pass for backward, and what backward allocates on top (with checkpointing, the block being recomputed).
        act_bytes is 2 under autocast, 4 in fp32. Tests check `saved` against autograd's saved tensors."""
        cfg, s = self.config, act_bytes
        d, f, h, kv = cfg.n_embd, cfg.ffn_hidden, cfg.n_head, cfg.n_kv_head * cfg.head_dim
        # per block: q/k/v/out/MLP tensors in the activation dtype, fp32 copies around the two RMSNorms (none
        # in fp32, where .float() is a no-op), and a few per-row statistics (softmax log-sum-exp per head, rms)
        block = s * (7 * d + 4 * f + 2 * kv) + (16 if s == 2 else 4) * d + 4 * h + 8
        ends = 12 * d + 12  # embedding, final norm, and the loss's gradient for its input: nothing per logit
        saved = ends + cfg.n_layer * (4 * d if cfg.grad_checkpoint else block)  # checkpointing: fp32 block inputs
        return saved, block if cfg.grad_checkpoint else 0

    def estimate_memory(self, batch_size, block_size, act_bytes):
        """Peak bytes per device of a training step: fp32 weights, gradients and AdamW's two moments of the trained
        ones (LoRA: the adapters), autocast's weight copies, batch_size x block_size tokens' activations, and the
        loss's: its output matrix's gradient (computed in forward, kept for backward) and one chunk's fp32 logits."""
        n, trained = self.num_params()["total"], sum(p.numel() for p in self.parameters() if p.requires_grad)
        saved, transient = self.activation_bytes(act_bytes)
        rows = min(batch_size * block_size, max(1, ChunkedLoss.CHUNK_BYTES // (4 * self.config.vocab_size)))
        return {"weights": 4 * n, "grads": 4 * trained, "optimizer": 8 * trained,
                "weight copies": n * act_bytes if act_bytes < 4 else 0,
                "activations": batch_size * block_size * (saved + transient),
                "loss": 4 * self.tok_emb.weight.numel() + 8 * rows * self.config.vocab_size}


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token id of each row of logits (B, V) -> (B,) ids: greedy at temperature 0, else sample
    from the softmax restricted to the top_k tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # tokens only needed after the mass is reached
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).view(-1)
