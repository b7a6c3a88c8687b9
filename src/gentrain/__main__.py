"""`python -m gentrain` is the `gentrain` command (torchrun launches it this way)."""

from gentrain.cli import main

main()
