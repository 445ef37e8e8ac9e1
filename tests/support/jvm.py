"""Java test apps: a Maven build once per test run, and a truststore with keyless' CA.

`maven_app(name)` builds tests/apps/java/NAME (a Maven project) into a cache folder keyed by
the hash of its pom and sources, so a pytest run (and the next one, unchanged) builds it once;
`MavenApp.command(main_class, *jvm_args)` is the `java -cp ...` argv that runs it.

`java_truststore(ca_pem, dest)` is the recipe of docs/languages/java.md: a copy of the JDK's
own `cacerts` (the public CAs) with keyless' CA imported, as PKCS#12 with password `changeit`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["INSTALL_HINT", "TRUSTSTORE_PASSWORD", "MavenApp", "java_home", "java_truststore",
           "maven_app"]

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "apps" / "java"
CACHE = Path(os.environ.get("KEYLESS_JAVA_CACHE", Path(tempfile.gettempdir()) / "keyless-java"))
TRUSTSTORE_PASSWORD = "changeit"
INSTALL_HINT = "apt-get install -y openjdk-17-jdk-headless maven"
BUILD_TIMEOUT = 600  # a cold ~/.m2 downloads the SDK's dependencies first
_built: dict[str, MavenApp] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class MavenApp:
    name: str
    java: str
    classpath: tuple[Path, ...]

    def command(self, main_class: str, *jvm_args: str) -> list[str]:
        return [self.java, *jvm_args, "-cp", os.pathsep.join(map(str, self.classpath)),
                main_class]


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is missing: the Java legacy apps cannot be built or run. "
                    f"Install a JDK 17 and Maven: `{INSTALL_HINT}`")
    return found


def java_home() -> Path:
    """The JDK that `java` on PATH belongs to (its lib/security/cacerts is the public CAs)."""
    return Path(_tool("java")).resolve().parents[1]


def _sources_hash(project: Path) -> str:
    digest = hashlib.sha256()
    files = [project / "pom.xml", *sorted((project / "src").rglob("*"))]
    for file in files:
        if file.is_file():
            digest.update(str(file.relative_to(project)).encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def maven_app(name: str) -> MavenApp:
    """tests/apps/java/NAME built (once per run and per source hash) and ready to run."""
    with _lock:
        if name not in _built:
            _built[name] = _build(name)
        return _built[name]


def _build(name: str) -> MavenApp:
    java, mvn = _tool("java"), _tool("mvn")
    project = APPS / name
    if not (project / "pom.xml").is_file():
        pytest.fail(f"no Maven project at {project}")
    build = CACHE / f"{name}-{_sources_hash(project)}"
    done = build / "BUILT"
    if not done.exists():
        shutil.rmtree(build, ignore_errors=True)
        build.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=build.parent))
        shutil.copy2(project / "pom.xml", staging / "pom.xml")
        shutil.copytree(project / "src", staging / "src")
        try:
            # offline first: a warm ~/.m2 (.ci/run fetches it) needs no registry at all
            for offline in (["-o"], []):
                built = subprocess.run([mvn, "-B", "-q", *offline, "package", "-DskipTests"],
                                       cwd=staging, capture_output=True, text=True,
                                       timeout=BUILD_TIMEOUT)
                if built.returncode == 0:
                    break
        except subprocess.TimeoutExpired:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"`mvn package` of {name} took over {BUILD_TIMEOUT}s: is Maven Central "
                        "(or the configured mirror) reachable?")
        if built.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"`mvn -B -q package` of tests/apps/java/{name} failed (exit "
                        f"{built.returncode}); it needs Maven Central or a mirror in "
                        f"~/.m2/settings.xml, or a ~/.m2 prefetched by .ci/run:\n"
                        f"{(built.stdout + built.stderr)[-4000:]}")
        (staging / "BUILT").write_text("ok\n")
        staging.chmod(0o755)  # mkdtemp's 0700: apps also run as other UIDs (namespace tests)
        # another run may have finished the same build meanwhile: either copy is good
        if not done.exists():
            shutil.rmtree(build, ignore_errors=True)
            staging.rename(build)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    jars = sorted((build / "target").glob("*.jar"))
    libs = sorted((build / "target" / "lib").glob("*.jar"))
    if not jars or not libs:
        pytest.fail(f"the build of {name} at {build} has no jar or no target/lib")
    return MavenApp(name, java, (*jars, *libs))


def java_truststore(ca_pem: str | Path, dest: Path) -> Path:
    """A PKCS#12 truststore at dest: the JDK's cacerts plus the CA in ca_pem (`changeit`)."""
    keytool = _tool("keytool")
    cacerts = java_home() / "lib" / "security" / "cacerts"
    if not cacerts.exists():
        pytest.fail(f"the JDK has no {cacerts}: install `ca-certificates-java` ({INSTALL_HINT})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    # -importkeystore writes a PKCS#12 copy whatever cacerts' own format (JKS on Debian's
    # JDK 17, where its store password is `changeit`).
    for argv in (
        [keytool, "-importkeystore", "-noprompt", "-srckeystore", str(cacerts),
         "-srcstorepass", TRUSTSTORE_PASSWORD, "-destkeystore", str(dest),
         "-deststoretype", "PKCS12", "-deststorepass", TRUSTSTORE_PASSWORD],
        [keytool, "-importcert", "-noprompt", "-alias", "keyless", "-file", str(ca_pem),
         "-keystore", str(dest), "-storetype", "PKCS12", "-storepass", TRUSTSTORE_PASSWORD],
    ):
        made = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            pytest.fail(f"keytool failed ({made.returncode}): {made.stdout}{made.stderr}")
    return dest
