"""Text models at work: sentences from the prior, continuations of a prompt, and the latent
interpolation between two sentences of the paper's Table 3.

Decoding is greedy (argmax) or sampled, from the softmax at a temperature, optionally cut to the
k most likely tokens (top-k) or to the smallest set holding probability p (top-p, nucleus).
<pad> and <s> are never produced (they are never targets), and </s> is held back until the
sentence has the shortest length the data kept (min_tokens), as the authors' decoder did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data.text import END, PAD, START, decode, encode, tokenize_sentence
from .errors import UsageError, ZForcingError
from .generate import chunks, generator_for, rows_per_chunk, step_bytes
from .model import ZForcing
from .sentence_defaults import DEFAULT_LENGTH, INTERPOLATION_TOP_K

MAX_LENGTH = 1000  # tokens per sentence: far beyond what a model of 5..15-token sentences can say
SHOWN_TOKENS = 20  # of an over-long sentence, in the hint that says where to cut it


class TextInputError(ZForcingError):
    """A sentence or prompt the model cannot read."""


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen from p(y_t | h_t)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1: no cut
    min_tokens: int = 0  # </s> is banned before this many tokens

    def check(self) -> None:
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (off) or more, not {self.top_k}.", "For example --top-k 10.")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], not {self.top_p:g}.", "For example --top-p 0.9.")
        ignored = [option for option, is_set in (("--temperature", self.temperature != 1.0), ("--top-k", self.top_k != 0),
                                                 ("--top-p", self.top_p != 1.0)) if is_set]
        if self.greedy and ignored:  # greedy takes the argmax: they would change nothing, in silence
            raise UsageError(
                f"--greedy takes the most likely token, so {' and '.join(ignored)} would have no effect.",
                f"Leave out --greedy to sample with {' and '.join(ignored)}, or leave {'it' if len(ignored) == 1 else 'them'} out.",
            )

    def chooser(self, generator: torch.Generator | None, offset: int = 0):
        """choose(logits (num, 1, V), t) -> token ids (num, 1), for ZForcing.generate. offset is
        how many tokens precede step 0 (a prompt's), which count toward min_tokens."""

        def choose(logits: Tensor, t: int) -> Tensor:
            logits = logits.squeeze(1).clone()
            logits[:, [PAD, START]] = float("-inf")
            if t + offset < self.min_tokens:
                logits[:, END] = float("-inf")
            if self.greedy:
                return logits.argmax(-1, keepdim=True)
            logits = self.cut(logits / self.temperature)
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)

        return choose

    def cut(self, logits: Tensor) -> Tensor:
        """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = torch.softmax(ordered, -1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the tokens ahead already hold p
            logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
        return logits


@dataclass
class TextVocabulary:
    """A text checkpoint's vocabulary and tokenizer settings (config["data"]["text"])."""

    words: list[str]
    lowercase: bool
    min_tokens: int
    max_tokens: int
    unknown: list[str] = field(default_factory=list)  # words read as <unk> so far

    @classmethod
    def of(cls, data: dict) -> "TextVocabulary":
        text = data.get("text")
        if data.get("modality") != "tokens" or not text:
            what = {"binary": "images", "frames": "audio"}.get(data.get("modality"), data.get("modality"))
            raise TextInputError(f"This is a model of {what} ({data.get('kind')}), not a text model.",
                                 "Pass a checkpoint trained on a text dataset (zforcing prepare imdb / text).")
        return cls(text["vocabulary"], text["lowercase"], text["min_tokens"], text["max_tokens"])

    def ids(self, sentence: str, what: str = "sentence", limit: int | None = None) -> list[int]:
        """A sentence's token ids; unknown words become <unk> and are remembered in `unknown`."""
        tokens = tokenize_sentence(sentence, self.lowercase)
        if not tokens:
            raise TextInputError(f"The {what} {sentence!r} holds no words.", "Give a sentence, e.g. \"this movie was great .\"")
        if limit is not None and len(tokens) > limit:
            raise TextInputError(
                f"The {what} has {len(tokens)} tokens; this model was trained on sentences of at most {limit}.",
                f"Shorten it to {limit} tokens or fewer: it would end after {shown_tokens(tokens[:limit])!r}.",
            )
        ids, unknown = encode(tokens, self.words)
        self.unknown += [word for word in unknown if word not in self.unknown]
        return ids

    def text(self, ids: list[int]) -> str:
        return decode(ids, self.words)


def shown_tokens(tokens: list[str]) -> str:
    """The first and last few of many tokens, with what lies between left out."""
    if len(tokens) <= SHOWN_TOKENS:
        return " ".join(tokens)
    half = SHOWN_TOKENS // 2
    return f"{' '.join(tokens[:half])} … {' '.join(tokens[-half:])}"


def check_length(length: int) -> None:
    if length > MAX_LENGTH:
        raise UsageError(
            f"--length {length:,} is more tokens than a sentence may have here ({MAX_LENGTH:,}); "
            "a model of short sentences only repeats itself beyond a few dozen.",
            f"Give --length {DEFAULT_LENGTH} (the default) or any number up to {MAX_LENGTH:,}.",
        )


