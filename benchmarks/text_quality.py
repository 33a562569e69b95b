"""Quality of what the default text model writes, through the whole system.

A varied set of article and ad copy specs (none of them used anywhere else in the project)
goes through submit → broker → a real worker → rows, once greedy (the kinds' defaults) and once
sampled, on the pretrained default (``smollm2-135m-instruct``, fetched if missing) or
``--model``. Prints one JSON object per run:

- ``on_topic``: share of outputs that mention their topic or a keyword (each spec lists the
  words that count: stems such as ``tide`` for "how the moon causes tides");
- ``empty``: share of outputs without a body (articles) or with every field empty (ads), errors
  included;
- ``length_ratio``: words written ÷ words asked, per article (mean, min, max); for ads the
  share within ``max_chars``;
- ``titles_clean``: share of article titles that are a title (no leading ``-``, ``#``, ``*``
  or quote, at most 20 words).

Targets (issue #12): on_topic ≥ 0.8, empty 0, length_ratio mean within 0.5-1.5.
``--samples FILE`` writes every output as Markdown for reading. ``--param NAME=VALUE`` adds a
job parameter to both runs; ``--setting NAME=VALUE`` sets a worker setting (an ``AIGC_*`` field
of schemas/settings.py), e.g. ``--setting text_precision=fp32`` against the default to measure a
speed option's effect on quality (issue #16: within 0.05 of fp32).

    python benchmarks/text_quality.py [--model NAME_OR_DIR] [--samples out.md] [--setting text_precision=fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from aigc import api  # noqa: E402
from aigc.schemas.settings import PRETRAINED_TEXT_MODEL, Settings  # noqa: E402

# (spec, words that show it is on topic: any one, matched as a lower-case substring)
ARTICLES = [
    ({"topic": "how the moon causes tides", "length": 150}, ["tide", "moon"]),
    ({"topic": "composting kitchen scraps at home", "keywords": ["compost", "worms"], "length": "short"},
     ["compost", "scrap", "worm"]),
    ({"topic": "the history of the bicycle", "tone": "enthusiastic", "length": 200}, ["bicycle", "bike", "cycl"]),
    ({"topic": "why sleep matters for memory", "length": 150}, ["sleep", "memor"]),
    ({"topic": "choosing a first telescope", "keywords": ["aperture"], "length": 150}, ["telescope", "aperture"]),
    ({"topic": "how vaccines train the immune system", "tone": "neutral", "length": 200}, ["vaccin", "immun"]),
    ({"topic": "saving money on groceries", "keywords": ["budget", "coupons"], "length": "short"},
     ["grocer", "budget", "coupon", "sav"]),
    ({"topic": "the life cycle of a butterfly", "length": 120}, ["butterfl", "caterpillar", "chrysalis"]),
    ({"topic": "learning to play the guitar as an adult", "tone": "encouraging", "length": 150},
     ["guitar"]),
    ({"topic": "how solar panels make electricity", "keywords": ["photovoltaic"], "length": 150},
     ["solar", "photovoltaic", "panel"]),
    ({"topic": "the benefits of walking every day", "tone": "upbeat", "length": 120}, ["walk"]),
    ({"topic": "how bread rises", "keywords": ["yeast", "gluten"], "length": 150}, ["bread", "yeast", "dough"]),
    ({"topic": "protecting your privacy online", "length": 200}, ["privacy", "online", "password", "data"]),
    ({"topic": "the rules of chess for beginners", "length": 150}, ["chess", "pawn", "king"]),
    ({"topic": "why the sky is blue", "tone": "curious", "length": 120}, ["sky", "blue", "light"]),
    ({"topic": "caring for a houseplant", "keywords": ["watering", "sunlight"], "length": "short"},
     ["plant", "water", "sunlight"]),
    ({"topic": "the invention of the printing press", "length": 200}, ["print", "gutenberg"]),
    ({"topic": "how to prepare for a job interview", "tone": "practical", "length": 150},
     ["interview", "job"]),
    ({"topic": "what causes earthquakes", "keywords": ["tectonic plates"], "length": 150},
     ["earthquake", "tectonic", "plate"]),
    ({"topic": "the importance of bees for farming", "length": 150}, ["bee", "pollinat"]),
]
ADS = [
    ({"product": "a reusable coffee cup", "audience": "commuters", "channel": "social"}, ["cup", "coffee", "reusable"]),
    ({"product": "noise-cancelling headphones", "audience": "students", "channel": "search", "max_chars": 150},
     ["headphone", "noise", "sound"]),
    ({"product": "a vegetable seed starter kit", "audience": "new gardeners", "channel": "email"},
     ["seed", "garden", "grow", "kit"]),
    ({"product": "an online Spanish course", "audience": "travellers", "channel": "display", "tone": "playful"},
     ["spanish", "course", "learn"]),
    ({"product": "a waterproof hiking jacket", "audience": "weekend hikers", "channel": "print"},
     ["jacket", "waterproof", "hik"]),
    ({"product": "a budgeting app", "audience": "young families", "channel": "social", "tone": "warm"},
     ["budget", "app", "money"]),
    ({"product": "an electric bike", "audience": "city commuters", "channel": "search", "max_chars": 120},
     ["bike", "electric", "ride"]),
    ({"product": "a home yoga mat", "audience": "busy parents", "channel": "email", "n_variants": 2},
     ["yoga", "mat"]),
]
SAMPLED = {"temperature": 0.7, "top_p": 0.9}


def start_worker(settings: Settings, folder: Path) -> subprocess.Popen:
    env = os.environ | settings.to_env()
    log = open(folder / "worker.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "aigc.workers", "--devices", "cpu"], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def words(text: str) -> int:
    return len(text.split())


def measure(kind: str, specs: list, rows: list[dict]) -> dict:
    """The quality figures of one job's rows against its specs (same order)."""
    on_topic, empty, ratios, within, titles = [], [], [], [], []
    for (spec, expected), row in zip(specs, rows):
        output = row["output"] or {}
        variants = output.get("variants") or [output]
        for variant in variants:
            text = (row["output_text"] or "").lower() if len(variants) == 1 else variant.get("text", "").lower()
            on_topic.append(any(word in text for word in expected))
            if kind == "article":
                body = variant.get("body") or ""
                empty.append(bool(row["error_code"]) or not body)
                ratios.append(words(body) / int(spec.get("length") if isinstance(spec.get("length"), int)
                                                 else {"short": 150, "medium": 400, "long": 800}[spec["length"]]))
                title = variant.get("title") or ""
                titles.append(bool(title) and title[0] not in "-#*\"'" and words(title) <= 20)
            else:
                fields = [variant.get(k) or "" for k in ("headline", "body", "cta")]
                empty.append(bool(row["error_code"]) or not any(fields))
                within.append(sum(len(f) for f in fields) <= spec.get("max_chars", 280))
    figures = {"outputs": len(on_topic), "on_topic": round(sum(on_topic) / len(on_topic), 3),
               "empty": round(sum(empty) / len(empty), 3)}
    if kind == "article":
        figures["length_ratio"] = {"mean": round(statistics.mean(ratios), 3), "min": round(min(ratios), 3),
                                   "max": round(max(ratios), 3)}
        figures["titles_clean"] = round(sum(titles) / len(titles), 3)
    else:
        figures["within_max_chars"] = round(sum(within) / len(within), 3)
    return figures


