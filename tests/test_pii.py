from loraflow.pii import find, scrub


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
