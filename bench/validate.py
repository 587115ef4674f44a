"""Time the validation gate on 10,000 generated curated records, token lengths and all checks included.

    python bench/validate.py [--records 10000]

Side by side in one run: the bare work every length check needs (render each record with the chat template
and tokenize them in one batch, transformers alone) and our whole step (that, plus assistant spans,
end-of-turn tokens, MinHash overlap, PII, GX suites, drift against a profile, reports). The last line is
the headline: the step's time with every check on, drift included.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, not an installed copy

from loraflow.config import load_params  # noqa: E402
from loraflow.io import write_jsonl  # noqa: E402
from steps import validate  # noqa: E402

WORDS = ("campanha anúncio vitrine clique conversão orçamento lance palavra produto categoria loja marca estoque "
         "preço frete cupom banner busca relatório métrica público segmento criativo pedido retorno investimento "
         "impressão alcance frequência custo venda página vendedor comprador patrocinado posição leilão meta "
         "semana mês dia hora canal mídia varejo cliente carrinho checkout desconto oferta promoção").split()


def records(n: int, rng: random.Random, split: str) -> list[dict]:
    out = []
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        msgs = [{"role": "system", "content": "Você é um assistente de retail media."}] if i % 5 == 0 else []
        for _ in range(1 + (i % 7 == 0)):  # some two-turn conversations
            msgs += [{"role": "user", "content": words(rng.randint(6, 30)) + "?"},
                     {"role": "assistant", "content": words(rng.randint(10, 60)) + "."}]
        out.append({"id": f"{split}{i:06d}", "messages": msgs, "source": f"retail_media/gen{i % 3}.jsonl#{i}", "meta": {}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000)
    n = ap.parse_args().records
    rng = random.Random(0)
    n_eval = n // 10
    train, evals = records(n - n_eval, rng, "t"), records(n_eval, rng, "e")
    prefs = [{"id": f"p{i:05d}", "prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
              "rejected": [{"role": "assistant", "content": "Não sei."}], "source": r["source"], "meta": {}}
             for i, r in enumerate(train[:200])]
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "curated"
        write_jsonl(d / "train.jsonl", train)
        write_jsonl(d / "eval.jsonl", evals)
        write_jsonl(d / "prefs.jsonl", prefs)

        from loraflow.models import load_tokenizer, resolve

        t0 = time.perf_counter()
        tok = load_tokenizer(resolve(params.base.model, params.base.model_cache))
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in train + evals]
        lengths = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        bare = time.perf_counter() - t0
        print(f"bare transformers: render + tokenize {len(texts)} records in {bare:.1f} s "
              f"(p50 {sorted(lengths)[len(lengths) // 2]} tokens)")

        profile = Path(tmp) / "profile.json"
        t0 = time.perf_counter()
        report = validate.run(params, d, Path(tmp) / "v1", profile)  # first pass: no baseline yet, writes one
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = validate.run(params, d, Path(tmp) / "v2", profile)  # every check, drift included
        full = time.perf_counter() - t0
        n_exp = sum(len(v) for v in report["splits"].values())
        print(f"loraflow validate, no baseline: {first:.1f} s; with drift: {full:.1f} s "
              f"({n_exp} expectations, success={report['success']}, warnings={report['warnings']})")
    print(f"{full:.1f} s to validate {n} records (goal < 30 s)")


if __name__ == "__main__":
    main()
