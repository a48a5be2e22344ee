"""The results database: its schema and every read and write, the answers' filters, and its upkeep over years."""
