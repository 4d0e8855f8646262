"""The built-in experts. Each registers through the ``switchboard.experts`` entry-point group and
imports the contract from ``switchboard``, exactly as a third-party plugin does."""
