"""Prompt injection and jailbreaks: known phrasings first, then a small classifier on sentence embeddings.

The heuristics are regular expressions for the phrasings attacks keep using ("ignore all previous
instructions", "you are now DAN", "developer mode", a fake ``[system]`` turn, "reveal your system prompt"),
in English and, for the commonest, in a few other languages. They cost microseconds and are precise.

The classifier is a logistic regression over the bundled all-MiniLM-L6-v2 embedding of the text (texts
longer than one window are read in overlapping windows, the highest score wins); its weights ship in
``injection.npz`` beside this module, trained by ``bench/train_injection.py`` on the public sets in
shared/data (fixed seed and split) and tied to the sha256 of the embedding model they were trained on.
Embedding a prompt costs milliseconds, so the guard can run it only when asked (``classifier="always"``),
only on texts the cheap suspicion filter marks (``"suspicious"``: instruction-like vocabulary), or never.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from lamina.application.guards._base import Finding, FindingGuard, GuardSettings

INJECTION_WEIGHTS = Path(__file__).resolve().parent / "injection.npz"

Embed = Callable[[Sequence[str]], list[list[float]]]
ClassifierMode = Literal["always", "suspicious", "never"]

_PHRASES: dict[str, str] = {
    "ignore_instructions": (
        r"(?<!don't )(?<!do not )(?<!never )\b(?:ignore|disregard|forget|override|skip|bypass|neglect)\b"
        r"[\w\s,'-]{0,40}?\b(?:previous|prior|"
        r"above|earlier|preceding|former|original|initial|all|any|your|the|system|these|those)\b[\w\s,'-]{0,"
        r"30}?\b(?:instructions?|directives?|rules?|prompts?|guidelines?|commands?|orders?|constraints?|"
        r"context|programming|restrictions?)|(?<!don't )(?<!do not )\b(?:ignore|disregard|forget)\s+"
        r"(?:all\s+|everything\s+)?(?:of\s+)?(?:the\s+)?(?:above|previous|prior|preceding)\b"
    ),
    "ignore_instructions_i18n": (
        r"ignor(?:a|e|iere|ez|ar)\w*\s+(?:\w+\s+){0,3}(?:instrucciones|instructions|anweisungen|istruzioni|"
        r"instruções|instrucoes|instructies|инструкции)|(?:vergiss|vergessen sie|oublie[sz]?|olvida|"
        r"dimentica|esqueça|esqueca)\s+(?:\w+\s+){0,3}(?:anweisungen|instructions|instrucciones|istruzioni|"
        r"instruções)|игнорируй|忽略(?:之前|以上|所有|先前)|前の指示を無視|이전 지시"
    ),
    "reveal_prompt": (
        r"\b(?:reveal|show|print|repeat|output|display|tell me|give me|leak|disclose|what (?:is|are|was))\b"
        r"[\w\s,'-]{0,30}?\b(?:your|the)\s+(?:\w+\s+){0,2}(?:system prompt|initial prompt|hidden prompt|"
        r"instructions|secret key|password|passphrase|confidential)"
    ),
    "role_override": (
        r"\byou are (?:now|no longer)\b|\bfrom now on,? you\b|\bact as (?:an? )?(?:unrestricted|unfiltered|"
        r"jailbroken|evil)|\bpretend (?:that )?you (?:are|have) no (?:rules|restrictions|limits|filters)|"
        r"\b(?:developer|god|admin|debug|sudo|unrestricted|jailbreak) mode\b|\bDAN\b|do anything now"
    ),
    "fake_turn": (
        r"(?im)^\s*(?:\[|<\|?|###\s*)(?:system|assistant|im_start|/?inst|sys)\b[\]|>:]*|"
        r"<\|im_start\|>|\[/?INST\]|<<SYS>>|^\s*system\s*(?:override|message|prompt)?\s*:"
    ),
    "new_instructions": (
        r"\b(?:new|updated|real|actual|secret|hidden|additional) instructions?\s*[:\-]|"
        r"\binstead,? (?:you (?:must|should|will)|respond|reply|say|output)\b|"
        r"\b(?:no|without) (?:ethical|moral|content) (?:guidelines|restrictions|filters|limits)"
    ),
}
#: words one of which must be in the (lowercased) text for each rule to be worth its regex: most prompts
#: then cost a few substring tests instead of six backtracking searches
_TRIGGERS: dict[str, tuple[str, ...]] = {
    "ignore_instructions": ("ignore", "disregard", "forget", "override", "skip", "bypass", "neglect"),
    "ignore_instructions_i18n": (
        "ignor",
        "vergiss",
        "vergessen",
        "oubli",
        "olvida",
        "dimentica",
        "esque",
        "игнор",
        "忽略",
        "無視",
        "지시",
    ),
    "reveal_prompt": ("prompt", "instruction", "secret", "password", "passphrase", "confidential"),
    "role_override": ("you are", "from now on", "act as", "pretend", " mode", "dan", "do anything"),
    "fake_turn": ("[", "<|", "<<", "###", "system", "assistant"),
    "new_instructions": ("instruction", "instead", "ethical", "moral", "content"),
}
_COMPILED = {name: (_TRIGGERS[name], re.compile(rx, re.IGNORECASE)) for name, rx in _PHRASES.items()}
#: instruction-like vocabulary: a text without any of it is not worth an embedding in "suspicious" mode
#: matched on the lowered text, case-sensitive: four times faster than re.IGNORECASE on the text
_SUSPICIOUS = re.compile(
    r"\b(?:ignore|disregard|forget|instruction|prompt|system|pretend|role|act as|you are|rules|reveal|"
    r"secret|password|override|mode|respond|reply|answer only|output|repeat|translate|encode|base64|"
    r"decode|hypothetical|imagine|story|character|persona|jailbreak|unrestricted|bypass|admin|developer|"
    r"passcode|passwort|mot de passe|contraseña|user's|email address|database|birth|security number|"
    r"your (?:response|answer|message|elucidation|implementation|code)|code (?:snippet|block|section))"
    r"|[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af\u0400-\u04ff\u0600-\u06ff]",
)
_WINDOW_CHARS = 1000
_WINDOW_STEP = 800


def looks_suspicious(text: str) -> bool:
    """Whether ``text`` has instruction-like words (in "suspicious" mode the classifier reads only these)."""
    return _SUSPICIOUS.search(text.lower()) is not None


def heuristic_findings(text: str) -> list[Finding]:
    """Known injection phrasings in ``text`` (entity ``PROMPT_INJECTION:<rule>``)."""
    out = []
    low = text.lower()
    for name, (triggers, rx) in _COMPILED.items():
        if not any(t in low for t in triggers):
            continue
        match = rx.search(text)
        if match is not None:
            out.append(Finding(f"PROMPT_INJECTION:{name}", 1.0, match.start(), match.end()))
    return out


class InjectionClassifier:
    """A logistic regression over sentence embeddings (the weights from ``bench/train_injection.py``)."""

    def __init__(self, embed: Embed, path: Path = INJECTION_WEIGHTS, threshold: float | None = None) -> None:
        with np.load(path) as data:
            self._w = np.asarray(data["weights"], dtype=np.float32)
            self._b = float(data["bias"])
            logit = (
                float(data["threshold"]) if threshold is None else float(np.log(threshold / (1 - threshold)))
            )
            self.model_sha256 = str(data["model_sha256"])
        self._threshold = logit
        self._embed = embed

    @staticmethod
    def windows(text: str) -> list[str]:
        """The pieces of ``text`` the classifier reads: the whole text when short, else overlapping
        windows (about 256 tokens each: what the embedding model reads of one text)."""
        if len(text) <= _WINDOW_CHARS:
            return [text]
        starts = range(0, len(text) - _WINDOW_CHARS + _WINDOW_STEP, _WINDOW_STEP)
        return [text[s : s + _WINDOW_CHARS] for s in starts]

    def logits(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """The highest window logit of each text (one embedding call for all their windows)."""
        windows: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            parts = self.windows(text)
            windows += parts
            owner += [i] * len(parts)
        vectors = np.asarray(self._embed(windows), dtype=np.float32)
        scores = vectors @ self._w + self._b
        out = np.full(len(texts), -np.inf)
        np.maximum.at(out, np.asarray(owner), scores.astype(np.float64))
        return out

    def probability(self, text: str) -> float:
        return float(1 / (1 + np.exp(-self.logits([text])[0])))

    def is_injection(self, logit: float) -> bool:
        return logit > self._threshold


class InjectionGuard(FindingGuard):
    """Heuristics, then (as configured) the embedding classifier; judges the whole text: no redaction."""

    can_redact = False

    def __init__(
        self,
        settings: GuardSettings,
        *,
        name: str = "injection",
        classifier: InjectionClassifier | None = None,
        mode: ClassifierMode = "always",
    ) -> None:
        super().__init__(name, settings)
        if mode != "never" and classifier is None:
            raise ValueError(f"the guard {name!r} has classifier mode {mode!r} but no classifier")
        self._classifier = classifier
        self._mode = mode
        self._last: tuple[str, bool] | None = None

    def _suspicious(self, text: str) -> bool:
        """``looks_suspicious``, remembered for the last text (``cheap`` then ``find`` ask about it)."""
        last = self._last
        if last is not None and last[0] is text:
            return last[1]
        answer = looks_suspicious(text)
        self._last = (text, answer)
        return answer

    def cheap(self, text: str) -> bool:
        """Cheap when the classifier will not read it (the heuristics alone run)."""
        if not super().cheap(text):
            return False
        if self._classifier is None or self._mode == "never":
            return True
        return self._mode == "suspicious" and not self._suspicious(text)

    def find(self, text: str) -> list[Finding]:
        found = heuristic_findings(text)
        if found or self._classifier is None or self._mode == "never":
            return found
        if self._mode == "suspicious" and not self._suspicious(text):
            return []
        logit = float(self._classifier.logits([text])[0])
        if self._classifier.is_injection(logit):
            return [Finding("PROMPT_INJECTION:classifier", float(1 / (1 + np.exp(-logit))), 0, len(text))]
        return []
