"""Prompts per kind (chat messages and raw prompts) and the parsing of what models write back.

The parsing cases are shapes small instruct models really produce (seen on SmolLM2-135M).
"""

from __future__ import annotations

import pytest

from aigc.schemas.specs import effective_params
from aigc.schemas.templates import (
    REPLY_PREFIX, complete_sentences, is_empty, parse_output, render_messages, render_prompt,
)

ARTICLE = {"topic": "bees", "keywords": ["honey"], "length": 150, "tone": "calm", "language": "English"}
AD = {"product": "boots", "audience": "hikers", "channel": "email", "tone": "bold", "max_chars": 60}


def test_an_article_becomes_system_and_user_messages_and_a_title_prefix():
    messages, prefix = render_messages("article", ARTICLE)

    assert [m["role"] for m in messages] == ["system", "user"]
    assert ("calm article in English of about 150 words about bees. Use the keywords: honey."
            in messages[1]["content"])
    assert prefix == "Title:"
    titled, prefix = render_messages("article", ARTICLE | {"title": "On Bees"})
    assert 'Use the title "On Bees".' in titled[1]["content"] and prefix == "Title: On Bees\n\n"


def test_ad_copy_messages_show_the_format_once_and_end_with_the_request():
    messages, prefix = render_messages("ad_copy", AD)

    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"].startswith("Headline:") and "Call to action:" in messages[2]["content"]
    assert messages[-1]["content"] == ("Write bold ad copy for an email ad for boots, aimed at hikers. "
                                       "Keep the whole ad under 60 characters.")
    assert prefix == REPLY_PREFIX["ad_copy"] == "Headline:"


def test_raw_prompts_for_base_models_end_where_the_chat_reply_starts():
    assert render_prompt("article", ARTICLE).endswith("Title:")
    assert render_prompt("article", ARTICLE | {"title": "On Bees"}).endswith("Title: On Bees\n\n")
    assert render_prompt("ad_copy", AD).endswith("Headline:")


@pytest.mark.parametrize("text,title,body", [
    (" Bees at Work\n\nThey buzz. They make honey.", "Bees at Work", "They buzz. They make honey."),
    (" **Bees at Work**\nThey buzz.", "Bees at Work", "They buzz."),
    ("\n# Bees at Work\n\nThey buzz.", "Bees at Work", "They buzz."),
    (' "Bees at Work"\nThey buzz.', "Bees at Work", "They buzz."),
    (" - Bees at Work\nThey buzz.", "Bees at Work", "They buzz."),
    (" Title: Bees at Work\nThey buzz.", "Bees at Work", "They buzz."),
    ("\n\n   \nBees\nThey buzz.", "Bees", "They buzz."),
    (" " + "word " * 30 + "end.", "word word word word word word word word word word word word…",
     ("word " * 30 + "end.").strip()),
    (" Bees matter. " + "They buzz all day long and make honey for the hive in every season " * 2,
     "Bees matter", ("They buzz all day long and make honey for the hive in every season " * 2).strip()),
])
def test_article_titles_are_found_whatever_the_model_decorates_them_with(text, title, body):
    assert parse_output("article", ARTICLE, text) == {"title": title, "body": body}


def test_a_given_title_is_kept_and_not_repeated_in_the_body():
    titled = ARTICLE | {"title": "On Bees"}
    assert parse_output("article", titled, "They buzz.") == {"title": "On Bees", "body": "They buzz."}
    assert parse_output("article", titled, "# On bees\nThey buzz.")["body"] == "They buzz."


def test_a_truncated_article_ends_at_its_last_complete_sentence():
    text = " Bees\nBees make honey. They live in hives. They dance to tell the way to flow"
    assert parse_output("article", ARTICLE, text, truncated=True)["body"] == \
        "Bees make honey. They live in hives."
    assert parse_output("article", ARTICLE, text)["body"].endswith("to flow")  # ended on its own
    assert complete_sentences("Short. Then a very long unfinished tail that goes on and on") == \
        "Short. Then a very long unfinished tail that goes on and on"  # would lose most of it


@pytest.mark.parametrize("text,expected", [
    (" Dry Feet\nBody: Boots that keep water out.\nCall to action: Buy now",
     {"headline": "Dry Feet", "body": "Boots that keep water out.", "cta": "Buy now"}),
    (' "Dry Feet"\nBODY: Boots.\nCall to Action: Buy\n\nThis ad is friendly.',
     {"headline": "Dry Feet", "body": "Boots.", "cta": "Buy"}),
    (" Dry Feet\nBody: *Boots* that last\nCalls: Buy\nEmail: [address]",
     {"headline": "Dry Feet", "body": "Boots that last", "cta": "Buy"}),
    (" Dry Feet\nBoots for every trail.", {"headline": "Dry Feet", "body": "Boots for every trail.", "cta": ""}),
    (" Dry Feet\nBody: " + "waterproof " * 10, {"headline": "Dry Feet",
                                                "body": "waterproof waterproof waterproof waterproof waterproof",
                                                "cta": ""}),
])
def test_ad_fields_are_read_from_labelled_lines_within_max_chars(text, expected):
    assert parse_output("ad_copy", AD, text) == expected


def test_empty_outputs_are_recognised_per_kind():
    assert is_empty("article", {"title": "", "body": ""})
    assert not is_empty("article", {"title": "Bees", "body": ""})
    assert not is_empty("article", {"title": "", "body": "They buzz."})
    assert is_empty("ad_copy", {"headline": "", "body": "", "cta": ""})
    assert not is_empty("ad_copy", {"headline": "", "body": "", "cta": "Buy"})


def test_free_form_items_are_returned_as_written():
    assert parse_output("ad_copy", {"prompt": "free"}, " text") == {"text": " text"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_output("article", chat, "Hello!") == {"text": "Hello!"}


@pytest.mark.parametrize("kind,spec,job,expected", [
    ("article", {"topic": "x", "length": 150}, {}, (234, 75, 1.1)),
    ("article", {"topic": "x", "length": 800}, {}, (1144, 400, 1.1)),
    ("article", {"topic": "x", "length": 150}, {"max_new_tokens": 40}, (40, 20, 1.1)),
    ("article", {"topic": "x", "length": 150, "params": {"max_new_tokens": 30, "min_new_tokens": 29}},
     {"max_new_tokens": 40}, (30, 29, 1.1)),
    ("ad_copy", {"product": "x", "max_chars": 280}, {}, (117, 8, 1.1)),
    ("article", {"prompt": "x"}, {}, (128, 0, 1.0)),
    ("article", {"messages": [{"role": "user", "content": "x"}]}, {"repetition_penalty": 1.3}, (128, 0, 1.3)),
])
def test_token_budgets_come_from_the_item_then_the_job_then_the_kind(kind, spec, job, expected):
    params = effective_params(kind, job, spec)
    assert (params.max_new_tokens, params.min_new_tokens, params.repetition_penalty) == expected
