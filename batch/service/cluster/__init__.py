"""Several machines answering one spool: the head (`run --ray`, `watch --ray`) keeps the spool and the database
and sends units to Ray actors, each one loaded model on one node. Needs the `ray` extra.
"""
