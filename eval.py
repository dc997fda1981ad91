"""
Evaluate a checkpoint: what it has learned, and what thinking buys.

    python eval.py                                   # out/best.pt (else out/ckpt.pt) on data/reasoning
    python eval.py --ckpt out/best.pt --data data/reasoning --json report.json
    python eval.py --gsm8k gsm8k_test.jsonl --items 0   # only GSM8K (jsonl of {question, answer})

1. Validation loss and perplexity on DATA/val.bin, counting only the tokens train.py learns (val_mask.bin).
2. The reasoning score: exact-match accuracy on held-out problems of the built-in tasks (tasks.py), with
   thinking forced on (<|think|>) and forced off (<|no_think|>), the mean thinking length and tokens/s.
   With --gsm8k, the same for a GSM8K-style file, scored on the final number.
3. The showcase prompts, each shown with whether the model thought, its thinking, answer, tokens and time.
Everything goes into one JSON report (--json) for tracking runs, and a readable table on screen.
Decoding is greedy by default, so a report is reproducible.
"""
import argparse
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from common import UserError, robust_stdio, run_main, save_json
from data import check_tokenizer, get_batch, load_data, read_gsm8k
from inference import add_model_args, add_sampling_args, checkpoint_path, load_model, make_generator, sampling_kwargs
from replies import generate_replies, generate_reply, is_correct
from tasks import EXTRA_TASKS, TASK_MAKERS, TASKS, difficulty_of, heldout_items
from tokenizer import render_prompt

SHOWCASE = [  # the seed designs' five prompts, then five that probe the built-in tasks and the model's identity
    "What is 15 * 23?",
    "If a train travels at 60 mph for 2.5 hours, how far does it go?",
    "Write a haiku about programming",
    "What is the capital of France?",
    "Sort these numbers: 5, 2, 8, 1, 9",
    "Sort these numbers: 45, 3, 67, 12, 9",  # what people type: small numbers, mixed sizes (issue #25)
    "Sort these numbers: 8, 3, 5, 1, 9",
    "What is 478 + 256?",
    "How many times does the letter r appear in strawberry?",
    "Who are you?",
]

# ----------------------------------------------------------------------------- validation loss


def read_val(data_dir, model, enc):
    """meta.json and the val split (tokens, mask or None, document index or None) of a prepare.py folder, checked
    against the model. The index is read where prepare.py wrote one."""
    meta, bins = load_data(data_dir, ("val",), documents=os.path.isfile(os.path.join(data_dir, "val_index.bin")))
    check_tokenizer(meta, enc.name, data_dir)
    tokens, mask, index = bins["val"]
    chunk = 1 << 22  # 8 MB at a time: the val.bin of a big corpus may not fit in memory at once
    top = max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)
    if top >= model.config.vocab_size:
        raise UserError(f"{data_dir}/val.bin holds token ids beyond the model's vocabulary: it was prepared for "
                        "another model")
    return meta, tokens, mask, index


def window_starts(n, T, index=None):
    """Where consecutive windows of T tokens start in the first n + 1 tokens, each token in at most one window.
    With a document index each window starts at a document's <|bos|> (the first one the window before has not
    reached), as train.py's windows="documents" read: windows starting anywhere would cut documents off from their
    prompts, and score answers the model never has to give without them."""
    if index is None:
        return list(range(0, n - T + 1, T)) if T > 0 else []
    bos, starts, k = np.asarray(index[:]), [], 0
    while k < len(bos) and bos[k] + T <= n:
        starts.append(int(bos[k]))
        k = int(np.searchsorted(bos, bos[k] + T))
    return starts


