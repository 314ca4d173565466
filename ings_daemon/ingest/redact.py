"""PII redaction at write time (INGS_REDACT_PII): identifiers become typed placeholders.

`redact(text)` returns the text with every finding replaced by `[EMAIL]`, `[PHONE]`, `[CARD]`,
`[IBAN]`, `[IP]` or `[SECRET]`, and how many of each kind it replaced. It is pure (no metrics,
no logging: the originals must never reach a log); `count(counts)` adds the counts to
`ings_pii_redactions_total{kind}`.

Detectors run one after another on the text the previous one left, most specific first, so a
token's digits are not taken for a card, an IBAN's or a card's digits for a phone number, and a
placeholder (letters in brackets) matches nothing, which makes redaction idempotent. Every pattern
is linear: character classes that cannot overlap their neighbours, possessive quantifiers (Python
3.11) or bounded repeats, and lookbehinds that let a candidate start only at the start of a run.
Kept on purpose (false positives cost more than they protect in chat text): a 40-hex-digit git
sha or content hash, a DID's hash, a UUID, unprefixed high-entropy strings, `password: ...` lines.
Missed: a phone number run into other digit groups by single spaces (libphonenumber's matcher
rejects the whole run), a card number glued to a word or a decimal ("4111...1111abc").
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import phonenumbers
from stdnum import iban, luhn, numdb

from ..runtime import metrics

KINDS = ("email", "phone", "card", "iban", "ip", "secret")
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}
_PLACEHOLDER_SET = frozenset(PLACEHOLDERS.values())
# Regions whose national formats count as phone numbers (any region's +CC form always does):
# "US" reads all of NANP (+1: US, Canada, Caribbean), "GB" the UK's 0-prefixed numbers.
PHONE_REGIONS: tuple[str, ...] = ("US", "GB")

Span = tuple[int, int]
Finder = Callable[[str], Iterable[Span]]

# Secrets with a documented, recognisable shape. Own patterns rather than detect-secrets' plugins:
# those flag lines of code for review, so their regexes match a fixed-length piece (the header of a
# PEM block, not its key; OpenAI's legacy keys only) without word boundaries, and the package pulls
# requests and a global settings object; redaction needs the whole token's span.
_TOKEN = re.compile(
    r"""(?<![A-Za-z0-9_-])(?:
      eyJ[A-Za-z0-9_-]{8,}+\.eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]*+  # JWT (RFC 7519): base64url '{"' header, payload
    | (?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}                 # AWS access key id
    | gh[pousr]_[A-Za-z0-9]{36,}+ | github_pat_[A-Za-z0-9_]{22,}+      # GitHub tokens (2021 formats)
    | gl(?:pat|dt|ptt|rt|oas)-[A-Za-z0-9_-]{20,}+                     # GitLab tokens
    | xox[abeposr]-[A-Za-z0-9-]{10,}+                                # Slack tokens
    | [rs]k_(?:live|test)_[A-Za-z0-9]{16,}+ | whsec_[A-Za-z0-9]{24,}+ # Stripe secret/restricted keys, webhook secrets
    | AIza[A-Za-z0-9_-]{35}                                           # Google API key
    | hf_[A-Za-z0-9]{30,}+                                            # Hugging Face token (HUGGINGFACE_TOKEN)
    | npm_[A-Za-z0-9]{36,}+ | pypi-AgE[A-Za-z0-9_-]{50,}+             # npm, PyPI upload tokens
    | SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}                       # SendGrid
    | sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}+                   # OpenAI, Anthropic (sk-ant-), ...: not sk-learn
    )(?![A-Za-z0-9_-])""",
    re.VERBOSE,
)
# PEM (RFC 7468), OpenSSH and PGP private keys: the whole block, its body too; a block cut off
# before its footer is redacted up to where its base64 (and Proc-Type/DEK-Info lines) ends.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[A-Za-z0-9+/=\s:,]|-(?!----))*+"
    r"(?:-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"
)
# Only the credential is replaced; "Bearer " and "https://user:" stay as context.
_BEARER = re.compile(r"\bBearer\s++(?P<secret>[A-Za-z0-9._~+/-]{16,}+=*+)")
_URL_PASSWORD = re.compile(r"://[^\s/@:]{0,256}+:(?P<secret>[^\s/@]{1,256}+)@")

# E-mail: a regex is enough (RFC 5322's quoted forms and comments do not occur in chat), no
# library needed. Local part: letters, digits, . % + - _ (Unicode letters too); a domain with at
# least one dot and a letter TLD. `@mention` and `user@localhost` are not addresses.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w%+-][\w.%+-]*+@(?:[^\W_][\w-]*+\.)+[^\W\d_]{2,}+(?![\w-])")
# Runs of alphanumeric groups split by single spaces or dashes, candidates for IBANs and cards;
# which groups form an identifier is decided by its check digits (see _grouped).
_IBAN_RUN = re.compile(r"(?<![\w])[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9])*+")
# No lookahead after a run: one that failed would make each later group a new start scanning to
# the run's end (quadratic); a last group glued to a word or a decimal is dropped in _cards.
_DIGIT_RUN = re.compile(r"(?<![\w+])(?<![0-9][.,])[0-9](?:[ -]?[0-9])*+")
_GLUED = re.compile(r"\w|[.,][0-9]")
_GROUP = re.compile(r"[A-Za-z0-9]++")
_IBAN_START = re.compile(r"[A-Za-z]{2}[0-9]{2}[A-Za-z0-9]*+")
# Dotted quads not inside a longer dotted number (10.0.1.2.3) nor a word (v1.2.3.4).
_IPV4 = re.compile(r"(?<![\w])(?<![0-9]\.)(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w])(?!\.[0-9])")
_IPV6_RUN = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]{2,}+(?![\w])")
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")
_IBAN_DB = numdb.get("iban")


def redact(text: str, phone_regions: Sequence[str] = PHONE_REGIONS) -> tuple[str, Counter[str]]:
    """Replace identifiers in `text` by typed placeholders; return `(text, counts by kind)`.

    Kinds (keys of the counter, see KINDS) and their rules:
    secret: the token shapes above (AWS, GitHub, JWT, PEM private keys, Bearer credentials, ...);
    email: see _EMAIL; iban: ISO 13616, validated by country format and the ISO 7064 mod-97 check
    (python-stdnum); card: 13-19 digits, groups of at least 3 split by spaces or dashes, a payment
    MII (first digit 2-6, ISO/IEC 7812), not one digit repeated, Luhn-valid (ISO/IEC 7812-1);
    ip: IPv4 dotted quads with octets 0-255, IPv6 as the stdlib ipaddress parses it (with a digit,
    so `::` in code stays); phone: libphonenumber's matcher at leniency VALID (a number valid for
    its region, which leaves dates, years, times and short order numbers), +CC numbers for every
    country and national formats of `phone_regions`. Text without findings is returned as is.
    """
    counts: Counter[str] = Counter()
    steps: list[tuple[str, Finder]] = [
        ("secret", _secrets),
        ("email", _emails),
        ("iban", _ibans),
        ("card", _cards),
        ("ip", _ipv6),
        ("ip", _ipv4),
    ]
    steps += [("phone", _phone_finder(region)) for region in phone_regions]
    for kind, find in steps:
        text = _replace(text, find(text), kind, counts)
    return text, counts


def count(counts: Mapping[str, int]) -> None:
    """Add one text's redaction counts (as `redact` returns them) to ings_pii_redactions_total."""
    for kind, n in counts.items():
        if n:
            metrics.PII_REDACTIONS.labels(kind=kind).inc(n)


