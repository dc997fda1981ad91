"""
The built-in reasoning tasks: small problems with exact answers, their step-by-step traces, and the checks.

    add, sub, mul   column arithmetic, one traced line per column
    sort, max       insertion sort and a running maximum over short lists
    count           how often a letter appears in a word, spelled letter by letter
    word            two-step word problems, each step traced like add/sub/mul
    digitsum        the sum of a number's digits, a running total (not in the default mix: a skill to teach a
                    trained model, docs/adapt.md)

Each task draws a problem from a seeded random.Random and returns (key, question, trace lines, answer).
One problem in HELDOUT_SHARE (by a hash of its key) is reserved for evaluation and never trained on:
prepare.py writes the rest as training data, eval.py scores the reserved ones, and a reinforcement-learning
trainer rewards answers with check_answer. The traces are short, regular and digit by digit, so that a
model of a few million parameters can learn each small step on a CPU in minutes, while the answer in one
step (no thinking) stays out of its reach. GSM8K-style problems are checked on their final number.
No torch here: this file is plain Python.
"""
import hashlib
import random
import re
from dataclasses import dataclass


@dataclass
class Difficulty:
    digits: int = 3          # add / sub / max: numbers of up to this many digits
    mul_digits: tuple = (2, 1)  # mul: up to A-digit × up to B-digit (B >= 2 adds partial products)
    list_len: int = 5        # sort / max: lists of up to this many numbers


def difficulty_of(meta):
    """The difficulty a prepare.py folder was made with (its meta.json), so that problems match training."""
    d = meta.get("difficulty")
    return Difficulty(**{**d, "mul_digits": tuple(d["mul_digits"])}) if d else Difficulty()


HELDOUT_SHARE = 10  # 1 problem in 10 (by hash) is reserved for heldout_items and never trained on


def add_steps(a, b):
    """Column addition, right to left, one line per column. A line starts with what is left of both numbers
    (and the carry), so the digits to add are the last ones just written; then the column sum and the
    answer so far:  478+256: 8+6=14, 4 / 47+25+1: 7+5+1=13, 34 / 4+2+1: 4+2+1=7, 734"""
    lines, carry, done = [], 0, ""
    while True:
        c = f"+{carry}" if carry else ""
        head, x, y, a, b = f"{a}+{b}{c}", a % 10, b % 10, a // 10, b // 10
        s = x + y + carry
        carry, done = s // 10, f"{s % 10}{done}"
        if a == b == 0:
            return lines + [f"{head}: {x}+{y}{c}={s}, {int(str(carry) + done)}"]
        lines.append(f"{head}: {x}+{y}{c}={s}, {done}")


def sub_steps(a, b):
    """Column subtraction (a >= b) with borrows, written like add_steps; a borrowing column shows the 10
    it borrowed:  532-278: 12-8=4, 4 / 53-27-1: 13-7-1=5, 54 / 5-2-1: 5-2-1=2, 254"""
    lines, borrow, done = [], 0, ""
    while True:
        c = "-1" if borrow else ""
        head, x, y, a, b = f"{a}-{b}{c}", a % 10, b % 10, a // 10, b // 10
        top = x + 10 if x < y + borrow else x  # borrow 10 from the next column when needed
        d = top - y - borrow
        borrow, done = int(top > x), f"{d}{done}"
        if a == b == 0:
            return lines + [f"{head}: {top}-{y}{c}={d}, {int(done)}"]
        lines.append(f"{head}: {top}-{y}{c}={d}, {done}")


def mul_digit_steps(a, d):
    """a × one digit, right to left with carries; a carry is added in a step of its own after the product of
    the digits (a times-table fact, then a small sum):  47*6: 7*6=42, 2 / 4*6+4: 4*6=24, 24+4=28, 282"""
    lines, carry, done = [], 0, ""
    while True:
        head, x, a = f"{a}*{d}" + (f"+{carry}" if carry else ""), a % 10, a // 10
        p = x * d + carry
        work = f"{x}*{d}={x * d}, {x * d}+{carry}={p}" if carry else f"{x}*{d}={p}"
        carry, done = p // 10, f"{p % 10}{done}"
        if a == 0:
            return lines + [f"{head}: {work}, {int(str(carry) + done)}"]
        lines.append(f"{head}: {work}, {done}")


def mul_steps(a, b):
    """a × b: one partial product per digit of b (right to left), each added to the running total."""
    lines, total = [], 0
    for i, d in enumerate(reversed(str(b))):
        lines += mul_digit_steps(a, int(d))
        partial = a * int(d) * 10 ** i
        if i:
            lines += add_steps(total, partial)
        total += partial
    return lines


def number(rng, digits):
    """A number of 1..digits digits; the digit count is uniform so short and long numbers are equally common."""
    k = rng.randint(1, digits)
    return rng.randint(10 ** (k - 1) if k > 1 else 0, 10 ** k - 1)


