"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class CompressError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class RecipeError(CompressError):
    """One or more problems in a recipe file; each line is `file:line: field: problem`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class StepConfigError(CompressError):
    """A step's setting that does not fit the model, found once it is loaded (before any work): `field` is where
    the setting sits in the step's config, so a recipe run can name its file and line."""

    def __init__(self, message: str, field: tuple = ()):
        self.message, self.field = message, field
        super().__init__(message)

    def within(self, prefix: tuple) -> "StepConfigError":
        return StepConfigError(self.message, prefix + self.field)
