"""Log-probabilities in OpenAI's shapes: the completions object (tokens, token_logprobs, top_logprobs,
text_offset) and chat's list of content entries (token, logprob, bytes, top_logprobs)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from lmspec.runtime.serve.requests import Scored


def completion_logprobs(decode: Callable[[list[int]], str], scored: Sequence[Scored], offset: int = 0) -> dict:
    """The `logprobs` of a completion choice (or of one streamed chunk of it, its text starting at
    `offset` characters into the choice's text). A prompt's first token has null for both."""
    tokens, offsets = [], []
    for s in scored:
        piece = decode([s.token])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [None if s.logprob is None else {decode([t]): lp for t, lp in s.top} for s in scored],
            "text_offset": offsets}


def chat_logprobs(decode: Callable[[list[int]], str], scored: Sequence[Scored]) -> dict:
    """The `logprobs` of a chat choice (or of one streamed chunk of it)."""
    def entry(token: int, logprob: float) -> dict:
        piece = decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scored]}
