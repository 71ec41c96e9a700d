"""Gemma 4's chat format: the checkpoint's Jinja template rendered as transformers renders it, stop
tokens, thoughts, and a multi-turn session that keeps the KV cache between turns."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from g4.generation import AnyDrafter, GenerateError, Generation, Model, Sampler, generate, soft_ids

# Gemma 4's format, written for the tiny model; used for a tokenizer folder that carries no template.
GEMMA4_TEMPLATE = Path(__file__).parent / "assets" / "tiny" / "chat_template.jinja"
# Gemma 4 quirk: generation ends at the end of a turn (<turn|>) and after a tool call, where the model
# opens <|tool_response> for the caller to fill in; not only at <eos>.
STOP_TOKENS = ("<eos>", "<turn|>", "<|tool_response>")
# Gemma 4 quirk: with thinking on, the model writes its thought as <|channel>thought\n...<channel|> first.
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")

Message = dict[str, Any]


@attrs.frozen
class Template:
    """A Jinja chat template and where it came from (for error messages)."""

    source: str
    path: Path


def template(folder: Path) -> Template:
    """The chat template in a tokenizer folder (chat_template.jinja or tokenizer_config.json), else Gemma 4's."""
    if (folder / "chat_template.jinja").is_file():
        return Template((folder / "chat_template.jinja").read_text(), folder / "chat_template.jinja")
    t = _config(folder).get("chat_template")
    if isinstance(t, str):
        return Template(t, folder / "tokenizer_config.json")
    return Template(GEMMA4_TEMPLATE.read_text(), GEMMA4_TEMPLATE)


def special_tokens(folder: Path) -> dict[str, str]:
    """`bos_token` etc. as the template sees them (tokenizer_config.json; Gemma's names by default)."""
    cfg = _config(folder)
    out = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    for name in SPECIAL_NAMES:
        v = cfg.get(name)
        if isinstance(v, dict):  # an AddedToken written out
            v = v.get("content")
        if isinstance(v, str):
            out[name] = v
    return out


def _config(folder: Path) -> dict[str, Any]:
    return _json(folder / "tokenizer_config.json")


def _json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} if there is no such file); GenerateError naming it if it is not one."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise GenerateError(f"{path}: not a JSON object")
    return obj


def stop_ids(folder: Path | None, eos: Sequence[int]) -> tuple[int, ...]:
    """`eos`, plus generation_config.json's eos ids and the ids of `STOP_TOKENS` in the tokenizer."""
    if folder is None:
        return tuple(eos)
    e = _json(folder / "generation_config.json").get("eos_token_id", [])
    added = _json(folder / "tokenizer.json").get("added_tokens", [])
    ids = [*eos, *([e] if isinstance(e, int) else e)]
    ids += [t["id"] for t in added if isinstance(t, dict) and t.get("content") in STOP_TOKENS]
    return tuple(dict.fromkeys(int(i) for i in ids))


@functools.cache
def _environment():  # noqa: ANN202 (jinja2.Environment)
    """A sandboxed Jinja environment set up as transformers' `apply_chat_template` sets up its own."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks training targets with it): the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):  # noqa: ANN202
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def render(
    tpl: Template,
    messages: Sequence[Message],
    specials: dict[str, str],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for a conversation; GenerateError if the template does not render."""
    import jinja2

    try:
        return (
            _environment()
            .from_string(tpl.source)
            .render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                **specials,
            )
        )
    except jinja2.TemplateError as e:
        raise GenerateError(f"{tpl.path}: chat template does not render: {type(e).__name__}: {e}") from None


def split_thought(text: str) -> tuple[str, str]:
    """(thought, answer) of a reply written with thinking on; ("", text) without a thought."""
    if THOUGHT_OPEN not in text:
        return "", text
    head, _, rest = text.partition(THOUGHT_OPEN)
    thought, closed, tail = rest.partition(THOUGHT_CLOSE)
    return thought.removeprefix("thought\n"), head + tail if closed else head


@attrs.define
class Chat:
    """A conversation with a model: each turn feeds only what the cache does not hold yet.

    The model sees exactly the template's rendering of the whole conversation. Where that rendering
    starts with the tokens already in the cache (prompt and reply of earlier turns), only the rest is
    fed; otherwise (the template dropped a thought from the history, or the reply re-tokenizes
    differently) the conversation is prefilled again from position 0.
    """

    model: Model
    tokenizer: Any  # tokenizers.Tokenizer
    template: Template
    specials: dict[str, str]
    enable_thinking: bool = False
    tools: list[dict[str, Any]] | None = None
    messages: list[Message] = attrs.field(factory=list)
    cached: list[int] = attrs.field(factory=list)  # tokens the model's cache holds, from position 0
    drafter: AnyDrafter | None = None  # speculative decoding
    soft: Tensor | None = None  # the soft tokens of every image and clip in the conversation, in order

    def _soft(self, ids: list[int], start: int) -> Tensor | None:
        """The soft tokens of the placeholders in `ids[start:]` (those before were fed with the cache)."""
        if self.soft is None:
            return None
        token = soft_ids(self.model)
        before, here = (sum(part.count(i) for i in token) for part in (ids[:start], ids[start:]))
        return self.soft[before : before + here] if here else None

    def text(self) -> str:
        """The conversation as the template renders it, ending with the model's turn opener."""
        return render(
            self.template, self.messages, self.specials, tools=self.tools, enable_thinking=self.enable_thinking
        )

    def prompt(self) -> list[int]:
        """The rendered conversation, as token ids."""
        return self.tokenizer.encode(self.text(), add_special_tokens=False).ids

    def reply(
        self,
        messages: Sequence[Message],
        max_new_tokens: int,
        sampler: Sampler | None = None,
        on_token: Callable[[int], None] | None = None,
        soft: Tensor | None = None,
    ) -> Generation:
        """Adds `messages`, generates the model's reply and adds it to the conversation. `soft`: the soft
        tokens of the images and clips `messages` add (their placeholders are in the messages' text)."""
        self.messages += messages
        if soft is not None:
            self.soft = soft if self.soft is None else torch.cat([self.soft, soft])
        ids = self.prompt()
        n = len(self.cached)
        start = n if n < len(ids) and ids[:n] == self.cached else 0
        g = generate(
            self.model,
            ids[start:],
            max_new_tokens,
            sampler or Sampler(),
            on_token=on_token,
            start=start,
            drafter=self.drafter,
            soft=self._soft(ids, start),
        )
        self.cached = ids + list(g.ids[:-1])  # the last token was sampled, not fed
        reply = list(g.ids[:-1] if g.ids and g.ids[-1] in self.model.eos_ids else g.ids)
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(reply, skip_special_tokens=False)})
        return g
