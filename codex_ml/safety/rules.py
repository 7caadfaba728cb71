"""Built-in detection rules for secrets and PII, with the checks that keep a code corpus intact.

Each rule is a regex plus, optionally, `keywords` (literals: the regex runs only on the lines holding
one of them, so the common secret-free document costs a few substring searches; case-insensitive
rules look for them in the lowercased text) and `check`, a function of the match that rejects
look-alikes: Luhn for cards, reserved domains for emails, public ranges for IPs, and for vendor
tokens, URL passwords and assignments one `placeholder()` test (fillers, templates, placeholder
words, documented values). When the pattern has a group named `value`, only that group is
replaced; otherwise the whole match is. tests/secrets_corpus.py is the labelled corpus they answer to.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    id: str
    pattern: re.Pattern
    action: str = "redact"
    description: str = ""
    kind: str = "secret"                    # secret | pii | custom
    placeholder: str = ""                   # default: <SECRET:id>
    keywords: tuple[str, ...] = ()          # literals, one must occur; empty: always run
    digits: bool = False                    # runs only where digits form a phone/IP/card shape
    line_scoped: bool = False               # matches never span lines: scan only keyword lines

    check: Callable[[re.Match], bool] | None = field(default=None, compare=False)

    @property
    def replacement(self) -> str:
        return self.placeholder or f"<SECRET:{self.id}>"


# ---------------------------------------------------------------- checks
def _line_of(s: str, i: int) -> tuple[int, int]:
    ls, le = s.rfind("\n", 0, i) + 1, s.find("\n", i)
    return ls, le if le >= 0 else len(s)


RESERVED_DOMAINS = ("example.com", "example.org", "example.net", "example.edu", "localhost")
RESERVED_TLDS = ("example", "test", "invalid", "localhost", "local", "internal")
# `image@2x.png`, `module@1.2.tar.gz`, `sd_IN@devanagari.UTF-8`: file names and locales.
NOT_TLDS = {"utf", "utf8", "iso", "euro", "png", "jpg", "jpeg", "gif", "svg", "webp", "py", "pyc",
            "js", "ts", "css", "html", "txt", "md", "rst", "json", "yaml", "yml", "toml", "gz",
            "zip", "tar", "whl", "so", "dll", "exe", "c", "h", "cpp", "rs", "go", "java", "lock"}


def reserved_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in RESERVED_DOMAINS or any(host.endswith("." + d) for d in RESERVED_DOMAINS):
        return True
    return host.rsplit(".", 1)[-1] in RESERVED_TLDS


# SSH names protocol extensions and algorithms `name@domain` (`hmac-sha2-256@openssh.com`).
PROTOCOL_DOMAINS = {"openssh.com", "ssh.com", "libssh.org", "asyncssh.com"}
SERVICE_USERS = {"git", "noreply", "no-reply"}  # git@github.com: an SSH endpoint, not a person


def _email_ok(m: re.Match) -> bool:
    if re.search(r"://[^\s/@]*:[${%]*$", m.string[max(0, m.start() - 80):m.start()]):
        return False  # scheme://user:TOKEN@host: a URL's credentials (url_password's), not a mailbox
    domain = m.group("domain").lower()
    local = m.group(0)[:m.start("domain") - m.start() - 1].lower()
    return not (reserved_host(domain) or domain.rsplit(".", 1)[-1] in NOT_TLDS
                or domain in PROTOCOL_DOMAINS or local in SERVICE_USERS)


_NOT_IP_BEFORE = re.compile(r"(?i)(?:identifier|\b(?:version|ver|release|v|oid|sections?|rfc\d*|spec|"
                            r"chapter|step)|==|>=|<=|~=|§|#|-)[\s:=\"'(\[]*$")
_IP_CONTEXT = re.compile(r"(?i)(?<![a-z])(?:ip|ipv4|addr|address(?:es)?|host(?:name)?s?|server|client|"
                         r"remote|peer|connect(?:ed|ion)?|socket|inet|dns|nameserver|proxy|"
                         r"gateway|bind|listen(?:ing)?|ping|route|subnet|firewall|nslookup|whois|"
                         r"allow|deny|upstream|endpoint|vpn|port)(?![a-z])|"
                         r"://|\d:\d{2,5}\b|^\S+ - ")


# Not indented, or a list item: an indented bare dotted quad is more often a docstring's version.
_ALONE = re.compile(r"(?:[ \t]*-[ \t]+)?[\"']?(?:\d{1,3}\.){3}\d{1,3}[\"']?,?[ \t]*")


# The addresses every tutorial and test suite uses as its example.
EXAMPLE_IPS = {"1.2.3.4", "4.3.2.1", "5.6.7.8", "8.7.6.5", "2.3.4.5", "6.7.8.9", "1.1.1.2"}


def _ip_ok(m: re.Match) -> bool:
    try:
        ip = ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    if not ip.is_global or ip.is_multicast or ip.is_reserved or str(ip) in EXAMPLE_IPS:
        return False  # private, loopback, link-local, documentation (192.0.2/24 ...), reserved
    s = m.string
    ls, le = _line_of(s, m.start())
    if _ALONE.fullmatch(s, ls, le):
        # An address alone on a line (a hosts or allow list), unless it is an rst heading.
        return not re.match(r"\n[=~^-]{4,}\s*(?:\n|$)", s[le:le + 80])
    if _NOT_IP_BEFORE.search(s, max(0, m.start() - 16), m.start()):
        return False  # `version 1.2.3.4`, `==2.0.1.4`, `section 8.2.4.44`
    # Dotted quads are often versions or section numbers: take one as an address when its line
    # speaks of networks (or it is a log line), or when an octet is too large for a version.
    return bool(_IP_CONTEXT.search(s, ls, le)) or max(ip.packed) >= 100


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Card numbers printed in every payment provider's docs and test suites: documentation values.
TEST_CARDS = {"4111111111111111", "4242424242424242", "4012888888881881", "5555555555554444",
              "5105105105105100", "378282246310005", "371449635398431", "6011111111111117",
              "6011000990139424", "3530111333300000", "4000056655665556", "2223003122003222"}


_CARD_CONTEXT = re.compile(r"(?i)card|credit|debit|(?<![a-z])(?:cc|pan)(?![a-z])|visa|master|amex|"
                           r"payment|cvv|cvc|expir|\bexp_|maestro|unionpay|discover|jcb|diners|"
                           r"billing|stripe")


def _card_ok(m: re.Match) -> bool:
    raw = m.group(0)
    digits = re.sub(r"[ -]", "", raw)
    if not (13 <= len(digits) <= 19) or digits in TEST_CARDS or not luhn(digits):
        return False
    seps = set(re.findall(r"[ -]", raw))
    if len(seps) > 1:
        return False
    if not seps:
        # A bare digit run is far more often a seed, a big integer or a test vector than a card
        # number: take it only when its line, or a neighbour in a multi-line record, speaks of
        # cards or payments.
        return bool(_CARD_CONTEXT.search(*_near(m.string, m.start())))
    return True


_SSN_CONTEXT = re.compile(r"(?i)ssn|social|security|\btin\b|taxpayer|ss#")
_PHONE_CONTEXT = re.compile(r"(?i)phone|\btel\b|tel:|mobile|cell|fax|\bcall|contact|whatsapp|sms")


def _near(s: str, i: int, lines: int = 1) -> tuple[str, int, int]:
    """(s, start, end) of the line holding offset i and `lines` lines either side."""
    ls, le = _line_of(s, i)
    for _ in range(lines):
        ls = s.rfind("\n", 0, max(0, ls - 1)) + 1
        e = s.find("\n", le + 1)
        le = len(s) if e < 0 or le >= len(s) else e
    return s, ls, le


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m.group("a"), m.group("g"), m.group("s")
    if m.group("sep") == " " and not _SSN_CONTEXT.search(*_near(m.string, m.start(), 0)):
        return False
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}-{group}-{serial}" not in ("123-45-6789", "078-05-1120")  # advertised examples


def _phone_ok(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    if not 10 <= len(digits) <= 15 or len(set(digits)) < 3:
        return False
    if m.group("dom") and not _PHONE_CONTEXT.search(*_near(m.string, m.start(), 0)):
        return False
    # 555-0100..0199 are reserved for fiction and documentation.
    return not re.search(r"555[ .-]?01\d\d$", m.group(0))


# Placeholders and documentation values: what a token or password looks like in a README, a
# template or a test when nobody meant to write a real one.
PLACEHOLDER_WORDS = {
    "your", "my", "example", "examples", "sample", "dummy", "fake", "placeholder", "changeme",
    "change", "replace", "insert", "put", "enter", "redacted", "here", "todo", "tbd", "fixme",
    "foo", "bar", "baz", "secret", "token", "password", "passwd", "key", "apikey", "value",
    "test", "demo", "mock", "invalid", "bogus", "none", "null", "xxx", "abc", "goes"}
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_FILLER = re.compile(r"([xX*#.])\1{3,}|0{5,}|<[^>]*>|\$\{|\{\{|%\(|\.\.\.")
_ASCENDING = "0123456789abcdefghijklmnopqrstuvwxyz"

# Demo logins that documentation spells out (scott/tiger, RabbitMQ's guest/guest, ...).
DEMO_PASSWORDS = {"tiger", "guest", "admin", "root", "toor", "postgres", "mysql", "default",
                  "hunter2", "letmein", "qwerty", "swordfish", "masterkey", "changeit"}
# Values published in vendors' documentation for local development (the Azurite storage
# emulator's account key): documentation, not credentials.
DOCUMENTED_VALUES = {
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="}


def placeholder(v: str) -> bool:
    """True for a value nobody generated: fillers (xxxx, ****, ####, 00000), a template
    (<...>, ${...}, {{...}}), a placeholder word written as a word (`your_token_here`,
    `myBotToken`), an ascending run (123456, abcdef), too few distinct characters, or one character
    filling half of it. Words glued inside random text (`...7EXAMPLE`) do not count, and a leading
    run does not either unless it is half the value (Twitter bearer tokens start with 21 A's)."""
    if v in DOCUMENTED_VALUES or v.lower() in DEMO_PASSWORDS or _FILLER.search(v):
        return True
    n = len(v)
    if n >= 4 and len(set(v)) < min(6, max(3, n // 3)):
        return True
    run = max(len(m.group(0)) for m in re.finditer(r"(.)\1*", v)) if v else 0
    if n >= 4 and run * 2 >= n:
        return True
    low = v.lower()
    if any(_ASCENDING[i:i + 6] in low for i in range(len(_ASCENDING) - 5)):
        return True
    for m in _WORD.finditer(v):
        i = m.start()
        w, j = m.group(0), m.end()
        # A word counts at the start, after a separator, or as a camelCase part of 4+ letters;
        # a short one only as a whole segment (`my-bot-token`, not `_myYXXF` in random text).
        delimited = i == 0 or not v[i - 1].isalnum() or (
            v[i - 1].islower() and w[0].isupper() and len(w) >= 4)
        if len(w) < 4 and j < len(v) and v[j].isalnum():
            delimited = False
        if delimited and w.lower() in PLACEHOLDER_WORDS:
            return True
    return False


def _body(m: re.Match) -> str:
    """The random part of a vendor token: its `value` or `b*` group, else the whole match."""
    for name, g in m.groupdict().items():
        if g is not None and (name == "value" or name.startswith("b")):
            return g
    return m.group(0)


def _token_ok(m: re.Match) -> bool:
    return not placeholder(_body(m))


def _classes(v: str) -> int:
    return any(c.islower() for c in v) + any(c.isupper() for c in v) + any(c.isdigit() for c in v)


_LONG_WORD = re.compile(r"[A-Z]?[a-z]{3,}")


def wordy(v: str) -> bool:
    """Mostly words (`MBart50Tokenizer`, `jjwt-jackson`): an identifier, not a generated value.
    0.4% of random 20-character base62 strings pass as wordy, no random hex does."""
    if re.fullmatch(r"[a-z]*(?:[A-Z][a-z]+)+\d*", v):
        return True  # CamelCase words (`UseMarkFilteringSet`, `BytesOrStr`)
    words = _LONG_WORD.findall(v)
    return sum(map(len, words)) >= 0.7 * sum(c.isalnum() for c in v) and \
        any(len(w) >= 6 for w in words)


def randomish(v: str) -> bool:
    """Looks generated: letters and digits changing class often (`Tr0ub4dor&3x`,
    `9f8e7d6c5b4a`), unlike identifiers, words and versions (`mySecretString`,
    `jjwt-jackson-0.11.2`)."""
    segs = re.findall(r"[A-Za-z0-9]+", v)
    n = sum(map(len, segs))
    if n < 8 or placeholder(v) or wordy(v):
        return False
    kind = [[0 if c.islower() else 1 if c.isupper() else 2 for c in s] for s in segs]
    flips = sum(a != b for k in kind for a, b in itertools.pairwise(k)) / n
    has_digit = any(c.isdigit() for c in v)
    return flips >= 0.35 or (n >= 12 and has_digit and flips >= 0.2)


_PLACEHOLDER = re.compile(
    r"""^(?:<[^>]*>|\$\{?[\w.]*\}?|\{[^}]*\}|%\(?\w*\)?s|\*+|x+|\.+|-+|_+|
    (?:your|my|the|some|dummy|fake|sample|example|test|placeholder)[\w-]*|
    none|null|nil|true|false|required|optional|string|str|bytes|int|password|passwd|pwd|
    pass|secret|token|key|api_?key|apikey|redacted|hidden|changeit|todo|tbd|env|environ)$""",
    re.IGNORECASE | re.VERBOSE)
_NAME_SKIP = re.compile(r"(?i)(?:file|path|dir|name|prompt|field|type|len|length|size|env|var|"
                        r"regex|re|pattern|url|uri|label|message|msg|help|hint|id|class|policy|"
                        r"manager|handler|format|fmt|count|index|header|method|kind|mode|list|"
                        r"placeholder|description|desc|title|text|error|endpoint|expires|expiry|"
                        r"ttl|timeout|min|max|_re|_rx|_char|_chars|_prefix|_suffix|_sep|_bits)s?$")
_PUBLIC_NAME = re.compile(r"(?i)public|publishable")
_TYPE_NAME = re.compile(r"[A-Za-z_][\w.]*\[.*\]|[A-Z][A-Za-z]*(?:\.[A-Za-z_]\w*)*")


def _looks_random(v: str) -> bool:
    return len(v) >= 12 and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


_NAME_HEAD = re.compile(r"[\w.-]{0,40}$")
_EXPR_AFTER = re.compile(r"\s*(?:\.[A-Za-z_]|[%\[+*])")  # '{0}:{1}'.format(...), "%s" % x
# A config line (.env, ini, YAML, properties, Dockerfile ENV): NAME=value and nothing else.
# What may precede the name on a config line (.env, ini, YAML, properties, Dockerfile ENV), whose
# value runs to the end of the line: `export `, `ENV `, `- `, a quote.
_CONFIG_LINE = re.compile(r"[ \t]*(?:export[ \t]+|ENV[ \t]+|ARG[ \t]+|-[ \t]+)?[\"']?")
_PROSE_WORDS = {"the", "a", "an", "your", "is", "are", "be", "to", "for", "of", "and", "or", "not",
                "must", "enter", "please", "invalid", "incorrect", "forgot", "reset", "new",
                "confirm", "wrong", "with", "at", "least", "in", "this", "that", "you"}


def _assignment_ok(m: re.Match) -> bool:
    # The match starts at the keyword; the name's head (`db_` in `db_password`) lies before it.
    s = m.string
    head = _NAME_HEAD.search(s, max(0, m.start() - 40), m.start()).group(0)
    name, value, quote, op = head + m.group("name"), m.group("value"), m.group("q"), m.group("op")
    line_start = _line_of(s, m.start())[0]
    before = s[line_start:m.start() - len(head)]  # the line up to the name
    if op == ">":
        if not (before.endswith("<") and s.startswith("</", m.end())):
            return False
        quote = ">"  # <password>value</password>: the element delimits the literal
    if _NAME_SKIP.search(name) or _PUBLIC_NAME.search(name) or _PLACEHOLDER.match(value) \
            or len(set(value)) < 3 or placeholder(value):
        return False
    if quote and _EXPR_AFTER.match(s, m.end()):
        return False
    if re.fullmatch(r"(?:~|\.{0,2})/[\w./-]*", value):
        return False  # a path (`PWD='/tmp'`, `secret: /run/secrets/db`)
    if quote and op.strip() == ":" and m.group(0)[len(m.group("name"))] != quote \
            and re.match(r"\s*(?:[,)]|=)", s[m.end():]) and _TYPE_NAME.fullmatch(value):
        return False  # a quoted annotation: `credential: "Credential",`, `keys: "Iterable[Tsk]" = ()`
    lname = name.lower().strip("_-.")
    password_like = any(k in lname for k in ("pass", "pwd", "secret", "credential", "cred"))
    if op.strip() in ("==", "!=", "===", "!==", "is", "was", "") and not quote:
        return False  # a comparison, prose or a flag with a bare word: code, not a literal
    flag = head.startswith("-") and (not before or before[-1].isspace())  # --password=...
    if not op.strip() and not (flag or re.fullmatch(r"\s*(?:ENV|ARG)\s+", before)):
        return False  # `password to use`: prose; only a flag or Dockerfile ENV takes a space
    if (op.strip() in ("==", "!=", "===", "!==") or lname == "pass") and \
            re.fullmatch(r"[a-z_]+", value):
        return False  # `mode == 'error'`, {'pass': 'bandpass'}: a keyword of the code
    if " " in value:
        words = value.lower().split()
        return password_like and len(value) >= 8 and len(words) <= 6 and \
            not (_PROSE_WORDS & set(words)) and value[-1] not in ".:?!"
    if not quote:
        if re.search(r"[()\[\]{}<>]", value) or re.fullmatch(r"[A-Za-z_]\w*(?:\.\w+)+\.?", value) \
                or s[m.end():m.end() + 1] in (",", ")"):
            return False  # code: a call, an index, attribute access, `f(passphrase: BytesOrStr,`
        if randomish(value) or (flag and password_like and len(value) >= 6):
            return True
        # A literal on a config line (.env, ini, YAML): `DB_PASSWORD=supersecret`, `pwd: hunter2`;
        # a bare lowercase word there is more often code (`password = password_input`).
        rest = s[m.end():_line_of(s, m.end())[1]]
        config = _CONFIG_LINE.fullmatch(before) and re.fullmatch(r"[ \t]*(?:#.*)?", rest)
        if not (password_like and len(value) >= 6 and config):
            return False
        return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", name)) or not re.fullmatch(r"[A-Za-z_]+", value)
    if password_like:
        # `creds: "TemporaryCredentialResponse"`: a type named in a string.
        return len(value) >= 4 and not re.fullmatch(r"(?:[A-Z][a-z]+){3,}", value)
    return randomish(value)


def _url_ok(m: re.Match) -> bool:
    pw, user = urllib.parse.unquote(m.group("value")), m.group("user")
    # USER:PASSWORD@HOST, SAS_POLICY:SAS_KEY@NAMESPACE: a template in docs, not a credential;
    # guest:guest, postgres:postgres: a service's documented default. Any host counts: `.internal`
    # is where production hosts live.
    return not (_PLACEHOLDER.match(pw) or placeholder(pw) or len(pw) < 3 or pw == user
                or re.fullmatch(r"[A-Z][A-Z0-9_]*", pw))


_AWS_CONTEXT = re.compile(r"(?i)aws|secret[\s_.-]*(?:access[\s_.-]*)?key|\bsk\b|"
                          r"(?-i:\b(?:AKIA|ASIA)[A-Z0-9]{16}\b)")


def _aws_secret_ok(m: re.Match) -> bool:
    v = m.group("value")
    if not (any(c.isupper() for c in v) and any(c.islower() for c in v)) or placeholder(v) or \
            not (any(c.isdigit() for c in v) or "/" in v or "+" in v):
        return False
    ls, le = _line_of(m.string, m.start())
    return bool(_AWS_CONTEXT.search(m.string, ls, le))


def _pem_ok(m: re.Match) -> bool:
    """A key block needs key material: 40+ base64 characters forming most of the body."""
    body = m.group("body")
    body = re.sub(r"-----END[\s\S]*", "", body)
    body = re.sub(r"(?m)^[ \t]*[\"']?(?:Proc-Type|DEK-Info|Comment|Version):.*$", "", body)
    body = re.sub(r"\\[nr]|\s|[\"'+]", "", body)
    b64 = re.findall(r"[A-Za-z0-9+/=]", body)
    return len(b64) >= 40 and len(b64) >= 0.9 * len(body) and len(set(b64)) >= 20 \
        and not placeholder("".join(b64))


def _slack_ok(m: re.Match) -> bool:
    b = _body(m)
    return _classes(b) >= 2 and not placeholder(b)


_TWITTER_CONTEXT = re.compile(r"(?i)twitter|bearer|\bx_|tweet")


def _twitter_ok(m: re.Match) -> bool:
    ls, le = _line_of(m.string, m.start())
    return bool(re.search(r"%[23][BDF]", m.group(0)) or _TWITTER_CONTEXT.search(m.string, ls, le)) \
        and not placeholder(m.group(0).lstrip("A"))


# ---------------------------------------------------------------- rules
def _r(rid, pattern, description, keywords=(), kind="secret", placeholder="", check=None,
       line_scoped=True):
    return Rule(rid, re.compile(pattern), "redact", description, kind, placeholder,
                tuple(keywords), kind == "pii" and not keywords, line_scoped, check)


B64 = r"[A-Za-z0-9+/]"
_PEM = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
BUILTIN_RULES: list[Rule] = [
    _r("private_key",
       _PEM + r"(?P<body>[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|"
       r"[A-Za-z0-9+/=\s:,.\\-]*)",
       "PEM private-key blocks (RSA, EC, DSA, OpenSSH, PKCS#8, encrypted, PGP)", ["PRIVATE KEY"],
       check=_pem_ok, line_scoped=False),
    _r("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])(?P<b>[A-Z0-9]{16})\b",
       "AWS access key id", ["AKIA", "ASIA", "ABIA", "ACCA", "A3T"], check=_token_ok),
    _r("aws_secret_key", r"(?i)(?<![A-Za-z0-9/+])(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
       "AWS secret access key: 40 base64 characters on a line naming an AWS secret or holding "
       "a key id", ["aws", "secret", "akia", "asia"], check=_aws_secret_ok),
    _r("google_api_key", r"\bAIza(?P<b>[0-9A-Za-z_-]{35})(?![\w-])", "Google API key", ["AIza"],
       check=_token_ok),
    _r("azure_storage_key",
       r"(?i)(?:(?:account|storage|azure|shared|primary|secondary)[\w.-]{0,30}?key)['\"]?"
       rf"(?:[ \t]*(?::=|=>|[:=])[ \t]*|[ \t]+)['\"`]?(?P<value>{B64}{{86}}==)",
       "Azure storage account key (connection strings, JSON, YAML, code)",
       ["key"], check=_token_ok),
    _r("github_token", r"\bgh[pousr]_(?P<b>[A-Za-z0-9]{36,255})\b",
       "GitHub classic, OAuth, user-to-server, server-to-server and refresh tokens",
       ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"], check=_token_ok),
    _r("github_fine_grained_token", r"\bgithub_pat_(?P<b>[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b",
       "GitHub fine-grained personal access token", ["github_pat_"], check=_token_ok),
    _r("gitlab_token",
       r"(?i)\b(?:gl(?:pat|oas|dt|rtr|rt|cbt|ptt|ft|imt|agent|soat|ffct|wt)-(?P<b1>[A-Za-z0-9_-]{20,}"
       r"(?:\.[A-Za-z0-9_-]+)*)|GR1348941(?P<b2>[A-Za-z0-9_-]{20}))(?![\w-])"
       r"|(?:_gitlab_session=|(?:gitlab[\w.-]{0,20}?(?:token|pat|key|password)|private[_-]token)"
       r"['\"]?[ \t]*(?::=|=>|[:=])[ \t]*['\"`]?)(?P<value>[A-Za-z0-9_-]{20,64})(?![\w-])",
       "GitLab personal, deploy, runner (and registration), CI, feed, OAuth and other tokens, "
       "session cookies, legacy 20-character tokens",
       # One keyword for every gl*- prefix: 13 substring searches of each document cost 3x more
       # than running the regex on the lines that hold "gl" (global, glob, angle, ...).
       ("gl", "gr1348941", "gitlab", "private-token", "private_token"), check=_token_ok),
    _r("npm_token", r"\bnpm_(?P<b>[A-Za-z0-9]{36})\b", "npm access token", ["npm_"],
       check=_token_ok),
    _r("pypi_token", r"\bpypi-AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZ)(?P<b>[A-Za-z0-9_-]{50,})",
       "PyPI and TestPyPI upload tokens", ["pypi-AgE"], check=_token_ok),
    _r("slack_webhook",
       r"(?:https?://)?hooks\.slack\.com/(?:services|workflows|triggers)/(?:[A-Za-z0-9_+-]+/)+"
       r"(?P<b>[A-Za-z0-9_+-]{8,})",
       "Slack incoming-webhook and workflow URLs", ["hooks.slack.com"], check=_token_ok),
    _r("slack_token",
       r"\bxox[abposre]-\d+(?:-[0-9A-Za-z]+)*-(?P<b1>[0-9A-Za-z]{8,250})\b"
       r"|\bxoxe\.xox[bp]-\d-(?P<b2>[0-9A-Za-z-]{20,})|\bxapp-\d-[A-Z0-9]+-\d+-(?P<b3>[a-z0-9]{16,})",
       "Slack bot, user, app, configuration and refresh tokens", ["xox", "xapp-"],
       check=_slack_ok),
    _r("stripe_key",
       r"\b[sr]k_(?:[a-z]{2,8}_){1,2}(?P<b1>[0-9A-Za-z]{20,247})\b|\bwhsec_(?P<b2>[A-Za-z0-9+/]{32,})",
       "Stripe secret and restricted keys (any mode) and webhook-signing secrets",
       ["sk_", "rk_", "whsec_"], check=_token_ok),
    _r("sendgrid_key", r"\bSG\.(?P<b>[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})\b", "SendGrid API key",
       ["SG."], check=_token_ok),
    _r("twilio_key", r"\bSK(?P<b>[0-9a-fA-F]{32})\b",
       "Twilio API key (SK...)", ["SK"], check=_token_ok),
    _r("anthropic_key", r"\bsk-ant-(?:api|admin|sid)\d\d-(?P<b>[A-Za-z0-9_-]{32,})",
       "Anthropic API key", ["sk-ant-"], check=_token_ok),
    _r("openai_key",
       r"\bsk-(?:(?:proj|svcacct|admin|None)-)?(?P<b1>[A-Za-z0-9_-]{16,}T3BlbkFJ[A-Za-z0-9_-]{16,})"
       r"|\bsk-(?:proj|svcacct|admin)-(?P<b2>[A-Za-z0-9_-]{40,})|\bsk-(?P<b3>[A-Za-z0-9]{48})\b",
       "OpenAI API key (legacy, project, service-account, admin)", ["sk-"], check=_token_ok),
    _r("huggingface_token", r"\b(?:hf_|api_org_)(?P<b>[A-Za-z0-9]{34})\b", "Hugging Face token",
       ["hf_", "api_org_"], check=_token_ok),
    _r("twitter_bearer_token", r"\bA{20,}[B-Za-z0-9%][A-Za-z0-9%]{40,}",
       "Twitter/X API bearer token (21 A's, then URL-encoded base64)", ["A" * 20],
       check=_twitter_ok),
    _r("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)?",
       "JSON Web Token (signed, or unsigned with two parts)", ["eyJ"]),
    _r("bearer_token", r"(?i)\bbearer\s+(?P<value>[A-Za-z0-9._~+/%-]{20,}=*)",
       "Bearer token in an Authorization header", ["bearer"],
       check=lambda m: _looks_random(m.group("value")) and not placeholder(m.group("value"))),
    _r("url_password",
       r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://(?P<user>[^\s:/@'\"<>]{0,64}):"
       r"(?P<value>[^\s:/@'\"<>]{1,128})@(?P<host>[A-Za-z0-9.-]+)",
       "password in a URL (scheme://user:password@host), whatever the host", ["://"],
       check=_url_ok),
    _r("secret_assignment",
       r"(?i)(?P<name>(?:passw(?:or)?d|passwd|passphrase|"
       r"(?:(?<![a-z])|(?-i:(?<=[a-z])(?=P)))(?:pass(?![\w.-])|pwd)|secret|api[_.-]?key|"
       r"apikey|access[_.-]?key|private[_.-]?key|token|cred(?:s|entials?)?(?![a-z])|auth[_.-]?key)"
       r"[\w.-]{0,20}?)['\"]?(?:[ \t]+value)?"
       r"(?:[ \t]*:[ \t]*[A-Za-z_][\w.\[\], |]*?(?=[ \t]*=[^=])|[ \t]+(?:string|str|\[\]byte))?"
       r"(?P<op>[ \t]*(?::=|=>|===?|!==?|(?<![=!<>])=(?!=)|:)[ \t]*|>|[ \t]+(?:is|was)[ \t]+|[ \t]+)"
       r"(?P<q>['\"`])?(?P<value>(?(q)[^'\"`\n]{1,200}|[^\s'\"`,;<]{1,200}))(?(q)(?P=q))",
       "password or secret assigned to a suspicious name (password=, SECRET_KEY = '...', "
       "api_key: ..., Go backticks, typed declarations, comparisons, CLI flags)",
       ["pass", "pwd", "secret", "key", "token", "cred"], check=_assignment_ok),
    _r("email",
       r"\b[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+"
       r"[A-Za-z]{2,24})\b", "email address (reserved domains like example.com stay)", ["@"],
       kind="pii", placeholder="<EMAIL>", check=_email_ok),
    # PII patterns open with a lookahead for their first character: re then skips the other
    # positions fast (10x on the phone pattern), and one shared lookbehind serves the alternatives.
    _r("phone",
       r"(?=[+(0-9])(?<![\w+.-])(?:(?:\+1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
       r"|\+[1-9]\d{0,2}(?:[ .-]?\(0\)[ .-]?|[ .-])\(?\d{1,5}\)?(?:[ .-]\d{1,8}){1,5}"
       r"|\+[1-9]\d{10,14}|0\d{1,4}-\d{1,4}-\d{3,4}"
       r"|(?P<dom>\(?0\d{1,4}\)?[ ]\d{2,4}(?:[ ]\d{2,4}){0,3}))(?![\w-]|\.\d)",
       "phone number (NANP; international +CC ...; national 0... forms: 090-1234-5678, or with "
       "spaces on a line that speaks of phones)", kind="pii", placeholder="<PHONE>",
       check=_phone_ok),
    _r("ip_address", r"(?=\d)(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)",
       "public IPv4 address (private, loopback and documentation ranges stay)", kind="pii",
       placeholder="<IP_ADDRESS>", check=_ip_ok),
    _r("credit_card", r"(?=[2-68])(?<![\w.-])(?:4\d{3}|5\d{3}|2[2-7]\d{2}|6\d{3}|3[04-9]\d{2}|81\d{2})"
       r"(?:[ -]?\d{2,6}){2,5}(?![\w-]|\.\d)",
       "credit card number: Visa, Mastercard, Amex, Discover, JCB, Diners, Maestro, UnionPay "
       "(issuer prefix, length and Luhn checked)", kind="pii",
       placeholder="<CREDIT_CARD>", check=_card_ok),
    _r("ssn", r"(?=\d)(?<![\w-])(?P<a>\d{3})(?P<sep>[- ])(?P<g>\d{2})(?P=sep)(?P<s>\d{4})(?![\w-])",
       "US social security number (with spaces only on a line that speaks of SSNs)", kind="pii",
       placeholder="<SSN>", check=_ssn_ok),
]

BUILTIN_IDS = {r.id for r in BUILTIN_RULES}
