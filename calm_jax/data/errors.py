"""The one exception type the data package raises for bad inputs."""


class DataError(ValueError):
  """A data problem the user must fix: a missing file, a malformed record, a
  manifest that does not match the run. The message is one line and names the
  file (and line number, or manifest field) at fault."""
