"""The measurements behind ``python -m fetalbrain.benchmark``, one module per section of its results; ``suite.run``
runs them all and writes the results. A library: it imports no command (the parallel jobs start the command as a
process)."""
