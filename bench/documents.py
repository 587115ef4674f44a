"""Document reading throughput on the real sample documents (../shared/formats/documents/).

    python bench/documents.py [--repeat 3]

Reads each sample PDF, DOCX and HTML file through the format layer (loraflow/formats.read_units: the readers of
loraflow/documents.py, without cutting long sections, which needs the tokenizer) `--repeat` times and keeps each
file's best time. Prints each file's records and time, the PDF reader's pages per second (the text-layer PDFs'
pages over their time) and documents per second over all of them. The last line is the headline, numbers first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraflow.formats import Options, Reject, read_units  # noqa: E402
from tests.conftest import FORMATS  # noqa: E402

DOCS = FORMATS / "documents"
FILES = {  # name -> options a curate.sources spec would give
    "pdflatex-outline.pdf": {}, "REGIMENTO_DA_REITORIA.pdf": {}, "c02-22.pdf": {},
    "libreoffice-writer-password.pdf": {"password": "openpassword"},
    "handbook-872p.docx": {}, "fixture_research_article.docx": {}, "readability-folha-source.html": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    best: dict[str, float] = {}
    pages: dict[str, int] = {}
    for name, opts in FILES.items():
        for _ in range(args.repeat):
            info: dict = {}
            t = time.perf_counter()
            try:
                n = sum(1 for _ in read_units(DOCS / name, Options(**opts), info=info))
                what = f"{n} records"
            except Reject as e:
                what = f"quarantined ({e.code})"
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        if name.endswith(".pdf") and info.get("pages") and not info.get("pages_without_text"):
            pages[name] = info["pages"]
        print(f"{name:>32}: {what:<24} {best[name] * 1000:8.0f} ms  {info}")
    pdf_time = sum(best[n] for n in pages)
    total = sum(best.values())
    print(f"{sum(pages.values()) / pdf_time:.1f} PDF pages/s ({sum(pages.values())} pages of {len(pages)} text-layer "
          f"PDFs), {len(best) / total:.2f} documents/s ({len(best)} documents in {total:.1f} s; best of {args.repeat}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
