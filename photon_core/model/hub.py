"""Where a checkpoint comes from: the embedded demo model, a local folder, or a model-hub id.

    resolve(None)                                                  # the embedded demo model
    resolve("runs/demo/model")                                     # a local folder
    resolve("Alibaba-DAMO-Academy/Photon-S1")                      # fetched into the HF cache
    resolve("ORG/NAME", subfolder="3D-RAD", revision="main")       # a task's weights in a sub-folder / branch

Only a hub id reaches the network, through ``huggingface_hub.snapshot_download`` into the standard
HF cache (``HF_HUB_CACHE`` / ``HF_HOME``), restricted to what the loader reads: safetensors model
weights and their index, config / generation / preprocessor JSON and tokenizer files — never
``results.zip``, never pickles, never another task's sub-folder. ``HF_HUB_OFFLINE=1`` (or no
network) uses what the cache holds, or fails naming what is missing. The download shows
huggingface_hub's progress bars (a 3B checkpoint is several GB).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from photon_core.model.checkpoint import INDEX, READ_FILES, CheckpointError, CheckpointInfo

log = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The files a hub download may bring (relative to the sub-folder): what the loader and tokenizer read.
ALLOW = ["model*.safetensors"] + [f for f in READ_FILES if f != "model.safetensors"]


def is_hub_id(model: str) -> bool:
    """'ORG/NAME' that is not an existing local path."""
    return bool(HUB_ID.match(str(model))) and not Path(model).exists()


def allow_patterns(subfolder: str | None) -> list[str]:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [prefix + p for p in ALLOW]


def ignore_patterns(subfolder: str | None) -> list[str]:
    """Deeper folders than the one asked for (another task's weights, inference results)."""
    return [f"{subfolder.strip('/')}/*/*" if subfolder else "*/*"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(
    model: str | Path | None = None, subfolder: str | None = None, revision: str | None = None
) -> CheckpointInfo:
    """The local folder of a checkpoint and where it came from (stage filled in by the loader)."""
    if subfolder is not None and (
        not str(subfolder).strip() or ".." in Path(subfolder).parts or Path(subfolder).is_absolute()
    ):
        raise CheckpointError(f"--subfolder {subfolder!r} must be a relative folder inside the checkpoint.")
    if model is None or str(model) == "":
        if subfolder or revision:
            raise CheckpointError("--subfolder and --revision need --model (a folder or a hub id).")
        return CheckpointInfo("embedded", "embedded demo model", DEMO_MODEL)
    if Path(model).exists():
        if revision:
            raise CheckpointError(
                f"--revision {revision!r} applies to a hub id; '{Path(model).name}' is a local folder."
            )
        folder = Path(model) / subfolder if subfolder else Path(model)
        return CheckpointInfo("folder", folder.name, folder, subfolder=subfolder)
    if not HUB_ID.match(str(model)):
        raise CheckpointError(
            f"--model {str(model)!r} is neither an existing folder nor a hub id (ORG/NAME)."
        )
    folder = fetch(str(model), subfolder, revision)
    name = str(model) + (f"/{subfolder}" if subfolder else "")
    return CheckpointInfo("hub", name, folder, repo_id=str(model), subfolder=subfolder, revision=revision)


def fetch(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """snapshot_download of what the loader reads; returns the checkpoint folder inside the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = (
        repo_id + (f" (sub-folder {subfolder})" if subfolder else "") + (f" @ {revision}" if revision else "")
    )
    log.info("Fetching %s into the HF cache%s", what, " (offline: cache only)" if offline() else "")
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns(subfolder),
            ignore_patterns=ignore_patterns(subfolder),
            local_files_only=offline(),
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"The hub has no {what}: {type(e).__name__}.{_no_folder(repo_id)}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{what} is not in the HF cache ({cache_dir()}) and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline() else ''}: run once with network access to download "
            f"it, or pass a local folder with --model.{_no_folder(repo_id)}"
        ) from None
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise CheckpointError(f"{what}: the repository has no sub-folder {subfolder!r}.")
    missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
    if not (folder / "model.safetensors").is_file() and not (folder / INDEX).is_file():
        missing.append(f"model.safetensors or {INDEX}")
    if missing:
        hint = (
            "" if subfolder or (folder / "config.json").is_file()
            else " A task's weights may sit in a sub-folder (--subfolder) or a branch (--revision): the "
            "repository's model card names them."
        )
        raise CheckpointError(
            f"{what} in the HF cache lacks {', '.join(missing)}"
            f"{' (offline: only what was downloaded before is there)' if offline() else ''}.{hint}"
        )
    return folder


def _no_folder(model: str) -> str:
    """An ORG/NAME could also be a relative path ('runs/model') mistyped: say there is no such folder."""
    return f" No local folder '{model}' exists either."


def cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or str(constants.HF_HUB_CACHE)


def add_model_arguments(ap) -> None:
    """--model / --subfolder / --revision, the same on every command line (app, ask, evaluator, bench)."""
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or hub id ORG/NAME (default: the embedded demo model); a hub id is "
        "fetched into the HF cache (safetensors, configs and tokenizer only)",
    )
    ap.add_argument(
        "--subfolder", default=None, help="the checkpoint's folder inside --model (e.g. a task's S2 weights)"
    )
    ap.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (a hub id)")
