"""PII redaction at write time (INGS_REDACT_PII): identifiers become typed placeholders.

`redact(text)` returns the text with every finding replaced by `[EMAIL]`, `[PHONE]`, `[CARD]`,
`[IBAN]`, `[IP]` or `[SECRET]`, and how many of each kind it replaced. It is pure (no metrics,
no logging: the originals must never reach a log); `count(counts)` adds the counts to
`ings_pii_redactions_total{kind}`.

Detectors read a normalised view of the text (see _seen_as: NFKC, so fullwidth digits and at sign
read as ASCII; invisible format characters such as zero-width spaces dropped; any space separator
read as a space and any dash as `-`), and the findings are spliced into the text as it was
written: the rest of the text is stored unchanged, not NFKC-normalised (that would rewrite `m²`,
`…` and the fullwidth punctuation of every Japanese message). They run one after another, most
specific first, each on the view with the previous findings masked out, so a token's digits are
not taken for a card, an IBAN's or a card's digits for a phone number, and a placeholder (letters
in brackets) matches nothing. That makes redaction idempotent: where a finding is glued to other
text (see _glued), all detectors run again on the masked view, up to three rounds, so what a
second pass would find next to a placeholder is found in the first (only identifiers chained on
purpose, more than three each glued to the next, need more). Every pattern is linear: character
classes that cannot overlap their neighbours, possessive quantifiers (Python 3.11) or bounded
repeats, and lookbehinds that let a candidate start only at the start of a run.
Kept on purpose (false positives cost more than they protect in chat text): a 40-hex-digit git
sha or content hash, a DID's hash, a UUID, unprefixed high-entropy strings, `password: ...` lines,
a credential after "Bearer" that reads as words (letters, each word lower, upper or capitalised)
or has no letter (a date, a number), a card number followed by a decimal other than cents
(`4111...1111.5`). Missed: a phone number run into other digit groups by single spaces
(libphonenumber's matcher rejects the whole run), a card number glued to a word
("4111...1111abc") or grouped other than in runs of 3+ digits or pairs (`4111 1111 1111 11 11`),
look-alikes NFKC does not fold (a Cyrillic a, U+0430, in an address: UTS #39's confusables).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
import unicodedata
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
# PEM (RFC 7468), OpenSSH and PGP (RFC 4880 armor) private keys: the whole block, its body too,
# whatever separates its lines (newlines, spaces, or the two characters `\n` of a JSON string, as
# in a Google service-account file). A block without its footer (cut off, or split between an
# input and an output) is redacted up to where its base64 ends: base64 and line breaks, a space
# only before another 16 base64 characters (a one-line key), and the armor headers; prose after it
# stays. The body runs stop at the next `-----`, so each BEGIN scans at most to the next marker.
_KEY_LABEL = r"[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
_PRIVATE_KEY = re.compile(
    rf"-----BEGIN{_KEY_LABEL}(?:"
    rf"(?:[A-Za-z0-9+/=\s:,\\]|-(?!----))*+-----END{_KEY_LABEL}"
    r"|(?:(?:Proc-Type|DEK-Info|Version|Comment|Hash|Charset):[^\r\n\\\x00]*+"
    r"|[A-Za-z0-9+/=\r\n]|\\[rn/]|[ \t]++(?=[A-Za-z0-9+/=]{16}))*+)"
)
# A credential after the Bearer scheme (RFC 6750's b64token; the scheme name is case-insensitive,
# RFC 7235 section 2.1): only it is replaced, "Bearer " and "https://user:" stay as context. A
# trailing full stop is the sentence's; 8 characters at least (RFC 6750's own example token has
# 15); one that reads as prose (_WORDS) or has no letter is kept (see _is_credential).
# The credential is read in a lookahead: "Bearer Bearer <token>" leaves the second "Bearer" to match.
_BEARER = re.compile(r"\b(?i:bearer)\s++(?=(?P<secret>[A-Za-z0-9._~+/-]++=*+))")
_BEARER_MIN = 8
_WORDS = re.compile(r"(?:[A-Z]?[a-z]++|[A-Z]++)(?:[-/._](?:[A-Z]?[a-z]++|[A-Z]++))*+")
# RFC 3986's userinfo holds no brackets nor controls: a placeholder (or the mask standing for one)
# is never taken for part of a user name or password.
_URL_PASSWORD = re.compile(r"://[^\s/@:\[\]\x00]{0,256}+:(?P<secret>[^\s/@\[\]\x00]{1,256}+)@")

# E-mail: a regex is enough (RFC 5322's quoted forms and comments do not occur in chat), no
# library needed. Local part: letters, digits, . % + - _ (Unicode letters too); a domain with at
# least one dot and a letter TLD. `@mention` and `user@localhost` are not addresses.
_EMAIL_BODY = r"[\w%+-][\w.%+-]*+@(?:[^\W_][\w-]*+\.)+[^\W\d_]{2,}+(?![\w-])"
_EMAIL = re.compile(r"(?<![\w.%+-])" + _EMAIL_BODY)
_EMAIL_GLUED = re.compile(_EMAIL_BODY)
# Runs of alphanumeric groups split by single spaces or dashes, candidates for IBANs and cards;
# which groups form an identifier is decided by its check digits (see _grouped).
_IBAN_RUN = re.compile(r"(?<![\w])[A-Za-z]{2}[0-9]{2}(?:[ -]?[A-Za-z0-9])*+")
# No lookahead after a run: one that failed would make each later group a new start scanning to
# the run's end (quadratic); a last group glued to a word or a decimal is dropped in _cards,
# unless the decimal is cents (`4111 1111 1111 1111.00`: a 16-digit Luhn-valid amount with a
# card's MII is not a price anyone writes, a card number pasted from a form or sheet is).
_DIGIT_RUN = re.compile(r"(?<![\w+])(?<![0-9][.,])[0-9](?:[ -]?[0-9])*+")
_GLUED = re.compile(r"\w|[.,][0-9]")
_CENTS = re.compile(r"[.,][0-9]{2}(?!\w|[.,][0-9])")
_GROUP = re.compile(r"[A-Za-z0-9]++")
_IBAN_START = re.compile(r"[A-Za-z]{2}[0-9]{2}[A-Za-z0-9]*+")
# Dotted quads not inside a longer dotted number (10.0.1.2.3) nor a word (v1.2.3.4).
_IPV4 = re.compile(r"(?<![\w])(?<![0-9]\.)(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w])(?!\.[0-9])")
_IPV6_RUN = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]{2,}+(?![\w])")
_DIGIT = re.compile(r"[0-9]")
_ANY_DIGIT = re.compile(r"\d")  # a decimal digit of any script (Unicode Nd)
_LETTER = re.compile(r"[A-Za-z]")
_IBAN_DB = numdb.get("iban")
_ONE = re.compile("1")
# What a finding is masked with in the view until every detector has run: same length, so spans
# stay in the view's coordinates, and a character no detector takes into a match (nor reads as a
# letter, digit or separator next to one), as the bracketed placeholder is in the stored text.
_MASK = "\x00"
# Rounds of all detectors while a round's findings are glued to other text (see _glued); more
# than three only for identifiers chained on purpose, each glued to the next.
_ROUNDS = 3
_GLUE_BEFORE = re.compile(r"[\w.%+:/@-]")
_GLUE_AFTER = re.compile(r"[\w%+:/@-]|\.\S")


def redact(text: str, phone_regions: Sequence[str] = PHONE_REGIONS) -> tuple[str, Counter[str]]:
    """Replace identifiers in `text` by typed placeholders; return `(text, counts by kind)`.

    Kinds (keys of the counter, see KINDS) and their rules:
    secret: the token shapes above (AWS, GitHub, JWT, PEM private keys, Bearer credentials, ...);
    email: see _EMAIL; iban: ISO 13616, validated by country format and the ISO 7064 mod-97 check
    (python-stdnum), its groups split by single spaces or dashes; card: 13-19 digits, in groups of
    at least 3 or in pairs, split by single spaces or dashes, cents after it allowed, a payment
    MII (first digit 2-6, ISO/IEC 7812), not one digit repeated, Luhn-valid (ISO/IEC 7812-1);
    ip: IPv4 dotted quads with octets 0-255, IPv6 as the stdlib ipaddress parses it (with a digit,
    so `::` in code stays); phone: libphonenumber's matcher at leniency VALID (a number valid for
    its region, which leaves dates, years, times and short order numbers), +CC numbers for every
    country and national formats of `phone_regions`. Each detector reads the view of the text
    described by _seen_as; the placeholders replace the characters the findings came from (and
    the invisible ones right after), the rest of the text is kept as written. Text without
    findings is returned as is.
    """
    view, origin = _view(text)
    found: list[tuple[int, int, str]] = []
    steps: list[tuple[str, Finder]] = [
        ("secret", _private_keys),
        ("secret", _secrets),
        ("email", _emails),
        ("iban", _ibans),
        ("card", _cards),
        ("ip", _ipv6),
        ("ip", _ipv4),
    ]
    steps += [("phone", _phone_finder(region)) for region in phone_regions]
    for _ in range(_ROUNDS):
        new: list[tuple[int, int, str]] = []
        for kind, find in steps:
            spans = [(a, b) for a, b in find(view) if view[a:b] not in _PLACEHOLDER_SET]
            if spans:
                view = _masked(view, spans)
                new += [(a, b, kind) for a, b in spans]
        found += new
        if not any(_glued(view, a, b) for a, b, _ in new):
            break
    counts: Counter[str] = Counter(kind for _, _, kind in found)
    if not found:
        return text, counts
    found.sort()
    out: list[str] = []
    last = 0
    for a, b, kind in found:
        start, end = origin.span(a, b)
        out += (text[last:start], PLACEHOLDERS[kind])
        last = end
    out.append(text[last:])
    return "".join(out), counts


def count(counts: Mapping[str, int]) -> None:
    """Add one text's redaction counts (as `redact` returns them) to ings_pii_redactions_total."""
    for kind, n in counts.items():
        if n:
            metrics.PII_REDACTIONS.labels(kind=kind).inc(n)


