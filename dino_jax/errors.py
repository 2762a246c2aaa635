"""The one error type shown to users as a single line by the command-line tools."""
import argparse
import sys


class UsageError(ValueError):
  """Bad configuration or input data, reported as `error: <message>` without a traceback."""


def fail(message: str):
  """Exits with status 2 after printing `message` as a single `error:` line."""
  print("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()),
        file=sys.stderr)
  sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one `error:` line and exit status 2 (through `fail`)."""

  def error(self, message):
    fail(message)
