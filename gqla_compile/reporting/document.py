"""The :class:`Report`: the plain data a report is made of, and the renderers it hands that data to."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .html import render_html
from .text import sections

SCHEMA_VERSION = 1


@dataclass
class Report:
    """The graph-diff report of one optimized (or dry-run) model: plain JSON data plus renderers."""

    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = json.loads(json.dumps(plain(self.data), sort_keys=True))  # JSON types only

    # ---- accessors
    @property
    def layers(self) -> list[dict[str, Any]]:
        """One row per group of identical layers."""
        return self.data.get("layers", [])

    @property
    def path(self) -> str | None:
        return self.data.get("path")

    @property
    def has_latent_attention(self) -> bool:
        return bool(self.data.get("latent_attention"))

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.data, sort_keys=True, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"not a gqla_compile report (schema {SCHEMA_VERSION}) JSON document")
        return cls(data)

    # ---- rendering
    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, *, verbose: bool = False) -> str:
        """Terminal tables; ``verbose`` adds the full op histograms and the unified graph diff."""
        return "\n\n".join(sections(self.data, "simple", verbose=verbose, markdown=False))

    def to_markdown(self) -> str:
        return "\n\n".join(sections(self.data, "github", verbose=True, markdown=True)) + "\n"

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML file (inline CSS and SVG, no external assets); returns its path."""
        path = Path(path)
        path.write_text(render_html(self.data), encoding="utf-8")
        return path


def plain(value: Any) -> Any:
    """JSON-native copy: tuples to lists, NaN/inf to None, torch sizes to lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, torch.Size)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
