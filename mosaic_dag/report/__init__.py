"""Figures, the Markdown report and the self-contained HTML page."""
