"""Errors users see: each names the problem and the fix.

Every exception and warning class gqla_compile raises on purpose lives here (the modules that raise them
import them from here), so that a caller catches them from one place: ``gqla_compile.<Name>``. Private
control-flow exceptions that never leave their module (``trace_cache._Unkeyable``,
``verification._Ambiguous``) and the command line's ``cli.UsageError`` (turned into exit code 2 inside
``cli.main``, never raised by the library) stay beside their only users.
"""

from __future__ import annotations


class GqlaError(Exception):
    """Base class of the errors gqla_compile raises on purpose."""


class NoLatentAttentionError(GqlaError, ValueError):
    """The model (or config) holds no latent attention to rewrite or plan for."""


class UnknownTargetError(GqlaError, KeyError):
    """A target name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(GqlaError, ValueError):
    """Weights or activations whose shapes do not fit together; the message names the layer."""


class ConversionError(GqlaError, ValueError):
    """A checkpoint that cannot be converted with the arguments given."""


class VerificationError(GqlaError, RuntimeError):
    """A rewritten layer did not reproduce the original on the check input."""


class CompileError(GqlaError, RuntimeError):
    """Inductor could not compile a graph of the optimized model."""


class HealError(GqlaError, ValueError):
    """Bad healing input, or a checkpoint that does not belong to this run."""


class ReportError(GqlaError, ValueError):
    """A report that cannot be made as asked (e.g. an unoptimized model and no target)."""


class OutputExistsError(GqlaError, FileExistsError):
    """The output folder exists and overwriting it was not asked for."""


class UnsafeCheckpointError(GqlaError, ValueError):
    """A checkpoint stored only as pickle files, which are not loaded."""


class ModelNotFoundError(GqlaError, FileNotFoundError):
    """Neither a local model folder nor a built-in tiny config name."""


class GqlaServingError(GqlaError, ValueError):
    """A GQLA checkpoint that a vLLM engine cannot serve as asked (path, tensor parallelism, backend); the message
    names the fix."""


class PartialRewriteWarning(UserWarning):
    """Some candidate blocks were rewritten and others holding attention were not (see ``skipped``)."""


class NoLatentAttentionWarning(UserWarning):
    """``optimize`` found nothing to rewrite and returned the model unchanged; the message says why."""
