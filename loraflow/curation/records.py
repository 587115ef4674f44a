"""What curation keeps per raw record read (Raw), per output it yields (Item) and per source file (SourceStats)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loraflow.formats import Messages, Pref, Reject


@dataclass
class SourceStats:
    read: int = 0
    curated: int = 0
    duplicates: int = 0
    near_duplicates: int = 0  # of `duplicates`, those merged as near (not exact) twins
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    markers: dict[str, str] = field(default_factory=dict)  # format markers cut from every record (file_markers)
    # A document's facts as its reader saw them (pages, pages without text, sections, pieces cut; why it was
    # quarantined): loraflow/formats.py read_units' `info`.
    document: dict[str, Any] = field(default_factory=dict)
    # Pairs a teacher model wrote from this source's sections (curate.teacher): made, and what became of them.
    # Kept apart from the records read, so read = curated + duplicates + quarantined holds for those.
    generated: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out = {"read": self.read, "curated": self.curated, "duplicates": self.duplicates,
               "near_duplicates": self.near_duplicates, "quarantined": self.quarantined,
               "reasons": dict(sorted(self.reasons.items())), "formats": dict(sorted(self.formats.items())),
               "pii": dict(sorted(self.pii.items())), "fixes": dict(sorted(self.fixes.items())),
               "markers_removed": dict(self.markers)}
        # Only where there is something to say: the stats of plain record files stay as they were.
        if self.document:
            out["document"] = self.document
        if self.generated:
            out["generated"] = {k: self.generated[k] for k in GENERATED_OUTCOMES}
        return out


GENERATED_OUTCOMES = ("made", "curated", "duplicates", "quarantined")


@dataclass
class Raw:
    """One record read, and what became of it."""

    file: str
    source: str
    record: Any
    format: str = ""
    items: list[Item] = field(default_factory=list)
    reject: Reject | None = None
    key: tuple[int, int] = (0, 0)  # (file number, unit number): puts records read in parallel back in order
    generated: bool = False  # written by the teacher model from a section (curate.teacher), not read from a file


class Item:
    """One output a raw record yields: an SFT conversation or a preference pair."""

    __slots__ = ("raw", "_messages", "messages_json", "pref", "id", "n_tokens", "sized", "truncated", "outcome", "twin")

    def __init__(self, raw: Raw, messages: Messages | None = None, messages_json: str = "", pref: Pref | None = None,
                 id: str = "", n_tokens: int | None = None, sized: bool = False):  # noqa: A002
        self.raw = raw
        self._messages = messages
        self.messages_json = messages_json  # dumps(messages): hashed for the id, then reused in the output line
        self.pref = pref
        self.id = id
        self.n_tokens = n_tokens
        self.sized = sized  # whether n_tokens is settled (counted, or None because the bound says it fits)
        self.truncated = False
        self.outcome = ""  # new | duplicate | near_duplicate
        self.twin: Item | None = None  # the kept item a duplicate was merged into

    @property
    def messages(self) -> Messages | None:
        """The conversation (None for a preference pair). One a worker process sent as JSON only is
        decoded here on first use: most never need it again."""
        if self._messages is None and self.messages_json:
            self._messages = json.loads(self.messages_json)
        return self._messages

    @messages.setter
    def messages(self, value: Messages | None) -> None:
        self._messages = value


def is_feedback(rec: Any) -> bool:
    """An event `loraflow serve` logged (its output line's meta names the answer it was about)."""
    return isinstance(rec, dict) and "event_id" in rec
