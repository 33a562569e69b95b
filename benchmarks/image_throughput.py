"""Image throughput of the whole system against a bare generator loop, side by side.

Everything runs in one invocation on the same random-initialised DCGAN (nz=100, ngf=64,
64x64 RGB: the pretrained default's shape; speed does not depend on the weights) and prints
one JSON object:

- ``images_e2e_over_bare``: images/s of an image_set job through submit → Redis → a real
  worker process → PNGs written + rows committed, over a bare in-process loop of generator
  forward + PNG encoding at the same batch size.
- ``images_b64_over_b1``: the bare loop at batch 64 over batch 1 (forward + encoding), and the
  same for the forward pass alone (``forward_b64_over_b1``).

Each system run sits between two bare runs and is compared with their mean; the figures are
medians over ``--repeats`` (on a shared machine the load drifts between measurements).

Usage: ``python benchmarks/image_throughput.py [--items 64] [--images-per-item 16]``.
Needs Redis on 127.0.0.1:6379 (database 11).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import redis  # noqa: E402
import torch  # noqa: E402
from celery import Celery  # noqa: E402
from PIL import Image  # noqa: E402

from aigc import api  # noqa: E402
from aigc.schemas.db import upgrade  # noqa: E402
from aigc.schemas.settings import Settings  # noqa: E402
from aigc.workers.dcgan import DCGAN, DCGANConfig  # noqa: E402
from aigc.workers.gan import save_gan  # noqa: E402

BROKER = "redis://127.0.0.1:6379/11"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the worker's choice too
BATCH = 64


def bare_images_per_s(model: DCGAN, n: int, batch: int, encode: bool = True) -> float:
    """What a user would write: random latents, forward, encode each image to PNG bytes."""
    started = time.perf_counter()
    for start in range(0, n, batch):
        size = min(batch, n - start)
        with torch.inference_mode():
            out = model(torch.randn(size, model.config.nz, 1, 1, device=DEVICE))  # (B, 3, 64, 64)
            pixels = out.add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu()
        if encode:
            for array in pixels.permute(0, 2, 3, 1).numpy():
                Image.fromarray(array).save(io.BytesIO(), format="png")
    return n / (time.perf_counter() - started)


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    upgrade(settings.database_url)  # before the worker starts: no two processes migrate at once
    env = os.environ | settings.to_env()
    node = f"imgbench-{os.getpid()}@{socket.gethostname()}"
    proc = subprocess.Popen([sys.executable, "-m", "aigc.workers", "--devices", "cpu", "--hostname",
                             node, "--queues", "image_set"], env=env, cwd=REPO,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    app = Celery(set_as_current=False, broker=settings.broker_url)
    deadline = time.monotonic() + 180
    while not app.control.ping(destination=[node], timeout=1):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"worker did not start; see {log}")
    return proc


def system_images_per_s(settings: Settings, items: int, per_item: int, first_seed: int = 0) -> float:
    specs = [{"custom_id": f"c{i}", "n_images": per_item, "seed": first_seed + i * per_item}
             for i in range(items)]
    started = time.perf_counter()
    job_id = api.submit("image_set", specs, settings=settings)
    job = api.wait(job_id, timeout=3600, poll=0.05, settings=settings)
    seconds = time.perf_counter() - started
    assert job.status == "completed", job.status
    return sum(len(r["artifact_uris"]) for r in api.results(job_id, settings=settings)) / seconds


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--images-per-item", type=int, default=16)
    parser.add_argument("--b1-images", type=int, default=256, help="images for the batch-1 loops")
    parser.add_argument("--repeats", type=int, default=3,
                        help="system runs, each between two bare runs (a shared machine's load drifts)")
    args = parser.parse_args()
    n = args.items * args.images_per_item
    redis.Redis.from_url(BROKER).flushdb()
    torch.manual_seed(0)
    model = DCGAN(DCGANConfig()).eval().to(DEVICE)
    bare_images_per_s(model, BATCH * 2, BATCH)  # warm up
    b64_over_b1 = []
    forward_b64_over_b1 = []
    for _ in range(args.repeats):  # batch 1 and 64 back to back, each pair under the same load
        b64_over_b1.append(bare_images_per_s(model, n, BATCH) / bare_images_per_s(model, args.b1_images, 1))
        forward_b64_over_b1.append(bare_images_per_s(model, n, BATCH, encode=False)
                                   / bare_images_per_s(model, args.b1_images, 1, encode=False))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = save_gan(model, folder / "dcgan")
        settings = Settings(broker_url=BROKER, database_url=f"sqlite:///{folder}/aigc.db",
                            image_model=str(model_dir), chunk_size=args.items, max_batch_images=BATCH,
                            artifact_root=str(folder / "artifacts"), data_dir=folder)
        proc = start_worker(settings, folder / "worker.log")
        try:
            system_images_per_s(settings, 1, 4, first_seed=10**9)  # warm up the worker
            bare = [bare_images_per_s(model, n, BATCH)]
            system = []
            for repeat in range(args.repeats):
                system.append(system_images_per_s(settings, args.items, args.images_per_item, repeat * n))
                bare.append(bare_images_per_s(model, n, BATCH))
        finally:
            proc.terminate()
            proc.wait(60)
        png_bytes = sum(p.stat().st_size for p in (folder / "artifacts").rglob("*.png"))
    ratios = [s / ((bare[i] + bare[i + 1]) / 2) for i, s in enumerate(system)]
    report = {
        "benchmark": "image_throughput", "device": str(DEVICE), "torch_threads": torch.get_num_threads(),
        "model": "random DCGAN nz=100 ngf=64 64x64 RGB (3.58M parameters)", "images": n,
        "items": args.items, "images_per_item": args.images_per_item, "batch": BATCH,
        "repeats": args.repeats, "png_mib_written": round(png_bytes / 2**20, 1),
        "images_per_s": {"system": [round(x, 1) for x in system],
                         "bare_forward_png_b64": [round(x, 1) for x in bare]},
        "images_e2e_over_bare_each": [round(r, 3) for r in ratios],
        "images_e2e_over_bare": round(median(ratios), 3),
        "images_b64_over_b1_each": [round(r, 2) for r in b64_over_b1],
        "images_b64_over_b1": round(median(b64_over_b1), 2),
        "forward_b64_over_b1": round(median(forward_b64_over_b1), 2),
        "targets": {"images_e2e_over_bare": 0.8, "images_b64_over_b1": "10 (on a GPU)"},
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
