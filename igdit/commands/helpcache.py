"""``igdit <command> --help``, answered from a cache after its first time.

A command's help is built by its parser from the classes' signatures, and some parsers need Lightning (``fit``,
``validate``: the whole Trainer) or timm (``import-ckpt``: the model families) just to exist: seconds of imports
for a page of text. argparse and jsonargparse have no cache of their own, so the text is kept here, keyed by
everything it is made of: the command, igdit's source files (path, size, modification time), the versions of the
libraries whose signatures it lists, the Python version, the terminal width and the environment variables whose
values a page shows as defaults. Any change makes a new key;
``IGDIT_HELP_CACHE=0`` turns the cache off. Only a bare ``igdit <command> --help`` is cached: with other options
(``-c file --help``) the help shows their values.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

LIBRARIES = ("jsonargparse", "lightning", "torch", "timm", "optuna", "mlflow")
# environment variables that a page's defaults show (the Hugging Face cache of `data build`, ...)
ENVIRONMENT = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TORCH_HOME", "MLFLOW_TRACKING_URI")


def cache_folder() -> Optional[Path]:
    if os.environ.get("IGDIT_HELP_CACHE", "1") == "0":
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "igdit" / "help"


def help_key(command: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"{command}|{sys.version}|{shutil.get_terminal_size().columns}".encode())
    for name in LIBRARIES:
        try:
            digest.update(f"|{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(f"|{name}=none".encode())
    for name in ENVIRONMENT:
        digest.update(f"|{name}={os.environ.get(name)}".encode())
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        digest.update(f"|{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def is_plain_help(args: list[str]) -> bool:
    """``args`` (after the command) asks for the help and nothing else (``--help``, ``build --help``)."""
    return len(args) in (1, 2) and args[-1] in ("--help", "-h") and not any(a.startswith("-") for a in args[:-1])


def answer_help(command: str, run: Callable[[], int]) -> int:
    """Print the help of ``command`` (``sample``, ``data build``) from the cache, or let ``run`` print it (argparse exits with 0) and keep it."""
    folder = cache_folder()
    name = command.replace(" ", "-")
    path = None if folder is None else folder / f"{name}-{help_key(command)}.txt"
    if path is not None and path.is_file():
        sys.stdout.write(path.read_text())
        return 0
    buffer = io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(buffer):
        try:
            code = run()
        except SystemExit as exit_:
            code = exit_.code
    text = buffer.getvalue()
    sys.stdout.write(text)
    if path is not None and code in (0, None) and text.strip():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(text)
            temporary.replace(path)  # atomic: a second process never reads half a page
            for older in path.parent.glob(f"{name}-*.txt"):  # pages of earlier versions: never read again
                if older != path:
                    older.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only home: the help is simply built again next time
    return 0 if code is None else int(code) if isinstance(code, int) else 1
