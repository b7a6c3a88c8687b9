"""The verbs of the `gentrain` command, one module each; each builds what it needs from its config and
hands it to the library below (loop, checkpoint, data, models, metrics). No other module imports them."""
