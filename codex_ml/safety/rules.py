"""Built-in detection rules for secrets and PII, with the checks that keep a code corpus intact.

Each rule is a regex plus, optionally, `keywords` (literals: the regex runs only on the lines holding
one of them, so the common secret-free document costs a few substring searches; case-insensitive
rules look for them in the lowercased text) and `check`, a function of the match that rejects look-alikes (Luhn for cards, reserved
domains for emails, public ranges for IPs, placeholder values for assignments). When the pattern has
a group named `value`, only that group is replaced; otherwise the whole match is.
"""

from __future__ import annotations

import ipaddress
import re
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
RESERVED_DOMAINS = ("example.com", "example.org", "example.net", "example.edu", "localhost")
RESERVED_TLDS = ("example", "test", "invalid", "localhost", "local", "internal")
# `image@2x.png`, `module@1.2.tar.gz`, `sd_IN@devanagari.UTF-8`: file names and locales.
NOT_TLDS = {"utf", "utf8", "iso", "euro", "png", "jpg", "jpeg", "gif", "svg", "webp", "py", "pyc", "js", "ts", "css", "html",
             "txt", "md", "rst", "json", "yaml", "yml", "toml", "gz", "zip", "tar", "whl", "so",
             "dll", "exe", "c", "h", "cpp", "rs", "go", "java", "lock"}


def reserved_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in RESERVED_DOMAINS or any(host.endswith("." + d) for d in RESERVED_DOMAINS):
        return True
    return host.rsplit(".", 1)[-1] in RESERVED_TLDS


# SSH names protocol extensions and algorithms `name@domain` (`hmac-sha2-256@openssh.com`).
PROTOCOL_DOMAINS = {"openssh.com", "ssh.com", "libssh.org", "asyncssh.com"}
SERVICE_USERS = {"git", "noreply", "no-reply"}  # git@github.com: an SSH endpoint, not a person


def _email_ok(m: re.Match) -> bool:
    domain = m.group("domain").lower()
    local = m.group(0)[:m.start("domain") - m.start() - 1].lower()
    return not (reserved_host(domain) or domain.rsplit(".", 1)[-1] in NOT_TLDS
                or domain in PROTOCOL_DOMAINS or local in SERVICE_USERS)


_NOT_IP_BEFORE = re.compile(r"(?i)(?:\b(?:version|ver|release|v|oid|sections?|rfc\d*|spec|"
                            r"chapter|step)|==|>=|<=|~=|§|#|-)[\s:=\"'(\[]*$")
_IP_CONTEXT = re.compile(r"(?i)\b(?:ip|ipv4|addr|address(?:es)?|host(?:name)?s?|server|client|"
                         r"remote|peer|connect(?:ed|ion)?|socket|inet|dns|nameserver|proxy|"
                         r"gateway|bind|listen(?:ing)?|ping|route|subnet|firewall|nslookup|whois)\b|"
                         r"://|\d:\d{2,5}\b|^\S+ - ")


def _ip_ok(m: re.Match) -> bool:
    try:
        ip = ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return False  # private, loopback, link-local, documentation (192.0.2/24 ...), reserved
    s = m.string
    if _NOT_IP_BEFORE.search(s, max(0, m.start() - 12), m.start()):
        return False  # `version 1.2.3.4`, `==2.0.1.4`, `section 8.2.4.44`
    # Dotted quads are often versions or section numbers: take one as an address when its line
    # speaks of networks (or it is a log line), or when an octet is too large for a version.
    ls, le = s.rfind("\n", 0, m.start()) + 1, s.find("\n", m.end())
    line = s[ls:le if le >= 0 else len(s)]
    return bool(_IP_CONTEXT.search(line)) or max(ip.packed) >= 100


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


_CARD_CONTEXT = re.compile(r"(?i)card|credit|debit|\bcc\b|visa|master|amex|\bpan\b|payment")


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
        # number: take it only when its line speaks of cards or payments.
        s = m.string
        ls, le = s.rfind("\n", 0, m.start()) + 1, s.find("\n", m.end())
        return bool(_CARD_CONTEXT.search(s, ls, le if le >= 0 else len(s)))
    return True


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m.group("a"), m.group("g"), m.group("s")
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}-{group}-{serial}" not in ("123-45-6789", "078-05-1120")  # advertised examples