def _replace(text: str, spans: Iterable[Span], kind: str, counts: Counter[str]) -> str:
    """Splice the placeholder over each span (sorted, disjoint); an existing placeholder stays."""
    out: list[str] = []
    last = 0
    for start, end in spans:
        if text[start:end] in _PLACEHOLDER_SET:
            continue
        out += (text[last:start], PLACEHOLDERS[kind])
        last = end
        counts[kind] += 1
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


def _secrets(text: str) -> list[Span]:
    spans = [m.span() for pattern in (_PRIVATE_KEY, _TOKEN) for m in pattern.finditer(text)]
    spans += [m.span("secret") for m in _URL_PASSWORD.finditer(text)]  # any password in a URL
    spans += [
        m.span("secret")
        for m in _BEARER.finditer(text)
        if _DIGIT.search(m["secret"]) and _LETTER.search(m["secret"])  # random-looking, not prose
    ]
    spans.sort(key=lambda span: (span[0], -span[1]))
    disjoint: list[Span] = []
    for span in spans:  # a JWT after "Bearer " is found twice: keep the outer one
        if not disjoint or span[0] >= disjoint[-1][1]:
            disjoint.append(span)
    return disjoint


def _emails(text: str) -> Iterator[Span]:
    if "@" in text:
        yield from (m.span() for m in _EMAIL.finditer(text))


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN_RUN.finditer(text):
        yield from _grouped(m[0], m.start(), _IBAN_START.fullmatch, _is_iban, 15, 34, min_group=1)


