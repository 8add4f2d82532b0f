"""Attachments: their bytes in PostgreSQL, content checks, signed URLs, uploads and the file
routes. Stands on app.pg; knows no agent."""