@torch.no_grad()
def val_loss(model, tokens, mask, batch_size, max_tokens, index=None):
    """Mean cross-entropy per predicted token over the val tokens, read as consecutive windows of the model's
    context (window_starts: the same every run). With a mask only the targets train.py learns count, as in
    training (get_batch). Returns (loss, number of tokens scored); no tokens: (nan, 0)."""
    n = min(len(tokens) - 1, max_tokens)
    T = min(model.config.block_size, n)
    starts = window_starts(n, T, index)
    device = model.device
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(tokens, mask, starts[i:i + batch_size], T)
        scored = int((y != -1).sum())
        if scored == 0:
            continue  # a window of prompt tokens only: nothing to learn there, and its mean loss is nan
        _, loss = model(x.to(device), y.to(device))
        total, count = total + loss.item() * scored, count + scored
    return (total / count if count else math.nan), count


# ----------------------------------------------------------------------------- reasoning score


def reasoning_score(model, enc, items, sampling, generator, batch_size=64, modes=("on", "off", "auto")):
    """Answer every item in each mode: thinking forced on, forced off, and auto (the model chooses) -> raw counts
    {task: {mode: tally}}. Prompts of equal length are answered together (replies.generate_replies)."""
    tally = {}
    for mode in modes:
        prompts = [render_prompt(messages, enc, mode) for _, messages, _ in items]
        replies = generate_replies(model, enc, prompts, sampling, generator, batch_size)
        for (task, _, answer), reply in zip(items, replies):
            t = tally.setdefault(task, {}).setdefault(mode, dict.fromkeys(TALLY, 0))
            t["n"] += 1
            t["correct"] += is_correct(reply, task, answer)
            t["thought"] += reply.thinking is not None
            t["thinking_tokens"] += reply.thinking_tokens
            t["tokens"] += len(reply.ids)
            t["seconds"] += reply.seconds
            t["cut_off"] += reply.finish != "stop"  # max_new_tokens or the context ran out before the end of turn
    return tally


TALLY = ("n", "correct", "thought", "thinking_tokens", "tokens", "seconds", "cut_off")


def summarize(tally):
    """Raw counts -> accuracy, mean thinking length and tokens/s per task and mode, plus an "all" row."""
    total = {}
    for modes in tally.values():
        for mode, t in modes.items():
            total.setdefault(mode, dict.fromkeys(TALLY, 0))
            for k in TALLY:
                total[mode][k] += t[k]

    def stats(t):
        return dict(n=t["n"], accuracy=t["correct"] / t["n"], thought=t["thought"] / t["n"],
                    mean_thinking_tokens=t["thinking_tokens"] / t["n"], mean_tokens=t["tokens"] / t["n"],
                    tokens_per_s=t["tokens"] / max(t["seconds"], 1e-9), cut_off=t["cut_off"])
    return {task: {mode: stats(t) for mode, t in modes.items()} for task, modes in [*tally.items(), ("all", total)]}


def score_table(summary):
    """The table that shows what thinking buys: accuracy with thinking forced on vs off, per task, and what the
    model does when it chooses (auto): its accuracy, how often it thinks, and its thinking tokens against on's."""
    rows = [f"{'task':<8} {'n':>4}  {'think':>6}  {'no-think':>8}  {'gain':>6}  {'auto':>6}  {'thinks':>6}  "
            f"{'think tokens (auto)':>19}  {'tokens/s':>8}  {'cut off':>7}"]
    for task, m in summary.items():
        if task == "all" and len(summary) == 2:
            continue  # one task: its row is the total
        on, off, auto = m["on"], m["off"], m["auto"]
        tokens = f"{on['mean_thinking_tokens']:.1f} ({auto['mean_thinking_tokens']:.1f})"
        rows.append(f"{task:<8} {on['n']:>4}  {on['accuracy']:>6.1%}  {off['accuracy']:>8.1%}  "
                    f"{100 * (on['accuracy'] - off['accuracy']):>+6.1f}  {auto['accuracy']:>6.1%}  "
                    f"{auto['thought']:>6.0%}  {tokens:>19}  {on['tokens_per_s']:>8.0f}  "
                    f"{sum(mode['cut_off'] for mode in m.values()):>7}")
    cut_off = sum(mode["cut_off"] for task, m in summary.items() if task != "all" for mode in m.values())
    if cut_off:
        rows.append(f"{cut_off} replies were cut off by --max_new_tokens or the context (block_size) before they "
                    "ended; they count as wrong")
    return "\n".join(rows)


