"""Usage errors of the ``excp`` command as one line naming the problem and the fix.

Click reports a missing argument, a bad option value or an unknown option with the
command's usage block and an ``Error:`` line under it: four lines that bury the one
that matters. The ``excp`` group lets click parse exactly as it always does, and
prints its usage errors the way every other excp error is printed, with the exit code
of :class:`~excp.errors.InvalidInput`::

    excp: error [invalid_input]: missing option '--run': name the run with --run NAME (see excp push --help)

``--help``, ``--version`` and ``excp`` alone (which shows the help) behave as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from excp.errors import InvalidInput

# What to do about a missing required parameter, by the parameter's name.
MISSING_FIXES = {
    "path": "give the checkpoint file or Hugging Face Trainer checkpoint directory to push",
    "run": "name the run with --run NAME",
    "out": "say where to write with --out PATH",
}


class OneLineUsage(click.Group):
    """A group whose usage errors are one ``excp: error [invalid_input]: ...`` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # the caller handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # Not standalone: click raises its errors here instead of printing them, and
            # returns the exit code of --help, --version and ctx.exit().
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            click.echo(f"excp: error [{InvalidInput.code}]: {usage_line(err)}", err=True)
            sys.exit(InvalidInput.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_line(err: click.UsageError) -> str:
    """The problem, what to do, and where the command's help is."""
    see = f"(see {err.ctx.command_path} --help)" if err.ctx is not None else "(see excp --help)"
    if isinstance(err, click.MissingParameter) and err.param is not None:
        return f"{_missing(err.param)} {see}"
    if isinstance(err, click.NoSuchOption):
        guess = f"; did you mean {' or '.join(map(repr, err.possibilities))}?" if err.possibilities else ""
        return f"no such option {err.option_name!r}{guess} {see}"
    return f"{_clause(err.format_message())} {see}"


def _missing(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        kind, name = "option", max(param.opts, key=len)
    else:
        kind, name = "argument", param.human_readable_name
    return f"missing {kind} {name!r}: {MISSING_FIXES.get(param.name or '', f'give {name}')}"


def _clause(message: str) -> str:
    """Click's sentences as one clause: one line, '; ' between sentences, no final stop."""
    sentences = " ".join(message.split()).rstrip(".").split(". ")
    return "; ".join(_lower_first(s.strip()) for s in sentences if s.strip())


def _lower_first(sentence: str) -> str:
    """``Did you mean`` as ``did you mean``; a name such as PATH or --run as it is."""
    if len(sentence) > 1 and sentence[0].isupper() and sentence[1].islower():
        return sentence[0].lower() + sentence[1:]
    return sentence
