"""`keras-llama chat` in a real terminal (a pseudo-terminal): readline line editing and history,
Ctrl-C stops a reply and keeps the session, `/reset` confirms. Every wait is bounded in time."""

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from keras_llama import cli
from tests.presets import crafted

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class Terminal:
    """A child process whose controlling terminal is a pseudo-terminal we type into."""

    def __init__(self, argv):
        self.master, slave = pty.openpty()

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {**os.environ, "PYTHONPATH": os.getcwd(), "TERM": "xterm", "INPUTRC": "/dev/null"}
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env,
            preexec_fn=controlling_terminal, close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.seen = b""

    def expect(self, pattern, timeout):
        """Read until ``pattern`` (bytes regex) appears after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.seen)
            if match:
                self.seen = self.seen[match.end() :]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; got {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    raise AssertionError(
                        f"{pattern!r} not seen; the process ended: {self.seen!r}"
                    ) from None

    def type(self, keys):
        os.write(self.master, keys)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.master)


@pytest.fixture()
def terminal(tmp_path):
    # A tiny model with a long context: a reply runs for thousands of tokens unless stopped.
    preset = crafted.write_gguf(
        str(tmp_path / "chat.gguf"), context_length=4096,
        metadata={"tokenizer.chat_template": TEMPLATE},
    )  # fmt: skip
    argv = [sys.executable, "-m", "keras_llama_launcher", "chat", "--preset", preset, "-n", "4000"]
    term = Terminal(argv)
    yield term
    term.close()


def test_chat_in_a_terminal(terminal):
    terminal.expect(rb"Ctrl-C stops a reply", timeout=120)
    terminal.expect(rb"> ", timeout=30)
    # Readline editing: Ctrl-A jumps to the start of the line, where "/" completes "/reset".
    terminal.type(b"reset\x01/\r")
    terminal.expect(rb"\(conversation reset\)", timeout=30)
    terminal.expect(rb"> ", timeout=30)
    # History: the up arrow brings "/reset" back.
    terminal.type(b"\x1b[A\r")
    terminal.expect(rb"\(conversation reset\)", timeout=30)
    terminal.expect(rb"> ", timeout=30)
    # Ctrl-C at the prompt: a fresh prompt, the session goes on. A person presses it well after
    # the prompt shows: CPython's readline notices a signal only while it waits for input, so
    # one that lands between writing "> " and that wait shows at the next key (flaky here).
    time.sleep(0.5)
    terminal.type(b"\x03")
    terminal.expect(rb"> ", timeout=30)
    # Ctrl-C while a reply streams stops that reply only.
    terminal.type(b"a b\r")
    terminal.expect(rb"a b\r\n.+", timeout=120)  # the reply has started
    terminal.type(b"\x03")
    terminal.expect(re.escape(b"[reply interrupted]"), timeout=60)
    terminal.expect(rb"> ", timeout=30)
    assert terminal.process.poll() is None
    terminal.type(b"/exit\r")
    assert terminal.process.wait(timeout=60) == 0
    assert b"Traceback" not in terminal.seen
    assert cli.CUT_MARK.encode() not in terminal.seen
