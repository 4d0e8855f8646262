"""Prompts are data: Markdown and YAML files in this folder, rendered with Jinja (StrictUndefined)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import yaml


def read(name: str) -> str:
    """The text of a prompt file in this package (e.g. ``"commands.md"``)."""
    return (files(__name__) / name).read_text(encoding="utf-8")


def render(template: str, **values: Any) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(template).render(**values)


def load_yaml(name: str) -> Any:
    return yaml.safe_load(read(name))


def system_prompt(registry: Any) -> str:
    """The core's system prompt, listing the registered experts and their arguments."""
    spec = load_yaml("system.yaml")
    experts = []
    for item in registry.describe():
        props = item["args_schema"].get("properties", {})
        required = set(item["args_schema"].get("required", []))
        experts.append({"name": item["name"], "description": item["description"],
                        "args": [{"name": k, "required": k in required,
                                  "description": v.get("description", "")} for k, v in props.items()]})
    return render(spec["template"], experts=experts).strip()
