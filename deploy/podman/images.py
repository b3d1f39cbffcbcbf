"""Build this project's images with podman, where the public base image may not be pullable and
pip may need the host's settings (an index mirror, a proxy's CA bundle). Standard library only.

    python deploy/podman/images.py tools            # podman, runc, catatonit, debootstrap (apt-get)
    python deploy/podman/images.py base             # a Debian bookworm base image from Debian's mirror
    python deploy/podman/images.py build serve      # docker/Dockerfile --target serve → edge-anomaly:serve
    python deploy/podman/images.py postgres         # a stand-in for postgres:16 from Debian's package
    python deploy/podman/images.py pip-conf         # the pip.conf a build gets, and what it mounts

`make image-tools | image-base | image-serve | image-train | image-mlflow | image-load |
image-postgres` run these
(with CONTAINERS_CONF=deploy/podman/containers.conf). `build` uses `--base` (default
python:3.11-slim, the Dockerfile's own default) when it is present or can be pulled; in place
of that default only, the local base, made first if absent (a base the operator names that
cannot be pulled is an error). pip inside the build gets the host's pip
settings (`pip config list`, the environment's PIP_* included) as /etc/pip.conf, and the files
and local indexes they name mounted read-only under /run/pip-host, for the build only (what a
build leaves of these mount points: an empty /etc/pip.conf, empty entries under /run/pip-host).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_BASE = "python:3.11-slim"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"  # the Dockerfile's default for `train`
LOCAL_BASE = "localhost/edge-anomaly-base:bookworm"
# PostgreSQL for the compose stack where the public postgres:16 cannot be pulled: Debian's own
# package on the local base, with the official image's entrypoint interface (deploy/podman/postgres).
LOCAL_POSTGRES = "localhost/edge-anomaly-postgres:15"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the base holds beyond debootstrap's minimal system: Python 3.11 with venv (and pip's
# wheel), the CA certificates. No compiler.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Debian packages the targets need: the engine, its OCI runtime (runc: crun fails on hybrid
# cgroups), the init podman uses for pods, and debootstrap for the local base.
TOOLS = {"podman": "podman", "runc": "runc", "catatonit": "catatonit", "debootstrap": "debootstrap"}
# pip settings passed into builds; paths among their values are mounted.
CANNOT_INSTALL = 3  # `tools`' exit status when the tools are missing and cannot be installed
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert", "client-cert", "constraint",
            "default-timeout", "timeout", "retries", "proxy", "no-index", "prefer-binary", "only-binary")
PATH_KEYS = ("index-url", "extra-index-url", "find-links", "cert", "client-cert", "constraint")


def podman() -> str:
    """The engine command (PODMAN, default podman)."""
    return os.environ.get("PODMAN", "podman")


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"[images] {message}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """Debian packages of TOOLS not installed (by `dpkg -s`, else by command name)."""
    if shutil.which("dpkg"):
        return [pkg for pkg in TOOLS.values()
                if subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode != 0]
    return [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]


def ensure_tools() -> str:
    """Install what is missing with apt-get (root, Debian-like); '' when all is there, else why not."""
    missing = missing_tools()
    if not missing:
        return ""
    names = " ".join(missing)
    if shutil.which("apt-get") is None:
        return f"missing {names} and no apt-get to install them"
    if os.geteuid() != 0:
        return f"missing {names}; installing them needs root: apt-get install {names}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    say(f"apt-get install {names}")
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return f"apt-get install {names} failed: {' / '.join(tail)}"
    return ""


def image_id(name: str) -> str:
    """The ID of image `name`, '' when the engine has none."""
    found = subprocess.run([podman(), "image", "inspect", "--format", "{{.Id}}", name], capture_output=True,
                           text=True)
    return found.stdout.strip() if found.returncode == 0 else ""


def remove_superseded(tag: str, previous: str, since: float) -> None:
    """After a build moved `tag` off image `previous`, remove that image, and the `wheel` stage
    images (WHEEL_LABEL, untagged) made over an hour before this build began at `since` (the
    recent ones are the cache of the targets built together): repeated builds would otherwise
    keep every old image until the disk fills. An image a container still uses stays."""
    if previous and previous != image_id(tag):
        gone = subprocess.run([podman(), "rmi", previous], capture_output=True, text=True)
        say(f"removed the previous {tag} ({previous[:12]})" if gone.returncode == 0 else
            f"kept the previous {tag} ({previous[:12]}): {(gone.stderr.strip().splitlines() or ['?'])[-1]}")
    subprocess.run([podman(), "image", "prune", "--force", "--filter", f"label={WHEEL_LABEL}",
                    "--filter", f"until={int(since) - 3600}"], capture_output=True)


def image_exists(name: str) -> bool:
    """Whether the engine holds image `name`."""
    return subprocess.run([podman(), "image", "exists", name], capture_output=True).returncode == 0


def build_local_base(tag: str = LOCAL_BASE, rebuild: bool = False) -> str:
    """Debian bookworm (minbase + BASE_PACKAGES) from DEBIAN_MIRROR, imported as `tag`."""
    if image_exists(tag) and not rebuild:
        return tag
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed (make image-tools)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-anomaly-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        say(f"debootstrap bookworm from {DEBIAN_MIRROR} (about a minute)")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
             str(rootfs), DEBIAN_MIRROR], quiet=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/info", "usr/share/locale"):
            for p in (rootfs / junk).glob("*"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        run([podman(), "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["/bin/bash"]',
             "--message", f"Debian bookworm minbase + {' '.join(BASE_PACKAGES)} from {DEBIAN_MIRROR}",
             "-", tag], stdin=tar.stdout, quiet=True)
        tar.wait()
    say(f"base {tag} made in {time.monotonic() - started:.0f} s")
    return tag


def resolve_base(base: str) -> str:
    """`base` if present or pullable; the local base (made if absent) in place of the public
    default only: a base named by the operator that cannot be had is an error."""
    if image_exists(base):
        return base
    pulled = subprocess.run([podman(), "pull", "-q", base], capture_output=True, text=True, timeout=600)
    if pulled.returncode == 0:
        return base
    reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
    if base != PUBLIC_BASE:
        # An operator's own base (a hardened or company image) is never swapped silently.
        raise SystemExit(f"images.py: cannot pull the base {base} ({reason}); "
                         f"fix the name or the registry login, or leave BASE unset for {PUBLIC_BASE}")
    say(f"cannot pull {base} ({reason}); using {LOCAL_BASE}")
    return build_local_base()


def pip_settings() -> dict[str, dict[str, str]]:
    """`pip config list` of this Python's pip as {section: {key: value}}, the environment's
    PIP_* (section ':env:') folded into 'global', where they take precedence."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    if listed.returncode != 0:
        say(f"no pip settings passed to the build ({sys.executable} -m pip config list failed)")
    out = listed.stdout if listed.returncode == 0 else ""
    sections: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.partition(".")
        if key not in PIP_KEYS:
            continue
        value = str(ast.literal_eval(value))
        (env if section == ":env:" else sections.setdefault(section, {}))[key] = value
    sections.setdefault("global", {}).update(env)
    return sections


