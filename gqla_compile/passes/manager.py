"""The pass manager: runs an ordered list of graph passes and records what each changed.

Modelled on vLLM's compilation pass manager: each pass is a small callable GraphModule -> GraphModule
with a ``name`` and a ``summary()`` of what it matched, replaced or folded (a frozen dataclass, summaries.py); its ``uuid`` hashes the source
file that defines it. The report is built from these records.
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
from .summaries import PassSummary

logger = logging.getLogger(__name__)


class GraphPass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule: ...

    def summary(self) -> PassSummary: ...


def pass_uuid(graph_pass: GraphPass) -> str:
    """Hash of the source files that define the pass: its own module's and those of every package module whose
    functions, classes or module it imports (detection's matcher, probes and match types live beside it), so it
    changes whenever its behaviour can."""
    module = inspect.getmodule(type(graph_pass))
    package = module.__name__.split(".")[0]
    files = {inspect.getsourcefile(module)}
    for value in vars(module).values():
        owner = value if inspect.ismodule(value) else inspect.getmodule(value)
        if owner is not None and owner.__name__.split(".")[0] == package and hasattr(owner, "__file__"):
            files.add(inspect.getsourcefile(owner))
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


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
    summary: PassSummary = field(default_factory=PassSummary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PassManager:
    """Runs passes over layers' graphs and keeps one record per pass and layer: the report's single source.

    One manager serves a whole ``optimize`` call: ``run`` is called per layer and stage (detection, then
    the chosen path's rewrite), and the records of every layer accumulate in ``records``.
    """

    def __init__(self, *, dump_dir: str | Path | None = None):
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def run(self, passes: list[GraphPass], gm: fx.GraphModule, module_path: str) -> fx.GraphModule:
        """Run ``passes`` in order on one layer's graph; returns the last pass's graph."""
        for graph_pass in passes:
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
                index = sum(r.module_path == module_path for r in self.records) - 1
                safe = module_path.replace(".", "_")
                (self.dump_dir / f"{safe}.{index:02d}.{graph_pass.name}.py").write_text(gm.code)
        return gm

    def records_of(self, module_path: str) -> list[PassRecord]:
        """The records of one layer, in the order its passes ran."""
        return [r for r in self.records if r.module_path == module_path]
