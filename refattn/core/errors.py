"""The one error type refattn raises for bad input."""

#: A message quotes at most this many characters of what was given (a 10,000-element list is cut).
MAX_GIVEN_CHARS = 120


class SpecError(ValueError):
    """Input that the specification does not accept.

    The message always names the argument, what the specification expects
    and what was given, so a user can act on it without reading our code::

        SpecError: argument `k`: expected 4 dimensions (B, H, N, D), given shape (2, 3, 5)

    ``given`` is cut to :data:`MAX_GIVEN_CHARS` characters, ending in "...".
    """

    def __init__(self, argument: str, expected: str, given: str):
        self.argument = argument
        self.expected = expected
        self.given = given if len(given) <= MAX_GIVEN_CHARS else given[: MAX_GIVEN_CHARS - 3] + "..."
        super().__init__(f"argument `{argument}`: expected {expected}, given {self.given}")
