"""Jobs and their records: job files, the spool, the SQLite store, the worker and its reports."""
