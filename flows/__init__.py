"""Prefect flows. Importing loraflow first sets the offline/telemetry env before prefect is imported."""

import loraflow  # noqa: F401
