"""``python -m extproc``: the command line (a Ctrl-C while it loads exits quietly)."""

try:
    from extproc.cli.main import main
except KeyboardInterrupt:
    raise SystemExit(130) from None
except Exception as exc:
    # a Ctrl-C while a module's classes are built can come back wrapped in another error
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, KeyboardInterrupt):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise
    raise SystemExit(130) from None

raise SystemExit(main())
