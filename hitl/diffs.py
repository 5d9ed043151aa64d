"""What changed from one attempt's output to the next: a word-level diff, marked up.

The result is HTML with ``<ins>`` and ``<del>`` around the changed words, built only
from escaped pieces of text (``markupsafe``), so templates can show it without
``|safe`` on anything a user wrote. Words are compared without their whitespace; the
new text is reproduced exactly (drop the ``<del>`` parts and it is the new output).

difflib alone takes seconds on unlucky inputs (many words repeated just under its
"popular" cut), so the matching is difflib's own longest-match search under a budget:
past it, what is left is shown as replaced, coarse but still exact.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from difflib import Match, SequenceMatcher
from itertools import accumulate

from markupsafe import Markup, escape

from .models import Attempt, Review, Task

TOKEN = re.compile(r"\s*\S+\s*|\s+")  # a word with the whitespace around it
BUDGET = 4_000_000  # steps of difflib's longest-match search per diff: ~0.3 s at worst
Opcode = tuple[str, int, int, int, int]


@dataclass(frozen=True, slots=True)
class WordDiff:
    """The new text with its changes marked, and how many words came and went."""

    html: Markup
    inserted: int
    deleted: int

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.deleted)


def word_diff(before: str, after: str, budget: int = BUDGET) -> WordDiff:
    """Mark the words of ``after`` that are new, and those of ``before`` that went."""
    old, new = TOKEN.findall(before), TOKEN.findall(after)
    parts: list[Markup] = []
    inserted = deleted = 0
    for tag, i1, i2, j1, j2 in opcodes(old, new, budget):
        if tag == "equal":
            parts.append(escape("".join(new[j1:j2])))
            continue
        if i1 < i2:
            gone = "".join(old[i1:i2])
            if i1 and parts and not parts[-1][-1:].isspace():  # "a<del> b</del>", not "ab"
                gone = old[i1 - 1][len(old[i1 - 1].rstrip()):] + gone
            parts.append(Markup("<del>{}</del>").format(gone))
            deleted += i2 - i1
        if j1 < j2:
            text = "".join(new[j1:j2])
            words = text.rstrip() or text  # the space after is not underlined as new
            parts += [Markup("<ins>{}</ins>").format(words), escape(text[len(words):])]
            inserted += j2 - j1
    return WordDiff(Markup("").join(parts), inserted, deleted)


def opcodes(old: list[str], new: list[str], budget: int) -> Iterator[Opcode]:
    """difflib's opcodes over the words (whitespace aside), from budgeted matching."""
    i = j = 0
    for block in [*matching_blocks(old, new, budget), Match(len(old), len(new), 0)]:
        if i < block.a or j < block.b:
            tag = "replace" if i < block.a and j < block.b else "delete" if i < block.a \
                else "insert"
            yield tag, i, block.a, j, block.b
        i, j = block.a + block.size, block.b + block.size
        if block.size:
            yield "equal", block.a, i, block.b, j


def matching_blocks(old: list[str], new: list[str], budget: int) -> list[Match]:
    """Equal runs of words, as ``SequenceMatcher.get_matching_blocks`` finds them.

    The same search, breadth first (so a spent budget leaves only the finest detail
    unmatched), after the common head and tail; a range whose search would take the
    budget past its end is left unmatched. A search over a range
    costs one step per old word plus, for each, the places that word has in ``new``.
    """
    old_words, new_words = [t.strip() for t in old], [t.strip() for t in new]
    head = common_prefix(old_words, new_words)
    tail = common_prefix(old_words[head:][::-1], new_words[head:][::-1])
    blocks = [Match(0, 0, head), Match(len(old) - tail, len(new) - tail, tail)]
    matcher = SequenceMatcher(None, old_words, new_words)  # autojunk: common words anchor none
    popular: set[str] = matcher.bpopular  # type: ignore[attr-defined]  # documented, untyped
    places = Counter(word for word in new_words if word not in popular)
    cost = [0, *accumulate(1 + places[word] for word in old_words)]
    ranges = deque([(head, len(old) - tail, head, len(new) - tail)])
    while ranges:
        alo, ahi, blo, bhi = ranges.popleft()
        steps = cost[ahi] - cost[alo]
        if alo >= ahi or blo >= bhi or steps > budget:
            continue
        budget -= steps
        i, j, size = match = matcher.find_longest_match(alo, ahi, blo, bhi)
        if size:
            blocks.append(match)
            ranges.append((alo, i, blo, j))
            ranges.append((i + size, ahi, j + size, bhi))
    return sorted(block for block in blocks if block.size)


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One attempt as the task page shows it: what led to it and what it changed."""

    attempt: Attempt
    reviews: tuple[Review, ...]  # the decisions on it
    asked: Review | None  # the rejection of the attempt before, with its comment
    diff: WordDiff | None  # against the attempt before, when both outputs are known
    before_unknown: bool  # the attempt before was made before hitl kept outputs
    latest: bool


def attempt_views(task: Task) -> list[AttemptView]:
    """Every attempt of ``task``, oldest first, compared with the one before it.

    CPU-bound on long outputs: call it in a worker thread, not on the event loop.
    """
    views: list[AttemptView] = []
    previous: Attempt | None = None
    for record in task.attempts:
        asked = next((review for review in reversed(task.reviews)
                      if review.attempt == record.attempt - 1
                      and review.decision == "rejected"), None)
        diff = None
        if previous is not None and previous.output is not None and record.output is not None:
            diff = word_diff(previous.output, record.output)
        views.append(AttemptView(
            record, tuple(review for review in task.reviews if review.attempt == record.attempt),
            asked, diff, previous is not None and not previous.known,
            record is task.attempts[-1]))
        previous = record
    return views
