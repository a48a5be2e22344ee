"""The spool and what enters it: job files, `submit`, the spool folder's states, standing jobs, OpenAI batch files."""
