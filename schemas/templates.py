"""Prompt templates per kind, and the parsing of what a model wrote back.

The one place to change how an article or ad copy is asked for. A spec's free-form
``prompt`` bypasses the template.
"""

from __future__ import annotations

import re
from typing import Any

from .enums import Kind

ARTICLE = (
    "Write a {tone} article in {language} of about {length} words about {topic}."
    "{keywords_line}\n\nTitle: {title}"
)
AD_COPY = (
    "Write {tone} {channel} ad copy for {product}, aimed at {audience}, "
    "in at most {max_chars} characters.\n\nHeadline:"
)


def render_prompt(kind: Kind | str, spec: dict[str, Any]) -> str:
    """The prompt a text model is given for one item's validated ``spec``."""
    if spec.get("prompt"):
        return spec["prompt"]
    kind = Kind(kind)
    if kind is Kind.article:
        keywords = spec.get("keywords") or []
        return ARTICLE.format(
            tone=spec.get("tone", "neutral"),
            language=spec.get("language", "English"),
            length=spec.get("length", 300),
            topic=spec["topic"],
            keywords_line=f" Use the keywords: {', '.join(keywords)}." if keywords else "",
            title=spec.get("title") or "",
        ).rstrip()
    if kind is Kind.ad_copy:
        return AD_COPY.format(**{k: spec.get(k) for k in
                                 ("tone", "channel", "product", "audience", "max_chars")})
    raise ValueError(f"kind {kind} has no text template")


def parse_output(kind: Kind | str, spec: dict[str, Any], text: str) -> dict[str, Any]:
    """Structure a generated ``text`` for ``kind``: article → title/body; ad copy → parts."""
    kind = Kind(kind)
    if spec.get("prompt"):
        return {"text": text}
    if kind is Kind.article:
        if spec.get("title"):
            return {"title": spec["title"], "body": text.strip()}
        first, _, rest = text.strip().partition("\n")
        return {"title": first.strip(), "body": rest.strip()}
    if kind is Kind.ad_copy:
        return _parse_ad(text, spec.get("max_chars", 280))
    return {"text": text}


def _parse_ad(text: str, max_chars: int) -> dict[str, Any]:
    # The template ends in "Headline:", so the text starts with the headline itself.
    parts = re.split(r"\n\s*(Body|Call to action|CTA)\s*:\s*", "Headline: " + text, flags=re.I)
    fields = {"headline": parts[0].removeprefix("Headline: ").strip(), "body": "", "cta": ""}
    for label, value in zip(parts[1::2], parts[2::2]):
        fields["body" if label.lower() == "body" else "cta"] = value.strip()
    if not fields["body"] and "\n" in fields["headline"]:
        fields["headline"], _, fields["body"] = fields["headline"].partition("\n")
        fields["body"] = fields["body"].strip()
    return {k: v[:max_chars] for k, v in fields.items()}
