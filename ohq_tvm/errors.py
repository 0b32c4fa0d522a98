"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""


class OhqError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def run_cli(main) -> None:
    """Run a CLI entry point: user errors become one stderr line and exit code 2."""
    import sys
    try:
        sys.exit(main())
    except OhqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
