"""The only code that knows SQL: tables, the engine, and the operations on them."""
