"""What happened, kept: events buffered in Redis, the flusher that writes them to SQL, the records store and its
tables, the audit chain, and the schema's migrations."""
