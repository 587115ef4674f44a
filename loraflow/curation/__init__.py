"""Curation: raw files in the formats users bring -> chat-format records, preference pairs and a quarantine.

curate (the whole of it) runs parallel (workers) over reader (one process: formats -> normalise -> structure,
then ids and lengths); then lengths' too_long policy, dedup, stats and output. steps/curate.py reads the
folders and writes what `curate` returns.
"""
