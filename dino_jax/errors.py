"""The one error type shown to users as a single line by the command-line tools."""


class UsageError(ValueError):
  """Bad configuration or input data, reported as `error: <message>` without a traceback."""
