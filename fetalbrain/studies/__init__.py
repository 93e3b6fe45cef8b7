"""Declared studies: a study file (``spec``), its finished runs read back (``collect``), the statistics a reviewer
accepts (``statistics``), one summariser (``summarise``) and the README blocks generated from its results
(``readme``). The command is ``python -m fetalbrain.study``."""
