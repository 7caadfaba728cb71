"""The pipeline's report: one Markdown and one self-contained HTML page, figures as PNG (offline)."""