def budget_curve(model, enc, items, sampling, generator, batch_size, budgets):
    """Accuracy with thinking forced on, against the thinking budget (max_thinking_tokens): what each token buys."""
    curve = []
    for budget in budgets:
        summary = summarize(reasoning_score(model, enc, items, sampling | {"max_thinking_tokens": budget}, generator,
                                            batch_size, modes=("on",)))
        curve.append({"max_thinking_tokens": budget, **summary["all"]["on"],
                      "tasks": {task: m["on"]["accuracy"] for task, m in summary.items() if task != "all"}})
    return curve


def budget_table(curve):
    rows = [f"{'budget':>6}  {'accuracy':>8}  {'think tokens':>12}  " + "  ".join(f"{t:>6}" for t in curve[0]["tasks"])]
    for c in curve:
        rows.append(f"{c['max_thinking_tokens']:>6}  {c['accuracy']:>8.1%}  {c['mean_thinking_tokens']:>12.1f}  "
                    + "  ".join(f"{a:>6.0%}" for a in c["tasks"].values()))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- showcase


def showcase(model, enc, sampling, generator):
    """The showcase prompts, the model choosing whether to think (reasoning auto)."""
    results = []
    for prompt in SHOWCASE:
        messages = [{"role": "user", "content": prompt}]
        reply = generate_reply(model, enc, render_prompt(messages, enc, "auto"), sampling, generator)
        results.append(dict(prompt=prompt, thought=reply.thinking is not None, thinking=reply.thinking,
                            answer=reply.answer, tokens=len(reply.ids), seconds=round(reply.seconds, 3)))
    return results


def print_showcase(results):
    for r in results:
        print(f"\n> {r['prompt']}")
        if r["thought"]:
            print("  thinking: " + (r["thinking"].replace("\n", "\n            ") or "(empty)"))
        else:
            print("  (answered without thinking)")
        print(f"  answer:   {r['answer'] or '(empty)'}")
        print(f"  {r['tokens']} tokens in {r['seconds']:.2f}s")


# ----------------------------------------------------------------------------- main


def write_json(report, path):
    try:
        save_json(report, path)
    except OSError as e:
        raise UserError(f"cannot write the report to {path}: {e.strerror}") from None


