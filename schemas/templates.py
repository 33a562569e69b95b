"""Prompts per kind, and the parsing of what a model wrote back.

The one place to change how an article or ad copy is asked for. Instruct models get chat
messages (:func:`render_messages`, rendered on the worker by the model's own chat template);
base models without a template get one raw prompt (:func:`render_prompt`). Both end the same
way: the reply starts after ``Title:`` or ``Headline:`` (for chat models, the start of the
assistant's reply), so one parser reads either. A spec's free-form ``prompt`` or ``messages``
bypasses the templates.
"""

from __future__ import annotations

import re
from typing import Any

from .enums import Kind

ARTICLE_SYSTEM = "You are a skilled writer. You write clear, accurate and engaging articles."
ARTICLE_USER = ("Write a {tone} article in {language} of about {length} words about {topic}."
                "{keywords_line}{title_line} Begin with the article's title on its own line.")
ARTICLE_RAW = ("Write a {tone} article in {language} of about {length} words about {topic}."
               "{keywords_line}\n\nTitle:")

AD_SYSTEM = ("You are a skilled copywriter. You write short, punchy ad copy with a headline, a "
             "body and a call to action.")
# One worked example: small models copy a shown format far more reliably than a described one.
AD_EXAMPLE = [
    {"role": "user", "content": "Write enthusiastic ad copy for a social ad for a reusable water "
                                "bottle, aimed at students. Keep the whole ad under 200 characters."},
    {"role": "assistant", "content": "Headline: Stay Cool, Stay Hydrated\nBody: Our steel bottle "
                                     "keeps drinks cold for 24 hours and fits every backpack.\n"
                                     "Call to action: Grab yours today"},
]
AD_USER = ("Write {tone} ad copy for {a_channel} ad for {product}, aimed at {audience}. "
           "Keep the whole ad under {max_chars} characters.")
AD_RAW = ("Write {tone} {channel} ad copy for {product}, aimed at {audience}, "
          "in at most {max_chars} characters.\n\nHeadline:")
AD_LABELS = {"headline": "headline", "title": "headline", "body": "body", "text": "body",
             "description": "body", "call to action": "cta", "call-to-action": "cta", "cta": "cta",
             "calls to action": "cta", "calls": "cta", "action": "cta"}

# The assistant's reply starts with these (chat models) or the raw prompt ends with them.
REPLY_PREFIX = {Kind.article: "Title:", Kind.ad_copy: "Headline:"}


def _article_fields(spec: dict[str, Any]) -> dict[str, Any]:
    keywords = spec.get("keywords") or []
    return {"tone": spec.get("tone", "neutral"), "language": spec.get("language", "English"),
            "length": spec.get("length", 300), "topic": spec["topic"],
            "keywords_line": f" Use the keywords: {', '.join(keywords)}." if keywords else ""}


