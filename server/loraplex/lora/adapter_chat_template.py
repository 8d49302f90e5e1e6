"""An adapter's own chat template: `chat_template.jinja`, else `chat_template` in its
`tokenizer_config.json` (as transformers saves them), read with its spec from its directory
(read_chat_template) or from its S3 prefix (s3_source.py, through parse_chat_template).
No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.lora.adapter_errors import AdapterError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_BYTES = 1 << 20
MAX_TOKENIZER_CONFIG_BYTES = 64 << 20  # added-token tables make these large


def read_chat_template(path: Path, where: str) -> str | None:
    """An adapter directory's own chat template (parse_chat_template says which file wins);
    `where` names the adapter in messages."""
    jinja = path / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        if jinja.stat().st_size > MAX_TEMPLATE_BYTES:
            raise AdapterError(f"{where}: {CHAT_TEMPLATE_FILE} is larger than {MAX_TEMPLATE_BYTES} bytes")
        return parse_chat_template(where, jinja.read_bytes(), None)
    config_path = path / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return None
    if config_path.stat().st_size > MAX_TOKENIZER_CONFIG_BYTES:
        raise AdapterError(f"{where}: {TOKENIZER_CONFIG_FILE} is larger than {MAX_TOKENIZER_CONFIG_BYTES} bytes")
    return parse_chat_template(where, None, config_path.read_bytes())


def parse_chat_template(where: str, jinja: bytes | None, tokenizer_config: bytes | None) -> str | None:
    """The chat template an adapter brings: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or transformers' list of named templates: the one named "default")."""
    if jinja is not None:
        try:
            return jinja.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AdapterError(f"{where}: {CHAT_TEMPLATE_FILE} is not UTF-8: {e}") from None
    if tokenizer_config is None:
        return None
    try:
        config = json.loads(tokenizer_config.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{where}: {TOKENIZER_CONFIG_FILE} is not valid JSON: {e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise AdapterError(f"{where}: {TOKENIZER_CONFIG_FILE}: chat_template must be a string")
    return template or None
