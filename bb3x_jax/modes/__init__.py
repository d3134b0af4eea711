"""``main.py --mode``'s entry points, one module each, every one a ``run(config, workdir)``.

Modes sit on top of the library (``data``, ``model``, ``eval``, ``train``);
nothing in the library imports them.
"""
