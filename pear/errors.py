"""One exception type for everything a user can get wrong.

The CLI prints a `PearError` as one line (``pear: error: ...``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class PearError(Exception):
    """A problem with the user's input (model spec, files, options), not a bug in pear."""
