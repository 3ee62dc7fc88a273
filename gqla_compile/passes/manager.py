"""The pass manager: runs an ordered list of graph passes and records what each changed.

Modelled on vLLM's compilation pass manager: each pass is a small callable GraphModule -> GraphModule
with a ``name``, a ``uuid()`` that changes when its behaviour does (for compile caches), and a
``summary()`` of what it matched, replaced or folded. The report is built from these records only.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import fx

from .graph import op_histogram

logger = logging.getLogger(__name__)


class GraphPass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule: ...

    def summary(self) -> dict[str, Any]: ...


def pass_uuid(graph_pass: GraphPass) -> str:
    """Hash of the pass's source: changes whenever its behaviour can."""
    source = inspect.getsource(type(graph_pass))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclass
class PassRecord:
    """What one pass did to one layer's graph."""

    pass_name: str
    module_path: str
    uuid: str
    seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    code_before: str
    code_after: str
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PassManager:
    """Runs passes in order over one graph, keeping a record per pass (and optional graph dumps)."""

    def __init__(self, passes: list[GraphPass], *, dump_dir: str | Path | None = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def __call__(self, gm: fx.GraphModule, module_path: str) -> fx.GraphModule:
        for index, graph_pass in enumerate(self.passes):
            before_ops, before_code = dict(op_histogram(gm)), gm.code
            start = time.perf_counter()
            gm = graph_pass(gm)
            record = PassRecord(
                pass_name=graph_pass.name,
                module_path=module_path,
                uuid=pass_uuid(graph_pass),
                seconds=time.perf_counter() - start,
                ops_before=before_ops,
                ops_after=dict(op_histogram(gm)),
                code_before=before_code,
                code_after=gm.code,
                summary=graph_pass.summary(),
            )
            self.records.append(record)
            logger.debug("%s on %s: %s", graph_pass.name, module_path, record.summary)
            if self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                safe = module_path.replace(".", "_")
                (self.dump_dir / f"{safe}.{index:02d}.{graph_pass.name}.py").write_text(gm.code)
        return gm
