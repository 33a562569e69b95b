"""The fleet launcher: one worker process per device, each supervised and restarted.

``aigc worker --devices all`` runs here. The launcher itself never imports torch: it counts
GPUs in a short-lived child, then starts ``python -m aigc.workers --devices N`` per device, so each
process has ``CUDA_VISIBLE_DEVICES`` set before torch exists in it (and no fork ever follows
torch's thread start-up).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("aigc.launcher")

RESTART_BACKOFF_MAX = 60.0  # seconds between restarts of a worker that keeps crashing
STABLE_AFTER = 30.0  # a worker alive this long is healthy again: its backoff resets


def count_gpus() -> int:
    """CUDA devices visible to this host, asked of a child process (torch stays out of here)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError):
        return 0


def parse_devices(spec: str) -> list[str]:
    """``cpu`` → ["cpu"]; ``all`` → every GPU (or ["cpu"] without one); ``0,1`` → ["0", "1"]."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    if spec == "all":
        return [str(i) for i in range(count_gpus())] or ["cpu"]
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    if not devices or not all(d.isdigit() for d in devices) or len(set(devices)) != len(devices):
        raise ValueError(f"--devices must be 'all', 'cpu' or distinct GPU indices like 0,1; got {spec!r}")
    return devices


def check_devices(devices: list[str]) -> None:
    """Raise ValueError naming the GPU indices this host does not have (counted in a child)."""
    if devices == ["cpu"]:
        return
    count = count_gpus()
    missing = [d for d in devices if int(d) >= count]
    if missing:
        have = f"GPUs 0-{count - 1}" if count else "no CUDA device; use --devices cpu"
        raise ValueError(f"GPU {', '.join(missing)} does not exist: this host has {have}")


def device_name(device: str) -> str:
    return "cpu" if device == "cpu" else f"gpu{device}"


@dataclass
class Child:
    device: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 1.0
    restarts: int = 0
    next_start: float = field(default=0.0)

    def start(self) -> None:
        # Pinned in the environment it is born with, before any of its code runs.
        env = os.environ | {"CUDA_VISIBLE_DEVICES": "" if self.device == "cpu" else self.device}
        self.process = subprocess.Popen(self.argv, env=env)
        self.started = time.monotonic()
        log.info("started %s worker (pid %d)", device_name(self.device), self.process.pid)


def supervise(devices: list[str], worker_args: list[str], poll: float = 0.5) -> int:
    """Run one worker per device until SIGTERM/SIGINT; restart any that exits."""
    children = [Child(d, [sys.executable, "-m", "aigc.workers", "--devices", d, *worker_args])
                for d in devices]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    while not stopping:
        now = time.monotonic()
        for child in children:
            if child.process is None:
                if now >= child.next_start and not stopping:
                    child.start()
                continue
            code = child.process.poll()
            if code is None:
                if now - child.started > STABLE_AFTER:
                    child.backoff = 1.0
                continue
            child.restarts += 1
            log.error("%s worker (pid %d) exited with %s; restart %d in %.0f s",
                      device_name(child.device), child.process.pid, code, child.restarts, child.backoff)
            child.process, child.next_start = None, now + child.backoff
            child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
        time.sleep(poll)
    for child in children:
        if child.process:
            try:
                child.process.wait(60)
            except subprocess.TimeoutExpired:
                child.process.kill()
    return 0


def pin(device: str) -> str:
    """Pin this process to ``device`` before torch is imported; its node-name prefix."""
    if "torch" in sys.modules:
        raise RuntimeError("the device must be pinned before torch is imported")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
    return device_name(device)