def _cards(text: str) -> Iterator[Span]:
    for m in _DIGIT_RUN.finditer(text):
        run = m[0]
        if _GLUED.match(text, m.end()):  # "...1111abc", "... 3.14": the last group is no card's
            run = run[: max(run.rfind(" "), run.rfind("-"), 0)]
        yield from _grouped(run, m.start(), None, _is_card, 13, 19, min_group=3)


def _grouped(
    run: str,
    offset: int,
    first: Callable[[str], object] | None,
    valid: Callable[[str], bool],
    low: int,
    high: int,
    min_group: int,
) -> Iterator[Span]:
    """The spans (from `offset`) of `run` made of whole groups (each `min_group` long or more, the first one
    passing `first`), `low`-`high` characters without separators, that are `valid`: leftmost,
    then longest. A run holds other numbers or words around an identifier (a card then a CVV, an
    IBAN then a capitalised word), so each start and end is tried; at most `high` per start."""
    groups = [g.span() for g in _GROUP.finditer(run)]
    i = 0
    while i < len(groups):
        best, size = -1, 0
        if first is None or first(run[groups[i][0] : groups[i][1]]):
            for j in range(i, len(groups)):
                size += groups[j][1] - groups[j][0]
                if size > high or groups[j][1] - groups[j][0] < min_group:
                    break
                compact = "".join(run[a:b] for a, b in groups[i : j + 1])
                if size >= low and valid(compact):
                    best = j
        if best < 0:
            i += 1
            continue
        yield offset + groups[i][0], offset + groups[best][1]
        i = best + 1


def _is_iban(compact: str) -> bool:
    compact = compact.upper()
    return len(compact) == _iban_length(compact[:2]) and bool(iban.is_valid(compact))


@functools.cache
def _iban_length(country: str) -> int:
    """The IBAN length of `country` from python-stdnum's copy of the SWIFT IBAN registry, 0 if it
    has none: a cheap test first, so a run of many IBAN-like groups is not mod-97 checked at every
    length (what makes `redact` slow on adversarial text is validation, not the regexes)."""
    structure = _IBAN_DB.info(country)[0][1].get("bban", "")
    return 4 + sum(int(n) for n in re.findall("[0-9]+", structure)) if structure else 0


def _is_card(digits: str) -> bool:
    return digits[0] in "23456" and len(set(digits)) > 1 and bool(luhn.is_valid(digits))


def _ipv4(text: str) -> Iterator[Span]:
    # Octets checked here, not by ipaddress: it refuses leading zeros (192.168.001.010), which
    # are still someone's address.
    for m in _IPV4.finditer(text):
        if all(int(octet) <= 255 for octet in m[0].split(".")):
            yield m.span()


def _ipv6(text: str) -> Iterator[Span]:
    for m in _IPV6_RUN.finditer(text):
        candidate = m[0].rstrip(".")  # a sentence's full stop
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]  # "... 2001:db8::1: unreachable"
        if candidate.count(":") < 2 or not _DIGIT.search(candidate):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.start(), m.start() + len(candidate)


def _phone_finder(region: str) -> Finder:
    def find(text: str) -> Iterator[Span]:
        if _DIGIT.search(text) or not text.isascii():  # the matcher reads non-ASCII digits too
            matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)
            yield from ((m.start, m.end) for m in matcher)

    return find
