"""Documents as teams keep them (PDF, Word, web pages): the real files in ../shared/formats/documents/ read into
heading sections with their structure, what cannot be read quarantined with its reason, long sections cut."""

from __future__ import annotations

import re
import shutil
import unicodedata

import pytest

from loraflow.config import load_params
from loraflow.documents import Line, _drop_running_lines, split_section
from loraflow.errors import CurationError
from loraflow.formats import Options, Reject, Section, read_units
from loraflow.io import read_jsonl
from steps import curate
from tests.conftest import FORMATS, ROOT

DOCS = FORMATS / "documents"
needs_documents = pytest.mark.skipif(not DOCS.is_dir(), reason="shared/formats/documents not found above this checkout")


def _read(name: str, **opts) -> list[tuple[str, object]]:
    return [(idx, rec) for _, idx, rec in read_units(DOCS / name, Options(**opts))]


def _sections(name: str, **opts) -> list[tuple[str, Section]]:
    out = _read(name, **opts)
    assert all(isinstance(rec, Section) for _, rec in out), [rec for _, rec in out if not isinstance(rec, Section)]
    return out


_BARE_NUMBER = re.compile(r"^\s*(?:page\s*)?\d+\s*$", re.I | re.M)


# ------------------------------------------------------------------------------------------------- PDF

@needs_documents
def test_outlined_pdf_gives_one_section_per_bookmark_in_page_order():
    secs = _sections("pdflatex-outline.pdf")
    bookmarked = [(idx, s) for idx, s in secs if s.heading in ("Foo", "Bar", "Baz")]
    assert [s.heading for _, s in bookmarked] == ["Foo", "Bar", "Baz"] * 3  # the outline's 9 entries, in order
    assert [idx for idx, _ in bookmarked] == ["p2", "p2.2", "p2.3", "p2.4", "p3", "p3.2", "p3.3", "p4", "p4.2"]
    for _, s in bookmarked:
        assert s.text.startswith("Hello, here is some text")  # the printed "1 Foo" heading is not repeated in the text
        assert not _BARE_NUMBER.search(s.text)  # the page numbers at the foot of each page are gone
    # The only other section is the contents page before the first bookmark, under the document's name.
    assert [(idx, s.heading) for idx, s in secs if (idx, s) not in bookmarked] == [("p1", "pdflatex-outline")]


@pytest.fixture(scope="module")
def regulation():
    return _sections("REGIMENTO_DA_REITORIA.pdf")


@needs_documents
def test_regulation_pdf_sections_by_titulo_capitulo_and_article(regulation):
    paths = [s.path for _, s in regulation]
    assert "TÍTULO II – DO GABINETE DO REITOR > CAPÍTULO I – DA CHEFIA DE GABINETE > Art. 7º" in paths
    assert "TÍTULO I – DA ORGANIZAÇÃO > Art. 1º" in paths  # an article right under its TÍTULO's caption
    articles = [s for _, s in regulation if s.heading.startswith("Art.")]
    assert len(articles) >= 195  # of Art. 1º..205 of the Regimento and Art. 1º-2º of the Resolução
    art7 = next(s for s in articles if s.path.endswith("> Art. 7º") and "GABINETE" in s.path)
    assert art7.text.startswith("A Chefia do Gabinete compõe-se de:") and "\n\nb) Secretaria Particular;" in art7.text
    # each section is named by the page it starts on: an article starts on almost every page, up to the last
    pages = [int(idx[1:].split(".")[0]) for idx, _ in regulation]
    assert pages == sorted(pages) and len(set(pages)) >= 70 and pages[-1] == 80


@needs_documents
def test_regulation_pdf_text_keeps_accents_nfc_and_has_no_page_furniture(regulation):
    text = "\n".join(s.path + "\n" + s.text for _, s in regulation)
    assert unicodedata.is_normalized("NFC", text)
    for word in ("ORGANIZAÇÃO", "órgãos", "Pró-Reitoria", "Art. 5º", "§ 1º", "Parágrafo único"):
        assert word in text, word
    assert not _BARE_NUMBER.search(text)
    assert "\x00" not in text and "�" not in text


