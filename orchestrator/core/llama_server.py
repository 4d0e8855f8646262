"""llama-cpp-python's OpenAI-compatible server, sampling under a grammar the way llama.cpp's own server does.

    python -m orchestrator.core.llama_server --model <file.gguf> --host 127.0.0.1 --port 8000 [--grammar-first]

takes ``python -m llama_cpp.server``'s arguments and serves the same API. Why it exists: llama-cpp-python
(0.3.x, ``Llama._init_sampler``) puts the grammar sampler in the sampling chain *before* top-k/greedy, so
every generated token runs the grammar over the whole vocabulary (49,152 tokens for SmolLM2) — on a
CPU that costs more than the 135M model's forward pass. llama.cpp's C++ server (``common_sampler_sample``
in ``common/sampling.cpp``) samples first, checks the one sampled token against the grammar, and only
when the grammar rejects it applies the grammar to the whole vocabulary and samples again. That is
what :class:`GrammarLastSampler` does here.

For greedy decoding (temperature 0, how the remote core plans) the two orders pick the same token
at every step: the grammar only removes tokens, so when the most likely token is allowed it is also
the most likely allowed one (ties too: the lowest token id wins either way), and when it is not, the
grammar is applied to the whole vocabulary as before. ``tests/orchestrator/core/test_llama_server.py``
checks that the replies are identical. With sampling (temperature > 0) the draws differ from
grammar-first's (the random state advances differently when a token is resampled), as they do in
llama.cpp's server; the distribution a reply is drawn from is the grammar-constrained one either way.

This module is a test and evaluation aid for the `remote` extra (llama-cpp-python is not a runtime
dependency): the runtime never imports it.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import numpy as np

#: the flag that keeps llama-cpp-python's own order (the grammar over the whole vocabulary every token)
GRAMMAR_FIRST_FLAG = "--grammar-first"


class GrammarLastSampler:
    """A sampler with ``LlamaSampler``'s interface (``sample``, ``accept``, ``reset``, ``close``) that runs
    ``chain`` (penalties, top-k …, greedy or dist) first and the grammar only on the token it picked,
    falling back to grammar-then-chain over the whole vocabulary when the grammar rejects that token."""

    def __init__(self, chain: Any, grammar: Any, n_vocab: int) -> None:
        from llama_cpp import llama_cpp as C

        self._C = C
        self.chain = chain  # a llama_cpp._internals.LlamaSampler without the grammar
        self.grammar = grammar  # a LlamaSampler holding only the grammar sampler
        self.n_vocab = n_vocab
        self._data = (C.llama_token_data * n_vocab)()
        rec = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        assert rec.itemsize == ctypes.sizeof(C.llama_token_data)
        self._view = np.frombuffer(self._data, dtype=rec)
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._one = (C.llama_token_data * 1)()
        #: how many tokens the grammar rejected (each one cost a pass over the whole vocabulary)
        self.resampled = 0
        self.sampled = 0

    def _load(self, ctx: Any, idx: int) -> Any:
        C = self._C
        logits = C.llama_get_logits_ith(ctx.ctx, idx)
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self._view["p"] = 0.0
        return C.llama_token_data_array(data=self._data, size=self.n_vocab, selected=-1, sorted=False)

    def _pick(self, cur: Any) -> int:
        if not 0 <= cur.selected < self.n_vocab:
            raise RuntimeError(f"the sampler selected no token (selected={cur.selected})")
        return int(self._data[cur.selected].id)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """The next token (``llama_sampler_sample``'s contract: it is accepted before it is returned)."""
        C = self._C
        cur = self._load(ctx, idx)
        C.llama_sampler_apply(self.chain.sampler, ctypes.byref(cur))
        token = self._pick(cur)
        self.sampled += 1
        if not self._allowed(token):
            self.resampled += 1
            cur = self._load(ctx, idx)
            C.llama_sampler_apply(self.grammar.sampler, ctypes.byref(cur))
            C.llama_sampler_apply(self.chain.sampler, ctypes.byref(cur))
            token = self._pick(cur)
        self.accept(token)
        return token

    def _allowed(self, token: int) -> bool:
        C = self._C
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        one = C.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        C.llama_sampler_apply(self.grammar.sampler, ctypes.byref(one))
        return not math.isinf(self._one[0].logit)

    def accept(self, token: int) -> None:
        self.grammar.accept(token)
        self.chain.accept(token)

    def reset(self) -> None:
        self.grammar.reset()
        self.chain.reset()

    def close(self) -> None:
        self.chain.close()
        self.grammar.close()


def grammar_last_llama() -> type:
    """``llama_cpp.Llama`` with :class:`GrammarLastSampler` in place of its grammar-first chain (a sampler
    without a grammar is left as it was)."""
    import llama_cpp
    from llama_cpp import _internals

    class GrammarLastLlama(llama_cpp.Llama):  # type: ignore[misc, name-defined]
        """``Llama``, sampling under a grammar as llama.cpp's server does (see the module doc)."""

        def _init_sampler(self, *args: Any, grammar: Any = None, **kw: Any) -> Any:
            chain = super()._init_sampler(*args, grammar=None, **kw)
            if grammar is None:
                return chain
            only = _internals.LlamaSampler()
            only.add_grammar(self._model, grammar)
            return GrammarLastSampler(chain, only, self._n_vocab)

    return GrammarLastLlama


def main(argv: list[str] | None = None) -> None:
    """``python -m llama_cpp.server``'s command line, with the grammar sampled last unless
    ``--grammar-first`` (llama-cpp-python's own order, for comparison) is given."""
    import llama_cpp
    from llama_cpp.server.__main__ import main as serve

    args = list(sys.argv[1:] if argv is None else argv)
    if GRAMMAR_FIRST_FLAG in args:
        args.remove(GRAMMAR_FIRST_FLAG)
    else:
        llama_cpp.Llama = grammar_last_llama()  # the server builds its model as llama_cpp.Llama(...)
    sys.argv = [sys.argv[0], *args]
    serve()


if __name__ == "__main__":
    main()
