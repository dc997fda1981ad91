"""isolate.py: a Child runs calls in its own process and returns their results and exceptions; a native crash
there (a segfault, as llama.cpp's on some CPUs) is one ChildCrashed naming the signal, and the caller, a
pytest run included, goes on. This file imports nothing heavy: every Child imports it again."""
import ctypes
import os
import subprocess
import sys

import pytest

import isolate


def item(obj, key):  # these run in the child, on the object its factory made
    return obj[key]


def pid(obj):
    return os.getpid()


def segfault(obj):
    ctypes.string_at(0)  # reads address 0: a real invalid read, as a native library's bug makes


def test_calls_return_results_and_raise_exceptions_from_the_child():
    with isolate.Child(dict, answer=42) as child:
        assert child.call(item, "answer") == 42
        assert child.call(pid) == child.process.pid != os.getpid()
        with pytest.raises(KeyError, match="question"):
            child.call(item, "question")
        assert child.call(item, "answer") == 42  # an exception leaves the child and its object as they were
    assert child.process.exitcode == 0  # close() ends it cleanly
    with pytest.raises(ValueError, match="invalid literal"):
        isolate.Child(int, "forty-two")  # the factory's exception too


def test_a_segfault_is_one_exception_and_a_new_child_works():
    with isolate.Child(dict, answer=42) as child:
        with pytest.raises(isolate.ChildCrashed, match=r"segfault\(\) crashed its child process \(SIGSEGV\)"):
            child.call(segfault)
        with pytest.raises(isolate.ChildCrashed, match="SIGSEGV"):  # the object is gone: every later call says so
            child.call(item, "answer")
    with isolate.Child(dict, answer=42) as child:
        assert child.call(item, "answer") == 42


CRASHING_TESTS = '''
import ctypes

import isolate


def segfault(obj):
    ctypes.string_at(0)


def test_crashes_in_a_child():
    with isolate.Child(dict) as child:
        child.call(segfault)


def test_runs_after_the_crash():
    pass
'''


def test_a_crash_fails_one_test_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_crashing.py").write_text(CRASHING_TESTS)
    root = os.path.dirname(os.path.abspath(isolate.__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp_path,
                           "test_crashing.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1: tests failed, not a crash of pytest itself
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout
    assert "ChildCrashed: segfault() crashed its child process (SIGSEGV)" in proc.stdout, proc.stdout
