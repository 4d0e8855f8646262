"""Request validation errors in OpenAI's words: one readable message naming the parameter.

Pydantic reports a value that fits no member of a union once per member, with locations that carry
the members' type names and discriminator tags (``messages.0.user.content.list[tagged-union[…]].0``).
A client should read what OpenAI would say instead — "Invalid type for 'messages.0.content': expected
one of a string or an array, but got an integer instead." — with ``param`` naming the parameter as it
appears in the request (``messages.0.content``, the style of the API's other errors).
"""

from __future__ import annotations

from typing import Any

#: the discriminator tags of the request's unions (message roles, content part types)
_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url"}
#: pydantic error types that say "the value has the wrong type", and what was expected
_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean", "bool_parsing": "a boolean",
    "list_type": "an array", "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "none_required": "null",
}
_BOUNDS = {"less_than_equal": ("above maximum", "<=", "le"), "less_than": ("above maximum", "<", "lt"),
           "greater_than_equal": ("below minimum", ">=", "ge"), "greater_than": ("below minimum", ">", "gt")}


def _param(loc: tuple[Any, ...] | list[Any]) -> str:
    """The parameter a pydantic location points at, without union members and discriminator tags."""
    out: list[str] = []
    previous: Any = None
    for part in loc:
        if part in ("body", "query", "path", "header", "cookie") and not out and previous is None:
            previous = part
            continue  # where FastAPI found it, not part of the name
        if isinstance(part, str) and ("[" in part or part in _EXPECTED_NAMES):
            continue  # a union member's type name: str, list[str], tagged-union[…]
        if isinstance(part, str) and part in _TAGS and isinstance(previous, int):
            previous = part
            continue  # the member a discriminated union chose: messages.0.user.content
        out.append(str(part))
        previous = part
    return ".".join(out)


_EXPECTED_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before",
                   "function-plain", "function-wrap", "lax-or-strict", "json-or-python"}


def _got(value: Any) -> str:
    if value is None:
        return "null"
    for kind, words in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return words
    return type(value).__name__


def _one_of(expected: list[str]) -> str:
    unique = list(dict.fromkeys(expected))
    if len(unique) == 1:
        return unique[0]
    return "one of " + ", ".join(unique[:-1]) + " or " + unique[-1]


def _number(value: Any) -> str:
    """2.0 as 2, as OpenAI writes bounds."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return _shown(value)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def describe(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) for pydantic's ``errors`` of one request: the first parameter at fault,
    said once even when several union members reported it."""
    if not errors:
        return "Invalid request.", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON: {detail}".rstrip(": "), None, "invalid_request"
    top = [e for e in errors if _param(e.get("loc", ()))[:1] and
           _param(e.get("loc", ())).split(".")[0] == _param(first.get("loc", ())).split(".")[0]] or [first]
    # of one parameter's errors, the deepest: the union member whose shape the value had got furthest
    err = max(top, key=lambda e: len(_param(e.get("loc", ())).split(".")))
    param = _param(err.get("loc", ()))
    kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    if kind in ("invalid_unicode", "unsupported_parameter"):
        return str(ctx.get("message") or err.get("msg")), ctx.get("param"), kind
    if kind in _EXPECTED:
        expected = [_EXPECTED[e["type"]] for e in top if e.get("type") in _EXPECTED and _param(e["loc"]) == param]
        return (f"Invalid type for '{param}': expected {_one_of(expected)}, but got {_got(value)} instead.", param,
                "invalid_type")
    if kind in _BOUNDS:
        side, op, key = _BOUNDS[kind]
        bound = ctx.get(key)
        number = "decimal" if isinstance(bound, float) else "integer"  # the parameter's type, as OpenAI says
        code = f"{number}_{side.split()[0]}_{'max' if 'max' in side else 'min'}_value"
        return (f"Invalid '{param}': {number} {side} value. Expected a value {op} {_number(bound)}, but got "
                f"{_number(value)} instead.", param, code)
    if kind == "missing":
        return f"Missing required parameter: '{param}' (Field required).", param, "invalid_request"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "invalid_request"
    if kind == "too_short":
        n = ctx.get("min_length")
        what = "empty array" if not value else "array too short"
        return (f"Invalid '{param}': {what}. Expected an array with minimum length {n}, but got "
                f"{'an empty array' if not value else f'an array with length {len(value)}'} instead.", param,
                "invalid_request")
    if kind == "too_long":
        return (f"Invalid '{param}': array too long. Expected an array with maximum length {ctx.get('max_length')}, "
                f"but got an array with length {ctx.get('actual_length')} instead.", param, "invalid_request")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(ctx.get("discriminator", "")).strip("'")
        where = f"{param}.{field}" if param else field
        if kind == "union_tag_not_found":
            return f"Missing required parameter: '{where}'.", where, "invalid_request"
        return (f"Invalid value for '{where}': '{_shown(ctx.get('tag'))}'. Supported values are: "
                f"{ctx.get('expected_tags')}.", where, "invalid_request")
    if kind == "literal_error":
        return (f"Invalid value for '{param}': {_shown(value)!r}. Supported values are: {ctx.get('expected')}.", param,
                "invalid_value")
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"Invalid '{param or 'body'}': {message}.".replace("..", "."), param or None, "invalid_request"
