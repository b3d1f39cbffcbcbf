"""The inspection log: decisions and feedback in a SQL database (`log`), written ahead to a
durable local spool (`spool`), its schema's Alembic migrations (`migrations`) and what it says
about the models (`quality`)."""
