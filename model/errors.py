"""The one error type every layer may raise for a problem the user can fix."""


class UserError(Exception):
    """A problem the user can fix (data, folders, flags): entry points print it as one line."""
