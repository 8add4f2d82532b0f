"""frontend/ checked without a browser: its image (frontend/Dockerfile, which compose's nginx
is built from), its lock file and build settings, and what the development page is given.

The browser tests (tests/test_browser_*.py) run the page and the built app in Chromium.
"""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.harness.deploy import PROJECT_ROOT, dockerfile_instructions, hadolint_binary

FRONTEND = PROJECT_ROOT / "frontend"
DOCKERFILE = FRONTEND / "Dockerfile"


def test_frontend_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [
            hadolint_binary(),
            *("--no-color", "--format", "json", "--failure-threshold", "style"),
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == []
    assert result.returncode == 0, result.stderr


def test_frontend_image_is_pinned_nginx_with_only_the_build() -> None:
    steps = dockerfile_instructions(DOCKERFILE)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert re.fullmatch(r"\d+\.\d+", args["NGINX_VERSION"]), "pin nginx's minor version"
    assert re.fullmatch(r"\d+(\.\d+)*", args["NODE_VERSION"])
    froms = [a for k, a in steps if k == "FROM"]
    assert froms[-1].startswith("nginx:${NGINX_VERSION}-alpine")
    final = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][-1] :]
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /src/dist /usr/share/nginx/html"]
    runs = [a for k, a in steps if k == "RUN"]
    # The lock file is installed before the sources are copied (cached layer), with `npm ci`.
    ci = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "npm ci" in a)
    lock = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and "package-lock.json" in a)
    src = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and a.startswith("src"))
    assert lock < ci < src
    assert any("npm run build" in r for r in runs)


def test_frontend_build_context_holds_what_the_dockerfile_copies() -> None:
    ignored = (FRONTEND / ".dockerignore").read_text().split()
    for kind, args in dockerfile_instructions(DOCKERFILE):
        if kind == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert (FRONTEND / source).exists(), source
                assert source.rstrip("/") + "/" not in ignored and source not in ignored
    for never in ("node_modules/", "dist/", ".env"):
        assert never in ignored, never


def test_compose_builds_nginx_from_the_frontend_with_the_domain_key() -> None:
    nginx = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]["nginx"]
    assert nginx["build"]["context"] == "./frontend"
    assert nginx["build"]["args"]["VITE_CHATKIT_DOMAIN_KEY"].startswith("${CHATKIT_DOMAIN_KEY")
    static_mounts = [v for v in nginx["volumes"] if "/usr/share/nginx/html" in v]
    assert not static_mounts, "the image carries the frontend; a mount would hide it"
    assert not (PROJECT_ROOT / "nginx" / "html").exists(), "the placeholder page is gone"


def test_package_lock_pins_what_package_json_asks_for() -> None:
    package = json.loads((FRONTEND / "package.json").read_text())
    lock = json.loads((FRONTEND / "package-lock.json").read_text())
    assert lock["lockfileVersion"] >= 3
    root = lock["packages"][""]
    for group in ("dependencies", "devDependencies"):
        assert root.get(group) == package.get(group), group
        for name, version in package[group].items():
            assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}: pin an exact version"
            assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert "@openai/chatkit-react" in package["dependencies"]
    assert "tsc --noEmit" in package["scripts"]["build"], "the build type-checks first"


def test_every_vite_variable_is_typed_and_documented() -> None:
    used = set()
    for path in (FRONTEND / "src").rglob("*.ts*"):
        used |= set(re.findall(r"env\.(VITE_[A-Z_]+)", path.read_text()))
    used |= set(re.findall(r"(VITE_[A-Z_]+)", (FRONTEND / "vite.config.ts").read_text()))
    typed = set(
        re.findall(r"readonly (VITE_[A-Z_]+)", (FRONTEND / "src/vite-env.d.ts").read_text())
    )
    documented = set(
        re.findall(r"^#?(VITE_[A-Z_]+)=", (FRONTEND / ".env.example").read_text(), re.M)
    )
    assert used, "no VITE_ variable found"
    assert used <= typed, used - typed
    assert used <= documented, used - documented
