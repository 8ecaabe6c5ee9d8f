"""A user's data for calibration and evaluation: plain text, JSONL chats, or JSONL prompt/completion pairs.

A fine-tune is trained to produce its assistant turns, so those are the tokens it is judged on. Chats are
rendered with the model's own chat template (the rendering `generate()` uses); each sample carries the
ids of the whole conversation and, per position, whether the *next* token is one the assistant wrote
(including the end-of-turn token, which a fine-tune must also produce). Plain text scores every position.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .validate import read_text_file

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    ids: list[int]
    targets: np.ndarray          # bool per position t < len(ids) - 1: is ids[t + 1] a token to judge
    prompt: list[dict] | None = None   # the chat up to its last assistant turn (for greedy-reply agreement)


@dataclass
class Dataset:
    kind: str                     # "text", "chat" or "prompt-completion"
    path: Path
    sha256: str
    samples: list[Sample] = field(default_factory=list)
    truncated: int = 0

    @property
    def scored_tokens(self) -> int:
        return int(sum(s.targets.sum() for s in self.samples))

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "samples": len(self.samples),
                "scored_tokens": self.scored_tokens, "truncated": self.truncated}


def read_dataset(path: str | Path, tokenizer, *, tokens: int = 4096, ctx: int = 512) -> Dataset:
    """The samples of a data file, up to about `tokens` scored tokens, none longer than `ctx` ids."""
    path = Path(path)
    text = read_text_file(path, "data file")
    digest = hashlib.sha256(text.encode()).hexdigest()
    first = text.lstrip()[:1]
    if path.suffix.lower() in (".jsonl", ".json") or first == "{":
        records = _jsonl(text, path)
        kind = "chat" if "messages" in records[0][1] else "prompt-completion"
        data = Dataset(kind, path, digest)
        for line, record in records:
            if data.scored_tokens >= tokens:
                break
            _add_record(data, record, line, tokenizer, ctx)
        if not data.samples:
            raise EdgeqError(f"{path}: no conversation has an assistant turn to judge; add assistant replies")
    else:
        data = Dataset("text", path, digest)
        for window in text_windows(tokenizer, text, path, tokens, ctx):
            data.samples.append(Sample(window, np.ones(len(window) - 1, dtype=bool)))
    if data.truncated:
        log.warning("%s: %d samples were longer than %d tokens and were cut to fit", path, data.truncated, ctx)
    return data


def text_windows(tokenizer, text: str, path: Path, tokens: int, ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `ctx` ids from the start of the text (BOS first when the model wants it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.token_id(tokenizer.spec.bos_token) if tokenizer.spec.add_bos_token else None
    width = ctx - (bos is not None)
    windows = [ids[i:i + width] for i in range(0, min(len(ids), tokens), width)]
    windows = [w for w in windows if len(w) == width] or windows[:1]
    if not windows or len(windows[0]) < 2:
        raise EdgeqError(f"{path} holds too little text to measure anything; use a longer file")
    return [([bos] if bos is not None else []) + w for w in windows]


def _jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgeqError(f"{path}, line {number}: not valid JSON ({exc.msg}); one JSON object per line") from None
        if not isinstance(record, dict) or not ({"messages"} <= set(record) or {"prompt", "completion"} <= set(record)):
            raise EdgeqError(f"{path}, line {number}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}")
        records.append((number, record))
    if not records:
        raise EdgeqError(f"{path} holds no JSON lines; write one chat or prompt/completion object per line")
    kinds = {"messages" in r for _, r in records}
    if len(kinds) > 1:
        raise EdgeqError(f"{path} mixes chats and prompt/completion lines; use one kind per file")
    return records


def _messages(record: dict, line: int, path: Path) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise EdgeqError(f"{path}, line {line}: messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise EdgeqError(f"{path}, line {line}: messages[{i}] needs a role ({', '.join(ROLES)}) and string content")
        return messages
    prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise EdgeqError(f"{path}, line {line}: prompt and completion must be strings, the completion not empty")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _add_record(data: Dataset, record: dict, line: int, tokenizer, ctx: int) -> None:
    messages = _messages(record, line, data.path)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise EdgeqError(f"{data.path}, line {line}: the chat has no assistant turn; nothing to judge it on")
    if tokenizer.chat_template is None:  # no template: prompt then completion as plain text
        prompt_ids = tokenizer.prompt_ids(prompt="".join(m["content"] for m in messages[:turns[-1]]))
        ids = prompt_ids + tokenizer.encode(messages[turns[-1]]["content"], add_special_tokens=False)
        spans = [(len(prompt_ids), len(ids))]
    else:
        try:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
            spans = []
            stops = set(tokenizer.spec.stop_token_ids)
            for turn in turns:
                start = len(_common_prefix(tokenizer.encode_chat(messages[:turn], add_generation_prompt=True), ids))
                end = len(_common_prefix(tokenizer.encode_chat(messages[:turn + 1], add_generation_prompt=False), ids))
                # the turn ends at its stop token (generated, so judged); what the template writes after it is not
                end = next((i + 1 for i in range(start, end) if ids[i] in stops), end)
                spans.append((start, end))
        except EdgeqError as exc:
            raise EdgeqError(f"{data.path}, line {line}: the chat template rejects this chat ({exc})") from None
    if len(ids) > ctx:
        ids = ids[:ctx]
        data.truncated += 1
    targets = np.zeros(max(len(ids) - 1, 0), dtype=bool)
    for start, end in spans:
        targets[max(start - 1, 0):max(min(end, len(ids)) - 1, 0)] = True  # position t predicts token t + 1
    if targets.any():
        data.samples.append(Sample(ids, targets, messages[:turns[-1]]))


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
