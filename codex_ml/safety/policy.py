"""Policy files: add, override or disable rules without code changes.

The format is the older codex_ml safety policy (configs/safety_policy.yaml documents it):

    version: "1.0"
    description: ...
    rules:
      - id: internal_host                      # a new rule: pattern and action required
        pattern: "\\bcorp-[a-z0-9]+\\.internal\\b"
        action: redact                         # allow | block | redact
        description: internal host names
        placeholder: "<HOST>"                  # optional, default <REDACTED:id>
        keywords: ["corp-"]                    # optional literal prefilter (speed)
      - id: email                              # a built-in id: override only what is given
        action: allow
      - id: phone
        enabled: false                         # disable a built-in

`stage` (prompt/output/both) from the older format is accepted and ignored: a corpus has no stages.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..stage import UserError
from .rules import BUILTIN_RULES, Rule


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    pattern: str | None = None
    action: Literal["allow", "block", "redact"] | None = None
    description: str | None = None
    enabled: bool = True
    placeholder: str | None = None
    keywords: list[str] | None = None
    stage: str | None = None  # older format; ignored


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | int | float | None = None
    description: str | None = None
    rules: list[PolicyRule] = []
    allow_bypass: bool | None = None  # older format; ignored (the corpus is always sanitized)
    logging: dict | None = None       # older format; ignored


def load_policy(path: str | os.PathLike | None) -> Policy:
    if path is None:
        return Policy()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"policy file {path} not found (set sanitize.policy to a file or null)") \
            from None
    except yaml.YAMLError as e:
        raise UserError(f"policy file {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"policy file {path}: top level must be a mapping with a `rules` list")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(PolicyRule.model_fields if "rules" in err["loc"]
                                    else Policy.model_fields)
                msgs.append(f"unknown key '{loc}' (allowed: {allowed})")
            else:
                msgs.append(f"{loc} = {err.get('input')!r}: {err['msg']}")
        raise UserError(f"policy file {path}: " + "; ".join(msgs)) from None
    ids = [r.id for r in policy.rules]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"policy file {path}: rule ids must be unique, repeated: {dup}")
    return policy


def build_rules(policy: Policy, redact_pii: bool = True, where: str = "policy") -> list[Rule]:
    """Built-in rules with the policy's overrides applied, then the policy's new rules."""
    by_id = {r.id: r for r in BUILTIN_RULES if redact_pii or r.kind != "pii"}
    builtin_pii = {r.id for r in BUILTIN_RULES if r.kind == "pii"}
    added: list[Rule] = []
    for pr in policy.rules:
        base = by_id.get(pr.id)
        if pr.id in builtin_pii and not redact_pii:
            continue  # PII handling switched off as a whole by sanitize.redact_pii
        if not pr.enabled:
            by_id.pop(pr.id, None)
            continue
        if base is None and (pr.pattern is None or pr.action is None):
            raise UserError(f"{where}: rule '{pr.id}' is not a built-in rule, so it needs both "
                            f"`pattern` and `action` (allow|block|redact)")
        changes: dict = {}
        if pr.pattern is not None:
            try:
                rx = re.compile(pr.pattern)
            except re.error as e:
                raise UserError(f"{where}: rule '{pr.id}': invalid pattern {pr.pattern!r}: {e}") \
                    from None
            # The built-in's checks and prefilters belong to its own pattern.
            changes.update(pattern=rx, check=None, digits=False, line_scoped=False, keywords=())
        if pr.action is not None:
            changes["action"] = pr.action
        if pr.description is not None:
            changes["description"] = pr.description
        if pr.placeholder is not None:
            changes["placeholder"] = pr.placeholder
        if pr.keywords is not None:
            changes["keywords"] = tuple(pr.keywords)
        if base is not None:
            by_id[pr.id] = dataclasses.replace(base, **changes)
        else:
            changes.setdefault("placeholder", f"<REDACTED:{pr.id}>")
            added.append(Rule(id=pr.id, kind="custom", **changes))
    return list(by_id.values()) + added
