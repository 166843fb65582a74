"""The one error type every layer may raise for a problem the user can fix."""


class UserError(Exception):
    """A problem the user can fix (data, folders, flags): entry points print it as one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the entry point says in one line what was kept and exits 128 + signal."""

    def __init__(self, signum: int, message: str = ""):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {self.signal_name}")
