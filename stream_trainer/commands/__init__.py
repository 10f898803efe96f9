"""Sub-commands of the ``stream-trainer`` command line, one module each."""