def _glued(view: str, start: int, end: int) -> bool:
    """Whether a finding touches a character an identifier can hold or start after ("2671.4111",
    "...2671x4::8", "DE89...3000-a@b.io"): a detector that ran before it read that character as
    part of a candidate's context and refused the candidate, which it will take once the finding
    is a placeholder; another round, on the view with the findings masked, takes it now."""
    return bool((start and _GLUE_BEFORE.match(view, start - 1)) or _GLUE_AFTER.match(view, end))


def _masked(view: str, spans: Iterable[Span]) -> str:
    """`view` with each span (sorted, disjoint) overwritten by _MASK characters."""
    out: list[str] = []
    last = 0
    for start, end in spans:
        out += (view[last:start], _MASK * (end - start))
        last = end
    out.append(view[last:])
    return "".join(out)


def _seen_as(char: str) -> str:
    """How the detectors read `char` (ASCII reads as itself): its NFKC form (Unicode UAX #15:
    fullwidth digits U+FF10-FF19 and at sign U+FF20 read as ASCII, circled `①` as `1`), without
    format characters (category Cf: zero-width space, non-joiner, joiner, word joiner, BOM, soft
    hyphen, bidi controls) or combining marks (Mn, Me), which split an identifier without being
    seen; a space separator (Zs: no-break, narrow no-break, thin, ideographic) reads as a space
    and a dash (Pd: en, em, figure dash, ...; and U+2212 minus) as `-`, the group separators the
    detectors know."""
    seen: list[str] = []
    for c in unicodedata.normalize("NFKC", char):
        category = unicodedata.category(c)
        if category in ("Cf", "Mn", "Me"):
            continue
        seen.append(" " if category == "Zs" else "-" if category == "Pd" or c == "\u2212" else c)
    return "".join(seen)


