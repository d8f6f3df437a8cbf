"""The README's manifest reference table and the JSON Schema (schema/agent.schema.json), both from KEYS.

Apart because only `python -m tasks.manifest` makes them; loading manifests never needs them.
"""
from __future__ import annotations

import json
from typing import Any

from tasks.manifest.keys import KEYS, SECTIONS, Key


def _default_text(key: Key) -> str:
    if key.default_text is not None:
        return key.default_text
    if key.default == '':
        return 'empty'
    if key.default is None:
        return ''
    if isinstance(key.default, (list, dict, str)):
        return f'`{json.dumps(key.default)}`' if not isinstance(key.default, str) else f'`{key.default}`'
    return str(key.default)


def reference_table() -> str:
    rows = ['| key | type | default | meaning |', '|---|---|---|---|']
    rows += [f'| `{key.path}` | {key.kind.name} | {_default_text(key)} | {key.description} |' for key in KEYS]
    return '\n'.join(rows) + '\n'


def json_schema() -> dict:
    def property_of(key: Key) -> dict:
        schema = {'description': key.description, **key.kind.schema()}
        if key.default is not None:
            schema['default'] = key.default
        return schema

    properties: dict[str, Any] = {}
    for key in KEYS:
        section, _, inner = key.path.rpartition('.')
        if section:
            properties.setdefault(section, {'description': SECTIONS[section], 'type': 'object',
                                            'properties': {}, 'additionalProperties': False})
            properties[section]['properties'][inner] = property_of(key)
        else:
            properties[inner] = property_of(key)
    return {
        '$schema': 'https://json-schema.org/draft/2020-12/schema',
        'title': 'claude-bottle agent manifest (agents/<name>.yaml, agents/_defaults.yaml)',
        'type': ['object', 'null'],
        'properties': properties,
        'additionalProperties': False,
        'not': {'required': ['prompt', 'prompt_file']},
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + '\n'
