"""Download models for reelqueue, on a machine with Hugging Face Hub access.

    python scripts/fetch_models.py Wan2.1-T2V-1.3B-Diffusers Qwen2.5-1.5B-Instruct --dest models/
    python scripts/fetch_models.py --list

Each model lands in ``<dest>/<name>`` and every file's SHA-256 goes into
``<dest>/manifest.json``. Copy the folder, manifest included, to the GPU hosts
(``[models] dir``): the worker never downloads anything, and checks each model against
the manifest before a job uses it (``reelqueue models``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.models import CATALOGUE, CatalogueEntry, record_in_manifest  # noqa: E402

NO_HUB = 3  # exit status when the hub cannot be reached


class FetchError(Exception):
    """A download that cannot work here; the message says what to do instead."""


def fetch(name: str, dest: Path) -> dict[str, str]:
    """Download ``name`` into ``dest/name``; return where it came from."""
    entry = CATALOGUE[name]
    target = dest / name
    if entry.url:
        return _fetch_url(entry, target)
    return _fetch_repo(entry, target)


def _fetch_repo(entry: CatalogueEntry, target: Path) -> dict[str, str]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FetchError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it on a "
                         "machine with hub access")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        revision = HfApi().model_info(entry.repo).sha or "main"
        snapshot_download(entry.repo, revision=revision, local_dir=target,
                          allow_patterns=list(entry.allow) or None)
    except GatedRepoError:
        raise FetchError(f"{entry.repo} is gated: accept its licence on huggingface.co and "
                         "log in with `hf auth login`, then run this again") from None
    except RepositoryNotFoundError:
        raise FetchError(f"{entry.repo} is not on the hub (renamed or removed?); download "
                         "it by hand and put it in the models folder") from None
    except Exception as exc:  # no network, a proxy, a timeout: the HTTP client's own errors
        raise FetchError(f"cannot reach the Hugging Face Hub for {entry.repo} "
                         f"({type(exc).__name__}: {exc}); run this on a machine with hub "
                         "access") from None
    shutil.rmtree(target / ".cache", ignore_errors=True)  # the download's own bookkeeping
    return {"repo": entry.repo, "revision": revision}


def _fetch_url(entry: CatalogueEntry, target: Path) -> dict[str, str]:
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(entry.url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 8 * 1024 * 1024)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(f"cannot download {entry.url} ({exc}); run this on a machine with "
                         "internet access") from None
    partial.replace(target)
    return {"url": entry.url}


def print_catalogue() -> None:
    width = max(map(len, CATALOGUE))
    for name, entry in CATALOGUE.items():
        source = entry.repo or entry.url
        print(f"{name:<{width}}  {entry.kind:<15} {source}\n{'':<{width}}  {entry.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="models from --list")
    parser.add_argument("--dest", type=Path, default=Path("models"),
                        help="the models folder (default: models/)")
    parser.add_argument("--list", action="store_true", help="show the catalogue and exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        print_catalogue()
        return 0
    unknown = [name for name in args.names if name not in CATALOGUE]
    if unknown:
        parser.error(f"not in the catalogue: {', '.join(unknown)} (see --list)")
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        print(f"fetching {name} …", flush=True)
        try:
            source = fetch(name, args.dest)
        except FetchError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return NO_HUB
        entry = record_in_manifest(args.dest, name, source)
        count, size = len(entry["files"]), sum(f["size"] for f in entry["files"].values())
        print(f"  {count} file{'s' * (count != 1)}, {size / 1e9:.2f} GB, checksums in "
              f"{args.dest / 'manifest.json'}")
    print(f"done. Copy {args.dest}/ (with manifest.json) to each GPU host's [models] dir.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
