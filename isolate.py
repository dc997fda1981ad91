"""Run code that may crash natively (llama.cpp) in a child process, so that a crash fails that call with a clear
error instead of killing the caller.

    with Child(load_model, path) as model:    # load_model(path) runs in the child; what it returns stays there
        ids = model.call(generate, prompt)    # generate(that object, prompt) runs there; ids come back pickled

The functions are pickled by name, so they must be module-level, in a module the child can import (a script is
imported as `__mp_main__`: its work must sit under `if __name__ == "__main__":`). Arguments and results must pickle.
"""
import multiprocessing
import signal


class ChildCrashed(RuntimeError):
    """The child process died (a segfault, an abort, the OOM killer): it and the object it held are gone."""


def serve(conn, factory, args, kwargs):
    """The child: make the object, then run each call on it and send back its result or its exception, until the
    parent closes its end of the pipe (or dies, which closes it too)."""
    try:
        obj = factory(*args, **kwargs)
        conn.send((True, None))
    except Exception as e:
        conn.send((False, e))
        return
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, fn(obj, *args, **kwargs)))
        except Exception as e:  # fn's own, or a result that does not pickle
            conn.send((False, e))


class Child:
    """One child process holding the object factory(*args, **kwargs); call(fn, ...) runs fn(object, ...) there."""

    def __init__(self, factory, *args, **kwargs):
        # Children fork from one server process, started by the first Child, that has imported torch (every file
        # here imports it, which takes seconds: with spawn, every child would). Unlike a fork of this process, the
        # server has no threads (torch's) whose locks a child could inherit held. The child imports the rest (not
        # preloaded: Python 3.11's server ignores sys.path, so it would miss a test file's module).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch"])
        self.conn, child_end = context.Pipe()
        # daemon: the child is ended when the parent exits, even without close()
        self.process = context.Process(target=serve, args=(child_end, factory, args, kwargs), daemon=True)
        self.process.start()
        child_end.close()  # the child holds the only copy now, so its death reads as EOF here
        self.crash = None  # what the ChildCrashed says, once the child has died
        self.receive(factory.__name__)

    def call(self, fn, *args, **kwargs):
        """fn(the object, *args, **kwargs) in the child -> its result; its exception is raised here."""
        if self.crash is None:
            try:
                self.conn.send((fn, args, kwargs))
            except BrokenPipeError:  # the child died since the last call: receive reads the EOF and says how
                pass
        return self.receive(fn.__name__)

    def receive(self, name):
        if self.crash is None:
            try:
                ok, value = self.conn.recv()
            except EOFError:
                self.process.join()
                code = self.process.exitcode  # negative: the signal that killed it
                how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
                self.crash = f"{name}() crashed its child process ({how}); that process and what it held are gone"
        if self.crash is not None:
            raise ChildCrashed(self.crash)
        if not ok:
            raise value
        return value

    def close(self):
        self.conn.close()  # the child reads EOF and returns
        self.process.join(10)
        self.process.kill()  # still there after 10 s: stuck in native code (a no-op once it has exited)
        self.process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
