"""
The measurements behind docs/serving.md's speed table: serve.py as a user starts it (a subprocess), one streaming
client at a time against eight at once, each reply max_tokens long: total tokens/s, and the time to first token
(the first content chunk after the request is sent), median and 90th percentile.

    python docs/serve_bench.py                          # the default model's shape, random weights, 96-token replies
    python docs/serve_bench.py --ckpt out/best.pt       # a trained checkpoint (replies may end before max_tokens)
    python docs/serve_bench.py --serve /tmp/old/serve.py --rounds 3   # another checkout's server, three rounds

Without --ckpt the checkpoint is train.py's default shape (4 layers, 256 wide, 4 heads, 2 KV heads, byte tokenizer,
256-token context) with random weights: speed does not depend on training. Its special tokens' embedding rows are
zero and the byte rows large, so no reply samples an end of turn and every reply runs to max_tokens (checked).
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is 478 + 256?", "Hi!", "Which is larger, 385 or 358?", "How many s in mississippi?",
             "What is 12+30?", "Sort 5, 3, 9, 1", "Count to ten", "What is 47 + 38? Think it through."]


def random_checkpoint(path):
    """The default model's shape, random weights that never end a reply (see the docstring) -> path."""
    sys.path.insert(0, ROOT)
    import dataclasses

    import torch
    from checkpoints import save_checkpoint
    from model import Forge, ModelConfig
    torch.manual_seed(0)
    model = Forge(ModelConfig(vocab_size=320, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256))
    with torch.no_grad():
        model.tok_emb.weight[:256] *= 15  # byte logits spread ~5 wide: a special token (logit 0) is never sampled
        model.tok_emb.weight[256:] = 0
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "tokenizer": "byte",
                     "config": {}}, path)
    return path


def one_reply(url, question, max_tokens, seed):
    """A streamed reply -> (seconds to its first content chunk, completion tokens)."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "seed": seed,
                       "stream": True, "stream_options": {"include_usage": True}, "reasoning": "off"}).encode()
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    res, first, tokens = conn.getresponse(), None, None
    assert res.status == 200, res.read()
    for line in res:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - t0
            tokens = event["usage"]["completion_tokens"] if event.get("usage") else tokens
    conn.close()
    return first, tokens


def run_clients(url, clients, per_client, max_tokens):
    """clients threads, each sending per_client replies one after another -> (tokens/s in all, [TTFT], [tokens])."""
    results, lock = [], threading.Lock()

    def client(c):
        for r in range(per_client):
            out = one_reply(url, QUESTIONS[(c + r) % len(QUESTIONS)], max_tokens, seed=1000 * c + r)
            with lock:
                results.append(out)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return sum(n for _, n in results) / seconds, [f for f, _ in results], [n for _, n in results]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--ckpt", help="checkpoint to serve (default: a random one of the default shape)")
    parser.add_argument("--serve", default=os.path.join(ROOT, "serve.py"), help="the serve.py to run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replies", type=int, default=3, help="replies per client per round")
    parser.add_argument("--max_tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (one client, then all of them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(os.path.join(tmp, "random.pt"))
        server = subprocess.Popen([sys.executable, args.serve, "--ckpt", ckpt, "--port", "0", "--device", "cpu",
                                   "--temperature", "0.6"], cwd=os.path.dirname(os.path.abspath(args.serve)),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            url = re.search(r" at (http://\S+/) ", server.stdout.readline().decode())[1]
            one_reply(url, "warm up", 8, 0)
            rows = {1: [], args.clients: []}
            for _ in range(args.rounds):  # taking turns, so background load hits both alike
                for clients in rows:
                    rows[clients].append(run_clients(url, clients, args.replies * args.clients // clients,
                                                      args.max_tokens))
        finally:
            server.terminate()
            server.wait()
    short = sum(n != args.max_tokens for runs in rows.values() for _, _, counts in runs for n in counts)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; replies of {args.max_tokens} tokens"
          + (f" ({short} replies ended early)" if short else ""))
    print("clients | tokens/s (each round) | time to first token: median, p90")
    for clients, runs in rows.items():
        ttft = sorted(f for _, firsts, _ in runs for f in firsts)
        print(f"{clients:7} | {', '.join(f'{rate:.0f}' for rate, _, _ in runs):21} | "
              f"{1000 * statistics.median(ttft):.0f} ms, {1000 * ttft[int(0.9 * (len(ttft) - 1))]:.0f} ms")
    base, many = (statistics.median(rate for rate, _, _ in runs) for runs in rows.values())
    print(f"{args.clients} clients / 1 client: {many / base:.2f}x the tokens/s (medians)")


if __name__ == "__main__":
    main()
