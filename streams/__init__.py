"""clipstream's stream layer: Faust worker, client SDK, CLI and the dev broker.

Kept import-free so that ``models`` can use the wire codec without pulling in Faust.
"""
