"""The SGLang adapter: WHIFLASH's spec class, server-argument resolution, target hooks and worker.

Only ``spec``, ``hooks`` and ``worker`` import SGLang; ``settings``, ``shape``, ``layout`` and ``verify_layout`` are
plain Python/PyTorch so they can be tested, and reasoned about, without it.
"""