def task_add(rng, d):
    a, b = number(rng, d.digits), number(rng, d.digits)
    q = rng.choice(["What is {} + {}?", "{} + {} = ?", "Add {} and {}."]).format(a, b)
    return f"add {a} {b}", q, add_steps(a, b), str(a + b)


def task_sub(rng, d):
    a, b = sorted([number(rng, d.digits), number(rng, d.digits)], reverse=True)
    q = rng.choice(["What is {} - {}?", "{} - {} = ?", "Subtract {1} from {0}."]).format(a, b)
    return f"sub {a} {b}", q, sub_steps(a, b), str(a - b)


def task_mul(rng, d):
    a, b = number(rng, d.mul_digits[0]), number(rng, d.mul_digits[1])
    q = rng.choice(["What is {} * {}?", "{} * {} = ?", "Multiply {} by {}."]).format(a, b)
    return f"mul {a} {b}", q, mul_steps(a, b), str(a * b)


def sort_steps(nums):
    """Insertion sort, one line per number: the number (a one-digit one padded to two digits, 9=09), then the
    numbers so far in order with it put in its place:  45, 3, 67 -> 45: 45 / 3=03: 03, 45 / 67: 03, 45, 67.
    Every line copies the line above and compares one number with each of its neighbours there; the last line is
    the answer. Padding gives every number the same width, so comparing 09 with 45 is digit by digit, like 39 with
    45: unpadded, telling a one-digit number from the first digit of a two-digit one was the small model's usual
    mistake (docs/training.md). The padding comes after the number is copied, where the model has seen it end."""
    done, lines = [], []
    for x in nums:
        done = sorted(done + [x])
        lines.append(f"{f'{x}={x:02d}' if x < 10 else x}: {', '.join(f'{y:02d}' for y in done)}")
    return lines


def task_sort(rng, d):
    nums = [number(rng, 2) for _ in range(rng.randint(3, d.list_len))]  # 0-99, one-digit numbers half the time
    q = rng.choice(["Sort these numbers: {}", "Sort from smallest to largest: {}"]).format(", ".join(map(str, nums)))
    return f"sort {nums}", q, sort_steps(nums), ", ".join(map(str, sorted(nums)))


def task_max(rng, d):
    nums = [number(rng, d.digits) for _ in range(rng.randint(2, d.list_len))]
    best, steps = nums[0], []
    for x in nums[1:]:  # a running maximum, one comparison per line
        steps.append(f"{best}, {x} -> {max(best, x)}")
        best = max(best, x)
    listed = ", ".join(map(str, nums))
    q = f"Which is larger, {nums[0]} or {nums[1]}?" if len(nums) == 2 else f"What is the largest of {listed}?"
    return f"max {nums}", q, steps, str(best)


WORDS = """apple banana cherry strawberry orange grape lemon melon peach pear plum mango kiwi papaya coconut
tomato potato carrot pepper onion garlic butter bread cookie pizza pasta rice sugar coffee water bottle
letter paper pencil school teacher student window garden flower forest river mountain valley island ocean
bridge castle rocket planet galaxy comet rabbit kitten puppy turtle parrot giraffe elephant zebra monkey
dolphin penguin spider beetle mirror ladder hammer basket button pillow blanket jacket mitten balloon
summer winter autumn spring morning evening tomorrow yesterday holiday birthday market village cottage
engine wheel bicycle tractor airplane subway harbor lighthouse library museum theater concert guitar violin
trumpet banner ribbon pattern puzzle riddle secret mystery wizard dragon goblin knight princess kingdom
treasure diamond silver copper marble crystal thunder rainbow shadow bubble cinnamon vanilla committee
mississippi assessment bookkeeper address success possess necessary parallel""".split()


def task_count(rng, d):
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n, spelled = 0, []
    for ch in word:  # spell the word, comparing each letter with the one asked for, with a running count:
        n += ch == letter  # the letter is restated at every step so the comparison is local
        spelled.append(f"{ch}{'=' if ch == letter else '≠'}{letter} {n}")
    q = rng.choice(["How many times does the letter {} appear in {}?", "How many {}'s are in {}?"]).format(letter, word)
    # The first line, the letter equal to itself, is the pattern every match then repeats: without it the
    # model gets the first match of a word wrong far more often than the later ones (t≠t 0, ..., t=t 1).
    return f"count {word} {letter}", q, [f"{letter}={letter}", ", ".join(spelled)], str(n)