def run(settings: Settings, params: dict, samples: list[str], label: str) -> dict:
    report = {}
    for kind, specs in (("article", ARTICLES), ("ad_copy", ADS)):
        items = [spec | {"custom_id": f"{kind}-{i}"} for i, (spec, _) in enumerate(specs)]
        started = time.perf_counter()
        job_id = api.submit(kind, items, params=params or None, settings=settings)
        job = api.wait(job_id, timeout=3600, poll=0.2, settings=settings)
        seconds = time.perf_counter() - started
        rows = list(api.results(job_id, settings=settings))
        report[kind] = measure(kind, specs, rows) | {
            "seconds": round(seconds, 1), "status": job.status,
            "output_tokens": sum(r["output_tokens"] or 0 for r in rows)}
        for (spec, _), row in zip(specs, rows):
            samples.append(f"## {label} · {kind} · {row['custom_id']}\n\n`{json.dumps(spec)}` → "
                           f"{row['output_tokens']} tokens, finish {row['finish_reason']}"
                           f"{', error ' + row['error_code'] if row['error_code'] else ''}\n\n"
                           f"{row['output_text'] or row['error_message']}\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PRETRAINED_TEXT_MODEL)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--samples", type=Path, help="write every output here as Markdown")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a job parameter for both runs (JSON value)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting, as AIGC_NAME would set it (e.g. text_precision=fp32)")
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    chosen = dict(p.split("=", 1) for p in args.setting)
    if args.model == PRETRAINED_TEXT_MODEL:
        subprocess.run([sys.executable, "-m", "aigc.workers.fetch", PRETRAINED_TEXT_MODEL], check=True,
                       stdout=subprocess.DEVNULL)
    samples: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = Settings(broker_url=args.broker, database_url=f"sqlite:///{folder}/q.db",
                            text_model=args.model, data_dir=folder, **chosen)
        import redis

        redis.Redis.from_url(args.broker).flushdb()
        worker = start_worker(settings, folder)
        try:
            report = {"benchmark": "text_quality", "model": args.model, "extra_params": extra,
                      "settings": chosen, "precision": settings.text_precision,
                      "greedy": run(settings, extra, samples, "greedy"),
                      "sampled": run(settings, SAMPLED | extra, samples, "sampled")}
        finally:
            worker.terminate()
            worker.wait(60)
    report["targets"] = {"on_topic": 0.8, "empty": 0, "length_ratio_mean": [0.5, 1.5]}
    if args.samples:
        args.samples.write_text("# text_quality samples\n\n" + "\n".join(samples), encoding="utf-8")
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