def render_messages(kind: Kind | str, spec: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Chat messages for a templated item, and the start of the reply that the model continues."""
    kind = Kind(kind)
    if kind is Kind.article:
        title = spec.get("title")
        user = ARTICLE_USER.format(**_article_fields(spec),
                                   title_line=f' Use the title "{title}".' if title else "")
        prefix = f"Title: {title}\n\n" if title else REPLY_PREFIX[kind]
        return [{"role": "system", "content": ARTICLE_SYSTEM}, {"role": "user", "content": user}], prefix
    if kind is Kind.ad_copy:
        channel = spec.get("channel", "social")
        user = AD_USER.format(tone=spec.get("tone", "friendly"), product=spec["product"],
                              a_channel=("an " if channel[0] in "aeiou" else "a ") + channel,
                              audience=spec.get("audience", "a general audience"),
                              max_chars=spec.get("max_chars", 280))
        return [{"role": "system", "content": AD_SYSTEM}, *AD_EXAMPLE,
                {"role": "user", "content": user}], REPLY_PREFIX[kind]
    raise ValueError(f"kind {kind} has no text template")


def render_prompt(kind: Kind | str, spec: dict[str, Any]) -> str:
    """The raw prompt a base model (one without a chat template) gets for a templated item."""
    kind = Kind(kind)
    if kind is Kind.article:
        prompt = ARTICLE_RAW.format(**_article_fields(spec))
        return f"{prompt} {spec['title']}\n\n" if spec.get("title") else prompt
    if kind is Kind.ad_copy:
        return AD_RAW.format(**{k: spec.get(k) for k in
                                ("tone", "channel", "product", "audience", "max_chars")})
    raise ValueError(f"kind {kind} has no text template")


def parse_output(kind: Kind | str, spec: dict[str, Any], text: str,
                 truncated: bool = False) -> dict[str, Any]:
    """Structure the ``text`` a model wrote after the reply prefix: article → title and body;
    ad copy → headline, body, call to action; free-form items → the text as it is.

    ``truncated``: generation stopped at ``max_new_tokens``; an article then ends at its last
    complete sentence rather than mid-word.
    """
    kind = Kind(kind)
    if spec.get("prompt") or spec.get("messages"):
        return {"text": text}
    if kind is Kind.article:
        return _parse_article(text, spec.get("title"), truncated)
    if kind is Kind.ad_copy:
        return _parse_ad(text, spec.get("max_chars", 280))
    return {"text": text}


AD_FIELDS = (("Headline", "headline"), ("Body", "body"), ("Call to action", "cta"))


def output_text(kind: Kind | str, parsed: dict[str, Any]) -> str:
    """One readable text of a parsed output: free-form text as written; an article's title,
    a blank line and its body; an ad's fields as labelled lines."""
    if "text" in parsed:
        return parsed["text"]
    if Kind(kind) is Kind.article:
        return f"{parsed['title']}\n\n{parsed['body']}".strip()
    return "\n".join(f"{label}: {parsed[name]}" for label, name in AD_FIELDS if parsed.get(name))


def is_empty(kind: Kind | str, parsed: dict[str, Any]) -> bool:
    """Whether a parsed templated output is unusable: nothing in any of its fields (an article
    with a title but no body is kept: a short budget can end there; ``finish_reason`` says so)."""
    return not any(parsed.get(name) for name in ("title", "headline", "body", "cta"))


_DECORATION = re.compile(r"^(?:[#>*\-\s]+|title\s*:\s*)+", re.I)
_SENTENCE_END = re.compile(r"[.!?…](?:[\"'”’)\]]*)(?=\s|$)")


def clean_title(line: str) -> str:
    """A title without Markdown decoration, a ``Title:`` label, wrapping quotes or bold marks."""
    title = _DECORATION.sub("", line.strip()).strip()
    title = title.strip("*_").strip()
    if len(title) > 1 and title[0] in "\"'“‘" and title[-1] in "\"'”’":
        title = title[1:-1].strip()
    return title


def _parse_article(text: str, given_title: str | None, truncated: bool) -> dict[str, Any]:
    lines = text.strip().splitlines()
    if given_title:
        title, body_lines = given_title, lines
        if lines and clean_title(lines[0]).lower() == given_title.lower():
            body_lines = lines[1:]  # the model repeated the title it was given
    else:
        while lines and not clean_title(lines[0]):
            lines = lines[1:]
        title, body_lines = (clean_title(lines[0]), lines[1:]) if lines else ("", [])
        words = title.split()
        if len(words) > 20:  # a paragraph, not a title: the body starts there
            first = _SENTENCE_END.search(title)
            cut = first.end() if first and len(title[:first.end()].split()) <= 20 else 0
            title, body_lines = (title[:cut].rstrip(". "), [title[cut:].strip(), *body_lines]) \
                if cut else (" ".join(words[:12]) + "…", [" ".join(words), *body_lines])
    body = "\n".join(body_lines).strip()
    if truncated:
        body = complete_sentences(body)
    return {"title": title, "body": body}


def complete_sentences(text: str) -> str:
    """``text`` up to its last complete sentence, if that keeps at least half of it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[:ends[-1]].rstrip()
    return text


def _clip(text: str, max_chars: int) -> str:
    """``text`` within ``max_chars``, cut at a word boundary."""
    text = re.sub(r"\*\*?|__", "", text).strip().strip('"“”').strip()  # Markdown emphasis
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars + 1].rsplit(" ", 1)[0]
    return (cut if len(cut) >= max_chars // 2 else text[:max_chars]).rstrip(" ,;:-")


def _parse_ad(text: str, max_chars: int) -> dict[str, str]:
    # The reply starts after "Headline:", so the first line is the headline's value.
    fields = {"headline": "", "body": "", "cta": ""}
    unlabelled = []
    for number, raw in enumerate(text.strip().splitlines()):
        line = raw.strip().strip("*").strip()
        label, colon, value = line.partition(":")
        field = AD_LABELS.get(label.strip().strip("*").lower()) if colon else None
        if number == 0 and field is None:
            field, value = "headline", line
        if field is None:
            if line and not colon:
                unlabelled.append(line)
            continue
        if not fields[field]:
            fields[field] = value.strip().strip("*").strip()
    if not fields["body"] and unlabelled:
        fields["body"] = unlabelled[0]
    return {name: _clip(value, max_chars) for name, value in fields.items()}
