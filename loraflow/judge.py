"""Pairwise LLM-as-judge for evaluate: which of two answers to the same prompt is better?

The judge reads a fixed prompt (question, reference answer, answers A and B) and we compare the logits of
its first answer token, "A" against "B": no free text to parse, and the verdict is deterministic. Each pair
is judged in both orders; the candidate wins only if it is preferred in both (position bias otherwise
decides), loses only if the other answer is preferred in both, and ties otherwise.
"""

from __future__ import annotations

import hashlib

PROMPT = """You compare two answers to the same question. A reference answer written by an expert is given.
Choose the answer that is more correct, more complete and closer in meaning to the reference, in the language of the question.
Reply with a single letter: A or B.

[Question]
{question}

[Reference answer]
{reference}

[Answer A]
{a}

[Answer B]
{b}"""

PROMPT_SHA256 = hashlib.sha256(PROMPT.encode()).hexdigest()


def question_text(messages: list[dict]) -> str:
    """The prompt turns as the judge sees them (system turns left out: they instruct the judged model)."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


class PairwiseJudge:
    def __init__(self, spec: str, cache: str = "~/.cache/loraflow", trust_remote_code: bool = False):
        from loraflow.models import load_causal_lm, load_tokenizer, resolve

        path = resolve(spec, cache)
        self.spec = spec
        self.tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(path, trust_remote_code=trust_remote_code).eval()
        self.ids = [self.tok(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B")]

    def _prefers_a(self, items: list[tuple[str, str, str, str]], batch_size: int) -> list[bool]:
        import torch

        texts = [self.tok.apply_chat_template([{"role": "user", "content": PROMPT.format(question=q, reference=r, a=a, b=b)}],
                                              tokenize=False, add_generation_prompt=True) for q, r, a, b in items]
        self.tok.padding_side = "left"
        out: list[bool] = []
        for start in range(0, len(texts), batch_size):
            enc = self.tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.model.device)
            # generate() rather than a bare forward pass: it derives position ids from the left-padded mask.
            with torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=1, do_sample=False, num_beams=1, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
            logits = gen.logits[0][:, self.ids]
            out += (logits[:, 0] > logits[:, 1]).tolist()
        return out

    def compare(self, questions: list[str], references: list[str], candidate: list[str], other: list[str],
                batch_size: int = 8) -> list[str]:
        """Per example "win", "tie" or "loss" for `candidate` against `other`."""
        first = self._prefers_a(list(zip(questions, references, candidate, other, strict=True)), batch_size)
        second = self._prefers_a(list(zip(questions, references, other, candidate, strict=True)), batch_size)
        verdicts = []
        for cand_as_a, other_as_a in zip(first, second, strict=True):
            wins = int(cand_as_a) + int(not other_as_a)
            verdicts.append({2: "win", 1: "tie", 0: "loss"}[wins])
        return verdicts