NAMES = ["Ana", "Ben", "Mia", "Sam", "Leo", "Zoe", "Max", "Ivy", "Tom", "Eva"]
THINGS = ["apples", "pens", "cards", "stickers", "books", "marbles", "coins", "shells", "cookies", "stamps"]
WORD_PROBLEMS = [  # (template, first operation, second operation): two steps, each one traced like above
    ("{n} has {a} {t}. {n} gets {b} more and gives away {c}. How many {t} does {n} have now?", "+", "-"),
    ("{n} had {a} {t}, lost {b} and then found {c}. How many {t} does {n} have now?", "-", "+"),
    ("{n} buys {b} bags of {a} {t} and already had {c}. How many {t} does {n} have?", "*", "+"),
]
STEPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}
APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def task_word(rng, d):
    i = rng.randrange(len(WORD_PROBLEMS))
    template, op1, op2 = WORD_PROBLEMS[i]
    a, b, c = rng.randint(10, 99), rng.randint(2, 9 if op1 == "*" else 99), rng.randint(1, 99)
    if op1 == "-":
        a, b = max(a, b), min(a, b)
    first = APPLY[op1](a, b)
    if op2 == "-":
        c = min(c, first)
    q = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, c=c)
    steps = [f"{a}{op1}{b}{op2}{c}"] + STEPS[op1](a, b) + STEPS[op2](first, c)
    return f"word {i} {a} {b} {c}", q, steps, str(APPLY[op2](first, c))


def task_digitsum(rng, d):
    n = number(rng, 6) if rng.random() < 0.8 else number(rng, 2)  # 1-6 digits, mostly long
    digits = [int(c) for c in str(n)]
    total, steps = digits[0], [" ".join(str(n))]  # spelled out first, so each digit is a token of its own
    for x in digits[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    q = rng.choice(["What is the sum of the digits of {}?", "Add up the digits of {}."]).format(n)
    return f"digitsum {n}", q, steps, str(total)


TASK_MAKERS = {"add": task_add, "sub": task_sub, "mul": task_mul, "sort": task_sort, "count": task_count,
               "max": task_max, "word": task_word, "digitsum": task_digitsum}
TASKS = ["add", "sub", "mul", "sort", "count", "max", "word"]  # the default mix, scored by eval.py and rl.py
EXTRA_TASKS = [t for t in TASK_MAKERS if t not in TASKS]  # made on request: prepare.py --task_weights, eval --tasks


EASY_TASKS = ("add", "sub", "mul", "max")  # the tasks that have easy problems (is_easy)


def is_easy(key):
    """Whether a problem needs no thinking: a sum, difference or product of two one-digit numbers, or the larger of
    two numbers. Its trace is a line or two; prepare.py --direct easy answers most of these directly, so that a
    model choosing whether to think has a reason to."""
    task, args = key.split(" ", 1)
    if task in ("add", "sub", "mul"):
        return all(int(x) < 10 for x in args.split())
    return task == "max" and args.count(",") == 1


def is_heldout(key):
    """Whether a problem is reserved for evaluation: decided by a hash, so train and held-out never share one."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % HELDOUT_SHARE == 0


def sample_problem(task, rng, difficulty, heldout=False, easy=None):
    """(question, thinking, answer) for a problem on the requested side of the held-out line, and with easy=True or
    False an easy one or not (is_easy; only EASY_TASKS have easy ones)."""
    if easy and task not in EASY_TASKS:
        raise ValueError(f"{task} has no easy problems: {', '.join(EASY_TASKS)} do")
    while True:
        key, question, steps, answer = TASK_MAKERS[task](rng, difficulty)
        if is_heldout(key) == heldout and easy in (None, is_easy(key)):
            return question, "\n".join(steps), answer


def heldout_items(n, seed=20240601, difficulty=None, easy_share=0.0, tasks=TASKS):
    """n evaluation items (task, messages ending with the user turn, answer), cycling through tasks.
    They come from the reserved share of problems, so none of them is ever in the training data. With easy_share,
    that share of each EASY_TASKS task's items is easy (is_easy): 7/12 makes a third of all items easy."""
    rng, difficulty = random.Random(seed), difficulty or Difficulty()
    for i in range(n):
        task = tasks[i % len(tasks)]
        k = i // len(tasks)  # the k-th item of its task: easy for the first easy_share of every 12
        easy = (k % 12 < round(12 * easy_share)) if easy_share and task in EASY_TASKS else None
        question, _, answer = sample_problem(task, rng, difficulty, heldout=True, easy=easy)
        yield task, [{"role": "user", "content": question}], answer


def final_number(text):
    """The last number in text, without thousands separators or trailing zeros ("1,250.50" -> "1250.5")."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def check_answer(task, text, answer):
    """Whether the model's answer text is right. The built-in tasks: exact match, ignoring whitespace, case and
    a final period. "gsm8k": the final numbers agree (a worked answer may say more than the number)."""
    if task == "gsm8k":
        return final_number(text) is not None and final_number(text) == final_number(answer)
    if task not in TASK_MAKERS:
        raise ValueError(f"unknown task {task!r}: known tasks are gsm8k, {', '.join(TASK_MAKERS)}")

    def norm(s):
        return re.sub(r"\s+", "", s).rstrip(".").lower()
    return norm(text) == norm(answer)
