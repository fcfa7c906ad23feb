"""``python -m extproc``: the command line (a Ctrl-C while it loads exits quietly)."""

try:
    from extproc.cli.main import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

raise SystemExit(main())
