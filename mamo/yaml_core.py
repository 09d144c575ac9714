"""YAML as presets, ``--set`` values and saved configs are read and written: the YAML 1.2 core schema's plain
scalars (``off`` is a string, ``1e-3`` a number, ``01`` is 1) and no key given twice in one mapping."""

from __future__ import annotations

import re
from typing import Any

import yaml


def _core_schema_resolvers() -> dict:
    """PyYAML's null and merge resolvers plus YAML 1.2 core-schema bool, int and float, in that order."""
    kept = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag in kept]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # Resolvers under the key None are tried for every scalar, first match wins: ints before floats.
    resolvers[None] = [
        ("tag:yaml.org,2002:" + tag, re.compile(f"^(?:{pattern})$"))
        for tag, pattern in (
            ("bool", r"true|True|TRUE|false|False|FALSE"),
            # Leading zeros are decimal (01 is 1): YAML 1.2 core, unlike 1.1's octal; octal is written 0o17.
            ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"),
            ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
             r"|\.(?:nan|NaN|NAN)"),
        )
    ]
    return resolvers


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 core int. PyYAML's own constructor reads a leading zero as YAML 1.1 octal (``010`` is 8, ``09``
    fails), where the core schema, and users writing ``epochs: 01``, mean decimal."""
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith(("0x", "0o")):
            return int(text[2:], 16 if text[1] == "x" else 8)
        return int(text, 10)
    except ValueError:  # an explicit !!int tag on text that is no integer
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds one key twice; ``key`` is the key and ``line`` the 1-based line of its second occurrence."""

    def __init__(self, key: Any, mark: yaml.Mark):
        super().__init__(None, None, f"duplicate key {key!r}", mark)
        self.key = key
        self.line = mark.line + 1


class YamlLoader(yaml.SafeLoader):
    """Safe YAML with the YAML 1.2 core schema's plain scalars, refusing a key given twice in one mapping.

    PyYAML follows YAML 1.1, where ``off``/``on``/``yes``/``no`` are booleans and ``1e-3`` is a string; in a preset
    (``formulation: off``) or an override (``--set train.lr=1e-3``) users mean the string and the number.
    """

    yaml_implicit_resolvers = _core_schema_resolvers()

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        # PyYAML keeps the last of two equal keys silently, so one of two settings would be dropped unseen. Keys
        # merged in with << are not checked: overriding a merged key is what merging is for.
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: PyYAML's own check below refuses it
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)


class YamlDumper(yaml.SafeDumper):
    """Writes what :class:`YamlLoader` reads back unchanged: a string that the core schema would read as a number
    or a boolean (a preset named ``1e3``) is quoted."""

    yaml_implicit_resolvers = _core_schema_resolvers()


def load_yaml(text: str) -> Any:
    """Parse YAML text as presets and ``--set`` values are parsed (see :class:`YamlLoader`)."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # a SafeLoader: no arbitrary objects
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        # PyYAML's constructors fail this way on a tag whose text they cannot read (`!!float abc`, `!!bool x`):
        # invalid YAML like any other, for the callers' sentences.
        raise yaml.constructor.ConstructorError(None, None, f"a tagged value cannot be read ({exc!r})") from exc
