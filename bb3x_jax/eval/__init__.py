"""Measuring a model: likelihood metrics per feedback class (``likelihood``),
generations and their F1 (``generation``), and the judges that label responses
good or bad (``judges``)."""
