"""The one error type refattn raises for bad input."""


class SpecError(ValueError):
    """Input that the specification does not accept.

    The message always names the argument, what the specification expects
    and what was given, so a user can act on it without reading our code::

        SpecError: argument `k`: expected 4 dimensions (B, H, N, D), given shape (2, 3, 5)
    """

    def __init__(self, argument: str, expected: str, given: str):
        self.argument = argument
        self.expected = expected
        self.given = given
        super().__init__(f"argument `{argument}`: expected {expected}, given {given}")
