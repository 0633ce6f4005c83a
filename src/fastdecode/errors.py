"""User-facing errors: the CLI prints their message and exits 2, the API raises them as is."""


class FastDecodeError(Exception):
    """A problem the user can fix (bad input, missing package, unsupported model)."""