def _phone_ok(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    if not 10 <= len(digits) <= 15 or len(set(digits)) < 3:
        return False
    # 555-0100..0199 are reserved for fiction and documentation.
    return not re.search(r"555[ .-]?01\d\d$", m.group(0))


_PLACEHOLDER = re.compile(
    r"""^(?:<[^>]*>|\$\{?[\w.]*\}?|\{[^}]*\}|%\(?\w*\)?s|\*+|x+|\.+|-+|_+|
    (?:your|my|the|some|dummy|fake|sample|example|test|placeholder)[\w-]*|
    none|null|nil|true|false|required|optional|string|str|bytes|int|password|passwd|pwd|
    pass|secret|token|key|api_?key|apikey|redacted|hidden|changeit|todo|tbd|env|environ)$""",
    re.I | re.X)
_NAME_SKIP = re.compile(r"(?i)(?:file|path|dir|name|prompt|field|type|len|length|size|env|var|"
                        r"regex|re|pattern|url|uri|label|message|msg|help|hint|id|class|policy|"
                        r"manager|handler|format|fmt|count|index|header|method|kind|mode|list|"
                        r"_re|_rx|_char|_chars|_prefix|_suffix|_sep|_bits)s?$")


def _looks_random(v: str) -> bool:
    return len(v) >= 12 and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


_NAME_HEAD = re.compile(r"[\w.-]{0,40}$")


_EXPR_AFTER = re.compile(r"\s*[.%\[+*]")  # '{0}:{1}'.format(...), "%s" % x: a template


def _assignment_ok(m: re.Match) -> bool:
    # The match starts at the keyword; the name's head (`db_` in `db_password`) lies before it.
    head = _NAME_HEAD.search(m.string, max(0, m.start() - 40), m.start()).group(0)
    name, value, quote = head + m.group("name"), m.group("value"), m.group("q")
    if _NAME_SKIP.search(name) or _PLACEHOLDER.match(value) or len(set(value)) < 3:
        return False
    if quote and _EXPR_AFTER.match(m.string, m.end()):
        return False
    lname = name.lower()
    password_like = any(k in lname for k in ("pass", "pwd", "secret", "credential"))
    if not quote:
        # Unquoted: a config/.env value, or code (`password=password`, `token: str`); code is
        # an identifier or an expression, a secret has digits and letters and no call syntax.
        return len(value) >= 8 and _looks_random(value) and not re.search(r"[()\[\]{}]", value) \
            and not re.fullmatch(r"[A-Za-z_][\w.]*\(?", value)
    if password_like:
        return len(value) >= 4
    return _looks_random(value)  # token / key names: only values that look generated


def _url_ok(m: re.Match) -> bool:
    pw = m.group("value")
    # USER:PASSWORD@HOST, SAS_POLICY:SAS_KEY@NAMESPACE: a template in docs, not a credential.
    return not (_PLACEHOLDER.match(pw) or reserved_host(m.group("host")) or len(pw) < 3
                or re.fullmatch(r"[A-Z][A-Z0-9_]*", pw))


# ---------------------------------------------------------------- rules
def _r(rid, pattern, description, keywords=(), kind="secret", placeholder="", check=None,
       line_scoped=True):
    return Rule(rid, re.compile(pattern), "redact", description, kind, placeholder,
                tuple(keywords), kind == "pii" and not keywords, line_scoped, check)


B64 = r"[A-Za-z0-9+/]"
BUILTIN_RULES: list[Rule] = [
    _r("private_key",
       r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*"
       r"PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,.-]*)",
       "PEM private-key blocks (RSA, EC, DSA, OpenSSH, PKCS#8, encrypted, PGP)", ["PRIVATE KEY"],
       line_scoped=False),
    _r("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b",
       "AWS access key id", ["AKIA", "ASIA", "ABIA", "ACCA", "A3T"]),
    _r("aws_secret_key",
       r"(?i)aws[\w.-]{0,30}?(?:secret|sk)[\w.-]{0,20}['\"]?\s*(?::=|=>|[:=])\s*['\"]?"
       r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
       "AWS secret access key assigned to an aws*secret* name", ["aws"]),
    _r("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])", "Google API key", ["AIza"]),
    _r("azure_storage_key",
       r"(?i)(?:AccountKey\s*=\s*|azure[\w.-]{0,30}?key['\"]?\s*[:=]\s*['\"]?)"
       rf"(?P<value>{B64}{{86}}==)", "Azure storage account key", ["AccountKey", "azure"]),
    _r("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
       "GitHub classic, OAuth, user-to-server, server-to-server and refresh tokens",
       ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]),
    _r("github_fine_grained_token", r"\bgithub_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}\b",
       "GitHub fine-grained personal access token", ["github_pat_"]),
    _r("gitlab_token", r"\bgl(?:pat|dt|rt|ptt|ft|imt|agent|oas|cbt|soat)-[A-Za-z0-9_-]{20,}\b",
       "GitLab personal, deploy, runner and other tokens", ["glpat-", "gldt-", "glrt-", "glptt-",
                                                            "glft-", "glimt-", "glagent-",
                                                            "gloas-", "glcbt-", "glsoat-"]),
    _r("npm_token", r"\bnpm_[A-Za-z0-9]{36}\b", "npm access token", ["npm_"]),
    _r("pypi_token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}", "PyPI upload token",
       ["pypi-AgEIcHlwaS5vcmc"]),
    _r("slack_webhook",
       r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/+-]{20,}",
       "Slack incoming-webhook URL", ["hooks.slack.com"]),
    _r("slack_token", r"\bxox[abposre]-[0-9A-Za-z-]{10,250}|\bxapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+",
       "Slack bot, user, app and refresh tokens", ["xox", "xapp-"]),
    _r("stripe_key", r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{24,}\b|\bwhsec_[A-Za-z0-9+/]{32,}",
       "Stripe secret, restricted and webhook-signing keys", ["sk_", "rk_", "whsec_"]),
    _r("sendgrid_key", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", "SendGrid API key",
       ["SG."]),
    _r("twilio_key", r"\bSK[0-9a-fA-F]{32}\b", "Twilio API key (SK...)", ["SK"]),
    _r("anthropic_key", r"\bsk-ant-(?:api|admin|sid)\d\d-[A-Za-z0-9_-]{32,}", "Anthropic API key",
       ["sk-ant-"]),
    _r("openai_key",
       r"\bsk-(?:(?:proj|svcacct|admin|None)-)?[A-Za-z0-9_-]{16,}T3BlbkFJ[A-Za-z0-9_-]{16,}"
       r"|\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}|\bsk-[A-Za-z0-9]{48}\b",
       "OpenAI API key (legacy, project, service-account, admin)", ["sk-"]),
    _r("huggingface_token", r"\b(?:hf_|api_org_)[A-Za-z0-9]{34}\b", "Hugging Face token",
       ["hf_", "api_org_"]),
    _r("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
       "JSON Web Token", ["eyJ"]),
    _r("bearer_token", r"(?i)\bbearer\s+(?P<value>[A-Za-z0-9._~+/-]{20,}=*)",
       "Bearer token in an Authorization header", ["bearer"],
       check=lambda m: _looks_random(m.group("value"))),
    _r("url_password",
       r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s:/@'\"<>]{1,64}:(?P<value>[^\s:/@'\"<>]{1,128})@"
       r"(?P<host>[A-Za-z0-9.-]+)",
       "password in a URL (scheme://user:password@host)", ["://"], check=_url_ok),
    _r("secret_assignment",
       r"(?i)(?P<name>(?:passw(?:or)?d|passwd|\bpwd|secret|api[_-]?key|apikey|"
       r"access[_-]?key|private[_-]?key|token|credentials?|auth[_-]?key)[\w.-]{0,20}?)['\"]?"
       r"[ \t]*(?::=|=>|(?<![=!<>])=(?!=)|:)[ \t]*(?P<q>['\"]?)(?P<value>[^\s'\"`,;]{1,200})(?P=q)",
       "password or secret assigned to a suspicious name (password=, SECRET_KEY = '...', "
       "api_key: ...)", ["pass", "pwd", "secret", "key", "token", "credential"],
       check=_assignment_ok),
    _r("email",
       r"\b[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+"
       r"[A-Za-z]{2,24})\b", "email address (reserved domains like example.com stay)", ["@"],
       kind="pii", placeholder="<EMAIL>", check=_email_ok),
    _r("phone",
       r"(?<![\w+.-])(?:\+1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)"
       r"|(?<![\w+])\+[1-9]\d{0,2}[ .-]\(?\d{1,4}\)?(?:[ .-]\d{2,4}){2,4}(?![\w-]|\.\d)",
       "phone number (NANP with separators, or international +CC ...)", kind="pii",
       placeholder="<PHONE>", check=_phone_ok),
    _r("ip_address", r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)",
       "public IPv4 address (private, loopback and documentation ranges stay)", kind="pii",
       placeholder="<IP_ADDRESS>", check=_ip_ok),
    _r("credit_card", r"(?<![\w.-])(?:4\d{3}|5[1-5]\d{2}|2[2-7]\d{2}|6(?:011|5\d{2})|3[47]\d{2}|"
       r"35\d{2}|3[068]\d{2})(?:[ -]?\d{2,4}){2,5}(?![\w-]|\.\d)",
       "credit card number (issuer prefix and Luhn checked)", kind="pii",
       placeholder="<CREDIT_CARD>", check=_card_ok),
    _r("ssn", r"(?<![\w-])(?P<a>\d{3})-(?P<g>\d{2})-(?P<s>\d{4})(?![\w-])",
       "US social security number", kind="pii", placeholder="<SSN>", check=_ssn_ok),
]

BUILTIN_IDS = {r.id for r in BUILTIN_RULES}
