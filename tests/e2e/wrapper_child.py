"""A stand-in for an IOC under the wrapper: each mode shows one init duty.

    exit CODE            exit with CODE
    kill SIGNAL          die by SIGNAL (default action)
    signals [--grandchild] [--exit-on-term]
                         print "<role> got <SIGNAL>" for each forwarded signal
    orphans N            orphan N grandchildren that exit, then report (JSON)
                         who adopted them and whether any is left unreaped
    console              an iocsh-like loop: prompt, read a line, answer it

Every line goes to stdout, flushed, so the test reads it at once.
"""

import json
import os
import signal
import sys
import time

FORWARDED = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH"]


def say(*words) -> None:
    # One write per line: two processes share this pipe, and print() under
    # PYTHONUNBUFFERED writes word by word.
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def report_signals(role: str, exit_on_term: bool) -> None:
    def handler(signum, frame):
        name = signal.Signals(signum).name
        say(role, "got", name)
        if name == "SIGTERM" and exit_on_term:
            sys.exit(0)

    for name in FORWARDED:
        signal.signal(getattr(signal, name), handler)


def signals_mode(args) -> None:
    grandchild = "--grandchild" in args
    exit_on_term = "--exit-on-term" in args
    if grandchild:
        pid = os.fork()
        if pid == 0:
            report_signals("grandchild", exit_on_term=True)
            say("grandchild ready", os.getpid(), os.getpgrp())
            while True:
                time.sleep(1)
    report_signals("child", exit_on_term)
    say("child ready", os.getpid(), os.getpgrp())
    while True:
        time.sleep(1)


def orphans_mode(count: int) -> None:
    """Fork a parent of `count` grandchildren and let it exit at once.

    Each grandchild waits until its parent is gone, writes its new parent
    pid (the adopter) to a pipe, then exits. Unless the adopter reaps it,
    it stays a zombie: /proc/<pid> remains, in state Z.
    """
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        for _ in range(count):
            if os.fork() == 0:
                parent = os.getppid()
                deadline = time.monotonic() + 5
                while os.getppid() == parent and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.write(write_end, f"{os.getpid()} {os.getppid()}\n".encode())
                os._exit(0)
        os._exit(0)
    os.close(write_end)
    os.waitpid(middle, 0)  # our own child: reaping it is our job
    lines = b""
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read()  # EOF once every grandchild has written and exited
    pids, adopters = [], set()
    for line in lines.decode().split("\n"):
        if line:
            pid, ppid = map(int, line.split())
            pids.append(pid)
            adopters.add(ppid)
    deadline = time.monotonic() + 5
    remaining = pids
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in pids if os.path.exists(f"/proc/{p}")]
    states = {}
    for pid in remaining:
        try:
            with open(f"/proc/{pid}/stat") as f:
                states[pid] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass
    say(json.dumps({"reported": len(pids), "adopters": sorted(adopters), "me": os.getpid(),
                    "parent": os.getppid(), "remaining": remaining, "states": states}))


def console_mode() -> None:
    def on_sigint(signum, frame):
        say("got SIGINT")

    signal.signal(signal.SIGINT, on_sigint)
    tty = os.isatty(0)
    foreground = tty and os.tcgetpgrp(0) == os.getpgrp()
    own_group = os.getpgrp() != os.getpgid(os.getppid())
    say(f"tty={tty} foreground={foreground} own_group={own_group}")
    while True:
        os.write(1, b"epics> ")
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line == "exit":
            return
        say(f"echo: {line}")


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "exit":
        sys.exit(int(args[0]))
    elif mode == "kill":
        sig = getattr(signal, args[0])
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(5)
        sys.exit(99)  # not reached
    elif mode == "signals":
        signals_mode(args)
    elif mode == "orphans":
        orphans_mode(int(args[0]))
    elif mode == "console":
        console_mode()
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
