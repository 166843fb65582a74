"""The converter's failures that the command turns into one line and an exit status."""


class UsageError(Exception):
    """Bad arguments, or inputs and folders that cannot be used as given: exit status 2."""


class DataError(Exception):
    """A failure the user has to fix in the data or the folders: exit status 1, the message is the line."""


class NothingConverted(Exception):
    """The input gave no product. An error, so that an empty data set never looks like a finished one."""
