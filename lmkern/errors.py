"""The exceptions lmkern's ops raise. For bad arguments, each is also the class torch raises
for the same mistake, so that code written against torch catches lmkern's errors too:
torch's argument checks raise RuntimeError (a few ValueError or TypeError), a kernel that
lacks a dtype raises NotImplementedError (a RuntimeError), and cross-entropy raises
IndexError for a class index out of range."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call (lmkern.backend)."""


class ArgumentError(ValueError, RuntimeError):
    """An argument with a wrong value or shape."""


class ArgumentTypeError(TypeError, NotImplementedError):
    """An argument of a wrong type (torch: TypeError) or dtype (torch: RuntimeError, or
    NotImplementedError where its kernel lacks the dtype)."""


class TargetIndexError(ValueError, IndexError):
    """A class index outside [0, number of classes) that is not ignore_index."""
