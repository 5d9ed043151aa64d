"""The word-level diff of one attempt's output against the one before: marked, escaped,
bounded in time; and the attempts as the task page shows them."""

from __future__ import annotations

import html
import random
import re
import time

import pytest
from markupsafe import Markup

from hitl.diffs import attempt_views, word_diff
from hitl.models import Attempt, Review, Task

HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script> & "quotes"'


def without(tag: str, marked: str) -> str:
    """The text a reader sees with every ``tag`` element (and its content) left out."""
    kept = re.sub(rf"<{tag}>.*?</{tag}>", "", marked, flags=re.S)
    return html.unescape(re.sub(r"</?(ins|del)>", "", kept))


def pieces(marked: str, tag: str) -> list[str]:
    return [html.unescape(text) for text in re.findall(rf"<{tag}>(.*?)</{tag}>", marked, re.S)]


def test_changed_words_are_marked_inserted_and_deleted() -> None:
    diff = word_diff("the quick brown fox jumps", "the slow brown fox jumps high")
    assert isinstance(diff.html, Markup)
    assert str(diff.html) == "the <del>quick </del><ins>slow</ins> brown fox jumps <ins>high</ins>"
    assert (diff.inserted, diff.deleted, diff.changed) == (2, 1, True)


def test_the_new_text_is_kept_exactly_and_the_old_words_are_there() -> None:
    before = "Dear Ann,\n\nYour refund   is on its way.\n"
    after = "Dear Ann,\n\nYour refund of 20 EUR was sent on 3 May.\n\nKind regards\n"
    diff = word_diff(before, after)
    assert without("del", diff.html) == after
    assert without("ins", diff.html).split() == before.split()


def test_runs_of_changes_read_as_one_change() -> None:
    diff = word_diff("one two three four", "one 2 3 four")
    assert pieces(diff.html, "del") == ["two three "]
    assert pieces(diff.html, "ins") == ["2 3"]


def test_every_piece_of_text_is_escaped() -> None:
    diff = word_diff(f"keep {HOSTILE} this", f"keep this {HOSTILE}")
    assert "<img" not in diff.html and "<script" not in diff.html
    assert "&lt;img src=x onerror=" in diff.html and "&amp;" in diff.html
    assert without("del", diff.html) == f"keep this {HOSTILE}"
    assert re.fullmatch(r"([^<]|<(/?)(ins|del)>)*", str(diff.html)), "a tag that is not ours"


@pytest.mark.parametrize(("before", "after"), [
    ("same words", "same words"),
    ("same  words\n", "same words"),  # whitespace alone is not a change of words
])
def test_unchanged_words_mark_nothing(before: str, after: str) -> None:
    diff = word_diff(before, after)
    assert (diff.inserted, diff.deleted, diff.changed) == (0, 0, False)
    assert "<ins>" not in diff.html and "<del>" not in diff.html
    assert without("del", diff.html) == after


@pytest.mark.parametrize(("before", "after"), [
    ("", "new text"), ("old text", ""), ("", ""), ("a b", "a"), ("  a", "a"), ("a", "a b"),
])
def test_ends_and_empty_outputs_keep_both_texts(before: str, after: str) -> None:
    diff = word_diff(before, after)
    assert without("del", diff.html) == after
    assert without("ins", diff.html).split() == before.split()


def test_a_word_deleted_at_the_end_keeps_its_space() -> None:
    assert str(word_diff("a b", "a").html) == "a<del> b</del>"


def prose(words: int, rng: random.Random) -> list[str]:
    """Words as they come in text: a few very common, most rare (Zipf's law)."""
    vocabulary = [f"word{rank}" for rank in range(1, 8001)]
    weights = [1 / rank for rank in range(1, 8001)]
    return [word + rng.choice([" "] * 15 + [".\n"])
            for word in rng.choices(vocabulary, weights, k=words)]


def test_a_100_kb_output_with_a_hundred_edits_is_diffed_word_by_word() -> None:
    rng = random.Random(10)
    before = prose(14_000, rng)
    after = list(before)
    for place in rng.sample(range(len(after)), 100):
        after[place] = "CHANGED "
    assert len("".join(after)) > 100_000
    started = time.perf_counter()
    diff = word_diff("".join(before), "".join(after))
    elapsed = time.perf_counter() - started
    assert without("del", diff.html) == "".join(after)
    assert diff.inserted == diff.deleted == 100
    assert elapsed < 2, f"{elapsed:.2f} s"


def test_a_pathological_pair_is_bounded_and_still_exact() -> None:
    """Each of 100 words 490 times (just under difflib's 'popular' cut), shuffled two
    ways, 190 KB: difflib alone takes 7 s on this (measured); ours gives up on the detail."""
    rng = random.Random(3)
    words = [f"w{n} " for n in range(100) for _ in range(490)]
    before, after = list(words), list(words)
    rng.shuffle(before)
    rng.shuffle(after)
    started = time.perf_counter()
    diff = word_diff("".join(before), "".join(after))
    elapsed = time.perf_counter() - started
    assert without("del", diff.html) == "".join(after)
    assert without("ins", diff.html).split() == "".join(before).split()
    assert elapsed < 1, f"{elapsed:.2f} s"


def rejected(attempt: int, comment: str, reviewer: str = "ann") -> Review:
    return Review("rejected", attempt, comment, reviewer, created_at=float(attempt))


def test_each_attempt_has_the_comment_that_led_to_it_and_its_diff() -> None:
    task = Task("t", "input", attempt=3, reviews=[rejected(1, "shorter"),
                                                  rejected(2, "politer", "bob")],
                attempts=[Attempt(1, "a long rude answer"), Attempt(2, "a rude answer"),
                          Attempt(3, "a kind answer")])
    first, second, third = attempt_views(task)
    assert first.asked is None and first.diff is None
    assert [review.comment for review in first.reviews] == ["shorter"]
    assert second.asked == task.reviews[0] and third.asked == task.reviews[1]
    assert second.diff is not None and pieces(second.diff.html, "del") == ["long "]
    assert third.diff is not None and pieces(third.diff.html, "ins") == ["kind"]
    assert third.reviews == () and third.latest and not second.latest


def test_an_unknown_output_is_never_compared() -> None:
    task = Task("t", "input", attempt=3, reviews=[rejected(1, "no"), rejected(2, "still no")],
                attempts=[Attempt(1, None, known=False), Attempt(2, None, known=False),
                          Attempt(3, "third output")])
    views = attempt_views(task)
    assert [view.diff for view in views] == [None, None, None]
    assert [view.before_unknown for view in views] == [False, True, True]
    assert views[2].asked is not None and views[2].asked.comment == "still no"


def test_a_running_or_failed_attempt_has_no_diff_yet() -> None:
    task = Task("t", "input", attempt=2, reviews=[rejected(1, "again")],
                attempts=[Attempt(1, "first"), Attempt(2, None, error="boom")])
    assert attempt_views(task)[1].diff is None