@torch.no_grad()
def sample_sentences(model: ZForcing, vocabulary: TextVocabulary, num: int, decoding: Decoding,
                     length: int = DEFAULT_LENGTH, prompt: str | None = None, seed: int = 0) -> list[str]:
    """num sentences from the prior, each up to `length` tokens after the prompt (if any), which
    the model first reads with posterior latents and which begins each returned sentence."""
    return [sentence for part in sentence_chunks(model, vocabulary, num, decoding, length, prompt, seed) for sentence in part]


@torch.no_grad()
def sentence_chunks(model: ZForcing, vocabulary: TextVocabulary, num: int, decoding: Decoding,
                    length: int = DEFAULT_LENGTH, prompt: str | None = None, seed: int = 0) -> Iterator[list[str]]:
    """sample_sentences' sentences, a chunk at a time, so that memory (the logits over the
    vocabulary, for every sentence of a chunk) is bounded whatever num is."""
    check_length(length)
    model.train(False)
    device = next(model.parameters()).device
    generator = generator_for(model, seed)
    prompt_ids = vocabulary.ids(prompt, "prompt") if prompt is not None else []
    choose = decoding.chooser(generator, offset=len(prompt_ids))
    for _, count in chunks(num, rows_per_chunk(step_bytes(model.config) + 8 * length)):
        first_input = state = None
        if prompt_ids:
            read = torch.tensor([prompt_ids] * count, device=device)
            state = model.encode(read, generator=generator)
            first_input = read[:, -1]
        tokens = model.generate(count, length, generator=generator, stop=lambda y: y == END, first_input=first_input,
                                state=state, choose=choose)
        yield [vocabulary.text(prompt_ids + row) for row in tokens.tolist()]


@dataclass
class InterpolationPoint:
    alpha: float
    greedy: str
    sampled: str


@torch.no_grad()
def interpolate(model: ZForcing, vocabulary: TextVocabulary, sentence_a: str, sentence_b: str, points: int = 11,
                length: int = DEFAULT_LENGTH, top_k: int = INTERPOLATION_TOP_K, temperature: float = 1.0,
                seed: int = 0, progress: Callable[[int, int], None] | None = None) -> list[InterpolationPoint]:
    """The paper's Table 3. The posterior means of z_1..z_T for each sentence (its words and
    </s>) are mixed as (1 - α) z^A_t + α z^B_t for α = 0, 1/(points - 1), ..., 1. Where one
    sentence has ended, its share is drawn from the prior instead, and past both ends z_t comes
    from the prior alone; so α = 0 decodes A's own latents and α = 1 B's. Each mix is decoded
    greedily and by top-k sampling, with the same prior draws, a chunk of mixes at a time;
    progress(done, total) follows the decoded mixes."""
    check_length(length)
    model.train(False)
    device = next(model.parameters()).device
    latents = []
    for sentence, what in ((sentence_a, "first sentence"), (sentence_b, "second sentence")):
        ids = vocabulary.ids(sentence, what, limit=vocabulary.max_tokens) + [END]
        latents.append(model.posterior_means(torch.tensor([ids], device=device))[0])  # (T, Z)
    alphas = torch.linspace(0.0, 1.0, points, device=device)
    given, weights = mixed_latents(latents, alphas)
    greedy = Decoding(greedy=True, min_tokens=vocabulary.min_tokens)
    sampled = Decoding(temperature=temperature, top_k=top_k, min_tokens=vocabulary.min_tokens)
    size = rows_per_chunk(step_bytes(model.config) + 8 * length)
    rows: list[list[str]] = [[], []]
    for texts, decoding in zip(rows, (greedy, sampled)):
        generator = generator_for(model, seed)  # the same prior draws for both decodings
        for start, count in chunks(points, size):
            part = slice(start, start + count)
            tokens = model.generate(count, length, generator=generator, stop=lambda y: y == END,
                                    choose=decoding.chooser(generator), latents=(given[part], weights[part]))
            texts += [vocabulary.text(row) for row in tokens.tolist()]
            if progress is not None:
                progress(len(rows[0]) + len(rows[1]), 2 * points)
    return [InterpolationPoint(alpha, g, s) for alpha, g, s in zip(alphas.tolist(), *rows)]


def mixed_latents(latents: list[Tensor], alphas: Tensor) -> tuple[Tensor, Tensor]:
    """For ZForcing.generate's `latents`: given (P, T, Z) = (1 - α) z^A_t [t < T_A] + α z^B_t [t < T_B]
    and weights (P, T) = (1 - α) [t < T_A] + α [t < T_B], for P mixing weights α and the two
    sentences' latents (T_A, Z) and (T_B, Z); T = max(T_A, T_B)."""
    steps = max(len(z) for z in latents)
    given = alphas.new_zeros(len(alphas), steps, latents[0].shape[-1])
    weights = alphas.new_zeros(len(alphas), steps)
    for share, z in zip((1.0 - alphas, alphas), latents):
        given[:, : len(z)] += share[:, None, None] * z
        weights[:, : len(z)] += share[:, None]
    return given, weights


__all__ = ["DEFAULT_LENGTH", "Decoding", "InterpolationPoint", "TextInputError", "TextVocabulary", "interpolate",
           "mixed_latents", "sample_sentences", "sentence_chunks"]
