"""Copy into ROOT what /opt/apiproxy's interpreter needs at run time (prototype, see Containerfile).

Symbolic links are kept and followed; directories are copied through their real paths, so a
merged-/usr base (/lib -> usr/lib) gives one copy of each library. Works from the official base
(Python in /usr/local) and from the Debian stand-in (Python in /usr), as it asks the interpreter.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = sys.argv[1]
SKIP_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "venv",
    "distutils",
    "unittest",
    "config-3.11-x86_64-linux-gnu",
}


def copy(path: str) -> None:
    if not os.path.lexists(path):
        return
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    dst = ROOT + path
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), dst)
        copy(os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path))))
    elif os.path.isdir(path):
        os.makedirs(dst, exist_ok=True)
        shutil.copystat(path, dst)
        for name in os.listdir(path):
            copy(os.path.join(path, name))
    else:
        shutil.copy2(path, dst)


stdlib = sysconfig.get_paths()["stdlib"]
for name in os.listdir(stdlib):
    if name not in SKIP_STDLIB:
        copy(os.path.join(stdlib, name))
copy("/opt/apiproxy")
interpreter = os.path.realpath("/opt/apiproxy/bin/python")
for path in (
    "/usr/local/bin/python3.11",
    "/usr/local/bin/python3",
    "/usr/local/bin/python",
    interpreter,
    "/etc/ssl/certs/ca-certificates.crt",
    "/usr/lib/ssl",
    "/usr/share/zoneinfo",
    "/etc/python3.11",
):
    copy(path)
binaries = [interpreter] + [
    os.path.join(d, f)
    for top in (stdlib, "/opt/apiproxy")
    for d, _, files in os.walk(top)
    for f in files
    if ".so" in f
]
libs = set(glob.glob("/usr/lib/x86_64-linux-gnu/libgcc_s.so*"))  # dlopen()ed by pthread_cancel
for binary in binaries:
    ldd = ["/usr/bin/ldd", binary]  # the image's own files, at build time
    out = subprocess.run(ldd, capture_output=True, text=True, check=False).stdout  # noqa: S603
    libs |= {word for line in out.splitlines() for word in line.split() if word.startswith("/")}
for lib in sorted(libs):
    copy(lib)
for link in ("/lib", "/lib64", "/bin", "/sbin"):
    if os.path.islink(link) and not os.path.lexists(ROOT + link):
        os.symlink(os.readlink(link), ROOT + link)
tmp = ROOT + "/tmp"  # noqa: S108 - the image's /tmp (an emptyDir in the pod), sticky like /tmp
os.makedirs(tmp, exist_ok=True)
os.chmod(tmp, 0o1777)  # noqa: S103
print(f"prune: {len(libs)} shared libraries, {len(binaries)} binaries checked")
