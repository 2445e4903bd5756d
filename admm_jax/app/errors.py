"""The one base class of the errors that are the user's to fix."""


class UserError(Exception):
  """Bad input or a stop the user should know about: every command line prints the message
  as one sentence (no traceback) and exits with `exit_code` (2 unless the error says
  otherwise, e.g. 128 + the signal of a SIGTERM/SIGINT stop)."""
  exit_code: int = 2
