"""Tokenization and chat templates, done once by edgeq so every backend gets the same token ids.

Only the `tokenizers` library and a sandboxed Jinja environment are used: an app that embeds the
runtime needs neither transformers nor the source model. The files come from a checkpoint or a bundle
someone else wrote, so each is checked as it is read and a damaged one fails in one line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .architectures import TURN_END_TOKENS
from .chat_template import compile_template, render
from .errors import EdgeqError
from .validate import json_type, read_json_object

# End-of-turn tokens used by the chat templates of the supported families (`edgeq.architectures`). A
# fine-tune that stops on one of these must stop on it after export too, so every one present in the
# vocab becomes a stop id.
END_OF_TURN_TOKENS = (*TURN_END_TOKENS, "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")


def _token_text(value, name: str, path: Path) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise EdgeqError(f"{path}: {name} must be a string or {{\"content\": string}}, got {json_type(value)}; fix the tokenizer files")
    return text


def _read_config(path: Path) -> dict:
    return read_json_object(path, "fix or re-save the tokenizer (tokenizer.save_pretrained)") if path.is_file() else {}


def load_tokenizer(path: Path):
    """The `tokenizers` Tokenizer of a tokenizer.json; a damaged file is one line, not a Rust panic message."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise EdgeqError(f"{path} is missing; save the tokenizer with transformers (a fast tokenizer) first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for every parse failure
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise EdgeqError(f"{path} is not a tokenizer the tokenizers library can read ({detail}); re-save the tokenizer") from None


@dataclass
class TokenizerSpec:
    """What the bundle's manifest records about the tokenizer; the files hold the rest."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_chat_template(folder: Path) -> str | None:
    """The chat template of an HF folder: `chat_template.jinja`, else tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgeqError(f"{jinja} is not UTF-8 text; re-save the chat template as UTF-8") from None
    config_path = folder / "tokenizer_config.json"
    template = _read_config(config_path).get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is used for chat
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
            raise EdgeqError(f"{config_path}: chat_template as a list must hold {{\"name\", \"template\"}} objects; fix it")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise EdgeqError(f"{config_path}: chat_template must be a string, got {json_type(template)}; fix it")
    return template


class ChatTokenizer:
    """Encodes prompts and chats to ids, and decodes generated ids to text incrementally."""

    def __init__(self, tokenizer_json: Path, spec: TokenizerSpec, chat_template: str | None):
        self._tok = load_tokenizer(tokenizer_json)
        # SentencePiece-style byte fallback: "<0xE2><0x82><0xAC>" decode together, as one run, to "€"
        byte_fallback = getattr(self._tok.model, "byte_fallback", False)
        self.byte_ids = ({self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)} - {None}) if byte_fallback else set()
        self.spec = spec
        self.chat_template = chat_template
        self._template = compile_template(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text and id, added tokens included (what a draft model must share with its target)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools` (OpenAI-style function specs) go into the template's context as transformers passes them."""
        if self._template is None:
            raise EdgeqError("this model has no chat template; pass a plain prompt instead of messages")
        s = self.spec
        return render(
            self._template, messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=s.bos_token or "", eos_token=s.eos_token or "",
            pad_token=s.pad_token or "", unk_token=s.unk_token or "",
            **({"tools": tools} if tools else {}),
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        # The template writes BOS itself where the model wants one; adding it again doubles it.
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)

    def to_json(self) -> str:
        """tokenizer.json as text: what a constraint library builds its own view of the vocabulary from."""
        return self._tok.to_str()

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise EdgeqError("pass exactly one of prompt= or messages=")
        return self.encode(prompt) if messages is None else self.encode_chat(messages)

    def detokenizer(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, never splitting a multi-byte character.

    A character spread over byte-level tokens decodes to U+FFFD until its last byte arrives, so
    text is only released once the tail of the decoded window no longer ends in U+FFFD. Byte-fallback
    tokens decode as a whole run (a run that is not valid UTF-8 becomes U+FFFD throughout, "F" too),
    so text is not released either while the window ends in one: the pieces join to the full decode.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids before this one are only context for decoding the next piece
        self._read = 0    # ids before this one have been released as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read])
        full_text = decode(self._ids[self._prefix:])
        in_byte_run = token_id in self._tokenizer.byte_ids
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd") and not in_byte_run:
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read])
        full_text = decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]


def spec_from_hf_folder(folder: Path, vocab: dict[str, int], generation_config: dict) -> TokenizerSpec:
    """Collects BOS/EOS and every stop id a fine-tune may end a turn with."""
    config_path, special_map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config, special_map = _read_config(config_path), _read_config(special_map_path)

    def special(name):
        return _token_text(config.get(name), name, config_path) or _token_text(special_map.get(name), name, special_map_path)

    spec = TokenizerSpec(
        bos_token=special("bos_token"), eos_token=special("eos_token"),
        pad_token=special("pad_token"), unk_token=special("unk_token"),
    )
    stop: list[int] = []
    eos_ids = generation_config.get("eos_token_id")
    stop += eos_ids if isinstance(eos_ids, list) else ([eos_ids] if eos_ids is not None else [])
    candidates: Iterable[str | None] = (spec.eos_token, *END_OF_TURN_TOKENS)
    stop += [vocab[t] for t in candidates if t in vocab]
    spec.stop_token_ids = sorted(set(stop))
    return spec
