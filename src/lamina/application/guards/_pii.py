"""PII and secrets: Presidio's analyzer with pattern and checksum recognizers only, and its anonymizer.

Recognized: email addresses (the domain checked against the public suffix list bundled with tldextract,
never fetched), phone numbers (python-phonenumbers), credit cards (Luhn), IBANs (their check digits),
IP addresses, US social security numbers, and secrets: API keys of common formats (``sk-...``,
``AKIA...``, ``ghp_...``, ``xox?-...``, ``AIza...``, Stripe keys, JWTs) and private key blocks. No NLP model
is loaded: Presidio runs with its no-op NLP engine, so names and addresses (which need one) are not found.

The cost is kept down by a prefilter: a text is given only to the recognizers that could match it (no
``@``, no email; fewer than 7 digits, no phone, card, SSN or IBAN...). A prompt without any of them costs
a few regex scans; see the README's Guardrails section for the measured figures.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from lamina.application.guards._base import Decision, Finding, FindingGuard, GuardSettings

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerResult

#: every entity this guard can find, and the default set
PII_ENTITIES = (
    "API_KEY",
    "CREDIT_CARD",
    "EMAIL_ADDRESS",
    "IBAN_CODE",
    "IP_ADDRESS",
    "PHONE_NUMBER",
    "PRIVATE_KEY",
    "US_SSN",
)
#: Presidio's base scores without context words: 0.4 keeps phone numbers (0.4), SSNs in the usual
#: ``ddd-dd-dddd`` form (0.5) and everything validated by a checksum (1.0), and drops bare 9-digit numbers
DEFAULT_THRESHOLD = 0.4

#: (name, regex, score) of the secret formats; Presidio pattern recognizers are made of them
SECRET_PATTERNS: dict[str, list[tuple[str, str, float]]] = {
    "API_KEY": [
        ("OpenAI / Anthropic key", r"\bsk-(?:[A-Za-z0-9]+-){0,3}[A-Za-z0-9_\-]{20,}", 0.9),
        ("AWS access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", 0.9),
        ("GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", 0.9),
        ("Slack token", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}", 0.9),
        ("Google API key", r"\bAIza[0-9A-Za-z_\-]{35}\b", 0.9),
        ("Stripe key", r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b", 0.9),
        ("JWT", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0.8),
    ],
    "PRIVATE_KEY": [
        (
            "private key block",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?",
            1.0,
        )
    ],
}
#: card numbers without separators by their issuers' prefixes and lengths (Visa, Mastercard incl. the
#: 2-series, Amex, Diners, Discover, Maestro, JCB), beside Presidio's own pattern; Luhn-checked by it
_CARD_BY_ISSUER = (
    r"\b(?:4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2[2-7]\d{14}|3[47]\d{13}|3(?:0[0-5]|[68]\d)\d{11}|6\d{11,18}|"
    r"5[06-9]\d{10,17}|(?:2131|1800)\d{11}|35\d{14,17})\b"
)
_PHONE_SHAPE = (
    "phone by shape",
    r"(?<![\w+.\-/])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{2,4}(?:[\s.\-]\d{2,4}){1,4}"
    r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w\-/]|\.\d)",
    0.4,
)
_NOT_A_PHONE = re.compile(
    r"^(?:\d{1,2}[.\-]\d{1,2}[.\-]\d{2,4}$|\d{4}[.\-]\d{1,2}[.\-]\d{1,2}|\d{1,3}(?:\.\d{1,3}){3}$|\d{3}-\d{2}-\d{4}$)"
)
#: what must be in a text for each entity to be possible at all (the prefilter)
_KEY_HINT = re.compile(r"sk-|AKIA|ASIA|ABIA|ACCA|gh[pousr]_|github_pat_|xox[abposr]-|AIza|_live_|_test_|eyJ")
_IP_HINT = re.compile(r"\d\.\d|[0-9A-Fa-f]:[0-9A-Fa-f:]")
_IBAN_HINT = re.compile(r"\b[A-Za-z]{2}\d{2}")


#: what Presidio's package imports when it is installed, for NER recognizers and devices the pii guard
#: never uses: PyTorch and transformers, 300 MB of the gateway's memory and seconds of its start
_NOT_FOR_PRESIDIO = ("torch", "transformers")


@contextlib.contextmanager
def _presidio_import() -> Iterator[None]:
    """Presidio imported with PyTorch and transformers out of its sight (an import of either fails while
    it loads, as when they are not installed); a process that already loaded them keeps them."""
    hidden = [name for name in _NOT_FOR_PRESIDIO if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import presidio_analyzer.predefined_recognizers  # noqa: F401  # the module that imports them
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    yield


def _analyzer(entities: Sequence[str]) -> AnalyzerEngine:
    """Presidio's analyzer with only the recognizers of ``entities`` and the no-op NLP engine (imported
    here: Presidio imports spaCy, seconds that a gateway without a pii guard need not spend)."""
    with _presidio_import():
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

    registry = RecognizerRegistry(recognizers=_recognizers(entities), supported_languages=["en"])
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
        supported_languages=["en"],
    )


def _recognizers(entities: Sequence[str]) -> list[EntityRecognizer]:
    """Presidio's pattern and checksum recognizers for ``entities``, with the offline email check, the
    secret patterns and the phone-shape fallback."""
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from tldextract import TLDExtract

    class OfflineEmailRecognizer(EmailRecognizer):
        """The email recognizer with its domain check on the suffix list tldextract ships (its default
        extractor downloads the public suffix list on first use)."""

        tld = TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

        def validate_result(self, pattern_text: str) -> bool:
            return bool(self.tld(pattern_text).fqdn)

    def secrets(entity: str) -> PatternRecognizer:
        patterns = [Pattern(*p) for p in SECRET_PATTERNS[entity]]
        return PatternRecognizer(
            entity, name=f"{entity}_recognizer", patterns=patterns, global_regex_flags=re.DOTALL
        )

    class PhonePattern(PatternRecognizer):
        """Phone numbers by their shape (groups of digits with separators, 7 to 15 digits), for the
        numbers python-phonenumbers rejects as invalid in the regions it tries; not dates, IP addresses
        or ``ddd-dd-dddd`` (an SSN's shape)."""

        def validate_result(self, pattern_text: str) -> bool | None:
            digits = sum(c.isdigit() for c in re.split(r"x|ext", pattern_text)[0])
            return None if 7 <= digits <= 15 and _NOT_A_PHONE.match(pattern_text) is None else False

    def cards() -> CreditCardRecognizer:
        return CreditCardRecognizer(
            patterns=[*CreditCardRecognizer.PATTERNS, Pattern("card by issuer prefix", _CARD_BY_ISSUER, 0.3)]
        )

    makers: dict[str, Callable[[], list[EntityRecognizer]]] = {
        "API_KEY": lambda: [secrets("API_KEY")],
        "PRIVATE_KEY": lambda: [secrets("PRIVATE_KEY")],
        "CREDIT_CARD": lambda: [cards()],
        "EMAIL_ADDRESS": lambda: [OfflineEmailRecognizer()],
        "IBAN_CODE": lambda: [IbanRecognizer()],
        "IP_ADDRESS": lambda: [IpRecognizer()],
        "PHONE_NUMBER": lambda: [
            PhoneRecognizer(),
            PhonePattern("PHONE_NUMBER", name="PhonePatternRecognizer", patterns=[Pattern(*_PHONE_SHAPE)]),
        ],
        "US_SSN": lambda: [UsSsnRecognizer()],
    }
    return [r for e in entities for r in makers[e]()]


#: a text that every recognizer reads, analysed once when a guard is built
_WARM_UP = "mail a@example.com or call 212-555-0123 from 10.0.0.1, card 4111 1111 1111 1111, key sk-0000"


def plausible(text: str, entities: Sequence[str]) -> list[str]:
    """The entities of ``entities`` that ``text`` could contain at all (a cheap, exact-enough prefilter:
    it never rules out a text that a recognizer would match)."""
    digits = sum(map(str.isdigit, text))
    out = []
    for entity in entities:
        if entity == "EMAIL_ADDRESS":
            ok = "@" in text
        elif entity == "API_KEY":
            ok = _KEY_HINT.search(text) is not None
        elif entity == "PRIVATE_KEY":
            ok = "PRIVATE KEY-----" in text
        elif entity == "IP_ADDRESS":
            ok = _IP_HINT.search(text) is not None
        elif entity == "IBAN_CODE":
            ok = digits >= 10 and _IBAN_HINT.search(text) is not None
        elif entity == "PHONE_NUMBER":
            ok = digits >= 7
        elif entity == "US_SSN":
            ok = digits >= 9
        else:  # CREDIT_CARD: 12 to 19 digits
            ok = digits >= 12
        if ok:
            out.append(entity)
    return out


class PiiGuard(FindingGuard):
    """PII and secrets in a text (see the module doc); redaction writes ``<EMAIL_ADDRESS>``-style
    placeholders through Presidio's anonymizer."""

    def __init__(
        self,
        settings: GuardSettings,
        *,
        name: str = "pii",
        entities: Sequence[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        super().__init__(name, settings)
        chosen = list(entities) if entities else list(PII_ENTITIES)
        unknown = sorted(set(chosen) - set(PII_ENTITIES))
        if unknown:
            raise ValueError(
                f"the pii guard cannot find {', '.join(unknown)}; choose from {', '.join(PII_ENTITIES)}"
            )
        self._entities = chosen
        self._threshold = threshold
        self._last: tuple[str, list[str]] | None = None
        self._analyzer = _analyzer(chosen)
        from presidio_anonymizer import AnonymizerEngine

        self._anonymizer = AnonymizerEngine()  # type: ignore[no-untyped-call]
        # the first analysis compiles the recognizers' patterns (hundreds of ms on a small machine): here,
        # at start, rather than in a request's time, where it could overrun the guard's timeout
        self._analyzer.analyze(_WARM_UP, language="en", entities=chosen, score_threshold=threshold)

    @property
    def entities(self) -> list[str]:
        return list(self._entities)

    def _plausible(self, text: str) -> list[str]:
        """``plausible`` for this guard's entities, remembered for the last text (``cheap`` then
        ``check`` ask about the same one)."""
        last = self._last
        if last is not None and last[0] is text:
            return last[1]
        wanted = plausible(text, self._entities)
        self._last = (text, wanted)
        return wanted

    def _results(self, text: str) -> list[RecognizerResult]:
        wanted = self._plausible(text)
        if not wanted:
            return []
        results: list[RecognizerResult] = self._analyzer.analyze(
            text, language="en", entities=wanted, score_threshold=self._threshold
        )
        return results

    def find(self, text: str) -> list[Finding]:
        return [Finding(r.entity_type, float(r.score), r.start, r.end) for r in self._results(text)]

    def cheap(self, text: str) -> bool:
        """Cheap when no entity is plausible (Presidio's analysis, 1 to 2 ms, does not run)."""
        return super().cheap(text) and not self._plausible(text)

    def check(self, text: str) -> Decision:
        results = self._results(text)
        if not results:
            return Decision(self.name, "allow")
        findings = tuple(Finding(r.entity_type, float(r.score), r.start, r.end) for r in results)
        if self.settings.action == "redact":
            redacted = self._anonymizer.anonymize(text=text, analyzer_results=results).text  # type: ignore[arg-type]
            return Decision(self.name, "redact", findings, text=redacted)
        return Decision(self.name, self.settings.action, findings)