def test_running_headers_footers_and_page_numbers_are_removed():
    def page(n: int, body: str) -> list[Line]:
        return [Line(n, "ACME Corp — Manual interno", 50, 0.95, 0.97, 9, False),
                Line(n, body, 50, 0.5, 0.52, 11, False),
                Line(n, f"Página {n} de 5", 50, 0.03, 0.05, 9, False)]

    pages = [page(n, f"Texto da página {n}.") for n in range(1, 6)]
    pages[2].insert(1, Line(3, "ACME Corp — Manual interno", 50, 0.6, 0.62, 11, False))  # in the body: content
    _drop_running_lines(pages)
    assert [[ln.text for ln in lines] for lines in pages][2] == ["ACME Corp — Manual interno", "Texto da página 3."]
    assert all(len(lines) == 1 for i, lines in enumerate(pages) if i != 2)


@needs_documents
def test_scanned_and_encrypted_pdfs_are_rejected_with_their_reason_and_the_password_opens_one():
    with pytest.raises(Reject) as e:
        _read("c02-22.pdf")
    assert e.value.code == "no_text_layer" and "OCR" in str(e.value)
    with pytest.raises(Reject) as e:
        _read("libreoffice-writer-password.pdf")
    assert e.value.code == "encrypted" and "password" in str(e.value)
    with pytest.raises(Reject, match="does not open it"):
        _read("libreoffice-writer-password.pdf", password="wrong")
    secs = _sections("libreoffice-writer-password.pdf", password="openpassword")
    assert len(secs) == 1 and secs[0][1].text.startswith("Lorem ipsum dolor sit amet")


