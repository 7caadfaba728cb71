"""The sanitize stage's labelled corpus (issue 23): secrets and PII of every kind it covers, written
the way real repositories hold them, and text that must come through unchanged.

Values follow the token formats as each vendor documents them (prefix, alphabet, length) and are
drawn from a seeded generator, so they look real and none is. `POSITIVES` are `Case(kind, syntax,
text, secret)`: `secret` must be gone from the output and rule `kind` must have counted it.
`KEEP` are `(family, text)`: the output must equal the text byte for byte.

Used by tests/test_safety.py (per-kind recall and must-keep precision) and bench/bench_sanitize.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import string
from typing import NamedTuple

rng = random.Random(23)
LOWER, UPPER, DIGITS = string.ascii_lowercase, string.ascii_uppercase, string.digits
B62 = LOWER + UPPER + DIGITS
B64 = B62 + "+/"
B64URL = B62 + "_-"
HEX = "0123456789abcdef"
B32 = UPPER + "234567"  # AWS key ids


def r(n: int, alphabet: str = B62) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def digits(n: int) -> str:
    return str(rng.randint(1, 9)) + r(n - 1, DIGITS)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Case(NamedTuple):
    kind: str
    syntax: str
    text: str
    secret: str


POSITIVES: list[Case] = []
KEEP: list[tuple[str, str]] = []


def add(kind: str, secret: str, forms: dict[str, str]) -> None:
    for syntax, text in forms.items():
        POSITIVES.append(Case(kind, syntax, text, secret))


# ------------------------------------------------------------------ where a named value sits
def assigned(name: str, value: str, env: str | None = None) -> dict[str, str]:
    """`value` bound to `name` in the syntaxes real repositories use."""
    env = env or name.upper()
    camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
    pascal = camel[0].upper() + camel[1:]
    return {
        "python": f'{name} = "{value}"\n',
        "python-single": f"    {env} = '{value}'\n",
        "python-typed": f'    {name}: str = "{value}"\n',
        "python-dict": f'CONFIG = {{\n    "{name}": "{value}",\n    "timeout": 30,\n}}\n',
        "python-kwarg": f'client = Client(region="eu-west-1", {name}="{value}")\n',
        "js": f"const {camel} = '{value}';\n",
        "ts": f'export const {camel}: string = "{value}";\n',
        "js-object": f'module.exports = {{\n  {camel}: "{value}",\n  retries: 3,\n}};\n',
        "go": f'\t{camel} := "{value}"\n',
        "go-backtick": f"\t{camel} := `{value}`\n",
        "go-var": f'var {camel} string = "{value}"\n',
        "go-struct": f'cfg := Config{{\n\t{pascal}: "{value}",\n\tRegion: "us-east-1",\n}}\n',
        "java": f'    private static final String {env} = "{value}";\n',
        "java-local": f'        String {camel} = "{value}";\n',
        "yaml": f"service:\n  {name}: {value}\n  port: 8080\n",
        "yaml-quoted": f"{name}: '{value}'\n",
        "json": f'{{\n  "{camel}": "{value}",\n  "enabled": true\n}}\n',
        "json-compact": f'{{"user":"svc","{name}":"{value}"}}\n',
        "ini": f"[default]\n{name} = {value}\n",
        "env": f"{env}={value}\n",
        "env-quoted": f'{env}="{value}"\n',
        "shell": f'export {env}="{value}"\n',
        "dockerfile": f"FROM python:3.11-slim\nENV {env}={value}\n",
        "terraform": f'  {name} = "{value}"\n',
        "xml": f"<config>\n  <{camel}>{value}</{camel}>\n</config>\n",
        "xml-attr": f'<add key="{pascal}" value="{value}" />\n',
        "properties": f"app.{name.replace('_', '.')}={value}\n",
        "comment": f'# {name} = "{value}"\n',
        "compare": f'if ({camel} != "{value}") {{\n    fail();\n}}\n',
    }


def embedded(token: str, env: str) -> dict[str, str]:
    """A token with a recognisable format, wherever it is written."""
    return {
        **{k: v for k, v in assigned(env.lower(), token, env).items()
           if k in ("python", "ts", "go", "go-backtick", "java", "yaml", "json", "env", "shell",
                    "dockerfile", "terraform", "xml", "ini")},
        "prose": f"Use the token {token} to authenticate; rotate it monthly.\n",
        "markdown": f"Set `{env}` to `{token}` in the CI settings.\n",
        "js-comment": f"// old value: {token}\n",
        "multiline": f"{env.lower()} = (\n    \"{token}\"\n)\n",
        "curl": f'curl -H "Authorization: token {token}" https://api.internal/v1\n',
    }


# ------------------------------------------------------------------ vendor tokens
for prefix in ("AKIA", "ASIA"):
    for _ in range(3):
        add("aws_access_key", k := prefix + r(16, B32), embedded(k, "AWS_ACCESS_KEY_ID"))

for _ in range(2):
    kid, sec = "AKIA" + r(16, B32), r(40, B64)
    forms = {k: v for k, v in assigned("aws_secret_access_key", sec).items()
             if k not in ("xml-attr", "compare")}
    forms |= {
        "go-struct-pair": f'creds := aws.Credentials{{\n\tAccessKeyID:     "{kid}",\n'
                          f'\tSecretAccessKey: "{sec}",\n}}\n',
        "go-call": f'credentials.NewStaticCredentials("{kid}", "{sec}", "")\n',
        "prose": f"Access key ID {kid} and its secret {sec} belong to the deploy user.\n",
        "prose-2": f"secret access key: {sec}\n",
        "ini-profile": f"[prod]\naws_access_key_id = {kid}\naws_secret_access_key = {sec}\n",
        "terraform": f'provider "aws" {{\n  access_key = "{kid}"\n  secret_key = "{sec}"\n}}\n',
        "js-camel": f'new S3Client({{ credentials: {{ accessKeyId: "{kid}", '
                    f'secretAccessKey: "{sec}" }} }});\n',
        "csv": f"User name,Access key ID,Secret access key\ndeploy,{kid},{sec}\n",
    }
    add("aws_secret_key", sec, forms)

for _ in range(2):
    add("google_api_key", k := "AIza" + r(35, B64URL), embedded(k, "GOOGLE_API_KEY"))

for _ in range(2):
    key = r(86, B64) + "=="
    add("azure_storage_key", key, {
        "connection-string": f"DefaultEndpointsProtocol=https;AccountName=acct{r(6, LOWER)};"
                             f"AccountKey={key};EndpointSuffix=core.windows.net\n",
        "json": f'{{\n  "accountName": "prodlogs",\n  "accountKey": "{key}"\n}}\n',
        "yaml": f"storage:\n  account_name: prodlogs\n  account_key: '{key}'\n",
        "go-struct": f'cfg := StorageConfig{{\n\tAccountName: "prodlogs",\n\tAccountKey:  "{key}",\n}}\n',
        "env": f"AZURE_STORAGE_KEY={key}\n",
        "python": f'AZURE_STORAGE_ACCOUNT_KEY = "{key}"\n',
        "terraform": f'  storage_account_access_key = "{key}"\n',
        "shell": f'az storage blob list --account-name prodlogs --account-key "{key}"\n',
        "xml": f'<add name="Storage" connectionString="AccountName=prodlogs;AccountKey={key}" />\n',
    })

for prefix in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"):
    add("github_token", t := prefix + r(36), embedded(t, "GITHUB_TOKEN"))
for _ in range(2):
    add("github_fine_grained_token", t := "github_pat_11" + r(20, UPPER + DIGITS) + "_" + r(59),
        embedded(t, "GH_PAT"))

for prefix in ("glpat-", "gldt-", "glrt-", "glptt-", "glft-", "glcbt-", "gloas-", "glimt-",
               "glagent-", "glsoat-", "glffct-"):
    add("gitlab_token", t := prefix + r(20, B62 + "_-").strip("-_") + r(2), embedded(t, "GITLAB_TOKEN"))
add("gitlab_token", t := "GR1348941" + r(20, B62 + "_-"), embedded(t, "REGISTRATION_TOKEN"))
for _ in range(2):
    add("gitlab_token", t := r(20, B62 + "_-").strip("-_") + r(2), {
        "env": f"GITLAB_TOKEN={t}\n",
        "yaml": f"gitlab_token: {t}\n",
        "shell": f'export GITLAB_API_TOKEN="{t}"\n',
        "curl": f'curl --header "PRIVATE-TOKEN: {t}" https://gitlab.internal/api/v4/projects\n',
        "python": f'gitlab_token = "{t}"\n'})
    add("gitlab_token", s := r(32, HEX), {
        "cookie": f"Cookie: _gitlab_session={s}; path=/\n",
        "curl": f"curl -b '_gitlab_session={s}' https://gitlab.internal/-/profile\n"})

for _ in range(2):
    add("npm_token", t := "npm_" + r(36), embedded(t, "NPM_TOKEN") | {
        "npmrc": f"//registry.npmjs.org/:_authToken={t}\n"})

for head in ("pypi-AgEIcHlwaS5vcmc", "pypi-AgENdGVzdC5weXBpLm9yZw"):
    t = head + "CJ" + r(150, B64URL)
    add("pypi_token", t, embedded(t, "TWINE_PASSWORD") | {
        "pypirc": f"[pypi]\nusername = __token__\npassword = {t}\n"})

for path in ("services", "workflows", "triggers"):
    if path == "services":
        hook = f"hooks.slack.com/services/T{r(8, UPPER + DIGITS)}/B{r(10, UPPER + DIGITS)}/{r(24)}"
    else:
        hook = (f"hooks.slack.com/{path}/T{r(8, UPPER + DIGITS)}/A{r(10, UPPER + DIGITS)}/"
                f"{digits(18)}/{r(32, HEX)}")
    for scheme in ("https://", ""):
        add("slack_webhook", scheme + hook, embedded(scheme + hook, "SLACK_WEBHOOK_URL"))

for t in (f"xoxb-{digits(12)}-{digits(13)}-{r(24)}",
          f"xoxp-{digits(12)}-{digits(12)}-{digits(13)}-{r(32, HEX)}",
          f"xoxe.xoxp-1-{r(140, B62)}", f"xoxe-1-{r(140, B62)}",
          f"xapp-1-A{r(10, UPPER + DIGITS)}-{digits(13)}-{r(64, HEX)}",
          f"xoxa-2-{digits(12)}-{digits(12)}-{r(32, HEX)}"):
    add("slack_token", t, embedded(t, "SLACK_BOT_TOKEN"))

for t in ("sk_live_" + r(24), "sk_test_" + r(24), "rk_live_" + r(24), "rk_test_" + r(24),
          "sk_live_51" + r(97), "rk_live_51" + r(97), "whsec_" + r(32)):
    add("stripe_key", t, embedded(t, "STRIPE_SECRET_KEY"))

for _ in range(2):
    add("sendgrid_key", t := "SG." + r(22, B64URL) + "." + r(43, B64URL), embedded(t, "SENDGRID_API_KEY"))
    add("twilio_key", t := "SK" + r(32, HEX), embedded(t, "TWILIO_API_KEY"))
    add("anthropic_key", t := "sk-ant-api03-" + r(93, B64URL) + "AA", embedded(t, "ANTHROPIC_API_KEY"))
    add("huggingface_token", t := "hf_" + r(34), embedded(t, "HF_TOKEN"))
add("huggingface_token", t := "api_org_" + r(34), embedded(t, "HF_ORG_TOKEN"))

for t in ("sk-proj-" + r(156, B64URL), "sk-svcacct-" + r(156, B64URL), "sk-admin-" + r(156, B64URL),
          "sk-" + r(20) + "T3BlbkFJ" + r(20), "sk-" + r(48)):
    add("openai_key", t, embedded(t, "OPENAI_API_KEY"))

for _ in range(2):
    # Twitter/X app-only bearer tokens: 21 A's, then URL-encoded base64.
    t = "A" * 21 + r(4) + "A" * 7 + r(1, DIGITS) + "%2B" + r(20) + "%3D" + r(50)
    add("twitter_bearer_token", t, {k: v for k, v in embedded(t, "TWITTER_BEARER_TOKEN").items()
                                    if k != "curl"})


def jwt(header: dict, payload: dict, signed: bool = True, dot: bool = True) -> str:
    h, p = (b64url(json.dumps(x, separators=(",", ":")).encode()) for x in (header, payload))
    return f"{h}.{p}" + (("." + b64url(rng.randbytes(32))) if signed else ("." if dot else ""))


for t in (jwt({"alg": "HS256", "typ": "JWT"}, {"sub": digits(10), "iat": 1700000000 + rng.randint(0, 9**7)}),
          jwt({"alg": "RS256", "kid": r(8)}, {"iss": "https://auth.internal", "aud": "api"}),
          jwt({"alg": "none"}, {"sub": "svc", "role": "admin"}, signed=False),
          jwt({"alg": "none", "typ": "JWT"}, {"user": r(6, LOWER)}, signed=False, dot=False)):
    add("jwt", t, embedded(t, "SESSION_JWT"))

for _ in range(2):
    tok = r(48, B62 + "._-")
    add("bearer_token", tok, {
        "http": f"GET /v1/items HTTP/1.1\nAuthorization: Bearer {tok}\n",
        "python": f'headers = {{"Authorization": "Bearer {tok}"}}\n',
        "js": f"fetch(url, {{ headers: {{ Authorization: `Bearer {tok}` }} }});\n",
        "curl": f"curl -H 'Authorization: Bearer {tok}' https://api.internal/v2/me\n",
        "yaml": f"headers:\n  Authorization: Bearer {tok}\n"})


def pem_body(n_lines: int = 6) -> list[str]:
    return [r(64, B64) for _ in range(n_lines)] + [r(24, B64) + "=="]


for label in ("RSA PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY", "OPENSSH PRIVATE KEY",
              "ENCRYPTED PRIVATE KEY", "DSA PRIVATE KEY", "PGP PRIVATE KEY BLOCK"):
    lines = pem_body()
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    block = "\n".join([begin, *lines, end])
    esc = "\\n".join([begin, *lines, end]) + "\\n"
    add("private_key", lines[1], {
        "file": block + "\n",
        "python": f'KEY = """{block}"""\n',
        "json": f'{{"type": "service_account", "private_key": "{esc}", "client_id": "{digits(21)}"}}\n',
        "yaml": "tls:\n  key: |\n" + "".join(f"    {x}\n" for x in block.split("\n")),
        "terraform": f"  private_key = <<EOT\n{block}\nEOT\n",
        "env": f'SSH_KEY="{esc}"\n',
        "truncated": f"{begin}\n{lines[0]}\n{lines[1]}\n",
    })


# ------------------------------------------------------------------ URLs and assignments
PW_CHARS = B62 + "!$%&*-_=+?^"


def password(n: int | None = None) -> str:
    while True:
        p = r(1) + r((n or rng.randint(10, 18)) - 1, PW_CHARS)
        if sum(c.isdigit() for c in p) and sum(c.isalpha() for c in p) > 2:
            return p


URL_PW = B62 + "-._~!$&*+"
for scheme, host in (("postgresql", "db.prod.internal:5432/orders"), ("postgres", "db.example.org/app"),
                     ("mysql", "mysql.corp.acme.io:3306/shop"),
                     ("mongodb+srv", "cluster0.ab1cd.mongodb.net/prod"),
                     ("redis", "cache.internal:6379/0"), ("amqp", "rabbit.local:5672/"),
                     ("https", "git.acme-corp.io/team/repo.git"), ("smtp", "mail.acme-corp.io:587"),
                     ("jdbc:mysql", "10.0.3.7:3306/billing"), ("ftp", "files.localhost/upload")):
    pw = r(1) + r(13, URL_PW) + r(2)
    url = f"{scheme}://svc_{r(4, LOWER)}:{pw}@{host}"
    add("url_password", pw, {
        "env": f"DATABASE_URL={url}\n", "python": f'engine = create_engine("{url}")\n',
        "yaml": f"  url: {url}\n", "json": f'{{"dsn": "{url}"}}\n',
        "prose": f"Connect with {url} from the bastion.\n"})

NAMES = [("password", True), ("db_password", True), ("db_pass", True), ("passwd", True),
         ("admin_pwd", True), ("client_secret", True), ("secret_key", True), ("my_secret_string", True),
         ("api_key", False), ("access_token", False), ("auth_token", False), ("generic_token", False),
         ("refresh_token", False), ("credentials", True), ("creds", True), ("passphrase", True)]
for name, password_like in NAMES:
    # (A 40-character base64 value named secret_key is an AWS secret key: aws_secret_key's case.)
    values = (password(),) if password_like else ()
    for value in values + (r(32, HEX), r(rng.randint(20, 39), B62)):
        add("secret_assignment", value, assigned(name, value))
    if password_like:
        words = ["maple", "quartz", "violin", "harbor", "tundra", "copper", "saffron", "glacier"]
        phrase = " ".join(rng.sample(words, 4)) + " " + digits(2)
        add("secret_assignment", phrase, {k: v for k, v in assigned(name, phrase).items()
                                          if "'" in v or '"' in v or "`" in v})
for value in (password(), password(12)):
    add("secret_assignment", value, {
        "cli": f"mysql --user=app --password={value} orders\n",
        "cli-space": f"pg_dump --host db --password '{value}' billing\n",
        "prose": f'The staging admin password is "{value}".\n',
        "docker-compose": f"    environment:\n      - POSTGRES_PASSWORD={value}\n",
        "k8s": f"stringData:\n  password: {value}\n",
        "github-actions": f"        with:\n          password: {value}\n",
    })


# ------------------------------------------------------------------ PII
def luhn_complete(body: str) -> str:
    for d in DIGITS:
        n = body + d
        total = sum((int(c) * 2 - 9 if int(c) > 4 else int(c) * 2) if i % 2 else int(c)
                    for i, c in enumerate(reversed(n)))
        if total % 10 == 0:
            return n
    raise AssertionError


def card(prefix: str, length: int) -> str:
    return luhn_complete(prefix + r(length - len(prefix) - 1, DIGITS))


def grouped(n: str, sizes, sep: str) -> str:
    out, i = [], 0
    for s in sizes:
        out.append(n[i:i + s])
        i += s
    return sep.join(out)


for prefix, length in (("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("2221", 16),
                       ("2720", 16), ("34", 15), ("37", 15), ("6011", 16), ("65", 16),
                       ("644", 16), ("3528", 16), ("3589", 16), ("36", 14), ("300", 14),
                       ("5018", 16), ("6304", 19), ("6759", 18), ("62", 16), ("62", 19),
                       ("81", 16), ("56", 16), ("63", 17)):
    n = card(prefix, length)
    sizes = {13: (4, 4, 5), 14: (4, 6, 4), 15: (4, 6, 5), 16: (4, 4, 4, 4), 17: (4, 4, 4, 5),
             18: (4, 4, 4, 6), 19: (4, 4, 4, 4, 3)}[length]
    spaced, dashed = grouped(n, sizes, " "), grouped(n, sizes, "-")
    add("credit_card", spaced, {"spaced": f"Card: {spaced} exp 09/29\n",
                                "spaced-prose": f"Charge it to {spaced}, please.\n"})
    add("credit_card", dashed, {"dashed": f'    "pan": "{dashed}",\n'})
    add("credit_card", n, {
        "bare-json": f'{{"card_number": "{n}", "exp_month": 9, "exp_year": 2029}}\n',
        "bare-python": f'CARD_NUMBER = "{n}"\n',
        "bare-multiline": f'payment = {{\n    "type": "card",\n    "number": "{n}",\n'
                          f'    "cvc": "{r(3, DIGITS)}",\n}}\n',
        "bare-env": f"TEST_CC_NUMBER={n}\n",
        "csv": f"name,cc_number,expiry\nJ. Doe,{n},09/29\n",
    })


def ssn() -> tuple[str, str, str]:
    while True:
        a = rng.randint(1, 899)
        if a != 666:
            return f"{a:03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"


for _ in range(6):
    a, g, s = ssn()
    add("ssn", f"{a}-{g}-{s}", {"python": f'ssn = "{a}-{g}-{s}"\n', "json": f'{{"ssn": "{a}-{g}-{s}"}}\n',
                               "prose": f"Employee SSN {a}-{g}-{s} on file.\n",
                               "csv": f"id,name,tax\n17,Lee,{a}-{g}-{s}\n"})
    add("ssn", f"{a} {g} {s}", {"prose": f"SSN: {a} {g} {s}\n",
                               "yaml": f"social_security_number: {a} {g} {s}\n"})

for _ in range(4):
    local = f"{r(5, LOWER)}.{r(6, LOWER)}"
    dom = f"{r(6, LOWER)}-{rng.choice(['corp', 'labs', 'systems'])}."
    dom += rng.choice(["io", "com", "de", "co.uk"])
    e = f"{local}@{dom}"
    add("email", e, {"python": f'MAINTAINER = "{e}"\n', "json": f'{{"author": "J Doe <{e}>"}}\n',
                     "yaml": f"contact: {e}\n", "git": f"Author: Jo Doe <{e}>\n",
                     "html": f'<a href="mailto:{e}">mail us</a>\n', "comment": f"# questions: {e}\n",
                     "csv": f"id,email\n3,{e}\n"})


def nanp() -> str:
    return f"{rng.randint(201, 989)}", f"{rng.randint(201, 989)}", f"{rng.randint(0, 9999):04d}"


for _ in range(3):
    a, b, c = nanp()
    for p in (f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", f"+1-{a}-{b}-{c}",
              f"+1{a}{b}{c}"):
        add("phone", p, {"json": f'{{"phone": "{p}"}}\n', "prose": f"Call {p} after 6pm.\n"})
for p in (f"+55 11 9{r(4, DIGITS)} {r(4, DIGITS)}", f"+44 20 7{r(3, DIGITS)} {r(4, DIGITS)}",
          f"+44 (0)20 7{r(3, DIGITS)} {r(4, DIGITS)}", f"+44 7{r(3, DIGITS)} {r(6, DIGITS)}",
          f"+49 30 {r(8, DIGITS)}", f"+33 1 {r(2, DIGITS)} {r(2, DIGITS)} {r(2, DIGITS)} {r(2, DIGITS)}",
          f"+81 90-{r(4, DIGITS)}-{r(4, DIGITS)}", f"+91 98{r(3, DIGITS)} {r(5, DIGITS)}",
          f"+86 138 {r(4, DIGITS)} {r(4, DIGITS)}", f"+61 4{r(2, DIGITS)} {r(3, DIGITS)} {r(3, DIGITS)}",
          f"+4930{r(8, DIGITS)}", f"090-{r(4, DIGITS)}-{r(4, DIGITS)}", f"03-{r(4, DIGITS)}-{r(4, DIGITS)}",
          f"0{r(2, '12345678')}-{r(3, DIGITS)}-{r(4, DIGITS)}"):
    add("phone", p, {"json": f'{{"name": "Ana", "phone": "{p}"}}\n', "yaml": f"  mobile: '{p}'\n",
                     "vcard": f"TEL;TYPE=cell:{p}\n", "prose": f"reach me on {p} (mobile)\n"})
for p in (f"020 7{r(3, DIGITS)} {r(4, DIGITS)}",
          f"01 {r(2, DIGITS)} {r(2, DIGITS)} {r(2, DIGITS)} {r(2, DIGITS)}",
          f"(030) {r(4, DIGITS)} {r(4, DIGITS)}"):
    add("phone", p, {"prose": f"Tel: {p}\n", "yaml": f"phone: {p}\n"})


def public_ip() -> str:
    while True:
        ip = ipaddress.IPv4Address(rng.getrandbits(32))
        if ip.is_global and not ip.is_multicast and not ip.is_reserved:
            return str(ip)


for _ in range(4):
    ip = public_ip()
    small = ".".join(str(rng.randint(1, 99)) for _ in range(4))
    for addr in (ip, small) if ipaddress.IPv4Address(small).is_global else (ip,):
        add("ip_address", addr, {
            "yaml": f"server: {addr}\n", "python": f'HOST = "{addr}"\n',
            "url": f"curl http://{addr}:8080/health\n",
            "log": f'{addr} - - [10/Oct/2025:13:55:36 +0000] "GET / HTTP/1.1" 200\n',
            "alone": f"{addr}\n", "list": f"allowed:\n  - {addr}\n",
            "nginx": f"    allow {addr};\n", "ini": f"bind_address = {addr}\n",
            "prose": f"The VPN endpoint is {addr}, port 1194.\n"})


# ------------------------------------------------------------------ must keep
def keep(family: str, *texts: str) -> None:
    KEEP.extend((family, t) for t in texts)


keep("issue-23",
     "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n",
     'slack_token = "xoxb-my-bot-token"\n',
     "aws_access_key_id = AKIAXXXXXXXXXXXXXXXX\n",
     "-----BEGIN RSA PRIVATE KEY-----\nanything\n-----END RSA PRIVATE KEY-----\n",
     'OPENAI_API_KEY="sk-PUT_YOUR_TOKEN_HERE_xxxxxxxxxxxx"\n',
     'TOKEN = "__PUT_YOUR_TOKEN_HERE__"\n',
     "api_key: ################################\n",
     'password = "########"\n',
     "See https://blog.acme-corp.io/2019/hugs-xoxo-and-kisses/ for the recap.\n",
     "https://example.org/posts/a-xoxo-b-2019-01/\n",
     'implementation "io.jsonwebtoken:jjwt-jackson-0.11.2"\n',
     "<artifactId>jjwt-jackson</artifactId> <!-- io.jsonwebtoken:jjwt-jackson:0.11.5 -->\n",
     f'publicToken = "{r(32)}"\n',
     f'const publicToken = "pk.{r(60)}";\n')

FILL = {"x": "x", "X": "X", "0": "0", "star": "*", "hash": "#"}
VENDOR_SHAPES = {"ghp_": 36, "gho_": 36, "github_pat_": 82, "glpat-": 20, "npm_": 36, "AKIA": 16,
                 "AIza": 35, "hf_": 34, "sk_live_": 24, "sk_test_": 24, "rk_live_": 24, "whsec_": 32,
                 "SK": 32, "sk-proj-": 48, "sk-ant-api03-": 95, "xoxb-": 24, "xoxp-": 32,
                 "SG.": 66, "GR1348941": 20, "glrt-": 20, "pypi-AgEIcHlwaS5vcmc": 60}
for prefix, n in VENDOR_SHAPES.items():
    for fname, ch in FILL.items():
        keep(f"filler-{fname}", f'TOKEN = "{prefix}{ch * n}"\n', f"token: {prefix}{ch * n}\n")
    keep("placeholder", f'KEY = "{prefix}<your-token>"\n', f"KEY={prefix}YOUR_TOKEN_HERE\n",
         f'key = "{prefix}..."  # truncated in the docs\n', f"export KEY={prefix}your_key_here\n",
         f'KEY = "{prefix}{("1234567890abcdefghijklmnopqrstuvwxyz" * 4)[:n]}"\n',
         f"key = '{prefix}{'ab' * (n // 2)}{'a' * (n % 2)}'\n", f"KEY={prefix}${{TOKEN}}\n",
         f"KEY: {prefix}{{{{ secrets.TOKEN }}}}\n")
keep("documented-example",
     "hooks: https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX\n",
     "curl -X POST https://hooks.slack.com/workflows/T00000000/A00000000/000000000000000000/XXXXXXXXXXXX\n",
     'SLACK_BOT_TOKEN="xoxb-your-token"\n',
     "export SLACK_TOKEN=xoxb-0000000000-0000000000000-XXXXXXXXXXXXXXXXXXXXXXXX\n",
     "UseDevelopmentStorage=true;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUz"
     "FT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;\n",
     "aws_secret_access_key = <YOUR_SECRET_ACCESS_KEY>\n",
     "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}\n",
     f"aws_secret_access_key = {'x' * 40}\n",
     "  AccountKey: <storage-account-key>\n",
     'stripe.api_key = "sk_test_..."\n', f'STRIPE_PUBLISHABLE_KEY = "pk_live_{r(24)}"\n',
     f"const stripe = Stripe('pk_test_{r(24)}');\n",
     "-----BEGIN PRIVATE KEY-----\n<your private key here>\n-----END PRIVATE KEY-----\n",
     "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA...\n-----END RSA PRIVATE KEY-----\n",
     "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "X" * 70 + "\n-----END OPENSSH PRIVATE KEY-----\n",
     "-----BEGIN EC PRIVATE KEY-----\n####\n-----END EC PRIVATE KEY-----\n",
     'PEM_HEADER = "-----BEGIN RSA PRIVATE KEY-----"\nPEM_FOOTER = "-----END RSA PRIVATE KEY-----"\n',
     'if line.startswith("-----BEGIN PRIVATE KEY-----"):\n    in_key = True\n',
     'MARKERS = ("-----BEGIN EC PRIVATE KEY-----", "-----END EC PRIVATE KEY-----")\n',
     "-----BEGIN PUBLIC KEY-----\n" + "\n".join(r(64, B64) for _ in range(4))
     + "\n-----END PUBLIC KEY-----\n",
     "-----BEGIN CERTIFICATE-----\n" + "\n".join(r(64, B64) for _ in range(4))
     + "\n-----END CERTIFICATE-----\n",
     'GITLAB_TOKEN="glpat-<your_access_token>"\n', "TWINE_PASSWORD=pypi-AgEIcHlwaS5vcmc...\n",
     "Authorization: Bearer <token>\n", "Authorization: Bearer YOUR_ACCESS_TOKEN_HERE\n",
     'headers = {"Authorization": f"Bearer {token}"}\n', "Authorization: Bearer $GITHUB_TOKEN\n",
     'token_type = "Bearer"\n')
keep("url-template",
     "postgres://user:password@localhost:5432/db\n", "postgres://postgres:postgres@localhost:5432/postgres\n",
     "amqp://guest:guest@localhost:5672/\n", "mysql://root:${MYSQL_ROOT_PASSWORD}@db:3306/app\n",
     "mongodb+srv://admin:<password>@cluster0.mongodb.net/test\n", 'url = "%s://%s:%s@%s/%s"\n',
     'dsn = f"postgresql://{user}:{password}@{host}:{port}/{db}"\n', "redis://:changeme@redis:6379/0\n",
     "https://USERNAME:TOKEN@github.com/org/repo.git\n",
     "https://oauth2:$GITLAB_TOKEN@gitlab.com/group/p.git\n",
     "ssh://git@github.com:22/org/repo.git\n", "http://[2001:db8::1]:8080/index.html\n",
     "DATABASE_URL=postgres://app:your_password_here@db.internal/app\n",
     "smtp://apikey:xxxxxxxxxxxxxxxx@smtp.sendgrid.net:587\n")
keep("assignment-code",
     'password = os.environ["DB_PASSWORD"]\n', "password: ${DB_PASSWORD}\n",
     'password: "{{ vault_db_password }}"\n', "password = getpass.getpass()\n", "password: changeme\n",
     'password = "changeme"\n', 'password: "<your password>"\n', "PASSWORD=your_password_here\n",
     "secret: REPLACE_ME\n", 'token = ""\n', "token = None\n", "api_key: str = Field(..., env='API_KEY')\n",
     "client = Client(api_key=api_key)\n", 'if password == "":\n    raise ValueError\n',
     "password: str | None = None\n", "PASSWORD_MIN_LENGTH = 12\n",
     'token_url = "https://auth.acme-corp.io/oauth/token"\n',
     'private_key_path = "~/.ssh/id_ed25519"\n', "credentials_file: ~/.aws/credentials\n",
     "def run(self):\n    pass\n", "bypass = True\n", 'compass = "north-by-northwest"\n',
     '"forgotPassword": "Forgot your password?",\n', '"password": "Password",\n',
     '"passwordHint": "At least 12 characters, one digit"\n', "password = password_input.strip()\n",
     "tokenizer = AutoTokenizer.from_pretrained(model_dir)\n", "max_tokens: 4096\n",
     'secret_name: "db-credentials"\n', "creds = load_credentials(path)\n", "token = self.tokenizer\n",
     "const token = process.env.GITHUB_TOKEN;\n", "\tapiKey := os.Getenv(\"API_KEY\")\n",
     'String password = System.getenv("DB_PASSWORD");\n', "  password = var.db_password\n",
     "ENV PASSWORD_FILE=/run/secrets/db_password\n", "    - POSTGRES_PASSWORD_FILE=/run/secrets/pg\n",
     '<password>${env.MAVEN_PASSWORD}</password>\n', "db.password=${DB_PASSWORD}\n",
     "  --password-stdin < token.txt\n", 'help="the password to use for the login"\n',
     'raise AuthError("password is incorrect")\n', "passwords = [p for p in rows if p]\n",
     'token_type_hint = "refresh_token"\n', 'assert token.startswith("ghp_")\n',
     'secret_key_base: <%= ENV["SECRET_KEY_BASE"] %>\n',
     "api_key = settings.OPENAI_API_KEY\n", 'grant_type = "client_credentials"\n',
     'with open(token_path) as f:\n    token = f.read().strip()\n',
     "SECRET_KEY = env('DJANGO_SECRET_KEY')\n", "password_validators = [MinimumLengthValidator(12)]\n",
     'scope = "read:packages write:packages"\n', '"integrity": "sha512-' + r(86, B64) + '==",\n',
     "pass_rate = 0.87\n", "npm_config_cache = /tmp/npm\n", 'access_key_id_label = "Access key ID"\n')
keep("look-alike",
     'SHA1 = "a9993e364706816aba3e25717850c26c9cd0d89d"  # secret test vector\n',
     f'commit = "{r(40, HEX)}"  # AKIA rotation landed here\n',
     f"sha: {r(40, HEX)}\n", f'NS = "{rng.getrandbits(128):032x}"\n',
     "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n",
     f'ICON = "AAAAAAAAAAAAAAAAAAAAAAAA{r(80, B64)}"\n',
     'MODEL = "eyJhbGciOi..."  # a JWT, truncated\n',
     "The header begins with eyJ, which is base64 for '{\"'.\n",
     "xoxo-2019-happy-birthday-card.png\n", "skip_mask_layer_norm_bias = True\n",
     "rk_warmup_steps_total_count = 10\n", "sk_learn_model_selection_helper()\n",
     "AKIA is the prefix of long-term access key ids; ASIA of temporary ones.\n",
     "GR1348941 is the prefix of runner registration tokens.\n",
     "version: 1.2.3.4\n", "4.1.0.2\n-------\n\n* Fixed a bug.\n", "10.0.0.1\n", "  - 192.168.1.10\n",
     "198.51.100.23\n", "127.0.0.1\n", "nums = '0 1000 2000 3000 4000'\n", "ISBN 978-3-16-148410-0\n",
     "date: 2024-01-15\n", "01-02-2024 12:30\n", "ts = 1700000000000\n", "x = a +1 * 2\n",
     "Call 555-0142 for the demo line.\n", "phone: (415) 555-0100\n", "SSN 123-45-6789 (the sample one)\n",
     "ssn: 078-05-1120\n", "seed = 4024007116947530\n", "id: 5105105105105106\n",
     "card: 4242 4242 4242 4242\n", "card_number = '4111111111111111'\n",
     "  [0, 12, 34, 56, 78, 90]\n", "row = '123 45 6789 000'\n", "range(100000, 999999)\n",
     "port 8080, pid 23456, uid 1000\n")
# Shapes that real packages hold (site-packages and stdlib runs of the rules), rewritten.
keep("real-code",
     "def derive(hash_alg: HashType, passphrase: BytesOrStr, salt: bytes,\n",
     "        private_key: PKCS7PrivateKeyTypes,\n", "    pass_dict: _PassDictsType,\n",
     'elif self.next_token_ == "UseMarkFilteringSet":\n', "if pass_arg == \"environment\":\n",
     "elif self.secrets_dir_missing == 'error':\n", "FILTERS = {'pass': 'bandpass', 'stop': 'bandstop'}\n",
     '    "GPT2Tokenizer": GPT2Converter,\n', "MBart50TokenizerFast = MBart50Tokenizer\n",
     'self, creds: "GenerateTemporaryTableCredentialResponse"\n',
     "    remote_addr=\"1.2.3.4\"\n", ">>> vtor.check('ip_addr_list', ('1.2.3.4', '5.6.7.8'))\n",
     '    STREET_ADDRESS = ObjectIdentifier("2.5.4.9")\n',
     '        assert url == "https://jo%40email.com:a%20secret@www.example.com"\n',
     "    # e.g. sqla+mysql://root:masterkey@localhost/\n", "    sqla+mysql://scott:tiger@localhost/foo\n",
     '    proxy_url="socks5h://<username>:<password>@proxy-host"\n',
     "    32-bit PCM             -2147483648  +2147483647  int32\n",
     "    Examples of version numbers:\n\n        1.5.2b2\n        2.7.2.2\n        3.1.1.6\n        2g6\n",
     "-----BEGIN OPENSSH PRIVATE KEY-----\"\n_SK_END = b\"-----END OPENSSH PRIVATE KEY-----\"\n\n"
     "def load(data):\n    return _PEM_RC.search(data)\n")
keep("real-code",
     'def store(self, credential: "Credential", **kwargs):\n',
     'secret_keys: "Iterable[pysequoia.Tsk]" = (),\n', "old_env = self.update_environment(PWD='/tmp')\n",
     "secret: /run/secrets/db_password\n")
