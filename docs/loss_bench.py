"""
The measurements behind docs/performance.md's chunked-loss table: one training step (forward and backward) with this
checkout's model.py against another revision's, each in its own child process: peak memory (the child's ru_maxrss)
and the median step time, the two taking turns (so background load hits both alike).

    python docs/loss_bench.py                               # train.py's default model, GPT-2's vocabulary, 16 x 256
    python docs/loss_bench.py --before cb66e45 --rounds 3 --reps 3 --threads 2
    python docs/loss_bench.py --rounds 1 --reps 1 --threads 1   # memory only: one step each, one core
    python docs/loss_bench.py --chunk_mib 16                    # "after" with another chunk size (model.py: 64)

--before is a git revision (default cb66e45, the last commit before the chunked loss) or a model.py file, imported
from a temporary folder. Peak RSS counts the whole process (Python, torch, weights, gradients): the difference
between the two is the loss's; "at rest" is the RSS before the first step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
    """One model, one batch: a warm-up step, then args.reps timed ones -> JSON on stdout."""
    sys.path.insert(0, args.child)
    import torch
    import model as M
    from model import Forge, ModelConfig
    torch.set_num_threads(args.threads)
    if args.chunk_mib and hasattr(M, "ChunkedLoss"):
        M.ChunkedLoss.CHUNK_BYTES = args.chunk_mib << 20
    torch.manual_seed(0)
    model = Forge(ModelConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=4, n_head=4,
                              n_kv_head=2, n_embd=256)).train()
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    rest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(1 + args.reps):
        start = time.perf_counter()
        model(x, y)[1].backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate = model.estimate_memory(args.batch_size, args.block_size, 4) if hasattr(model, "estimate_memory") else {}
    print(json.dumps({"rest_mib": rest / 1024, "peak_mib": peak / 1024, "times": times[1:],
                      "estimate_mib": {k: v / 2**20 for k, v in estimate.items()}}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="cb66e45", help="git revision whose model.py is 'before'")
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="child processes per side, alternating")
    p.add_argument("--reps", type=int, default=3, help="timed steps per child (after one warm-up step)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--chunk_mib", type=int, default=0, help="the loss's fp32 logits per chunk (0: model.py's)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as before:
        with open(os.path.join(before, "model.py"), "wb") as f:  # a file's path, or a revision's model.py
            f.write(open(args.before, "rb").read() if os.path.isfile(args.before) else subprocess.run(
                ["git", "show", f"{args.before}:model.py"], cwd=ROOT, check=True, capture_output=True).stdout)
        flags = [f"--{k}={getattr(args, k)}" for k in ("vocab_size", "batch_size", "block_size", "reps", "threads",
                                                        "chunk_mib")]
        runs = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name, folder in (("before", before), ("after", ROOT)):
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run([sys.executable, __file__, f"--child={folder}", *flags], check=True,
                                     capture_output=True, text=True, env=env)
                runs[name].append(json.loads(out.stdout))
    print(f"model: 4 layers, d=256, heads 4/2, vocab {args.vocab_size}; micro-batch {args.batch_size} x "
          f"{args.block_size}, fp32, forward + backward; {args.threads} thread(s), {args.rounds}x{args.reps} steps each"
          + (f"; after: chunks of {args.chunk_mib} MiB" if args.chunk_mib else ""))
    for name, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        print(f"{name:6}  peak RSS {max(r['peak_mib'] for r in rs):7.0f} MiB (at rest {rs[0]['rest_mib']:.0f})  "
              f"step {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    print("estimate (after):", ", ".join(f"{k} {v:.0f} MiB" for k, v in runs["after"][0]["estimate_mib"].items()))


if __name__ == "__main__":
    main()
