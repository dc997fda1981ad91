"""
The measurements behind docs/data.md's streaming and --resume tables: prepare.py on synthetic files in the real
datasets' shapes, timed and measured (peak RSS) as a user runs it, in a child process.

    python docs/prepare_bench.py                         # 400 MB OpenHermes-shaped array, 300 MB text file
    python docs/prepare_bench.py --json_mb 40 --txt_mb 30 --repo ../nanoforge-old   # smaller; another checkout

Reports, for a JSON array shaped like OpenHermes-2.5's one file: --max_samples 1000 as a plain file and through the
openhermes recipe, then a full pass; for a text file: an uninterrupted run, a run killed with SIGKILL halfway, and
its --resume (wall time as a share of the uninterrupted run's, and whether every output file is byte-identical).
Give the machine to it alone: on 2 cores another job changes the times (not the memory).
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "naïve café résumé 数学 ✅ équation").split()


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def openhermes_array(path, megabytes, rng):
    """One JSON array of records shaped like openhermes2_5.json's (their null columns, system/human/gpt turns)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        size, n = 0, 0
        while size < megabytes << 20:
            turns = [("system", ""), ("human", sentence(rng, 10, 120) + "?"), ("gpt", sentence(rng, 50, 500) + ".")]
            rec = {"custom_instruction": None, "topic": None, "model_name": None, "category": None,
                   "conversations": [{"from": who, "value": text, "weight": None} for who, text in turns],
                   "views": None, "language": None, "id": None, "hash": None, "source": "airoboros2.2"}
            text = ("," if n else "") + "\n    " + json.dumps(rec, ensure_ascii=False)
            f.write(text)
            size, n = size + len(text.encode()), n + 1
        f.write("\n]\n")


def text_file(path, megabytes, rng):
    """Paragraphs of a few lines, separated by blank lines."""
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < megabytes << 20:
            text = "\n".join(sentence(rng, 5, 15) for _ in range(rng.randint(1, 8))) + "\n\n"
            f.write(text)
            size += len(text.encode())


def run(repo, args, kill_after=None):
    """prepare.py with args in a child -> (wall seconds, that child's peak RSS in MB)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, os.path.join(repo, "prepare.py"), *args, "--tokenizer", "byte"],
                                stdout=subprocess.DEVNULL, stderr=err)
        if kill_after is not None:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        if kill_after is None and status:
            err.seek(0)
            sys.exit(f"prepare.py failed: {err.read().decode()[-500:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def same_files(a, b):
    names = sorted(n for n in os.listdir(a) if n != "meta.json")
    return names == sorted(n for n in os.listdir(b) if n != "meta.json") and all(
        open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--json_mb", type=int, default=400)
    p.add_argument("--txt_mb", type=int, default=300)
    args = p.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        array, text = os.path.join(tmp, "openhermes2_5.json"), os.path.join(tmp, "text.txt")
        openhermes_array(array, args.json_mb, rng)
        text_file(text, args.txt_mb, rng)
        out = lambda name: ["--out_dir", os.path.join(tmp, name)]  # noqa: E731
        for spec in (array, f"openhermes={array}"):
            seconds, peak = run(args.repo, [spec, "--max_samples", "1000", *out("sample")])
            print(f"{spec.replace(tmp + '/', '')} --max_samples 1000: {seconds:.2f} s, peak RSS {peak:.0f} MB")
        seconds, peak = run(args.repo, [array, *out("full")])
        print(f"full pass over the {args.json_mb} MB array: {seconds:.1f} s, peak RSS {peak:.0f} MB")
        whole, _ = run(args.repo, [text, *out("whole")])
        run(args.repo, [text, *out("cut")], kill_after=whole / 2)
        with open(os.path.join(tmp, "cut", "progress.json")) as f:
            committed = json.load(f)["records"]
        resumed, _ = run(args.repo, [text, *out("cut"), "--resume"])
        print(f"{args.txt_mb} MB text: uninterrupted {whole:.1f} s; SIGKILL after {whole / 2:.1f} s ({committed:,} "
              f"documents committed); --resume {resumed:.1f} s = {resumed / whole:.2f}x; files identical: "
              f"{same_files(os.path.join(tmp, 'whole'), os.path.join(tmp, 'cut'))}")


if __name__ == "__main__":
    main()
