"""The gateway's own tokenizer: it turns OpenAI requests into token ids so streams can move between workers.

Owning tokenization makes mid-stream migration exact: the gateway knows the prompt ids and every id a
worker has produced, so a continuation is simply ``input_ids = prompt_ids + output_ids`` on a new pair.
Loaded from a model folder's ``tokenizer.json`` (the Rust `tokenizers` library) and its chat template
(``chat_template.jinja`` or ``tokenizer_config.json``, rendered with jinja2 the way transformers does),
both imported lazily; never torch or transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


class TokenizerUnavailable(RuntimeError):
    """No usable tokenizer at the given place; the message says what was missing."""


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken-style dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class TextTokenizer:
    """Encode, decode and render chat for one model."""

    def __init__(self, backend: Any, chat_template: str | None, special: dict[str, str], name: str = "") -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.name = name
        self.special = special  # bos_token, eos_token, ... -> text
        self.chat_template = chat_template
        self._template: Any = None
        if chat_template:
            self._template = _compile_template(chat_template)
        self.eos_token_id: int | None = None
        if special.get("eos_token"):
            self.eos_token_id = backend.token_to_id(special["eos_token"])

    @classmethod
    def from_path(cls, path: str | Path) -> TextTokenizer:
        """Load from a model folder (tokenizer.json + optional chat template) or a tokenizer.json file."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - part of the core install
            raise TokenizerUnavailable("the 'tokenizers' package is not installed") from e
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        tok_file = p / "tokenizer.json" if p.is_dir() else p
        if not tok_file.is_file():
            raise TokenizerUnavailable(f"no tokenizer.json at {p}")
        backend = Tokenizer.from_file(str(tok_file))
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (t := _token_text(config.get(k))) is not None}
        return cls(backend, template, special, name=str(folder))

    # -- ids <-> text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- chat --------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise TokenizerUnavailable("this model has no chat template; use /v1/completions")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **self.special,
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids of a chat, as transformers' apply_chat_template(tokenize=True) gives them."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Text deltas from a growing list of ids, never splitting a multi-byte character.

    Decodes a short window (the ids since the last emitted boundary) rather than the whole output
    each time; a delta is held back while the window ends in an incomplete UTF-8 sequence (U+FFFD).
    ``finish`` reconciles with a full decode, so the concatenated deltas always equal ``decode(ids)``.
    """

    def __init__(self, tokenizer: TextTokenizer | ByteTokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted: list[str] = []
        self._prefix = 0  # window start
        self._read = 0  # ids up to here have been emitted

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self.tok.decode
        prefix_text = decode(self.ids[self._prefix:self._read])
        full = decode(self.ids[self._prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted.append(delta)
            return delta
        return ""

    def finish(self) -> str:
        """The rest of the text once no more ids will come."""
        text = self.tok.decode(self.ids)
        sent = "".join(self.emitted)
        rest = text[len(sent):] if text.startswith(sent) else ""
        if rest:
            self.emitted.append(rest)
        return rest

    @property
    def text(self) -> str:
        return "".join(self.emitted)


class ByteTokenizer:
    """The reference engine's ``emulated`` model: ids 0-255 are UTF-8 bytes, 256 ends the text, and a
    chat is ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then the assistant header).

    The worker reports it as ``tokenizer_path: "bytes"`` in /model_info.
    """

    EOS = 256
    CHAT_START = "<|im_start|>"
    CHAT_END = "<|im_end|>"

    def __init__(self) -> None:
        self.name = "bytes"
        self.eos_token_id: int | None = self.EOS
        self.vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        if not skip_special_tokens and self.EOS in ids:
            text += "<|endoftext|>" * ids.count(self.EOS)
        return text

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"{self.CHAT_START}{m['role']}\n{m['content']}{self.CHAT_END}\n" for m in messages)
        return text + (f"{self.CHAT_START}assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.render_chat(messages))


GatewayTokenizer = TextTokenizer | ByteTokenizer
