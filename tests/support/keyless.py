"""Run the real keyless process for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

from tests.support.azurite import free_port


def keyless_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m proxy`."""
    script = Path(sys.executable).with_name("keyless")
    if script.exists():
        return [str(script)]
    found = shutil.which("keyless")
    return [found] if found else [sys.executable, "-m", "proxy"]


class KeylessProcess:
    def __init__(self, workdir: Path, args: list[str], env: dict[str, str],
                 listen_host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.listen_host = listen_host
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        self.confdir = workdir / "confdir"
        self.log_path = workdir / "keyless.log"
        self.args = args
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ca_path(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def command(self) -> list[str]:
        """The command line of `keyless run` (subclasses wrap it, e.g. in a namespace)."""
        return [
            *keyless_command(), "run",
            "--listen", f"{self.listen_host}:{self.port}",
            "--admin", f"127.0.0.1:{self.admin_port}",
            "--confdir", str(self.confdir),
            *self.args,
        ]

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> Self:
        command = self.command()
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KEYLESS_")}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"keyless exited with {self.process.returncode}:\n{self.log()}")
            if self.get("/readyz" if wait_ready else "/healthz")[0] == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"keyless not ready within {timeout}s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, str]:
        """GET on the admin server, directly (never through any proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.admin_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, status
        return text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    def peak_rss_bytes(self) -> int:
        return self._status_kib("VmHWM") * 1024

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def _status_kib(self, field: str) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for pid {self.process.pid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
