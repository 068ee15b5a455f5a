"""Exceptions raised by pbrf_fast, so callers can catch each failure by kind."""


class PBRFError(Exception):
    """Base class of every error pbrf_fast raises on purpose."""


class TrainingDivergedError(PBRFError, FloatingPointError):
    """Training (a base run, a retraining or a response) reached non-finite parameters;
    the message says which run and what to lower."""


class DivergenceError(PBRFError, RuntimeError):
    """An iterative solver (LiSSA) blew up: its iterate went non-finite or grew
    past what a convergent recursion can reach. The message names the column
    and the option to change."""


class NonConvexLossError(PBRFError, ValueError):
    """The Gauss-Newton Hessian needs a loss that is convex in the network
    outputs; otherwise G is not positive semi-definite and the damped solve is
    meaningless."""


class NonFiniteError(PBRFError, ValueError):
    """A NaN or Inf appeared where a finite number is required (a right-hand side,
    a warm start, or an operator product inside a solve). The message names it."""


class IndefiniteOperatorError(PBRFError, ValueError):
    """A solver that needs a positive definite operator met a direction of zero or
    negative curvature (an undamped or indefinite Hessian)."""


class InputError(PBRFError, ValueError):
    """An argument is not what the call expects; the message names the argument and
    what was expected."""


class NondeterministicModelError(InputError):
    """The model is not one fixed function of each example (dropout active in ``forward``,
    batch norm normalising by batch statistics, any other randomness or coupling between the
    examples of a batch): influence differentiates f(theta, x_i), so it must be one. The message
    names the module and what to do (``model.eval()``, ``training=self.training``)."""


class ExamplesInteractWarning(PBRFError, UserWarning):
    """The examples of a batch interact in the model's forward pass (batch norm by batch
    statistics, a mean over the batch): the curvature of the batch objective is still defined,
    but per-example gradients and influence are not those of the examples alone. The message
    names the module."""


class UnsupportedModelError(InputError):
    """A model, layer or option the requested computation cannot serve; the message names the
    module, why, and what can serve it instead."""


class InputTypeError(InputError, TypeError):
    """An argument has the wrong type (e.g. float indices, a string for a number)."""


class InputIndexError(InputError, IndexError):
    """An index is out of range, or a mask has the wrong length."""


class DataNotFoundError(PBRFError, FileNotFoundError):
    """A data set's files are not where the loaders look: the message names the files, their
    layout and where they go (``--data-dir`` / ``$PBRF_DATA``)."""


class NotConvergedWarning(PBRFError, UserWarning):
    """A solve ended with columns above their tolerance: the message names the columns,
    their relative residuals and what to change (iterations, solver, damping)."""


class SlowPathWarning(PBRFError, UserWarning):
    """A call will run far slower than it needs to (a memory budget too small for its
    method, say); the message says why and which argument to change."""


class DataChangedError(PBRFError, ValueError):
    """A resumed run read training or test examples that differ from the ones its results
    folder was computed from; the message names the split, the example and how to start fresh."""


class ResultsWriteError(PBRFError, OSError):
    """A result file could not be written: its folder is read-only or not ours to write. The
    message names the folder and what to change; nothing is left under the file's final name."""


class NoSpaceError(ResultsWriteError):
    """The disk under a results folder is (or would be) full: the message names the folder, the
    space the file needs and the space free; rerunning after space is freed resumes."""
