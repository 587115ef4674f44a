"""Curation from files read to output lines: read (in parallel where it pays), add a teacher's pairs (if
asked), apply the length policy, merge duplicates, account for every record, split train/eval by id."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.config import Params
from loraflow.curation.dedup import dedup, twins
from loraflow.curation.ids import in_eval
from loraflow.curation.lengths import Lengths, apply_length_policy, percentiles
from loraflow.curation.memory import gc_paused
from loraflow.curation.output import pref_record, sft_line
from loraflow.curation.parallel import read_sources
from loraflow.curation.records import Raw, SourceStats
from loraflow.curation.stats import summary, tally
from loraflow.curation.teacher_pairs import add_teacher_pairs, generated_totals
from loraflow.errors import CurationError


@dataclass(frozen=True)
class Sources:
    """Files under one folder to curate."""

    root: Path
    files: list[Path]
    label: str | None = None  # names sources "<label>/<file>" instead of "<root's name>/<file>"
    force: str | None = None  # the format every file holds whatever its extension (served feedback)


@dataclass
class Curated:
    """What curation makes, ready to write: the SFT lines as they are written, the records of the others."""

    train: list[str]
    eval: list[str]
    prefs: list[dict]
    quarantine: list[dict]
    stats: dict[str, Any]  # stats.json but for the hashes of the output files


@gc_paused()
def curate(params: Params, sources: list[Sources], root: Path = Path(".")) -> Curated:
    """Every record of every file curated, merged as a duplicate or quarantined with a reason; with
    curate.teacher, the pairs a teacher model writes from the document sections read curated alongside.

    root: the project root, where a relative curate.teacher.cache_dir lies (outside every DVC output).

    Raises CurationError when no record could be curated, naming the first reasons.
    """
    stats: dict[str, SourceStats] = defaultdict(SourceStats)
    lengths = Lengths.for_params(params)
    raws: list[Raw] = []
    for s in sources:
        raws += read_sources(params, s.root, s.files, stats, lengths, label=s.label, force=s.force)
    teacher = None
    if params.curate.teacher is not None:
        teacher = add_teacher_pairs(params, raws, stats, lengths, root)
    apply_length_policy(params, raws, lengths)
    kept, prefs = dedup(params, raws)
    quarantine = tally(raws, stats)
    if not kept and not prefs:
        # Nothing is written (the previous output stays), so the reasons go into the message itself.
        why = "; ".join(f"{q['source']}: {q['reason']}" for q in quarantine[:5])
        raise CurationError(f"{sources[0].root}: no record could be curated ({len(quarantine)} rejected): {why}")

    dups = twins(raws)
    fraction = params.curate.eval_fraction
    held_out = [in_eval(it.id, fraction) for it in kept]
    train = [sft_line(it, dups) for it, e in zip(kept, held_out, strict=True) if not e]
    evals = [sft_line(it, dups) for it, e in zip(kept, held_out, strict=True) if e]

    # Percentiles over a stable sample (the smallest ids): exact for the records counted already.
    sample = sorted(kept, key=lambda it: it.id)[:params.curate.length_stats_sample or None]
    missing = [it for it in sample if it.n_tokens is None]
    for it, n in zip(missing, lengths.count([it.messages for it in missing]) if missing else [], strict=True):
        it.n_tokens = n
    token_lengths = percentiles([it.n_tokens for it in sample if it.n_tokens is not None])
    token_lengths["counted"] = len(sample)

    out = Curated(train, evals, [pref_record(it, dups) for it in prefs], quarantine,
                  summary(params, stats, {"train": len(train), "eval": len(evals), "prefs": len(prefs)}, token_lengths))
    if teacher is not None:
        out.stats["teacher"] = {**teacher, "records": generated_totals(stats)}
    for raw in raws:  # no Raw <-> Item cycles left: reference counting frees the run's objects on return
        raw.items = []
    return out
