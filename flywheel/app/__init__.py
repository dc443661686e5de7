"""The application layer: the CLI, the embedded stack, the loop's orchestration (``loop``: the steps the DAGs
call), the demo, the simulated users and the report. It imports the stages and serving; nothing below it imports
it (the import-linter contracts in ``pyproject.toml``)."""
