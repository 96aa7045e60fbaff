"""Launch and supervise a ComfyUI server process.

Used by the Modal app (``@modal.enter``) and the RunPod worker to start ComfyUI once per container, and
by anyone who wants gpubridge to own a local ComfyUI::

    proc = ComfyProcess(path="/opt/ComfyUI", port=8188, args=["--disable-auto-launch"])
    proc.start()            # returns when GET /system_stats answers; raises ComfyStartError if it dies
    ...
    proc.ensure_running()   # restarts it if it died (bounded by max_restarts)
    proc.stop()

Start-up waits as long as the process is alive (model loading can take minutes on a cold volume), unless
``start_timeout`` says otherwise, and fails fast, with the last lines of its output, when it exits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from ..errors import ProviderUnavailable

__all__ = ["ComfyProcess", "ComfyStartError"]

log = logging.getLogger("gpubridge.comfy.process")


class ComfyStartError(ProviderUnavailable):
    """ComfyUI exited (or never became ready) while starting. ``output`` holds its last lines."""

    def __init__(self, message: str, *, returncode: int | None = None, output: Sequence[str] = ()):
        super().__init__(message, provider="comfy")
        self.returncode = returncode
        self.output = list(output)


class ComfyProcess:
    """One ComfyUI server process.

    Give either ``path`` (a ComfyUI checkout: runs ``python main.py --listen HOST --port PORT *args`` there)
    or ``command`` (an argv list or a shell-style string; ``{host}`` and ``{port}`` are substituted).
    """

    def __init__(
        self,
        command: Sequence[str] | str | None = None,
        *,
        path: str | Path | None = None,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        port: int = 8188,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        start_timeout: float | None = None,
        poll_interval: float = 0.05,
        max_restarts: int = 5,
        output_lines: int = 200,
        echo: bool = False,
    ):
        if (command is None) == (path is None):
            raise ValueError("Give exactly one of command or path")
        if path is not None:
            self.argv = [python, "main.py", "--listen", host, "--port", str(port), *args]
            self.cwd: str | None = str(path)
        else:
            parts = shlex.split(command) if isinstance(command, str) else list(command)  # type: ignore[arg-type]
            self.argv = [p.format(host=host, port=port) for p in parts] + list(args)
            self.cwd = str(cwd) if cwd else None
        self.host = host
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.poll_interval = poll_interval
        self.max_restarts = max_restarts
        self.restarts = 0
        self.echo = echo
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=output_lines)
        self._reader: threading.Thread | None = None
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def output(self) -> list[str]:
        """The last lines ComfyUI printed (stdout and stderr)."""
        return list(self._output)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -------------------------------------------------------------------------------------------- control

    def spawn(self) -> None:
        with self._lock:
            if self.alive():
                return
            log.info("starting ComfyUI: %s", shlex.join(self.argv))
            self._output.clear()
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends its children too
            )
            self._reader = threading.Thread(target=self._pump, args=(self._proc,), daemon=True, name="comfy-output")
            self._reader.start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._output.append(line)
            if self.echo:
                print(f"[comfyui] {line}", file=sys.stderr)
            else:
                log.debug("[comfyui] %s", line)
        proc.stdout.close()

    def start(self) -> None:
        """Spawn ComfyUI and wait until it answers."""
        self.spawn()
        self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll ``GET /system_stats`` until it answers 200; return the seconds waited.

        Waits as long as the process lives (or ``timeout``/``start_timeout``); raises ComfyStartError at
        once if the process exits.
        """
        timeout = timeout if timeout is not None else self.start_timeout
        t0 = time.monotonic()
        delay = self.poll_interval
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False) as http:
            while True:
                if self._proc is None:
                    raise ComfyStartError("ComfyUI was never started")
                code = self._proc.poll()
                if code is not None:
                    self._join_reader()
                    tail = "\n".join(self.output[-20:]) or "(no output)"
                    raise ComfyStartError(
                        f"ComfyUI exited with code {code} while starting ({shlex.join(self.argv)}). "
                        f"Last output:\n{tail}",
                        returncode=code,
                        output=self.output,
                    )
                try:
                    if http.get(f"{self.url}/system_stats").status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                if timeout is not None and time.monotonic() - t0 > timeout:
                    self.stop()
                    raise ComfyStartError(
                        f"ComfyUI did not answer on {self.url} within {timeout:g}s", output=self.output
                    )
                time.sleep(delay)  # polling a child process's readiness; nothing to await on
                delay = min(0.5, delay * 1.5)

    def healthy(self, timeout: float = 2.0) -> bool:
        """The process is alive and answers ``/system_stats``."""
        if not self.alive():
            return False
        try:
            return httpx.get(f"{self.url}/system_stats", timeout=timeout, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def ensure_running(self) -> bool:
        """Restart ComfyUI if it died. Returns True if it had to restart. Bounded by ``max_restarts``."""
        with self._lock:
            if self.alive():
                return False
            if self.restarts >= self.max_restarts:
                raise ComfyStartError(
                    f"ComfyUI died {self.restarts + 1} times; not restarting again", returncode=self.returncode,
                    output=self.output,
                )
            self.restarts += 1
            log.warning("ComfyUI is not running (exit code %s); restart %d", self.returncode, self.restarts)
            self.start()
            return True

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after ``timeout``. Returns the exit code."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
            self._join_reader()
            return proc.returncode

    def kill(self) -> None:
        """Kill ComfyUI at once (for tests of crash handling)."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(self._proc, signal.SIGKILL)
            self._proc.wait()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2.0)

    # -------------------------------------------------------------------------------------------- async

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def aensure_running(self) -> bool:
        return await asyncio.to_thread(self.ensure_running)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    def __enter__(self) -> ComfyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exited({self.returncode})" if self._proc else "not started"
        return f"<ComfyProcess {self.url} pid={self.pid} {state}>"
