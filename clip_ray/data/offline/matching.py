"""Whole-token query matching: which of many queries occur in a caption.

Caption and queries are casefolded and split into words (`\\w+`) and single
punctuation marks, and a query matches where its token sequence occurs in the
caption's. So "cat" does not match "category", "red car" matches "a Red  car."
but not "red, car", and "dog" matches "dog's". Each caption is cut into its
token n-grams up to the longest query's length and the n-grams are looked up in
a dict, so the cost per caption does not grow with the number of queries.
`clip-ray data queries` builds its lists with this same tokenizer.
"""

from __future__ import annotations

import re
from typing import Iterable

from clip_ray.storage import resolve

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


class QueryMatcher:
    """Finds which of many queries occur in a caption, by n-gram lookup."""

    def __init__(self, queries: Iterable[str]):
        self.names: list[str] = []  # as first written, one per distinct token sequence
        self._ids: dict[str, int] = {}
        self.max_tokens = 0
        for query in queries:
            tokens = tokenize(query)
            phrase = " ".join(tokens)
            if tokens and phrase not in self._ids:
                self._ids[phrase] = len(self.names)
                self.names.append(query.strip())
                self.max_tokens = max(self.max_tokens, len(tokens))

    @classmethod
    def from_file(cls, path: str) -> "QueryMatcher":
        """One query per line; blank lines and repeats are ignored."""
        fs, inner = resolve(path)
        with fs.open_input_stream(inner) as stream:
            return cls(stream.read().decode("utf-8-sig").splitlines())

    def __len__(self) -> int:
        return len(self.names)

    def match(self, caption: str) -> list[int]:
        """Ids (indices into `names`) of the queries that occur in `caption`, ascending."""
        tokens = tokenize(caption)
        found = set()
        for start in range(len(tokens)):
            for end in range(start + 1, min(start + self.max_tokens, len(tokens)) + 1):
                query = self._ids.get(" ".join(tokens[start:end]))
                if query is not None:
                    found.add(query)
        return sorted(found)