def main():
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint: val loss, reasoning score, showcase.")
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=256, temperature=0.0)
    parser.add_argument("--data", help="a prepare.py folder for the val loss (default: the one the checkpoint "
                                       "was trained on, else data/reasoning)")
    parser.add_argument("--items", type=int, default=50, help="held-out problems per built-in task (0 = skip)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="the tasks to score, a comma list (default: the "
                        f"seven of the default mix; also {', '.join(EXTRA_TASKS)})")
    parser.add_argument("--easy_share", type=float, default=0.58,
                        help="share of easy problems (tasks.is_easy) in add/sub/mul/max's items: 0.58 (default) makes "
                             "a third of all easy, as auto needs; 0: as the tasks draw them")
    parser.add_argument("--gsm8k", metavar="FILE", help="also score a GSM8K-style jsonl of {question, answer}")
    parser.add_argument("--gsm8k_items", type=int, default=None, help="score only the first N GSM8K records")
    parser.add_argument("--val_tokens", type=int, default=1_000_000, help="score at most this many val tokens")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass for the val loss")
    parser.add_argument("--gen_batch", type=int, default=64, help="held-out problems answered at once")
    parser.add_argument("--thinking_budgets", default="", metavar="N,N,...",
                        help="also score the built-in tasks, thinking on, at each of these max_thinking_tokens")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    args = parser.parse_args()
    if args.items < 0 or min(args.val_tokens, args.batch_size, args.gen_batch) < 1:
        raise UserError("--items must be >= 0, --val_tokens, --batch_size and --gen_batch >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASK_MAKERS for t in tasks):
        raise UserError(f"--tasks {args.tasks!r}: a comma list of {', '.join(TASK_MAKERS)}")
    if not 0 <= args.easy_share <= 1:
        raise UserError("--easy_share must be between 0 and 1")
    try:
        budgets = [int(b) for b in args.thinking_budgets.split(",") if b.strip()]
    except ValueError:
        budgets = [-1]
    if min(budgets, default=0) < 0:
        raise UserError(f"--thinking_budgets must be numbers >= 0 separated by commas, not {args.thinking_budgets!r}")
    robust_stdio()
    sampling = sampling_kwargs(args)
    gsm8k = read_gsm8k(args.gsm8k, args.gsm8k_items) if args.gsm8k else None  # a bad file fails before any work
    model, enc, ckpt = load_model(args)
    generator = make_generator(model, args.seed)
    data_dir = args.data or (ckpt.get("config") or {}).get("data_dir") or os.path.join("data", "reasoning")
    report = {"checkpoint": checkpoint_path(args), "iter_num": ckpt.get("iter_num"), "tokenizer": enc.name,
              "params": model.num_params()["total"], "device": str(model.device), "sampling": sampling}
    print(f"{report['checkpoint']}: {report['params'] / 1e6:.2f}M parameters, tokenizer {enc.name}, "
          f"iteration {report['iter_num']}, on {report['device']}")

    # 1. validation loss
    meta = {}
    if os.path.exists(os.path.join(data_dir, "val.bin")):
        meta, tokens, mask, index = read_val(data_dir, model, enc)
        t0 = time.perf_counter()
        loss, n = val_loss(model, tokens, mask, args.batch_size, args.val_tokens, index)
        if n == 0:
            raise UserError(f"{data_dir}/val.bin has no tokens to score")
        report["val"] = dict(data=data_dir, loss=loss, perplexity=math.exp(loss), tokens=n)
        print(f"\nval loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({n:,} tokens of {data_dir}/val.bin, "
              f"{time.perf_counter() - t0:.1f}s)")
    elif args.data:
        raise UserError(f"no val.bin in {data_dir}: run python prepare.py (or pass another --data)")
    else:
        print(f"\nno {data_dir}/val.bin: skipping the val loss (run python prepare.py, or pass --data)")

    # 2. reasoning score: thinking on vs off
    if args.items:
        difficulty = difficulty_of(meta)
        items = list(heldout_items(args.items * len(tasks), difficulty=difficulty, easy_share=args.easy_share,
                                   tasks=tasks))
        print(f"\nreasoning score: {args.items} held-out problems per task, thinking forced on, forced off, and auto "
              "(the model chooses)")
        summary = summarize(reasoning_score(model, enc, items, sampling, generator, args.gen_batch))
        report["reasoning"] = {"difficulty": asdict(difficulty), "easy_share": args.easy_share, "tasks": summary}
        print(score_table(summary))
        if budgets:
            report["reasoning"]["budgets"] = budget_curve(model, enc, items, sampling, generator, args.gen_batch,
                                                          budgets)
            print("\naccuracy against the thinking budget (thinking forced on, max_thinking_tokens):")
            print(budget_table(report["reasoning"]["budgets"]))
    if gsm8k:
        print(f"\nGSM8K: {len(gsm8k)} problems of {args.gsm8k}, scored on the final number")
        summary = summarize(reasoning_score(model, enc, gsm8k, sampling, generator, args.gen_batch))
        report["gsm8k"] = {"file": args.gsm8k, **summary["gsm8k"]}
        print(score_table(summary))

    # 3. showcase
    report["showcase"] = showcase(model, enc, sampling, generator)
    print("\nshowcase (the model chooses whether to think):")
    print_showcase(report["showcase"])

    if args.json:
        write_json(report, args.json)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_main(main)
