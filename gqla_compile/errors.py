"""Errors users see: each names the problem and the fix."""

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


class PartialRewriteWarning(UserWarning):
    """Some candidate blocks were rewritten and others holding attention were not (see ``skipped``)."""


class NoLatentAttentionWarning(UserWarning):
    """``optimize`` found nothing to rewrite and returned the model unchanged; the message says why."""
