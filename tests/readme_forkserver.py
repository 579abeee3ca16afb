"""A fork server for the README's ``headscope`` commands: imports torch and transformers once,
then runs each command line in a fresh fork of that process (the real ``headscope.cli.main``,
with the caller's stdin/stdout/stderr and working directory), so a README block of many
commands does not pay the import time for each. Used by tests/test_readme.py only.

    python tests/readme_forkserver.py SOCKET     # prints "ready" once listening
    CLIENT (a `headscope` shim on PATH) sends argv + cwd and its fds 0-2; gets the exit status back
    headscope --readme-run-python-file FILE     # runs a python file in a fork instead (README python blocks)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback

RUN_PYTHON = "--readme-run-python-file"
CLIENT = '''#!{python}
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect({path!r})
socket.send_fds(s, [json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}).encode()], [0, 1, 2])
reply = s.recv(16)
sys.exit(int(reply) if reply else 1)
'''


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    code = 1
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        argv = request["argv"]
        if argv[:1] == [RUN_PYTHON]:  # a README python block, as `python FILE` would run it
            import runpy

            sys.argv = argv[1:]
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))
            runpy.run_path(argv[1], run_name="__main__")
            code = 0
        else:
            from headscope.cli import main

            code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(str(code).encode())
        os._exit(0)


def serve(path: str) -> None:
    import headscope.cli  # noqa: F401  the slow imports, once
    import headscope.model  # noqa: F401
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018  resolve the lazy module the organisms use
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _child(conn, json.loads(data), fds)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
