"""model.py against references: naive attention, full recomputation, the whole batch's logits at once, closed-form
parameter counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import all_logits, greedy_ids
from model import ChunkedLoss, Forge, KVCache, ModelConfig, apply_rope, rope_tables, sample_next


def tiny_config(**overrides):
    args = dict(vocab_size=128, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    args.update(overrides)
    return ModelConfig(**args)


def naive_attention(attn, x, cos, sin):
    """Reference GQA: repeat each K/V head for its group of query heads, explicit causal mask."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, T, attn.n_head, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = scores.masked_fill(~causal, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_matches_naive_attention(n_kv_head):
    torch.manual_seed(0)
    model = Forge(tiny_config(n_kv_head=n_kv_head))
    attn = model.blocks[0].attn
    x = torch.randn(3, 40, 64)
    cos, sin = model.rope_cos[:40], model.rope_sin[:40]
    diff = (attn(x, [(cos, sin)]) - naive_attention(attn, x, cos, sin)).abs().max().item()
    assert diff < 1e-5


def test_rope_score_depends_only_on_distance():
    cfg = tiny_config(block_size=64)
    cos, sin = rope_tables(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    for m, n in [(5, 2), (10, 10), (3, 20)]:
        for shift in (1, 7, 30):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the distance


def greedy_by_recomputation(model, prompt, steps):
    idx = torch.tensor([prompt])
    ids, logits = [], []
    for _ in range(steps):
        last, _ = model(idx)
        logits.append(last[0, -1])
        ids.append(int(last[0, -1].argmax()))
        idx = torch.cat([idx, torch.tensor([[ids[-1]]])], dim=1)
    return ids, torch.stack(logits)


def greedy_with_cache(model, prompt, steps):
    cache = KVCache(model.config, 1, len(prompt) + steps, "cpu", torch.float32)
    idx = torch.tensor([prompt])
    ids, logits = [], []
    for _ in range(steps):
        last, _ = model(idx, caches=[cache])
        logits.append(last[0, -1])
        ids.append(int(last[0, -1].argmax()))
        idx = torch.tensor([[ids[-1]]])
    return ids, torch.stack(logits)


def varied_model(**overrides):
    """A random tiny model whose weights are scaled up: larger weights give varied (not constant) greedy
    continuations."""
    torch.manual_seed(0)
    model = Forge(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.mark.parametrize("emb_rank", [0, 16])
def test_kv_cache_decoding_matches_full_recomputation(emb_rank):
    model = varied_model(emb_rank=emb_rank, n_layer=3)
    prompt = [7, 3, 99, 12, 5]
    ref_ids, ref_logits = greedy_by_recomputation(model, prompt, 70)
    ids, logits = greedy_with_cache(model, prompt, 70)
    assert len(set(ref_ids)) > 5
    assert ids == ref_ids
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert greedy_ids(model, prompt, 70) == ref_ids


def test_forced_tokens_are_yielded_and_decoding_goes_on_from_them():
    """force(rows, tokens) replaces what a row sampled (a thinking budget closing a think block): the forced token
    is the one yielded and fed back, so what follows is the greedy continuation of the prompt and it."""
    model = varied_model(n_layer=2)
    prompt = [7, 3, 99, 12, 5]
    free = greedy_ids(model, prompt, 12)
    steps = []

    def force(rows, tokens):  # the 4th token of row 0 becomes 42
        steps.append(rows)
        return [42 if len(steps) == 4 else t for t in tokens]
    forced = greedy_ids(model, prompt, 12, force=force)
    assert free[3] != 42 and forced[:4] == free[:3] + [42] and steps[0] == [0]
    assert forced[4:] == greedy_ids(model, prompt + forced[:4], 8)


def test_kv_cache_holds_only_kv_heads():
    cfg = tiny_config(n_head=4, n_kv_head=1)
    cache = KVCache(cfg, 1, 50, "cpu", torch.float32)
    assert cache.k.shape == (cfg.n_layer, 1, 1, 50, cfg.head_dim)


def test_generate_stops_at_stop_id_and_at_block_size():
    torch.manual_seed(0)
    model = Forge(tiny_config(block_size=32)).eval()
    out = greedy_ids(model, [1, 2, 3], 1000, temperature=1.0)
    assert len(out) == 32 - 3  # never runs past the context window
    first = out[0]
    torch.manual_seed(0)
    model = Forge(tiny_config(block_size=32)).eval()
    assert greedy_ids(model, [1, 2, 3], 1000, temperature=1.0, stop_ids={first}) == [first]
    assert greedy_ids(model, list(range(32)), 10) == []


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])

    def pick(*args, **kwargs):
        return int(sample_next(logits, *args, **kwargs))

    assert pick(temperature=0) == 1
    g = torch.Generator().manual_seed(0)
    assert {pick(1.0, top_k=1, generator=g) for _ in range(50)} == {1}
    assert {pick(1.0, top_p=0.1, generator=g) for _ in range(50)} == {1}
    # p(1) ~ 0.66, p(2) ~ 0.24: top_p=0.8 keeps exactly those two
    assert {pick(1.0, top_p=0.8, generator=g) for _ in range(200)} == {1, 2}
    assert {pick(1.0, top_k=3, generator=g) for _ in range(300)} == {0, 1, 2}


