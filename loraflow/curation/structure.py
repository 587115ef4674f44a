"""The shape a curated conversation and a preference pair must have: roles, turn order, non-empty turns."""

from __future__ import annotations

from loraflow.formats import Messages, Pref, Reject

ROLES = ("system", "user", "assistant")


def check_structure(msgs: Messages) -> None:
    """Optional leading system turn, then user/assistant alternating, ending with the assistant."""
    _check_turns(msgs, "messages", last="assistant")


def _check_turns(msgs: Messages, where: str, last: str) -> None:
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise Reject("unknown_role", f"{where}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if not m["content"]:
            raise Reject("empty_turn", f"{where}[{i}] ({m['role']}): empty content")
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not turns:
        raise Reject("no_answer", f"{where}: no user/assistant turns after the system message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = i + (len(msgs) - len(turns))
            raise Reject("role_order", f"{where}[{pos}].role: expected {want!r} (turns must alternate user/assistant), "
                         f"got {m['role']!r}")
    if turns[-1]["role"] != last:
        raise Reject("no_answer", "last turn is the user's: there is no assistant answer to learn" if last == "assistant"
                     else f"{where}: the prompt must end with a user turn")


def check_pref(p: Pref) -> None:
    _check_turns(p.prompt, "prompt", last="user")
    for name, side in (("chosen", p.chosen), ("rejected", p.rejected)):
        if not side:
            raise Reject("missing_field", f"{name}: no answer")
        for i, m in enumerate(side):
            if m["role"] != "assistant":
                raise Reject("role_order", f"{name}[{i}].role: expected 'assistant', got {m['role']!r}")
            if not m["content"]:
                raise Reject("empty_turn", f"{name}[{i}]: empty content")
    if p.chosen == p.rejected:
        raise Reject("identical_pair", "chosen and rejected are the same text: nothing to prefer")
