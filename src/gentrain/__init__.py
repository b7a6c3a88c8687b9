"""gentrain: train GANs and VAEs on images with one command."""

__version__ = "0.1.0"


class GentrainError(Exception):
    """An error the user can fix: the CLI prints its message as one line and exits non-zero."""

    exit_code = 2


class Interrupted(GentrainError):
    """Ctrl-C or SIGTERM: a checkpoint was written and the run can be resumed."""

    exit_code = 130
