"""What every ``launch/`` entry point shares: flags, --help, --verbose, one-line errors, exit statuses.

An entry point defines its flags on a fresh ``absl.flags.FlagValues`` (not the
global ``FLAGS``), so that its ``main(argv)`` can be called again in one process
(the tests call every command in-process with many argument lists) and two
commands never clash over a flag name::

  def _define(fv):
    flags.DEFINE_string("workdir", None, "...", flag_values=fv, required=True)

  def main(argv=None):
    fv = cli.parse(_define, argv, __doc__)      # --help/--helpfull print and exit 0
    with cli.errors():                           # a known input error -> one line, status 2
      ...

Exit statuses (the README lists them too):

  0   done
  1   an unexpected error: a bug, reported with its traceback
  2   bad input: a flag, a config value, a file or directory; one line ``error: <culprit>: <what>``
  3   training stopped at a non-finite loss or gradient (nothing non-finite was saved)
  75  preempted (SIGTERM; EX_TEMPFAIL): the state was saved, run the same command again to resume

The console is quiet unless ``--verbose``: absl/orbax INFO logs and JAX's
backend probing ("Unable to initialize backend 'tpu'") are shown only then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from absl import flags

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 2, 3, 75
_HELP = ("--help", "-help", "-h", "--helpfull", "-helpfull", "--helpshort", "-?")


class UsageError(ValueError):
  """Bad input detected by an entry point; the message names the flag or file (one line)."""


def one_line(msg: object) -> str:
  """``msg`` on one line: whitespace runs (newlines included) become one space."""
  return " ".join(str(msg).replace("\\n", " ").split())


def fail(msg: object, status: int = EXIT_USAGE) -> NoReturn:
  """Print ``error: <msg>`` as one line on stderr and exit with ``status``."""
  text = one_line(msg)
  print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr, flush=True)
  raise SystemExit(status)


def _flag_error(e: BaseException, args: Sequence[str]) -> str:
  """One line naming the offending flag (a ``--config.*`` override where the message does not)."""
  raw = str(e)
  if "Error whilst parsing config file" in raw or "Traceback (most recent call last)" in raw:
    # config_flags folds the config file's own traceback into the message: keep its last line,
    # the exception that get_config raised ('ValueError: config arg size=Q: ...').
    last = [line.strip() for line in raw.strip().splitlines() if line.strip()][-1]
    config_args = [a for a in args if a.startswith("--config=")]
    raw = f"{config_args[-1]}: {last.split(': ', 1)[-1]}" if config_args else last
  msg = one_line(raw)
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":   # KeyError's repr
    msg = msg[1:-1]
  if isinstance(e, flags.IllegalFlagValueError) and msg.startswith("flag --"):
    # 'flag --x=v: why' -> '--x=v: why'; config_flags wraps a bad config arg the same way.
    msg = msg[len("flag "):]
  if isinstance(e, flags.UnrecognizedFlagError):
    name = getattr(e, "flagname", "") or msg
    hint = f" ({msg[msg.index('Did you mean'):]})" if "Did you mean" in msg else ""
    return f"--{name}: unknown flag (see --help){hint}"
  if isinstance(e, (AttributeError, KeyError)):
    for a in args:
      if a.startswith("--config."):
        path = a[2:].split("=", 1)[0]
        if any(f"{part}'" in msg or f'"{part}"' in msg for part in path.split(".")[1:]):
          hint = msg[msg.index("Did you mean"):] if "Did you mean" in msg else ""
          return f"--{path}: no such config field{'; ' + hint if hint else ''}"
  if "must have a value other than None" in msg:
    return f"{msg.split('=', 1)[0]}: required"
  if not isinstance(e, flags.Error) and not msg.startswith("--"):
    # Raised while loading a config file (a syntax error, a missing module): name that file.
    config_args = [a for a in args if a.startswith("--config=")]
    if config_args:
      return f"{config_args[-1]}: {msg}"
  return msg


def config_value(fv: flags.FlagValues, name: str = "config"):
  """The ConfigDict of a ``DEFINE_config_file`` flag; one line (``--config=...: why``) if it did not load.

  config_flags defers a file that fails to load (missing, a directory) to the
  first access of the value; this makes that access here, as a one-line error.
  """
  try:
    value = fv[name].value
    if value is not None:
      value.keys()
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    why = lines[-1].split(": earlier failure to load: ")[-1]
    if "earlier failure to load: " in why:
      why = why.split("earlier failure to load: ", 1)[1]
    fail(f"--{name}={fv[name].serialize().split('=', 1)[-1]}: {why}")
  return value


def _print_help(fv: flags.FlagValues, doc: str | None, prog: str) -> None:
  if doc:
    print(doc.strip() + "\n")
  print(f"usage: python -m {prog} [flags]\n\nflags:")
  print(fv.get_help(prefix="  ", include_special_flags=False))


def configure_logging(verbose: bool) -> None:
  """INFO logs of absl, orbax and JAX on with ``verbose``, else warnings and errors only."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    # The global FLAGS hold absl's own logging flags; nothing else parses them here.
    flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  level = logging.INFO if verbose else logging.WARNING
  logging.getLogger().setLevel(level)
  for name in ("absl", "orbax", "jax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(level)
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # C++ INFO/WARNING of XLA/TSL before backend init


def parse(define: Callable[[flags.FlagValues], None], argv: Sequence[str] | None, doc: str | None,
          prog: str = "") -> flags.FlagValues:
  """Define the flags on a fresh FlagValues, parse ``argv`` (default ``sys.argv``) and set up logging.

  ``--help`` (and ``-h``, ``--helpfull``) print ``doc`` and the flags, exit 0.  A
  bad flag, a missing required one or a stray positional argument is one line on
  stderr and exit status 2.
  """
  argv = list(sys.argv if argv is None else argv)
  prog = prog or os.path.splitext(os.path.basename(argv[0] if argv else ""))[0] or "launch"
  fv = flags.FlagValues()
  flags.DEFINE_bool("verbose", False, "Show INFO logs (absl, orbax, JAX backend probing).", flag_values=fv)
  try:
    define(fv)
  except Exception as e:  # noqa: BLE001 - config_flags may evaluate the config file while defining
    fail(_flag_error(e, argv[1:]))
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in _HELP for a in args):
    _print_help(fv, doc, prog)
    raise SystemExit(EXIT_OK)
  try:
    rest = fv(argv)
  except flags.Error as e:
    fail(_flag_error(e, argv[1:]))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError) as e:
    # config_flags applies --config.x.y overrides and loads the config file while parsing and lets
    # plain exceptions through: an unknown field, a bad value, a missing or broken file.
    fail(_flag_error(e, argv[1:]))
  if len(rest) > 1:
    fail(f"unexpected argument {rest[1]!r} (flags are --name=value; see --help)")
  configure_logging(fv.verbose)
  return fv


@contextlib.contextmanager
def errors(*types: type[BaseException], status: int = EXIT_USAGE) -> Iterator[None]:
  """Turn the given exception types (and :class:`UsageError`) into ``error: <message>`` and ``status``."""
  try:
    yield
  except (UsageError, *types) as e:
    fail(e, status)


def check_dir_arg(flag: str, path: str | None, *, must_exist: bool = True) -> str:
  """``path`` of ``--flag``, refused in one line when unset, a file, or (``must_exist``) missing."""
  if not path:
    raise UsageError(f"--{flag}: required")
  path = os.path.expanduser(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"--{flag}: {path} is a file, not a directory")
  if must_exist and not os.path.isdir(path):
    raise UsageError(f"--{flag}: {path}: no such directory")
  return path
