"""Start a vhost-user-gpu back-end process, connect to it, collect its stderr, reap it.

The command is a list of arguments in which ``{socket}`` is replaced by the socket
path (``--socket-path`` mode) or ``{fd}`` by the number of an inherited, already
connected socket (``--fd`` mode, as libvirt does it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["OURS_COMMAND", "REFERENCE_COMMAND", "BackendProcess"]

REPO_ROOT = Path(__file__).resolve().parents[2]
OURS_COMMAND = (sys.executable, "-m", "vgpu_backend", "--socket-path", "{socket}")
REFERENCE_BINARY = "/usr/lib/qemu/vhost-user-gpu"
REFERENCE_COMMAND = (REFERENCE_BINARY, "--socket-path", "{socket}")


class BackendProcess:
    """One back-end process and the connected vhost-user socket to it."""

    def __init__(self, command: Sequence[str], *, name: str = "backend",
                 connect_timeout: float = 30.0) -> None:
        self.name = name
        self.command = list(command)
        self._dir = tempfile.TemporaryDirectory(prefix="vgpu-test-")
        self.socket_path = os.path.join(self._dir.name, "vhost-user.sock")
        self._stderr_chunks: list[bytes] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env.setdefault("G_DEBUG", "")
        self.sock: socket.socket
        if any("{fd}" in arg for arg in self.command):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            argv = [a.replace("{fd}", str(theirs.fileno())) for a in self.command]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=(theirs.fileno(),), env=env, cwd=REPO_ROOT)
            theirs.close()
            self.sock = ours
        else:
            argv = [a.replace("{socket}", self.socket_path) for a in self.command]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         env=env, cwd=REPO_ROOT)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not any("{fd}" in arg for arg in self.command):
            try:
                self.sock = self._connect(connect_timeout)
            except BaseException:
                self.cleanup()  # never leave a back-end listening for nobody
                raise

    def _read_stderr(self) -> None:
        if self.proc.stderr is None:
            return
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._stderr_chunks.append(chunk)

    def _connect(self, timeout: float) -> socket.socket:
        """Connect once the back-end listens (retrying the bind/listen window)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before "
                                   f"listening: {self.stderr[-2000:]}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen on {self.socket_path} "
                                       f"within {timeout}s: {self.stderr[-2000:]}") from None
                time.sleep(0.01)

    @property
    def stderr(self) -> str:
        """Everything the back-end wrote to stderr so far."""
        return b"".join(self._stderr_chunks).decode("utf-8", "replace")

    def wait_stderr(self, text: str, timeout: float = 5.0) -> bool:
        """Whether ``text`` shows up on stderr within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def alive(self) -> bool:
        """The process is still running."""
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit by itself; return its exit status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout}s after the "
                                 f"disconnect; stderr: {self.stderr[-2000:]}") from None
        self._reader.join(2.0)
        return code

    def kill(self) -> None:
        """Stop the process if it is still running (test cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2.0)

    def cleanup(self) -> None:
        """Kill if needed and remove the socket directory."""
        self.kill()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._dir.cleanup()
