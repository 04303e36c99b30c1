"""Run the CLI and tools in processes forked from one that has already imported them.

A fresh ``python -m attnres_megatron.training.pretrain`` spends ~4 s importing torch and
Megatron-Core, and over a second tearing its modules down at exit, around runs that mostly
train for well under a second; under torchrun every rank pays it again. :func:`run` and
:class:`Popen` take the command line a test would give ``subprocess.run`` or ``subprocess.Popen``
and run it in a child forked from a server: a fresh interpreter started once per test session
(with this file, so nothing of the test session's state) that has imported the CLI's modules.
The child is a process of its own, in a session of its own, with the test's environment,
working directory, arguments and standard streams (the test's own pipes, files or terminal,
passed over a Unix socket); the command runs in it as the interpreter runs it (``runpy``, as
``python -m`` and ``python script.py`` do) and ends as the interpreter ends a program --
non-daemon threads joined, ``atexit`` handlers run, streams flushed, the exit status of
``SystemExit`` or of an uncaught exception -- except that it leaves without tearing down the
imported modules (as multiprocessing's forked children do). Whatever it leaves running in its
session is killed when it has ended.

Forms run this way:

* ``python -m MODULE ARGS`` and ``python SCRIPT.py ARGS``;
* ``python -m torch.distributed.run --opt=value ... (-m MODULE | SCRIPT.py) ARGS``: torchrun's own
  ``main`` -- its elastic agent, rendezvous, store, rank environment and failure handling --
  with its ``--run-path`` and ``--start-method=fork`` options added, so each rank is forked from
  the agent and runs the module (or the script) with ``runpy`` instead of starting an
  interpreter (``sys.path`` starts with the script's directory and then the working directory).

Anything else (other programs, ``python -c``, interpreter options, torchrun options given as
two words, environments that change what the server's imports read: thread counts,
``PYTHON*``, ``TORCH*``, allocator settings) runs with ``subprocess`` as before, and so does any
command given ``fresh=True``: the tests of start-up itself (quiet start, the "end to end,
once" refusals) and of real launchers (the torchrun layouts, mpirun, a stopped torchrun rank).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading

PRELOAD = ("attnres_megatron.training.pretrain",)
"""The CLI's imports; anything else a command needs it imports itself, as a fresh process would."""
RUN_AS_MAIN = ("attnres_megatron.training.pretrain",)
"""Preloaded for their imports, then dropped from ``sys.modules``: runpy runs them as ``__main__``
as ``python -m`` does (and does not warn that they were imported already)."""
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "TRITON", "CUDA", "LD_", "MALLOC_")
"""Prefixes of environment variables read while importing (interpreter, thread pools, torch,
allocator): a command whose environment sets one otherwise than the server's runs fresh."""
TORCHRUN = "torch.distributed.run"
TORCHRUN_OWN = ("--start-method", "--start_method", "--run-path", "--run_path", "--no-python", "--no_python")
"""torchrun options the forked form sets or cannot honour: commands with them run as they are."""
MESSAGE_BYTES = 1 << 20

PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL


