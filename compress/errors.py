"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class CompressError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class RecipeError(CompressError):
    """One or more problems in a recipe file; each line is `file:line: field: problem`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))