def test_sampling_filters_apply_to_each_row():
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.5], [2.0, 0.5, 1.0, 3.0]])
    assert sample_next(rows, temperature=0).tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    for filters in (dict(top_k=1), dict(top_p=0.1)):
        assert {tuple(sample_next(rows, 1.0, generator=g, **filters).tolist()) for _ in range(50)} == {(1, 3)}
    # each row keeps its own top two: {1, 2} and {3, 0}
    samples = torch.stack([sample_next(rows, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(samples[:, 0].tolist()) == {1, 2} and set(samples[:, 1].tolist()) == {3, 0}


def batch_prompts(n, length=6, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(model, prompts, max_new_tokens, **kwargs):
    """model.generate's steps collected into one list of token ids per prompt."""
    out = [[] for _ in prompts]
    for step in model.generate(prompts, max_new_tokens, **kwargs):
        for row, token in step.items():
            out[row].append(token)
    return out


def test_batched_greedy_decoding_matches_one_prompt_at_a_time():
    model = varied_model()
    prompts = batch_prompts(4)
    free = [greedy_ids(model, p, 40) for p in prompts]
    stop = {free[0][3], free[1][15]}  # rows stop at different steps (or run to max_new_tokens)
    expected = [greedy_ids(model, p, 40, stop_ids=stop) for p in prompts]
    assert len({len(e) for e in expected}) > 1 and len(set(free[0])) > 5
    assert decode(model, prompts, 40, temperature=0, stop_ids=stop) == expected
    assert decode(model, torch.tensor(prompts[1:2] * 5), 40, temperature=0, stop_ids=stop) == [expected[1]] * 5


def test_generate_drops_finished_rows():
    model = varied_model()
    prompts = batch_prompts(5)
    stop = {decode(model, prompts, 1, temperature=0)[2][0]}  # row 2 stops on its first token
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].size(0)))
    out = decode(model, prompts, 30, temperature=0, stop_ids=stop)
    assert len(out[2]) == 1 and max(map(len, out)) > 1
    assert all(r.index(t) == len(r) - 1 for r in out for t in stop & set(r))  # nothing after a stop id
    # forward s computes token s of the rows still running, i.e. those with more than s tokens
    assert sizes == [sum(len(r) > s for r in out) for s in range(len(sizes))]
    assert sizes[0] == 5 and sizes[1] < 5


def test_batched_sampling_is_reproducible():
    model = varied_model()
    prompts = batch_prompts(1) * 6  # a GRPO group: G copies of one prompt

    def sample(**kwargs):
        return decode(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(0), **kwargs)

    out = sample()
    assert out == sample()
    assert len({tuple(r) for r in out}) > 1  # each copy draws its own reply
    greedy_out = decode(model, prompts, 20, temperature=0)
    assert sample(top_k=1) == greedy_out and sample(top_p=1e-6) == greedy_out


def test_batched_generate_stops_at_max_new_tokens_and_block_size():
    torch.manual_seed(0)
    model = Forge(tiny_config(block_size=32)).eval()
    prompts = batch_prompts(3, length=3)
    assert [len(r) for r in decode(model, prompts, 7)] == [7, 7, 7]
    assert [len(r) for r in decode(model, prompts, 1000)] == [32 - 3] * 3  # never past the window
    assert decode(model, prompts, 0) == [[], [], []]
    assert decode(model, batch_prompts(2, length=32), 10) == [[], []]


def test_generations_with_their_own_caches_decode_together_as_they_would_alone():
    """Continuous batching (serve.py): generations of different prompt lengths, each with its own KV cache, join at
    different steps and leave after different numbers of tokens, sharing one forward pass a step (a list of caches,
    each row at its own position, attending to its own keys): each gets the tokens it gets alone (generate), greedy
    or sampled with its own seeded generator."""
    model = varied_model()
    joins = [(0, 3, 30), (0, 9, 12), (4, 5, 20), (7, 14, 25), (7, 6, 9), (16, 5, 6)]  # (step, prompt length, tokens)
    runs = [dict(prompt=batch_prompts(1, length=n, seed=i)[0], start=s, tokens=[], steps=steps,
                 sampling=dict(temperature=1.0, top_k=50) if i % 2 else dict(temperature=0)) for i, (s, n, steps) in
            enumerate(joins)]
    alone = [greedy_ids(model, r["prompt"], r["steps"], generator=torch.Generator().manual_seed(i), **r["sampling"])
             for i, r in enumerate(runs)]
    for i, r in enumerate(runs):
        r["generator"] = torch.Generator().manual_seed(i)

    def pick(r, logits):
        r["tokens"].append(int(sample_next(logits[:, -1].float(), generator=r["generator"], **r["sampling"])))
    widths = []
    for step in range(40):
        decoding = [r for r in runs if r["start"] < step and len(r["tokens"]) < r["steps"]]
        if decoding:
            idx = torch.tensor([[r["tokens"][-1]] for r in decoding])
            logits, _ = model(idx, caches=[r["cache"] for r in decoding])
            for r, row in zip(decoding, logits.split(1)):
                pick(r, row)
        for r in (r for r in runs if r["start"] == step):  # joining: the prompt fills the row's own cache
            r["cache"] = KVCache(model.config, 1, len(r["prompt"]) + r["steps"], "cpu", torch.float32)
            pick(r, model(torch.tensor([r["prompt"]]), caches=[r["cache"]])[0])
        widths.append(len(decoding))
    assert [r["tokens"] for r in runs] == alone and max(widths) == 5
    assert len(set(alone[0])) > 5 and len(set(alone[3])) > 5


def test_per_token_losses_are_the_mean_losss_terms():
    """reduction="none" gives each position's -log p(target) (rl.py's log-probabilities), 0 where ignored."""
    model = varied_model()
    idx = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(3))
    targets = idx.roll(-1, dims=1)
    targets[0, :5] = -1
    _, mean = model(idx, targets)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (3, 20) and (per_token[0, :5] == 0).all()
    assert torch.allclose(per_token.sum() / (targets != -1).sum(), mean)
    logp = torch.log_softmax(all_logits(model, idx).float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(per_token[targets != -1], -logp[targets != -1], atol=1e-5)


def test_masked_targets_cost_nothing():
    torch.manual_seed(0)
    model = Forge(tiny_config())
    idx = torch.randint(0, 128, (2, 20))
    targets = idx.clone()
    targets[:, :10] = -1
    _, loss = model(idx, targets)
    expected = F.cross_entropy(all_logits(model, idx)[:, 10:].reshape(-1, 128), idx[:, 10:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_output_head_is_tied_to_the_embedding():
    torch.manual_seed(0)
    model = Forge(tiny_config())
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)  # no separate output matrix exists
    hidden = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("x", o))
    idx = torch.randint(0, 128, (1, 8))
    logits, _ = model(idx)
    assert torch.allclose(logits, hidden["x"][:, -1:] @ model.tok_emb.weight.T, atol=1e-6)
    logits.sum().backward()  # the output path's gradient lands in the embedding's storage
    assert model.tok_emb.weight.grad.abs().sum() > 0
    hook.remove()
    model.zero_grad()
    model(idx, idx)[1].backward()  # and the loss's: every token's row (its softmax reaches them all), not only
    assert (model.tok_emb.weight.grad.abs().sum(1) > 0).sum() == 128  # the 8 rows the input looks up


def whole_batch_loss(model, idx, targets, reduction="mean"):
    """The loss as it was before chunking: every position's fp32 logits at once, through F.cross_entropy."""
    loss = F.cross_entropy(all_logits(model, idx).float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def loss_and_grads(model, loss_fn, reduction, weights):
    """loss_fn()'s loss and every parameter's gradient ("none": of the per-position losses weighted by weights, an
    arbitrary gradient for each position, as rl.py's advantages give)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss if reduction == "mean" else (loss * weights).sum()).backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same(a, b, rtol):
    """Two (loss, gradients) pairs agree: each tensor to rtol of its largest magnitude."""
    for name, x, y in [("loss", a[0], b[0]), *((name, a[1][name], b[1][name]) for name in a[1])]:
        assert (x - y).abs().max() <= rtol * y.abs().max(), name


@pytest.mark.parametrize("emb_rank", [0, 16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_loss_matches_the_whole_batchs(emb_rank, reduction, monkeypatch):
    """The loss a chunk of rows at a time (7 of the 120 rows here: the last chunk is short) against the whole batch's
    fp32 logits at once: the same loss and the same gradient for every parameter, with masked targets, the tied
    embedding, and a factorized one. Without gradients (evaluation) the same loss too."""
    monkeypatch.setattr(ChunkedLoss, "CHUNK_BYTES", 4 * 128 * 7)  # 7 rows of 128 fp32 logits
    model = varied_model(emb_rank=emb_rank).train()
    idx = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[0, :9], targets[2, 30:] = -1, -1
    weights = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    chunked = loss_and_grads(model, lambda: model(idx, targets, reduction=reduction)[1], reduction, weights)
    whole = loss_and_grads(model, lambda: whole_batch_loss(model, idx, targets, reduction), reduction, weights)
    assert_same(chunked, whole, 1e-5)
    with torch.no_grad():
        assert_same((model(idx, targets, reduction=reduction)[1], {}), whole, 1e-6)


def test_chunked_loss_under_autocast_and_compiled(monkeypatch):
    """Under bf16 autocast the chunked loss and its gradients match the whole batch's to bf16's precision; traced
    by torch.compile (dynamo and AOTAutograd, what train.py's compile hands to Inductor) they are the eager ones."""
    monkeypatch.setattr(ChunkedLoss, "CHUNK_BYTES", 4 * 128 * 7)
    model = Forge(tiny_config()).train()
    idx = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.where(torch.arange(40) < 9, -1, idx.roll(-1, dims=1))
    with torch.autocast("cpu", torch.bfloat16):
        chunked = loss_and_grads(model, lambda: model(idx, targets)[1], "mean", None)
        whole = loss_and_grads(model, lambda: whole_batch_loss(model, idx, targets), "mean", None)
    assert_same(chunked, whole, 3e-2)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    assert_same(loss_and_grads(model, lambda: compiled(idx, targets)[1], "mean", None),
                loss_and_grads(model, lambda: model(idx, targets)[1], "mean", None), 1e-6)


def test_no_bias_anywhere():
    model = Forge(tiny_config(emb_rank=8))
    assert not any("bias" in name for name, _ in model.named_parameters())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny_config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="divisible by n_head"):
        tiny_config(n_embd=66, n_head=4)


def closed_form_params(V, L, d, h, kv, ffn, r=0):
    hd = d // h
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d
    layer = attention + 3 * d * ffn + 2 * d  # + two RMSNorm weights
    embedding = V * r + r * d if r else V * d
    return embedding + L * layer + d  # + final norm


PRESETS = {  # README.md's model family, GPT-2 vocabulary padded to 50304
    "Forge-1 Nano": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, ffn_hidden=2048, block_size=1024),
    "Forge-1 Mini": dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, block_size=2048),
    "Yxanul 177M": dict(n_layer=28, n_embd=768, n_head=12, n_kv_head=2, ffn_hidden=2048, block_size=4096, emb_rank=128),
    "Cogni 168M": dict(n_layer=12, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, block_size=512),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts(name):
    p = PRESETS[name]
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = Forge(ModelConfig(vocab_size=50304, **p))
    counts = model.num_params()
    expected = closed_form_params(50304, p["n_layer"], p["n_embd"], p["n_head"], p["n_kv_head"],
                                  p["ffn_hidden"], p.get("emb_rank", 0))
    print(f"{name}: {counts['total']:,} parameters ({counts['embedding']:,} embedding)")
    assert counts["total"] == expected
    if name == "Yxanul 177M":
        assert round(counts["total"] / 1e6, 1) == 177.2


def test_default_ffn_hidden_is_8_thirds_rounded_to_64():
    assert ModelConfig(n_embd=768).ffn_hidden == 2048
    assert ModelConfig(n_embd=1000, n_head=8, n_kv_head=8).ffn_hidden == 2688


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Forge(tiny_config(n_embd=64, block_size=32))
    idx = torch.randint(0, 128, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Forge(tiny_config())
    ckpt = Forge(tiny_config(grad_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 128, (2, 24))
    for model in (plain, ckpt):
        model(idx, idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad - b.grad).abs().max().item() < 1e-6, name


def test_flops_per_token_against_torchs_flop_counter():
    """flops_per_token (6N plus 12 * layers * d * T for attention, PaLM's count) against the FLOPs torch counts
    in a training step. Attention runs as SDPA's math kernel, whose matmuls the counter sees (the fused CPU
    kernel it does not count). The formula's only surplus: it counts the norm gains as matmul weights."""
    model = Forge(tiny_config(n_layer=3, block_size=96))
    idx = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    norm_gains = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token(96) == counter.get_total_flops() / idx.numel() + 6 * norm_gains


def test_mfu_is_achieved_over_peak():
    model = Forge(tiny_config())
    assert model.estimate_mfu(1000, 96, 2.0, model.flops_per_token(96) * 1000) == pytest.approx(0.5)