WHEEL_LABEL = "io.edge-anomaly.stage=wheel"  # docker/Dockerfile's `wheel` stage (pruned when dangling)
BUILD_MOUNTS = "/run/pip-host"  # where a build sees the host files its pip settings name


def local_path(value: str) -> Path | None:
    """The local file or folder a pip setting names (a path, or a file: URL), if it exists."""
    path = Path(urlparse(value).path) if value.startswith("file:") else Path(value)
    return path if path.is_absolute() and path.exists() else None


def pip_conf(sections: dict[str, dict[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """(pip.conf text, [(host path, path in the build)]) for `sections`: the local files and
    folders the settings name are mounted under BUILD_MOUNTS (so what the build leaves of
    their mount points is in one place) and the settings rewritten to match. A local index
    folder named `simple` is mounted with its parent, where such mirrors keep the files it
    links to."""
    lines, mounts = [], set()
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key in PATH_KEYS:
                items = []
                for item in value.split():
                    path = local_path(item)
                    if path is not None:
                        mount = path.parent if path.name == "simple" else path
                        mounts.add((str(mount), BUILD_MOUNTS + str(mount)))
                        item = item.replace(str(path), BUILD_MOUNTS + str(path), 1)
                    items.append(item)
                value = " ".join(items)
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n", sorted(mounts)


def torch_index(url: str | None) -> str:
    """The TORCH_INDEX_URL a `train` build gets: `url` if given (TORCH_INDEX_URL, '' = pip's
    own settings only), else PyTorch's CPU index when it answers, else '' (pip, retrying an
    unreachable index for every requirement, would take many minutes to say so)."""
    if url is not None:
        return url
    try:
        urllib.request.urlopen(TORCH_INDEX_URL + "/torch/", timeout=10).close()
        return TORCH_INDEX_URL
    except OSError as exc:
        say(f"{TORCH_INDEX_URL} unreachable ({exc}); torch from pip's own settings")
        return ""


def build(target: str, tag: str, base: str, extra: list[str]) -> None:
    """docker/Dockerfile --target `target` → `tag` on `base` (see `resolve_base`), with the
    host's pip settings, host networking and Docker image format (which keeps HEALTHCHECK)."""
    base = resolve_base(base)
    conf, mounts = pip_conf(pip_settings())
    if target == "train":
        extra = ["--build-arg", f"TORCH_INDEX_URL={torch_index(os.environ.get('TORCH_INDEX_URL'))}", *extra]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-anomaly-pip-") as tmp:
        (Path(tmp) / "pip.conf").write_text(conf)
        # The folder stays private (0700: an index URL may carry a token); podman, not the
        # build's user, opens it to bind-mount the file, which stays readable inside.
        os.chmod(Path(tmp) / "pip.conf", 0o644)
        command = [podman(), "build", "--network=host", "--format", "docker", "-f", "docker/Dockerfile",
                   "--target", target, "--tag", tag, "--build-arg", f"BASE={base}",
                   "--volume", f"{tmp}/pip.conf:/etc/pip.conf:ro",
                   *[a for host, inside in mounts for a in ("--volume", f"{host}:{inside}:ro")], *extra, "."]
        say(f"{' '.join(command[:12])} … (base {base})")
        previous, since = image_id(tag), time.time()
        run(command, cwd=ROOT)
    say(f"{tag} built in {time.monotonic() - started:.0f} s")
    remove_superseded(tag, previous, since)


def build_postgres(tag: str = LOCAL_POSTGRES) -> str:
    """deploy/podman/postgres on the local base (made first if absent) → `tag` (cached layers:
    seconds when nothing changed)."""
    base = build_local_base()
    started = time.monotonic()
    previous, since = image_id(tag), time.time()
    run([podman(), "build", "--network=host", "--format", "docker", "--tag", tag,
         "--build-arg", f"BASE={base}", str(ROOT / "deploy" / "podman" / "postgres")], quiet=True)
    say(f"{tag} built in {time.monotonic() - started:.0f} s")
    remove_superseded(tag, previous, since)
    return tag


def run(command: list[str], quiet: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Run `command`; on failure exit with its output's tail."""
    result = subprocess.run(command, capture_output=quiet, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise SystemExit(f"{command[0]} {command[1]} failed ({result.returncode})\n{tail}".rstrip())


def main(argv: list[str]) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tools", help="install what is missing of " + ", ".join(TOOLS.values()))
    base = sub.add_parser("base", help=f"make {LOCAL_BASE} from Debian's mirror, if absent")
    base.add_argument("--rebuild", action="store_true")
    one = sub.add_parser("build", help="build one target of docker/Dockerfile")
    one.add_argument("target", choices=["serve", "train", "mlflow", "load"])
    one.add_argument("--tag", help="image name (default edge-anomaly:<target>)")
    one.add_argument("--base", default=os.environ.get("BASE") or PUBLIC_BASE,
                     help=f"base image (BASE; default {PUBLIC_BASE}, else {LOCAL_BASE})")
    one.add_argument("extra", nargs="*", help="more podman build arguments (after --)")
    sub.add_parser("postgres", help=f"build {LOCAL_POSTGRES} (Debian's PostgreSQL)")
    sub.add_parser("pip-conf", help="print the pip.conf builds get and the paths they mount")
    args = parser.parse_args(argv)
    if args.command == "tools":
        why = ensure_tools()
        if why:
            print(why)
            return CANNOT_INSTALL
    elif args.command == "base":
        build_local_base(rebuild=args.rebuild)
    elif args.command == "postgres":
        build_postgres()
    elif args.command == "build":
        build(args.target, args.tag or f"edge-anomaly:{args.target}", args.base, args.extra)
    else:
        conf, mounts = pip_conf(pip_settings())
        print(conf + "".join(f"# mounted: {host} at {inside}\n" for host, inside in mounts), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
