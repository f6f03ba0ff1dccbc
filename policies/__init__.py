"""Routing policies (heuristic, entropy, mlp), found through the ``whiflash_sgl.policies`` entry-point group."""