# ---------------------------------------------------------------------------- the server


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def _serve(sock: socket.socket) -> tuple[dict, list[int]]:
    """Fork a child per request; in the parent report its pid and then its wait status. Returns
    only in a child, with its request and standard stream descriptors."""
    _send(sock, {"ready": os.getpid(), "env": dict(os.environ)})
    while True:
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 3)
        if not data:
            sys.exit(0)  # the test session closed its end
        request = json.loads(data)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            return request, fds
        for fd in fds:
            os.close(fd)
        _send(sock, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(sock, {"status": status})


def _become(request: dict, fds: list[int]) -> None:
    """Turn this forked child into the process the request describes."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    # As the interpreter sets them up: stdout line-buffered on a terminal only, stderr always.
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "numpy" in sys.modules:  # a fresh interpreter seeds it from the OS (random reseeds at fork)
        sys.modules["numpy"].random.seed()


def _module_file(module: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise SystemExit(f"{sys.executable}: No module file named {module}")
    return spec.origin


def _run(request: dict) -> None:
    """The request's command, as the interpreter runs it. ``sys.modules["__main__"]`` stays this
    file: a spawn-context child (Megatron's checkpoint writer starts a multiprocessing Manager)
    then runs this file, not the whole CLI again."""
    kind, target, argv = request["kind"], request["target"], request["argv"]
    if kind == "module":  # python -m target argv
        sys.argv = [_module_file(target), *argv]
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=False)
    elif kind == "script":  # python target argv
        sys.argv = [target, *argv]
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")
    else:  # python -m torch.distributed.run OPTIONS (-m target | target) argv
        import torch.distributed.run as torchrun

        script = _module_file(target) if kind == "torchrun-module" else os.path.abspath(target)
        sys.path[0] = os.getcwd()
        if kind == "torchrun-script":
            sys.path.insert(0, os.path.dirname(script))

        # --run-path makes torchrun call run_script_path(script, *argv) in each forked rank.
        @functools.wraps(torchrun.run_script_path)
        def run_script_path(script: str, *argv: str) -> None:
            _rank(kind, target, script, *argv)

        torchrun.run_script_path = run_script_path
        sys.argv = [
            torchrun.__file__,
            *request["options"],
            "--start-method=fork",
            "--run-path",
            script,
            *argv,
        ]
        torchrun.main()


def _rank(kind: str, target: str, script: str, *argv: str) -> None:
    """One rank's ``python -u -m target argv`` (or ``python -u target argv``), in torchrun's forked worker."""
    sys.argv = [script, *argv]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True)  # -u
    if kind == "torchrun-module":
        runpy.run_module(target, run_name="__main__", alter_sys=False)
    else:
        runpy.run_path(script, run_name="__main__")


def _exit_code(done: SystemExit) -> int:
    """The exit status the interpreter gives ``SystemExit(code)`` (printing a message code)."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1


def _end(code: int) -> None:
    """End as the interpreter ends a program, without tearing down the imported modules."""
    import atexit as handlers

    threading._shutdown()  # joins non-daemon threads
    handlers._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def _server_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    for name in PRELOAD:  # what it prints goes to the server's log
        __import__(name)
    for name in RUN_AS_MAIN:
        sys.modules.pop(name, None)
    request, fds = _serve(sock)
    _become(request, fds)
    try:
        _run(request)
        code = 0
    except SystemExit as done:
        code = _exit_code(done)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _end(code)


# ---------------------------------------------------------------------------- the client


def _plan(command: list[str]) -> dict | None:
    """The request for a command the server runs, else None."""
    if len(command) < 2 or command[0] != sys.executable:
        return None
    if command[1] == "-m" and len(command) >= 3:
        if command[2] == TORCHRUN:
            return _torchrun_plan(command[3:])
        return dict(kind="module", target=command[2], argv=command[3:])
    if command[1].endswith(".py") and not command[1].startswith("-"):
        return dict(kind="script", target=command[1], argv=command[2:])
    return None


def _torchrun_plan(argv: list[str]) -> dict | None:
    options, rest = [], list(argv)
    while rest and rest[0].startswith("--"):
        name = rest[0].split("=", 1)[0]
        if name in TORCHRUN_OWN:
            return None
        if "=" not in rest[0] and name != "--standalone":
            return None  # an option given as two words: the command runs as it is
        options.append(rest.pop(0))
    if len(rest) >= 2 and rest[0] in ("-m", "--module"):
        return dict(kind="torchrun-module", options=options, target=rest[1], argv=rest[2:])
    if rest and rest[0].endswith(".py"):
        return dict(kind="torchrun-script", options=options, target=rest[0], argv=rest[1:])
    return None


def _import_env_differs(env: dict, started: dict, imported: dict) -> bool:
    """Whether ``env`` sets a variable read at import otherwise than the server's environment did
    when it started or as its imports set it (torch sets TORCHINDUCTOR_CACHE_DIR, say)."""
    keys = {k for k in (*env, *started, *imported) if k.startswith(IMPORT_TIME_ENV)}
    return any(env.get(k) not in (started.get(k), imported.get(k)) for k in keys)


class _Server:
    """The preloaded server of this test session, started on first use; one command at a time
    (the tests run one at a time)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.current: Popen | None = None  # the command it runs now
        self.started_env: dict = {}
        self.imported_env: dict = {}
        atexit.register(self.close)

    def ensure_started(self) -> None:
        if self.current is not None:  # left running by a test that failed before waiting for it
            self.current.kill()
            self.current.wait()
        if self.process is None or self.process.poll() is not None:
            self.started_env = dict(os.environ)
            self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with tempfile.TemporaryFile("w+") as log:
                self.process = subprocess.Popen(
                    [sys.executable, __file__, "--serve", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.started_env,
                )
                theirs.close()
                try:
                    ready = self.receive(timeout=None)
                except RuntimeError:
                    log.seek(0)
                    failed = f"the preloaded CLI server did not start:\n{log.read()[-3000:]}"
                    raise RuntimeError(failed) from None
            self.imported_env = ready["env"]

    def receive(self, timeout: float | None) -> dict | None:
        """The server's next message, or None after ``timeout`` seconds."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data = self.sock.recv(MESSAGE_BYTES)
        if not data:
            raise RuntimeError("the preloaded CLI server ended")
        return json.loads(data)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.sock.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


_SERVER = _Server()


class Popen:
    """``subprocess.Popen(command, stdin=..., stdout=..., stderr=..., env=env, cwd=cwd, text=True)``,
    forked from the preloaded server where the command's form allows it (module docstring) and
    ``fresh`` is not set; ``self.process`` is the ``subprocess.Popen`` of a command run fresh.
    Streams are PIPE, DEVNULL, None (this process's), a descriptor or a file; stderr may be STDOUT."""

    def __init__(
        self, command: list, *, stdin=None, stdout=None, stderr=None, env=None, cwd=None, fresh=False
    ):
        self.args = [str(part) for part in command]
        env = dict(os.environ if env is None else env)
        request = None if fresh else _plan(self.args)
        self.process = None
        self.returncode = None
        if request is not None:
            _SERVER.ensure_started()
            if _import_env_differs(env, _SERVER.started_env, _SERVER.imported_env):
                request = None
        if request is None:
            self.process = subprocess.Popen(
                self.args, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd, text=True
            )
            self.pid, self.stdin, self.stdout, self.stderr = (
                self.process.pid,
                self.process.stdin,
                self.process.stdout,
                self.process.stderr,
            )
            return
        self._start(request, env, cwd, stdin, stdout, stderr)

    def _start(self, request, env, cwd, stdin, stdout, stderr) -> None:
        theirs, ours, close = [], {}, []
        for index, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.STDOUT and index == 2:
                theirs.append(theirs[1])
            elif spec == PIPE:
                read, write = os.pipe()
                child, mine = (read, write) if index == 0 else (write, read)
                theirs.append(child)
                close.append(child)
                ours[index] = os.fdopen(mine, "w" if index == 0 else "r")
            elif spec == DEVNULL or (spec is None and index == 0):
                fd = os.open(os.devnull, os.O_RDWR)
                theirs.append(fd)
                close.append(fd)
            elif spec is None:
                theirs.append(index)
            else:
                theirs.append(spec if isinstance(spec, int) else spec.fileno())
        request = dict(request, env=env, cwd=os.path.abspath(cwd or os.getcwd()))
        try:
            _send(_SERVER.sock, request, theirs)
        finally:
            for fd in close:
                os.close(fd)
        self.stdin, self.stdout, self.stderr = ours.get(0), ours.get(1), ours.get(2)
        self.pid = _SERVER.receive(timeout=None)["pid"]
        _SERVER.current = self

    def poll(self) -> int | None:
        if self.process is not None:
            self.returncode = self.process.poll()
        elif self.returncode is None:
            self._collect(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.process is not None:
            self.returncode = self.process.wait(timeout)
        elif self.returncode is None and not self._collect(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _collect(self, timeout: float | None) -> bool:
        reply = _SERVER.receive(timeout)
        if reply is None:
            return False
        self.returncode = os.waitstatus_to_exitcode(reply["status"])
        try:  # whatever the command left running in its session (a writer's manager process)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _SERVER.current = None
        return True

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """What is left of stdout and stderr (when pipes), after the command has ended."""
        if self.process is not None:
            return self.process.communicate(timeout=timeout)
        if self.stdin is not None:
            self.stdin.close()
        texts: dict[int, str] = {}
        readers = [
            threading.Thread(target=lambda i=i, s=s: texts.__setitem__(i, s.read()), daemon=True)
            for i, s in ((1, self.stdout), (2, self.stderr))
            if s is not None
        ]
        for reader in readers:
            reader.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        finally:
            for reader in readers:
                reader.join()
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    stream.close()
        return texts.get(1), texts.get(2)


def run(
    command: list,
    *,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 600,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd,
    timeout=timeout)``, forked from the preloaded server where the command's form allows it
    (module docstring) and ``fresh`` is not set."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = Popen(command, stdout=out, stderr=err, env=env, cwd=cwd, fresh=fresh)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            out.seek(0), err.seek(0)
            raise subprocess.TimeoutExpired(process.args, timeout, out.read(), err.read()) from None
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _server_main(int(sys.argv[2]))
