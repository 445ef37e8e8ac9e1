"""Java test apps (tests/apps/java/NAME, Maven projects) built once per pytest run, and JVM
truststores that add a test CA to the JDK's cacerts.

- `maven_app(name)`: `mvn -B -q package` of tests/apps/java/NAME (its dependencies copied to
  target/lib) the first time it is asked for in this process; `MavenApp.command(main, ...)`
  is the `java` command line that runs one of its classes.
- `java_truststore(ca_pem, dest)`: a PKCS#12 copy of cacerts plus `ca_pem`, password
  `changeit` (`-Djavax.net.ssl.trustStore=... -Djavax.net.ssl.trustStorePassword=changeit`).

A missing JDK or Maven is an error with the install hint, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["INSTALL_HINT", "MavenApp", "java_truststore", "maven_app"]

INSTALL_HINT = "apt-get install -y openjdk-17-jdk-headless maven"
APPS = Path(__file__).resolve().parents[1] / "apps" / "java"
BUILD_TIMEOUT = 900.0  # seconds: a first build downloads the SDK from Maven Central
TRUSTSTORE_PASSWORD = "changeit"
_built: dict[str, MavenApp] = {}
_lock = threading.Lock()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: the Java apps need a JDK 17 and Maven "
                    f"(`{INSTALL_HINT}`)")
    return found


@dataclass(frozen=True)
class MavenApp:
    name: str
    project: Path
    java: str

    @property
    def classpath(self) -> str:
        target = self.project / "target"
        jars = sorted(target.glob("*.jar")) + sorted((target / "lib").glob("*.jar"))
        return os.pathsep.join(str(jar) for jar in jars)

    def command(self, main_class: str, *jvm_args: str) -> list[str]:
        return [self.java, *jvm_args, "-cp", self.classpath, main_class]


def maven_app(name: str) -> MavenApp:
    """tests/apps/java/NAME, built (once per run) with Maven; a failed build fails the test
    with Maven's output (offline first, so a warm ~/.m2 needs no network)."""
    with _lock:
        if name in _built:
            return _built[name]
        project = APPS / name
        if not (project / "pom.xml").is_file():
            raise FileNotFoundError(f"no Maven project at {project}")
        mvn, java = _tool("mvn"), _tool("java")
        done = None
        for offline in (["-o"], []):
            done = subprocess.run([mvn, "-B", "-q", *offline, "package", "-DskipTests"],
                                  cwd=project, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT)
            if done.returncode == 0:
                break
        assert done is not None
        if done.returncode != 0:
            pytest.fail(f"mvn package of {project} failed (Maven Central unreachable? a warm "
                        f"~/.m2 is needed offline):\n{(done.stdout + done.stderr)[-4000:]}")
        app = MavenApp(name, project, java)
        _built[name] = app
        return app


def java_truststore(ca_pem: str | Path, dest: Path) -> Path:
    """dest: a PKCS#12 truststore with the JDK's cacerts and `ca_pem`, password changeit."""
    keytool = _tool("keytool")
    java_home = Path(_tool("java")).resolve().parents[1]
    cacerts = java_home / "lib" / "security" / "cacerts"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    if cacerts.is_file():
        subprocess.run([keytool, "-importkeystore", "-noprompt", "-srckeystore", str(cacerts),
                        "-srcstorepass", TRUSTSTORE_PASSWORD, "-destkeystore", str(dest),
                        "-deststoretype", "PKCS12", "-deststorepass", TRUSTSTORE_PASSWORD],
                       check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([keytool, "-importcert", "-noprompt", "-alias", "keyless-test-ca",
                    "-file", str(ca_pem), "-keystore", str(dest), "-storetype", "PKCS12",
                    "-storepass", TRUSTSTORE_PASSWORD], check=True, capture_output=True,
                   text=True, timeout=60)
    return dest