class _Table(dict[int, str]):
    """A str.translate table computed by `rule` from each code point as it is met, so a text is
    read in one C-speed pass; bounded, since a text can hold any of 1.1 million code points."""

    def __init__(self, rule: Callable[[str], str]) -> None:
        super().__init__()
        self._rule = rule

    def __missing__(self, code: int) -> str:
        if len(self) >= 1 << 16:
            self.clear()
        value = self[code] = self._rule(chr(code))
        return value


_SEEN_AS = _Table(_seen_as)
# "1" for a character the view changes, "0" for one it keeps: where the edits are, in one pass.
_CHANGED = _Table(lambda char: "0" if _seen_as(char) == char else "1")


class _Origin:
    """Where the view's characters come from in the text: the view is the text with some
    characters replaced (each by its _seen_as, 0 or more characters), in lockstep between them."""

    def __init__(self, edits: list[tuple[int, str]]) -> None:
        self._text_at = [t for t, _ in edits]  # each replaced character's index in the text
        self._size = [len(seen) for _, seen in edits]
        self._view_at: list[int] = []  # where its replacement starts in the view
        shift = 0
        for t, seen in edits:
            self._view_at.append(t + shift)
            shift += len(seen) - 1

    def _text_index(self, v: int) -> int:
        """The index in the text of the character view[v] comes from (len(text) for the end)."""
        k = bisect.bisect_right(self._view_at, v) - 1
        if k < 0:
            return v
        if v < self._view_at[k] + self._size[k]:
            return self._text_at[k]
        return self._text_at[k] + 1 + v - self._view_at[k] - self._size[k]

    def span(self, start: int, end: int) -> Span:
        """The text's span that view[start:end] was read from: from its first character's source
        to its last one's, with the invisible characters that follow it (dropped from the view)."""
        if not self._view_at:
            return start, end
        return self._text_index(start), max(self._text_index(end - 1) + 1, self._text_index(end))


def _view(text: str) -> tuple[str, _Origin]:
    """The text as the detectors read it (see _seen_as) and where its characters come from.
    ASCII text is its own view; otherwise the text is translated through _SEEN_AS and, where
    that changed it, through _CHANGED to find which characters changed (linear either way)."""
    if text.isascii():
        return text, _Origin([])
    view = text.translate(_SEEN_AS)
    if view == text:
        return text, _Origin([])
    changed = text.translate(_CHANGED)
    edits = [(t, _SEEN_AS[ord(text[t])]) for t in (m.start() for m in _ONE.finditer(changed))]
    return view, _Origin(edits)