def tiny_pdf(pages: list[list[tuple[int, int, str]] | None]) -> bytes:
    """A PDF whose pages hold (x, y, text) lines in Helvetica 11; None: a page without a text layer."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = " ".join(f"BT /F1 11 Tf {x} {y} Td ({t}) Tj ET" for x, y, t in lines or [])
        objs.append(f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def _page(n: int, body: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    return [(72, 760, "Manual interno de compras"), *body, (300, 30, str(n))]  # a running header, a page number


def test_pdf_two_columns_read_column_by_column_and_page_furniture_dropped(tmp_path):
    left = [(72, 700 - 14 * i, t) for i, t in enumerate(
        ["CAPITULO I", "DAS COMPRAS", "Art. 1 Toda compra passa", "pela area de suprimentos.", "Art. 2 O pedido vai",
         "por escrito."])]
    right = [(330, 700 - 14 * i, t) for i, t in enumerate(
        ["Art. 3 O fornecedor e", "cadastrado antes.", "Art. 4 O pagamento sai", "em trinta dias."])]
    pages = [_page(1, left + right), None, _page(3, [(72, 700, "Art. 5 Casos omissos vao"), (72, 686, "ao diretor.")]),
             _page(4, [(72, 700, "Art. 6 Esta norma vale desde ja.")])]
    (tmp_path / "norma.pdf").write_bytes(tiny_pdf(pages))
    info: dict = {}
    out = [(idx, rec) for _, idx, rec in read_units(tmp_path / "norma.pdf", Options(), info=info)]
    secs = {idx: (rec.path, rec.text) for idx, rec in out if isinstance(rec, Section)}
    assert secs == {
        "p1": ("CAPITULO I – DAS COMPRAS > Art. 1", "Toda compra passa pela area de suprimentos."),
        "p1.2": ("CAPITULO I – DAS COMPRAS > Art. 2", "O pedido vai por escrito."),
        "p1.3": ("CAPITULO I – DAS COMPRAS > Art. 3", "O fornecedor e cadastrado antes."),  # the right column after the left
        "p1.4": ("CAPITULO I – DAS COMPRAS > Art. 4", "O pagamento sai em trinta dias."),
        "p3": ("CAPITULO I – DAS COMPRAS > Art. 5", "Casos omissos vao ao diretor."),
        "p4": ("CAPITULO I – DAS COMPRAS > Art. 6", "Esta norma vale desde ja."),
    }  # no "Manual interno de compras", no page numbers
    scan = dict(out)["p2"]
    assert isinstance(scan, Reject) and scan.code == "no_text_layer" and str(scan).startswith("page 2:")
    assert info["pages"] == 4 and info["pages_without_text"] == [2] and info["structure"] == "layout"


def test_corrupt_pdf_and_docx_are_rejected(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\nthis is not a pdf")
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    for name in ("broken.pdf", "broken.docx"):
        with pytest.raises(Reject) as e:
            list(read_units(tmp_path / name, Options()))
        assert e.value.code == "corrupt_file", name
    import docx

    docx.Document().save(tmp_path / "blank.docx")
    with pytest.raises(Reject, match="no text in this DOCX file") as e:
        list(read_units(tmp_path / "blank.docx", Options()))
    assert e.value.code == "empty_file"


# ------------------------------------------------------------------------------------------------ DOCX

@needs_documents
def test_handbook_docx_headings_become_the_path_lists_footnotes_kept_headers_dropped():
    secs = [s for _, s in _sections("handbook-872p.docx")]
    paths = {s.path for s in secs}
    assert "CHAPTER 1 – INTRODUCTION > A. PURPOSE" in paths  # Heading 1 > Heading 2
    assert ("CHAPTER 3 - ADMINISTRATION OF CHAPTER 13 CASES > A. INITIAL REVIEW OF CHAPTER 13 CASES > "
            "1. CONFLICTS OF INTEREST") in paths  # > Heading 3
    text = "\n".join(s.text for s in secs)
    assert len(re.findall(r"^\[\^f\d+\]: \S", text, re.M)) == 6  # each of its 6 footnotes, after the section citing it
    assert len(re.findall(r"^\d+\.\s", text, re.M)) > 100  # numbered lists keep their numbers
    assert "Standing Trustees\t\tPage" not in text and not re.search(r"Page \d+-\s+Effective", text)  # headers/footers
    assert len(re.findall(r"^\|(---\|)+$", text, re.M)) == 2  # its two "Related Provisions" boxes, as Markdown tables


@needs_documents
def test_portuguese_docx_outline_levels_and_merged_cell_tables_as_markdown():
    secs = [s for _, s in _sections("fixture_research_article.docx")]
    paths = [s.path for s in secs]
    assert "3 METODOLOGIA > 3.2 Dados e variáveis" in paths  # outline level 0 deepened by its "3.2" numbering
    tables = [t for s in secs for t in s.text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 11
    for t in tables:
        rows = t.split("\n")
        assert re.fullmatch(r"\|(---\|)+", rows[1])
        widths = {r.count(" | ") for r in rows if r != rows[1]}
        assert len(widths) == 1, t[:300]  # merged cells keep every row as wide as the table
    big = max(tables, key=len)
    assert big.count("\n") >= 38 and unicodedata.is_normalized("NFC", big)
    assert any("Práticas da administração" in t for t in tables)


# ------------------------------------------------------------------------------------------------ HTML

@needs_documents
def test_folha_page_gives_the_article_without_its_menus():
    secs = _sections("readability-folha-source.html")
    text = "\n".join(s.path + "\n" + s.text for _, s in secs)
    assert secs[0][1].path.startswith("Tite diz que errou ao levar taça da Libertadores a Lula em 2012")
    assert "Ao lado de representantes do clube paulista" in text and "acrescentou o comandante" in text
    for menu in ("Mercado da bola", "Edição Impressa", "Política de Privacidade", "Horóscopo", "Loterias"):
        assert menu not in text, menu
    assert all(re.fullmatch(r"\d+:\d+", idx) for idx, _ in secs)  # where each heading stands in the page


# --------------------------------------------------------------------------------------- long sections

def test_long_sections_are_cut_between_paragraphs_then_sentences_keeping_the_path():
    paras = ["Primeira frase do parágrafo um. Segunda frase dele.", "Parágrafo dois, curto.",
             "Um parágrafo longo. " + "Cada frase conta. " * 12 + "Fim do parágrafo."]
    sec = Section("Art. 5º", "TÍTULO II > CAPÍTULO I > Art. 5º", "Regimento", "\n\n".join(paras))
    fits = lambda s: len(s.text) <= 120  # noqa: E731
    pieces = split_section(sec, fits)
    assert len(pieces) > 2 and all(fits(p) for p in pieces)
    assert {p.path for p in pieces} == {sec.path} and {p.heading for p in pieces} == {"Art. 5º"}
    assert pieces[0].text == paras[0] + "\n\n" + paras[1]  # whole paragraphs while they fit
    for p in pieces:
        assert p.text.endswith((".", "dele.")) and p.text[0].isupper()  # never cut mid-sentence
    assert " ".join(p.text.replace("\n\n", " ") for p in pieces).split() == sec.text.split()
    assert split_section(sec, lambda s: True) == [sec]


def test_a_table_stays_whole_where_it_fits_else_splits_by_rows_with_its_header():
    table = "| a | b |\n|---|---|\n" + "\n".join(f"| linha {i} | valor {i} |" for i in range(10))
    sec = Section("Tabela", "Tabela", "Doc", "Texto antes.\n\n" + table)
    pieces = split_section(sec, lambda s: len(s.text) <= len(table))
    assert [p.text for p in pieces] == ["Texto antes.", table]
    rows = split_section(sec, lambda s: len(s.text) <= 80)
    assert all(p.text.startswith("| a | b |\n|---|---|\n| linha") for p in rows[1:]) and len(rows) > 3


# ---------------------------------------------------------------------------------- through curation

@needs_documents
def test_curating_documents_accounts_for_every_record_and_quarantines_by_file_and_reason(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    for name in ("pdflatex-outline.pdf", "c02-22.pdf", "libreoffice-writer-password.pdf", "handbook-872p.docx",
                 "fixture_research_article.docx", "readability-folha-source.html"):
        shutil.copy(DOCS / name, raw)
    params = load_params(ROOT / "params.yaml", ['curate.sources=[{glob: "*password*.pdf", password: openpassword}]'])
    stats = curate.run(params, raw, tmp_path / "out")
    for src, s in stats["sources"].items():
        assert s["curated"] + s["duplicates"] + s["quarantined"] == s["read"], src
    assert stats["sources"]["m/c02-22.pdf"]["reasons"] == {"no_text_layer": 1}
    assert stats["sources"]["m/libreoffice-writer-password.pdf"]["curated"] == 1
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert any(q["source"] == "m/c02-22.pdf" and q["reason"].startswith("m/c02-22.pdf: no text layer") for q in quarantine)
    records = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "eval.jsonl")
    by_source = {r["source"]: r for r in records}
    assert "m/pdflatex-outline.pdf#p2" in by_source or any(q["source"] == "m/pdflatex-outline.pdf#p2" for q in quarantine)
    # The handbook's long sections come in pieces that fit: few records are left too long to keep.
    hb = stats["sources"]["m/handbook-872p.docx"]
    assert any(src.startswith("m/handbook-872p.docx#¶") and "~" in src for src in by_source)
    assert hb["reasons"].get("too_long", 0) <= hb["read"] // 20
    assert stats["token_lengths"]["max"] <= params.base.max_seq_len
    piece = next(r for s, r in by_source.items() if s.startswith("m/handbook-872p.docx#") and "~2" in s)
    assert piece["messages"][-2]["content"] == piece["messages"][-2]["content"].strip() != ""
    # stats.json per document: what its reader saw, quarantined ones with their reason
    scan = stats["sources"]["m/c02-22.pdf"]["document"]
    assert scan == {"pages": 1, "pages_without_text": [1], "quarantined": "no_text_layer", "reason": scan["reason"]}
    assert scan["reason"].startswith("m/c02-22.pdf: no text layer")
    outlined = stats["sources"]["m/pdflatex-outline.pdf"]["document"]
    assert outlined["pages"] == 4 and outlined["structure"] == "outline" and "quarantined" not in outlined
    assert stats["sources"]["m/handbook-872p.docx"]["document"]["sections_cut"] > 0
    assert all("document" in s for s in stats["sources"].values())


@needs_documents
def test_document_facts_come_from_worker_processes_too_and_quarantine_says_why(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    for name in ("pdflatex-outline.pdf", "libreoffice-writer-password.pdf", "fixture_research_article.docx"):
        shutil.copy(DOCS / name, raw)
    one = curate.run(load_params(ROOT / "params.yaml", ["curate.workers=1"]), raw, tmp_path / "one")
    two = curate.run(load_params(ROOT / "params.yaml", ["curate.workers=2"]), raw, tmp_path / "two")
    assert one["sources"] == two["sources"]
    locked = two["sources"]["m/libreoffice-writer-password.pdf"]
    assert locked["document"]["quarantined"] == "encrypted" and "give its password" in locked["document"]["reason"]
    assert locked["read"] == locked["quarantined"] == 1
    assert two["sources"]["m/fixture_research_article.docx"]["document"]["tables"] == 11


@needs_documents
def test_an_encrypted_pdf_without_its_password_is_quarantined_naming_file_and_fix(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    shutil.copy(DOCS / "libreoffice-writer-password.pdf", raw)
    with pytest.raises(CurationError, match=r"m/libreoffice-writer-password.pdf: encrypted PDF: give its password"):
        curate.run(load_params(ROOT / "params.yaml"), raw, tmp_path / "out")


@needs_documents
def test_readers_report_what_each_document_held_for_its_stats():
    info: dict = {}
    recs = list(read_units(DOCS / "pdflatex-outline.pdf", Options(), info=info))
    assert info == {"pages": 4, "pages_without_text": [], "structure": "outline", "sections": len(recs),
                    "sections_cut": 0, "pieces": 0}
    info = {}
    with pytest.raises(Reject):
        list(read_units(DOCS / "c02-22.pdf", Options(), info=info))
    assert info == {"pages": 1, "pages_without_text": [1]}
    info = {}
    limited = Options(max_tokens=200)  # no tokenizer: the byte bound alone decides, so more is cut
    recs = list(read_units(DOCS / "fixture_research_article.docx", limited, info=info))
    assert info["tables"] == 11 and info["footnotes"] >= 1 and info["sections"] == 23
    assert info["sections_cut"] > 0 and len(recs) == info["sections"] - info["sections_cut"] + info["pieces"]


def test_model_card_data_section_lists_documents_pages_and_generated_pairs():
    from loraflow import modelcard

    s = {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4}
    metrics = {m: {k: s for k in modelcard.METRIC_NAMES} for m in ("base", "candidate")} | {
        "champion": None, "deltas": {"candidate_vs_base": {k: s for k in modelcard.METRIC_NAMES}},
        "eval_set": {"sha256": "0" * 64, "size": 3}, "generation": {"max_new_tokens": 24},
        "scoring": {"confidence": 0.95, "rouge_tokenizer": "words", "bertscore_model": "x"}}
    row = {"read": 12, "curated": 11, "duplicates": 0, "quarantined": 1, "reasons": {"no_text_layer": 1}}
    stats = {"sources": {
        "m/regimento.pdf": row | {"document": {"pages": 80, "pages_without_text": [3], "structure": "layout",
                                                "sections": 11, "sections_cut": 1, "pieces": 2}},
        "m/scan.pdf": {"read": 1, "curated": 0, "duplicates": 0, "quarantined": 1, "reasons": {"no_text_layer": 1},
                       "document": {"pages": 1, "pages_without_text": [1], "quarantined": "no_text_layer",
                                    "reason": "m/scan.pdf: no text layer"}},
        "m/faq.jsonl": {"read": 5, "curated": 5, "duplicates": 0, "quarantined": 0, "reasons": {}}},
        "totals": {"read": 18, "curated": 16, "duplicates": 0, "quarantined": 2},
        "splits": {"train": 15, "eval": 1}, "token_lengths": {"p50": 40, "p95": 80, "max": 90},
        "files": {"train.jsonl": "1" * 64, "eval.jsonl": "2" * 64},
        "teacher": {"endpoint": "http://127.0.0.1:8000/v1", "model": "base", "sections": 11, "pairs": 4,
                    "ungrounded": 2, "error": None, "records": {"made": 4, "curated": 4}}}
    params = load_params(ROOT / "params.yaml")
    card = modelcard.render(params, "m", stats, {}, metrics, {"decision": "promote", "reason": "better"})
    assert "Documents: 2, 81 PDF page(s) (2 without a text layer, not read: no OCR)" in card
    assert "| `m/regimento.pdf` | 79 of 80 | 11 | 2 | 11 records curated |" in card
    assert "| `m/scan.pdf` | 0 of 1 | — | — | quarantined: no_text_layer |" in card
    assert "`m/faq.jsonl` |" in card and "| `m/faq.jsonl` | —" not in card  # a record file is no document
    assert "from 11 section(s): 4 grounded question/answer pair(s) kept (2 ungrounded dropped), 4 curated" in card
    del stats["teacher"]
    for src in ("m/regimento.pdf", "m/scan.pdf"):
        del stats["sources"][src]["document"]
    plain = modelcard.render(params, "m", stats, {}, metrics, {"decision": "promote", "reason": "better"})
    assert "Documents:" not in plain and "teacher" not in plain
