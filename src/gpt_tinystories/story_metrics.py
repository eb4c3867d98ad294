"""Offline metrics of story completions, and their aggregation with 95% confidence intervals over prompts.

Per completion: whether it finished, its length, its repetition, its copying of the training stories (with an
`NGramIndex`), its use of the prompt's characters, and the share of its words that an English dictionary does
not know (pyspellchecker's, offline: made-up or broken words). Over all completions: distinct-1/2/3. All are
cheap proxies: none says whether the story makes sense; that is what the LLM grade (grading.py) and a human
reader judge.

Confidence intervals are percentile bootstraps over prompts: prompts are resampled with replacement (1,000
times, a fixed seed), each prompt standing for all its samples, and the statistic recomputed; the interval is
the 2.5th to 97.5th percentile. Resampling prompts rather than completions is right because the samples of
one prompt are not independent of each other, and the question is how a model does on prompts like these.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from .ngram_index import NGramIndex

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
# the text before a word that starts a sentence: a full stop, a new line, an opening quote, or nothing
SENTENCE_START = re.compile(r"(?:^|[.!?][\"'\u201d)]*\s|\n|(?:^|\s)[\"'\u201c])\s*$")
# Words written with a capital inside sentences that are not characters' names.
NOT_NAMES = {"I", "I'm", "I'll", "I've", "I'd", "OK", "Okay", "TV", "God", "Mr", "Mrs", "Ms", "Dr"}


def split_words(text: str) -> list[str]:
    return WORD.findall(text)


def ngrams(items: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def repeated_share(items: Sequence[str], n: int = 4) -> float | None:
    """The share of the n-grams of `items` that already occurred earlier in them (None for fewer than n)."""
    grams = ngrams(items, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else None


def names(text: str) -> set[str]:
    """Capitalised words used at least once inside a sentence (not as its first word): characters' names,
    mostly. A cheap heuristic: a name that only ever starts sentences is missed."""
    found = set()
    for match in WORD.finditer(text):
        word = match.group()
        if (
            word[0].isupper()
            and word not in NOT_NAMES
            and not SENTENCE_START.search(text[max(0, match.start() - 12) : match.start()])
        ):
            found.add(word)
    return found


def name_use(prompt: str, continuation: str) -> tuple[int, int, int]:
    """(names in the prompt, how many of them the continuation uses, names the continuation introduces).

    A name is new when the whole story (prompt + continuation) uses it inside a sentence and the prompt never
    mentions it; a name of the prompt is kept when the continuation contains it as a word."""
    prompt_names = names(prompt)
    used = set(split_words(continuation))
    story_names = names(prompt + continuation)
    new = {name for name in story_names - prompt_names if name in used and name not in split_words(prompt)}
    return len(prompt_names), len(prompt_names & used), len(new)


@dataclass
class Completion:
    prompt_index: int
    sample: int
    prompt: str
    text: str  # the continuation alone, EOS left out
    tokens: int  # new tokens generated, EOS included when produced
    finished: bool  # produced EOS within the budget


def completion_metrics(completion: Completion, index: NGramIndex | None = None, spell=None) -> dict:
    """The per-completion metrics (a flat dict of numbers and booleans, None where undefined)."""
    story_words = split_words(completion.text)
    prompt_names, kept, new = name_use(completion.prompt, completion.text)
    metrics = {
        "finished": completion.finished,
        "words": len(story_words),
        "repeated_4gram_share": repeated_share([w.lower() for w in story_words], 4),
        "prompt_names": prompt_names,
        "prompt_names_kept": kept if prompt_names else None,
        "new_names": new,
    }
    if index is not None:
        copying = index.copying(completion.text)
        metrics["copied_8gram_share"] = copying.share
        metrics["longest_copied_span"] = copying.longest_span
    if spell is not None:
        metrics.update(spell(completion.text))
    return metrics


@cache
def _dictionary():
    from spellchecker import SpellChecker

    return SpellChecker(language="en")


def spelling(text: str) -> dict:
    """The share of the text's words (lower-cased) that pyspellchecker's English dictionary does not hold."""
    found = [w.lower() for w in split_words(text) if not w.isdigit()]
    unknown = _dictionary().unknown(found) if found else set()
    return {"unknown_word_share": sum(w in unknown for w in found) / len(found) if found else None}


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams, pooled over `texts` (lower-cased words; None when there are none)."""
    grams = Counter(g for text in texts for g in ngrams([w.lower() for w in split_words(text)], n))
    total = sum(grams.values())
    return len(grams) / total if total else None


def summary(completions: Sequence[Completion], metrics: Sequence[dict]) -> dict:
    """Each metric's mean over prompts (each prompt: the mean of its samples) with a 95% bootstrap interval,
    and distinct-1/2/3 pooled over all completions. Booleans count as 0/1.

    distinct-n has no interval: it is a statistic of the whole set (it falls as the set grows), and resampling
    prompts with replacement duplicates their text, which distinct-n would read as repetition."""
    prompts = sorted({c.prompt_index for c in completions})
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    result = {}
    for key in metrics[0] if metrics else []:
        per_prompt = []
        for prompt in prompts:
            values = [m[key] for c, m in zip(completions, metrics, strict=True) if c.prompt_index == prompt]
            values = [float(v) for v in values if v is not None]
            per_prompt.append(np.mean(values) if values else np.nan)
        result[key] = _mean_ci(np.array(per_prompt), rng)
    for n in (1, 2, 3):
        result[f"distinct_{n}"] = {"mean": distinct_n([c.text for c in completions], n), "ci95": None,
                                   "prompts": len(prompts)}  # fmt: skip
    return result


def _mean_ci(per_prompt: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean over the prompts where the metric is defined, with its percentile-bootstrap 95% interval."""
    values = per_prompt[~np.isnan(per_prompt)]
    if len(values) == 0:
        return {"mean": None, "ci95": None, "prompts": 0}
    means = values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95": [float(low), float(high)], "prompts": len(values)}
