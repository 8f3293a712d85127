"""Export a base model, a base with one adapter merged in, or an adapter alone to other runtimes.

Kept empty of imports: `loraplex --help` imports the CLI, which must not pull in torch or gguf.
"""
