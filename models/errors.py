"""The errors lmkern.models raises about what a function was given. Each names the argument
as the function calls it, with the value and what was expected ("steps must be at least 1,
got 0"), and keeps that name apart from the rest of the message, so that a caller that
knows the argument by another name can say it in its own words: lmkern's command line
names its flags ("--steps must be at least 1, got 0", lmkern/app)."""

import string


class NamedError(Exception):
    """An error whose message names arguments. `template` is a str.format string: its
    positional fields ({}) take `values` in turn, and each named field ({steps}) is an
    argument, called `arguments[field]` if given, else by the field's own name.

    str(error) names each argument as the library does; error.message(names) as
    names[argument] for those in `names`.
    """

    def __init__(self, template, *values, **arguments):
        self.template, self.values, self.arguments = template, values, arguments
        super().__init__(self.message())

    def message(self, names=None):
        names = names or {}
        fields = {field for _, field, _, _ in string.Formatter().parse(self.template) if field}
        words = {}
        for field in fields:
            argument = self.arguments.get(field, field)
            words[field] = names.get(argument, argument)
        return self.template.format(*self.values, **words)


class ArgumentValueError(NamedError, ValueError):
    """An argument's value is not one the function takes."""


class ArgumentPathError(NamedError, FileNotFoundError):
    """A file or folder that an argument names is not there, or lacks what it should hold."""


def check_at_least(name, value, minimum):
    """Raises ArgumentValueError, naming the argument `name`, if value < minimum."""
    if value < minimum:
        raise ArgumentValueError("{name} must be at least {}, got {}", minimum, value, name=name)
