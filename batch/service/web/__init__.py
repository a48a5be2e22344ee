"""Looking at results: `vlbatch serve` (Datasette over the database, read-only) and `vlbatch gallery` (static pages).

Needs the `serve` extra (Datasette, pygal); nothing below the service floor imports this package.
"""
