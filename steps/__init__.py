"""Pipeline steps: one module per step, one core `run()` each. Importing loraflow first sets the offline env."""

import loraflow  # noqa: F401
