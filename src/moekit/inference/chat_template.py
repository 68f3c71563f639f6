"""Chat templates: a conversation rendered to prompt text exactly as transformers renders it.

A chat template is a Jinja2 program shipped with a model (in ``tokenizer_config.json`` or a
``chat_template.jinja`` file). transformers' ``apply_chat_template(tokenize=False)`` defines
what it means, so this module reproduces its environment, not just "some Jinja":

1. An immutable sandbox (templates come from the Hub and are untrusted code), with
   ``trim_blocks`` and ``lstrip_blocks`` on and the ``loopcontrols`` extension.
2. Globals ``raise_exception`` (a template's way to reject a conversation), ``strftime_now``;
   a ``tojson`` filter that does not HTML-escape and keeps non-ASCII text (``ensure_ascii=False``);
   a ``{% generation %}`` block (transformers uses it to mark assistant tokens) that renders its body.
3. The messages as plain data, keys whose value is None dropped (templates handle a missing key,
   many print "None" for a None one); a message's reasoning copied under ``reasoning_content`` and
   ``thinking``, the names templates read.
4. Variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, every named
   special token (``bos_token``, ``eos_token``, ...), then the caller's keyword arguments
   (``enable_thinking=False`` for Qwen3), which win over the special tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

from moekit.errors import UsageError

# Names a message's reasoning arrives under; templates read the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(UsageError):
    """A template rejected the conversation (``raise_exception``) or failed to render: one line."""


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' : wrong inside a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlock


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached: a chat REPL renders the same one every turn)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _plain(value: Any) -> Any:
    """JSON-like data only: what a sandboxed template may safely see."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (str, bool, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def normalize_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dict messages, None values dropped and reasoning aliased (see the module plan, step 3)."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(source: str, messages: list[Mapping[str, Any]], special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True, tools: list | None = None,
                documents: list | None = None, **kwargs: Any) -> str:
    """``messages`` rendered by the template ``source``, byte-identical to transformers'
    ``apply_chat_template(messages, tokenize=False, ...)``. Errors raise ``ChatTemplateError``."""
    import jinja2

    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    template = compile_template(source)
    variables = {**special_tokens, **_plain(kwargs)}
    try:
        return template.render(messages=normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **variables)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # raise_exception's message, Jinja's own (an undefined name), or Python's ('str' + None).
        raise ChatTemplateError(f"chat template: {' '.join(str(e).split())}") from None


__all__ = ["ChatTemplateError", "compile_template", "normalize_messages", "render_chat"]
