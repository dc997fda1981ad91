"""tasks.py: every built-in task's answers and traces checked by an independent computation from the question
text alone, the held-out split, the difficulty settings, and the answer checker."""
import collections
import random
import re

import pytest

from tasks import EASY_TASKS, EXTRA_TASKS, TASKS, Difficulty, check_answer, heldout_items, sample_problem


def solve(question):
    """(task, problem key, answer) computed from the question text alone, independently of tasks.py."""
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if m := re.search(r"letter (\w) appear in (\w+)|How many (\w)'s are in (\w+)", question):
        letter, word = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return "count", (word, letter), str(word.count(letter))
    if question.startswith("Sort"):
        return "sort", tuple(nums), ", ".join(map(str, sorted(nums)))
    if "larg" in question:
        return "max", tuple(nums), str(max(nums))
    if "gives away" in question:
        a, b, c = nums
        return "word", ("+-", a, b, c), str(a + b - c)
    if "lost" in question:
        a, b, c = nums
        return "word", ("-+", a, b, c), str(a - b + c)
    if "bags of" in question:
        b, a, c = nums
        return "word", ("*+", a, b, c), str(a * b + c)
    a, b = nums
    if question.startswith("Subtract"):
        a, b = b, a
    for task, op, word in (("add", "+", "Add"), ("sub", "-", "Subtract"), ("mul", "*", "Multiply")):
        if f" {op} " in question or question.startswith(word):
            return task, (a, b), str(eval(f"{a}{op}{b}"))
    raise AssertionError(f"unrecognised question {question!r}")


def check_trace(task, question, thinking, answer):
    """Every 'x op y [op c]=z' in the trace is true arithmetic, and the trace ends where the answer is."""
    for expr, value in re.findall(r"(\d+(?:[-+*]\d+)+)=(\d+)", thinking):
        assert eval(expr) == int(value), (question, thinking)
    last = thinking.splitlines()[-1]
    if task in ("add", "sub", "mul", "word"):
        assert last.endswith(f", {answer}"), (question, thinking)
    elif task == "sort":  # "3=03: 03, 45": each number in turn (one digit padded), then the numbers so far, in order
        nums, lines = solve(question)[1], thinking.splitlines()
        assert len(lines) == len(nums), (question, thinking)
        for k, (x, line) in enumerate(zip(nums, lines)):
            head, listed = line.split(": ")
            assert head == (f"{x}={x:02d}" if x < 10 else str(x)), (question, line)
            assert listed.split(", ") == [f"{y:02d}" for y in sorted(nums[:k + 1])], (question, line)
        assert ", ".join(str(int(y)) for y in listed.split(", ")) == answer
    elif task == "max":
        assert last.endswith(f"-> {answer}")
    elif task == "count":
        word, letter = solve(question)[1]
        assert thinking.splitlines()[0] == f"{letter}={letter}"  # the pattern a match repeats
        steps = last.split(", ")  # "s≠r 0, t≠r 0, r=r 1, ...": each letter compared, a running count
        assert [s[:4] for s in steps] == [f"{ch}{'=' if ch == letter else '≠'}{letter} " for ch in word]
        assert steps[-1][4:] == answer


def draws(n, difficulty=Difficulty(), heldout=False, seed=0):
    """n problems of every task, (task, question, thinking, answer), from one side of the held-out line."""
    rng = random.Random(seed)
    return [(task, *sample_problem(task, rng, difficulty, heldout)) for task in TASKS for _ in range(n)]


@pytest.mark.parametrize("heldout", [False, True])
def test_answers_and_traces_are_right(heldout):
    for task, question, thinking, answer in draws(1000, heldout=heldout):
        solved_task, _, truth = solve(question)
        assert (solved_task, answer) == (task, truth), question
        check_trace(task, question, thinking, answer)


def test_heldout_items_are_correct_and_never_trained_on():
    trained = {solve(question)[:2] for _, question, _, _ in draws(7000)}  # as many problems as the default data
    items = list(heldout_items(700))
    assert [task for task, _, _ in items[:len(TASKS)]] == TASKS and len(items) == 700
    assert items == list(heldout_items(700))  # deterministic
    for task, messages, answer in items:
        assert messages[-1]["role"] == "user" and len(messages) == 1
        solved_task, key, truth = solve(messages[0]["content"])
        assert (solved_task, answer) == (task, truth)
        assert (task, key) not in trained, messages
    assert len({solve(m[0]["content"])[:2] for _, m, _ in items}) > 500  # varied, not one problem repeated


