"""Running models: tokenizers and chat templates, generation defaults, loading a model folder.

Modules are imported where they are used (``moekit.inference.tokenization``,
``moekit.inference.loading``, ...), so importing this package costs nothing.
"""
