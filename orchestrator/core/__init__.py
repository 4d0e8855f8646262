"""The core: a LLaVA-style VLM that reads the conversation and writes commands (see docs/ARCHITECTURE.md).

Submodules: ``format`` (the one rendering of a conversation into model text), ``model`` (CoreModel:
load and generate), ``grammar`` (constrained decoding), ``loop`` (plan -> execute -> fuse). The
invocation-tuning data is generated from the registry by training/core_data.py; the commands that
drive the core are in orchestrator/cli. Importing this package is cheap: torch and transformers load
inside functions.
"""
