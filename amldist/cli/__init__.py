"""Command-line interface: `amldist <command> ...`. Each command lives in its own module here."""