def easy_by_hand(task, key):
    """The easy problems, decided here from the question: one-digit operands, or two numbers to compare."""
    return task in ("add", "sub", "mul") and max(key) < 10 or task == "max" and len(key) == 2


def test_easy_problems_are_the_one_step_ones_and_can_be_asked_for():
    rng = random.Random(1)
    for task in TASKS:
        for easy in ([True, False] if task in EASY_TASKS else [False]):
            for _ in range(200):
                question, thinking, answer = sample_problem(task, rng, Difficulty(), easy=easy)
                solved_task, key, truth = solve(question)
                assert answer == truth and easy_by_hand(task, key) == easy, question
    with pytest.raises(ValueError, match="sort has no easy problems"):
        sample_problem("sort", rng, Difficulty(), easy=True)


def test_a_heldout_mix_with_easy_items():
    """easy_share 7/12: that share of each of add, sub, mul and max's items is easy, a third of all items; the
    others are drawn as without it, and every item is still held out."""
    items = list(heldout_items(700, easy_share=7 / 12))
    easy = [easy_by_hand(task, solve(m[0]["content"])[1]) for task, m, _ in items]
    assert sum(easy) == 240 and sum(easy) / len(items) > 1 / 3
    assert all(task in EASY_TASKS for (task, _, _), e in zip(items, easy) if e)
    trained = {solve(question)[:2] for _, question, _, _ in draws(7000)}
    assert not {solve(m[0]["content"])[:2] for _, m, _ in items} & trained


def test_difficulty_is_configurable():
    longest = collections.Counter()
    for task, question, thinking, answer in draws(300, Difficulty(digits=5, mul_digits=(3, 2), list_len=7)):
        _, key, truth = solve(question)
        assert answer == truth
        check_trace(task, question, thinking, answer)
        if task in ("add", "sub"):
            longest["addsub"] = max(longest["addsub"], *map(len, map(str, key)))
        if task == "mul":
            longest["mul_b"] = max(longest["mul_b"], len(str(key[1])))
        if task == "sort":
            longest["list"] = max(longest["list"], len(key))
    assert longest == {"addsub": 5, "mul_b": 2, "list": 7}


def test_sort_lists_cover_what_people_type():
    """Held-out sort lists hold one-digit numbers (all of them one-digit, too), duplicates, and every length."""
    lists = [solve(question)[1] for task, question, _, _ in draws(1000, heldout=True) if task == "sort"]

    def share(pred):
        return sum(map(pred, lists)) / len(lists)
    assert share(lambda xs: min(xs) < 10) > 0.7 and share(lambda xs: max(xs) < 10) > 0.05
    assert share(lambda xs: min(xs) >= 10) > 0.05 and share(lambda xs: len(set(xs)) < len(xs)) > 0.1
    assert {len(xs) for xs in lists} == {3, 4, 5}


def test_digitsum_is_left_out_of_the_default_mix_and_traced_digit_by_digit():
    assert EXTRA_TASKS == ["digitsum"] and "digitsum" not in TASKS
    rng, lengths = random.Random(0), collections.Counter()
    for _ in range(2000):
        question, thinking, answer = sample_problem("digitsum", rng, Difficulty())
        n = re.search(r"digits of (\d+)", question)[1]
        assert int(answer) == sum(map(int, n)), question  # independent of tasks.py
        lines = thinking.splitlines()
        assert lines[0].split() == list(n) and len(lines) == len(n)  # spelled, then one addition per digit
        for expr, value in (line.split("=") for line in lines[1:]):
            assert eval(expr) == int(value)
        assert lines[-1].endswith(f"={answer}") or len(n) == 1
        lengths[len(n)] += 1
    assert set(lengths) == set(range(1, 7)) and lengths[6] > 250  # every length, long ones common
    items = list(heldout_items(20, tasks=["digitsum", "add"]))
    assert [t for t, _, _ in items[:4]] == ["digitsum", "add", "digitsum", "add"]
    assert check_answer("digitsum", " 15.", "15") and not check_answer("digitsum", "16", "15")


def test_check_answer():
    assert check_answer("add", "734", "734") and check_answer("add", " 734.\n", "734")
    assert check_answer("sort", "1,2, 5, 8,9", "1, 2, 5, 8, 9")
    assert not check_answer("add", "733", "734") and not check_answer("add", "7340", "734")
    assert not check_answer("sort", "1, 2, 5, 9, 8", "1, 2, 5, 8, 9") and not check_answer("count", "", "0")
    with pytest.raises(ValueError):
        check_answer("poetry", "x", "x")
