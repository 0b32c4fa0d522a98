"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""
import os
import sys


class OhqError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def last_line(e: BaseException, limit: int = 300) -> str:
    """The line of an exception's message that says what went wrong (TVM's come after a traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(e).__name__


def run_cli(main) -> None:
    """Run a CLI entry point: user errors become one stderr line and exit code 2; our own bugs one line and
    exit code 1 (OHQ_TRACEBACK=1 shows the traceback)."""
    try:
        sys.exit(main())
    except OhqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("OHQ_TRACEBACK"):
            raise
        print(f"error: internal error ({type(e).__name__}: {last_line(e)}); "
              "please report it, with OHQ_TRACEBACK=1 for details", file=sys.stderr)
        sys.exit(1)
