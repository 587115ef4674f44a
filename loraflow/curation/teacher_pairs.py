"""Question/answer pairs a teacher model writes from the document sections read (curate.teacher), turned into
records curated like any other: normalised, scrubbed, structure-checked, identified and sized, each placed
right after the section it came from. The asking, caching and grounding are loraflow/teacher.py's."""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from loraflow import pii
from loraflow.config import Params
from loraflow.curation.lengths import Lengths
from loraflow.curation.normalise import clean
from loraflow.curation.reader import identify_and_size
from loraflow.curation.records import GENERATED_OUTCOMES, Item, Raw, SourceStats
from loraflow.curation.structure import check_structure
from loraflow.formats import Converted, Reject, Section
from loraflow.teacher import Teacher, generate, records

log = logging.getLogger(__name__)


def sections_read(raws: list[Raw]) -> list[tuple[str, Section]]:
    """(source, section) for each section record curated so far, its text as cleaned and scrubbed: what the
    teacher reads (no PII leaves for the endpoint) and the evidence each pair is checked against."""
    out = []
    for raw in raws:
        if raw.reject is None and isinstance(raw.record, Section) and raw.items:
            answer = raw.items[0].messages[-1]["content"]
            out.append((raw.source, dataclasses.replace(raw.record, text=answer)))
    return out


def add_teacher_pairs(params: Params, raws: list[Raw], stats: dict[str, SourceStats], lengths: Lengths,
                      root: Path) -> dict[str, Any]:
    """Ask the teacher about every section read and insert its grounded pairs, as records, after their sections
    in `raws`. Returns stats.json's `teacher` entry. The endpoint failing loses nothing: the section records stay,
    and the error (endpoint, sections unasked) is logged and returned."""
    teacher = Teacher.from_params(params.curate.teacher, root)
    pairs, report = generate(sections_read(raws), teacher)
    if report.error:
        log.error("curate: %s", report.error)
    log.info("curate: teacher %s: %d section(s), %d asked, %d cached, %d pair(s) kept, %d ungrounded",
             teacher.url, report.sections, report.asked, report.cached, report.pairs, report.ungrounded)
    by_source = {raw.source: raw for raw in raws if isinstance(raw.record, Section)}
    kinds = [k for k in pii.KINDS if getattr(params.curate.pii, k)]
    memo: dict[bool, dict[str, tuple]] = {False: {}, True: {}}
    made: dict[str, list[Raw]] = defaultdict(list)
    for rec in records(pairs, teacher):
        section = by_source[rec["meta"]["generated"]["evidence"]]
        siblings = made[section.source]
        # "<section's source>@teacher<k>": one name per pair, even where a section gives several
        raw = Raw(section.file, f"{section.source}@teacher{len(siblings) + 1}", rec, "teacher", key=section.key,
                  generated=True)
        siblings.append(raw)
        conv = Converted([rec["messages"]], format="teacher")
        try:
            clean(conv, kinds, stats[section.file], memo)
            check_structure(conv.conversations[0])
        except Reject as e:
            raw.reject = e.with_traceback(None)
            continue
        raw.items = [Item(raw, messages=conv.conversations[0])]
    identify_and_size([it for group in made.values() for raw in group for it in raw.items], lengths)
    if made:
        raws[:] = [r for raw in raws for r in (raw, *made.get(raw.source, ()))]
    return report.as_dict()


def generated_totals(stats: dict[str, SourceStats]) -> dict[str, int]:
    """What became of the generated records, over every source."""
    return {k: sum(s.generated[k] for s in stats.values()) for k in GENERATED_OUTCOMES}
