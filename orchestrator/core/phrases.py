"""Drafts for the core's answers from the sentences it was trained to write (retrieval-based drafting).

The core's plain-text answers come back to the same sentences: a refusal ("Sorry, I can't help with web
search: I have no expert for it."), a request for an image, a greeting, a tool result ("Here is the mask
of the red circle; it covers 12% of the image."). Prompt lookup (``orchestrator.core.decode._draft``)
finds an argument's words in the request, but an answer's sentence is seldom in the prompt. A core folder
may ship ``phrases.txt``: answers of its training data, one per line (the recipe writes them, from the
training split only; ``switchboard train core --phrases-only`` writes them for a core trained before).
From them :class:`PhraseDrafter` keeps, for each run of one to three tokens, the token that most often
followed it there; a draft follows the reply's last tokens through that table, token by token, while one
next token leads (more than :data:`MIN_SHARE` of the times its context occurred), and stops where answers
end. As for prompt lookup the model checks every drafted token in one pass and the reply is the one
greedy decoding gives: a right draft saves passes, a wrong one costs its tokens in a pass. REST (He et
al., 2023, "Retrieval-based speculative decoding") drafts from a datastore the same way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: the file of a core folder that holds its answers' sentences, one per line
PHRASES_FILE = "phrases.txt"
#: the longest run of the reply's last tokens looked up (then shorter ones)
CONTEXT = 3
#: a next token is drafted only when it followed its context more than this share of the times
MIN_SHARE = 0.5


class PhraseDrafter:
    """Next-token table of a core's answer sentences (see the module doc)."""

    def __init__(self, sequences: Iterable[list[int]], end_id: int | None = None) -> None:
        #: the token that ends an answer: a draft stops before it
        self.end_id = end_id
        counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        self.sentences = 0
        for seq in sequences:
            self.sentences += 1
            for i in range(1, len(seq)):
                for k in range(1, min(CONTEXT, i) + 1):
                    counts[tuple(seq[i - k:i])][seq[i]] += 1
        #: context -> the token that most often followed it, where it leads (None: no token does)
        self.next: dict[tuple[int, ...], int | None] = {}
        for ctx, c in counts.items():
            tid, n = c.most_common(1)[0]
            self.next[ctx] = tid if n > MIN_SHARE * sum(c.values()) else None

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Any, end_id: int | None = None) -> PhraseDrafter:
        """From answer texts, tokenised as the core's replies are (each text whole); ``end_id`` (the end of
        a turn) closes each, so a draft learns where an answer ends and stops there."""
        tail = [end_id] if end_id is not None else []
        return cls((tokenizer(t, add_special_tokens=False)["input_ids"] + tail for t in texts if t.strip()),
                   end_id)

    @classmethod
    def load(cls, folder: str | Path, tokenizer: Any, end_id: int | None = None) -> PhraseDrafter | None:
        """The drafter of a core folder's ``phrases.txt``; None when it has none."""
        path = Path(folder) / PHRASES_FILE
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls.from_texts((line.replace("\\n", "\n") for line in lines), tokenizer, end_id)

    def draft(self, sequence: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that likely follow ``sequence`` (the reply so far): each the token that
        led after the longest run of the last tokens the table knows; [] when none leads."""
        ctx = list(sequence[-CONTEXT:])
        out: list[int] = []
        while len(out) < limit:
            nxt = None
            for k in range(min(CONTEXT, len(ctx)), 0, -1):
                key = tuple(ctx[-k:])
                if key in self.next:
                    nxt = self.next[key]
                    break
            if nxt is None or nxt == self.end_id:
                break
            out.append(nxt)
            ctx = (ctx + [nxt])[-CONTEXT:]
        return out


def write_phrases(folder: str | Path, texts: Iterable[str]) -> Path:
    """Write ``texts`` (answers, newlines kept as ``\\n``) as a core folder's ``phrases.txt``."""
    path = Path(folder) / PHRASES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t.replace("\n", "\\n") + "\n" for t in texts if t.strip()), encoding="utf-8")
    return path
