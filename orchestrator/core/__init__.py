"""The core: a LLaVA-style VLM that reads the conversation and writes commands (see DESIGN.md §5).

Submodules: ``format`` (the one rendering of a conversation into model text), ``model`` (CoreModel:
load and generate), ``data`` (invocation-tuning data generated from the registry), ``grammar``
(constrained decoding), ``loop`` (plan -> execute -> fuse), ``cli``. Importing this package is cheap:
torch and transformers load inside functions.
"""
