from loraflow.pii import find, residue, scrub


def test_each_kind_is_replaced_by_a_typed_placeholder():
    text = ("Fale com ana.silva@loja.com.br ou (11) 98765-4321; CPF 529.982.247-25, CNPJ 11.222.333/0001-81, "
            "cartão 4111 1111 1111 1111, servidor 192.168.0.10.")
    out, counts = scrub(text)
    assert out == ("Fale com <EMAIL> ou <PHONE>; CPF <CPF>, CNPJ <CNPJ>, cartão <CARD>, servidor <IP>.")
    assert counts == {"email": 1, "phone": 1, "cpf": 1, "cnpj": 1, "card": 1, "ip": 1}


def test_numbers_that_only_look_like_documents_survive():
    text = "Investimento R$ 1.200, receita R$ 6.000; pedido 123.456.789-00; lote 4111 1111 1111 1112; versão 1.2.3.4567; de 2000-2015 e 1936-1939"
    assert scrub(text)[0] == text and not find(text)


def test_phone_formats():
    for phone in ("+55 11 98765-4321", "(21) 3456-7890", "98765-4321", "11 98765-4321", "+5511987654321"):
        assert find(f"ligue {phone} hoje") == {"phone": 1}, phone


def test_kinds_can_be_turned_off():
    out, counts = scrub("CPF 529.982.247-25 e a@b.com", kinds=["email"])
    assert out == "CPF 529.982.247-25 e <EMAIL>" and counts == {"email": 1}


def test_email_local_part_takes_every_rfc5322_character_and_leaves_the_punctuation_around_it():
    # The address the LLaMA-Factory alpaca demo file carries, in its backticks, as the file writes it.
    assert scrub("would be `John.Doe-123%+@example-domain.com`.") == ("would be `<EMAIL>`.", {"email": 1})
    for addr in ("!def!xyz%abc@example.com", "o'neil@x.com.br", "a{b}|c~d@x.org", "x.@x.com", "ação@loja.com.br",
                 '"john doe"@example.com', "user+tag@sub.example.co.uk"):
        assert scrub(f"mail: {addr}, ok") == ("mail: <EMAIL>, ok", {"email": 1}), addr
    for wrapped, out in (("**a.b@x.com**", "**<EMAIL>**"), ("_ana@x.com_", "_<EMAIL>_"), ("(a@x.com).", "(<EMAIL>)."),
                         ("'a@x.com'", "'<EMAIL>'"), ("<a@x.com>", "<<EMAIL>>"), ("{a@my-host.com}-", "{<EMAIL>}-")):
        assert scrub(wrapped)[0] == out, wrapped
    # a regular expression for e-mail addresses and a handle are not addresses
    regex = "[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\\.[a-zA-Z]{2,}"
    assert scrub(f"use {regex} or @michael")[0] == f"use {regex} or @michael"


def test_other_countries_phones_and_compressed_ipv6():
    assert scrub("call +1 (555) 123-4567, +44 20 7946 0958 or (555) 123-4567")[0] == "call <PHONE>, <PHONE> or <PHONE>"
    assert scrub("host fe80::1:2:3 at 10:30:45, not [::-1]")[0] == "host <IP> at 10:30:45, not [::-1]"


def test_email_search_stays_linear_on_long_runs_of_atext():
    import base64
    import time

    blob = base64.b64encode(bytes(range(256)) * 600).decode() + " " + "`a" * 50_000
    t = time.perf_counter()
    assert scrub(blob)[0] == blob
    assert time.perf_counter() - t < 2.0


def test_the_second_detector_catches_what_the_scrubber_misses():
    # Each slipped past the scrubber's own patterns (dots between card groups, spaces in a CPF, a 9-digit
    # landline in an odd format, an address longer than RFC 5321 allows): scrubbing leaves it, the detector finds it.
    missed = {"card": "cartão 4111.1111.1111.1111", "cpf": "cpf 529 982 247 25", "phone": "tel (011) 3456.7890",
              "email": "x" * 300 + "@example.com"}
    for kind, text in missed.items():
        assert scrub(text)[0] == text and not find(text), kind
        assert residue(text) == {kind: 1}, kind
    # and it is not a false alarm on what the scrubber rightly leaves, nor on its placeholders
    clean = ("Investimento R$ 1.200; pedido 123.456.789-00; lote 4111 1111 1111 1112; versão 1.2.3.4567; 2000-2015; "
             "94962 × 4694 = 43957319824; `@app.get`; x = a@b.T; original[::-1]; <EMAIL> <PHONE> <CPF>; "
             "https://doi.org/10.5007/2175-8069.2020v17n45p19; 10.51359/1679-1827.2021.239657; 2175.8069-2020/4519")
    assert not residue(clean) and not residue(scrub("ana@x.com (11) 98765-4321 529.982.247-25")[0])