def _private_keys(text: str) -> Iterator[Span]:
    # A step of its own: a token glued to a key's footer ("-----END ... KEY-----ghp_...") then
    # reads as it will once the key is a placeholder, so a second pass finds nothing new.
    yield from (m.span() for m in _PRIVATE_KEY.finditer(text))


def _secrets(text: str) -> list[Span]:
    spans = [m.span() for m in _TOKEN.finditer(text)]
    spans += [m.span("secret") for m in _URL_PASSWORD.finditer(text)]  # any password in a URL
    for m in _BEARER.finditer(text):
        secret = m["secret"].rstrip(".")  # "... Bearer abc123def456." ends a sentence
        if _is_credential(secret):
            spans.append((m.start("secret"), m.start("secret") + len(secret)))
    spans.sort(key=lambda span: (span[0], -span[1]))
    disjoint: list[Span] = []
    for span in spans:  # a JWT after "Bearer " is found twice: keep the outer one
        if not disjoint or span[0] >= disjoint[-1][1]:
            disjoint.append(span)
    return disjoint


def _is_credential(candidate: str) -> bool:
    """Whether what follows "Bearer" is a credential rather than prose: 8 characters or more, a
    letter, and not only words (_WORDS: `tokens-are-great`, `TOKEN`, `access_token/Cookie`); a
    random token mixes digits or cases (`mF_9.B5f-4.1JqM`, RFC 6750's example). A camelCase word
    (`JavaScript`) reads as a token; a random token of letters all in one case (or capitalised)
    as words: about 1 in 450 of 8 base64 characters, 1 in 600,000 of 16."""
    return (
        len(candidate) >= _BEARER_MIN and _LETTER.search(candidate) is not None and _WORDS.fullmatch(candidate) is None
    )


def _emails(text: str) -> Iterator[Span]:
    if "@" not in text:
        return
    pos = 0
    while m := _EMAIL.search(text, pos):
        yield m.span()
        # "a@b.io+c@d.io": the next address starts where this one ends, after a character that
        # the lookbehind refuses here but not next to the placeholder: taken now, so a second
        # pass finds nothing new. A failed try scans only the run after this address.
        while glued := _EMAIL_GLUED.match(text, m.end()):
            yield glued.span()
            m = glued
        pos = m.end()


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN_RUN.finditer(text):
        yield from _grouped(m[0], m.start(), _IBAN_START.fullmatch, _is_iban, 15, 34, min_group=1)


def _cards(text: str) -> Iterator[Span]:
    for m in _DIGIT_RUN.finditer(text):
        run = m[0]
        # "...1111abc", "... 3.14": the last group is no card's; "...1111.00" (cents) still is.
        if _GLUED.match(text, m.end()) and not _CENTS.match(text, m.end()):
            run = run[: max(run.rfind(" "), run.rfind("-"), 0)]
        yield from _grouped(run, m.start(), None, _is_card, 13, 19, min_group=3, pairs=True)


def _grouped(
    run: str,
    offset: int,
    first: Callable[[str], object] | None,
    valid: Callable[[str], bool],
    low: int,
    high: int,
    min_group: int,
    pairs: bool = False,
) -> Iterator[Span]:
    """The spans (from `offset`) of `run` made of whole groups (each `min_group` long or more, the first one
    passing `first`), `low`-`high` characters without separators, that are `valid`: leftmost,
    then longest. A run holds other numbers or words around an identifier (a card then a CVV, an
    IBAN then a capitalised word), so each start and end is tried; at most `high` per start.
    With `pairs`, a candidate may also be written in pairs (`41 11 11 ...`): from a group of two,
    groups of two only, the last one of one or two (an odd-length number in pairs)."""
    groups = [g.span() for g in _GROUP.finditer(run)]
    i = 0
    while i < len(groups):
        best, size = -1, 0
        paired = pairs and groups[i][1] - groups[i][0] == 2
        if first is None or first(run[groups[i][0] : groups[i][1]]):
            for j in range(i, len(groups)):
                length = groups[j][1] - groups[j][0]
                size += length
                if size > high or (length > 2 if paired else length < min_group):
                    break
                if size >= low and valid("".join(run[a:b] for a, b in groups[i : j + 1])):
                    best = j
                if paired and length < 2:  # a single digit ends a number written in pairs
                    break
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
        if _ANY_DIGIT.search(text):  # no number without a digit; the matcher reads any script's
            matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)
            yield from ((m.start, m.end) for m in matcher)

    return find
