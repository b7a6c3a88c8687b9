"""Errors a user can cause, and how they reach the terminal: one line and a non-zero exit, never a traceback.

The bottom layer: every other module may import this one, and it imports none of gentrain's but `dist`
(to tell a torchrun peer's failure from this process's own).
"""

import functools
import sys


class GentrainError(Exception):
    """An error the user can fix: the CLI prints its message as one line and exits non-zero."""

    exit_code = 2


class Interrupted(GentrainError):
    """A signal stopped the run (Ctrl-C, SIGTERM, a scheduler's preemption): a checkpoint was written and the
    run can be resumed. It exits as a shell reports a process that the signal ended, 128 + its number
    (SIGINT 130, SIGTERM 143), which is what schedulers and scripts test for."""

    exit_code = 130

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def fail(message: str, code: int = 2):
    """Print `gentrain: error: MESSAGE` (a signal's stop, the user's or a scheduler's choice, is a plain note)
    and exit with `code`."""
    print(f"gentrain: {'' if code > 128 else 'error: '}{message}", file=sys.stderr)
    sys.exit(code)


def unset(key: str) -> GentrainError:
    """A mandatory key (`???` in its YAML) that the command line did not set."""
    return GentrainError(f"{key} has no value; set it on the command line: {key}=...")


def quote(value: str) -> str:
    """A path as one Hydra override value, whatever spaces, commas or '=' it holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def reported(task):
    """Wrap a verb so a GentrainError (or a GPU out of memory) ends in one line, not a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        import torch
        from omegaconf.errors import MissingMandatoryValue

        try:
            return task(*args, **kwargs)
        except GentrainError as e:
            fail(str(e), e.exit_code)
        except MissingMandatoryValue as e:
            fail(str(unset(e.full_key)))
        except torch.cuda.OutOfMemoryError:
            fail("the GPU ran out of memory; lower trainer.batch_size (checkpoints already written are intact)")
        except KeyboardInterrupt:  # before the loop took over Ctrl-C (loading data), or a second Ctrl-C
            fail("interrupted (checkpoints already written are intact)", 130)
        except RuntimeError as e:
            from gentrain import dist

            if dist.peer_lost(e):  # another torchrun worker stopped first and said why; nothing to add
                sys.exit(1)
            raise

    return wrapper
