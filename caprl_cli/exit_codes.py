"""Exit codes of `caprl`, in one place (documented in the README)."""

OK = 0  # complete, or nothing to do
FAILED = 1  # the engine could not start or crashed; committed rows are kept
USAGE = 2  # a user mistake or refused settings; nothing changed
PARTIAL = 3  # --max-runtime reached with work left
LOCKED = 75  # EX_TEMPFAIL: another run is writing this output
SIGINT = 130
SIGTERM = 143
