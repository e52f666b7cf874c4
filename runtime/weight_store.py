"""Weight store: one raw file per tensor plus a manifest, so any tier can read one layer at a time.

Layout of a store folder:
    manifest.json                 format, version, spec, fingerprint, source, tensors, files, checksum (written last)
    tensors/<layer>.<name>.bin    raw little-endian bytes in spec.dtype, C order, shape from the spec
    hf/                           tokenizer and config files, for AutoTokenizer.from_pretrained

Every file's content checksum is in the manifest (runtime.integrity), and the manifest's own: the hf/
files and the manifest are checked at open, a tensor file on its first read in a process. A tensor
file that changed since import is re-imported from its source when that still gives the imported
bytes, else refused by name. Files are written under a temporary name and renamed when whole.

    >>> store = import_hf_folder("ckpt/opt-125m", "stores/opt-125m", dtype="float16")
    >>> buf = torch.empty(store.spec.layer_bytes(1), dtype=torch.uint8)
    >>> store.read_layer_into(1, buf)                # then kernels.layer_views(store.spec, 1, buf)

A tied lm_head's manifest entry names the embedding's file, so it is stored once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flexgen_graph.errors import UserError
from flexgen_graph.spec import ModelSpec, TensorSlot, spec_from_config
from runtime.backend import read_file_into
from runtime.integrity import atomic_file, checksum, digest, file_checksum, hasher, need_space, remove_stale_tmp
from runtime.kernels import TORCH_DTYPES, layer_views

FORMAT = "flexgen-graph-weights"
VERSION = 3  # 2: linear weights stored input-major ([in, out]); 3: content checksums
MANIFEST = "manifest.json"
DUMMY_CHUNK_ELEMS = 1 << 22  # make_dummy's RAM per chunk: 16 MiB of float32
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "config.json",
)


class WeightStoreError(UserError):
    """A store, checkpoint or buffer a user supplied is not what it must be."""


class CorruptStoreError(WeightStoreError):
    """A store file whose content differs from the checksum recorded when it was written."""


def _manifest_checksum(m: dict) -> str:
    """Of every field but the checksum itself, in a canonical spelling (whitespace does not count)."""
    return checksum(json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True).encode())


def _key(layer: int, name: str) -> str:
    return f"{layer}.{name}"


def _is_tied_head(spec: ModelSpec, layer: int, name: str) -> bool:
    return spec.tie_embeddings and layer == spec.num_layers + 1 and name == "lm_head"


def hf_names(spec: ModelSpec) -> dict[tuple[int, str], str]:
    """(layer, local name) -> the HF parameter name, as the *ForCausalLM state_dict spells it (the
    family's table, flexgen_graph.families)."""
    return {(layer, w.name): w.hf for layer in range(spec.num_graph_layers) for w in spec.checkpoint_tensors(layer)}


def _canonical(key: str) -> str:
    """Checkpoint key -> state_dict spelling (OPT checkpoints may start at "decoder.", bare models at "layers.")."""
    if key.startswith("lm_head.") or key.startswith("model."):
        return key
    return "model." + key


class WeightStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise WeightStoreError(f"{mpath} does not exist: {self.path} is not a weight store "
                                   "(or its import did not finish)")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightStoreError(f"{mpath}: unreadable manifest ({e})") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise WeightStoreError(f"{mpath}: field 'format' is {got!r}, expected {FORMAT!r}")
        if m.get("version") != VERSION:
            raise WeightStoreError(f"{mpath}: field 'version' is {m.get('version')!r}, expected {VERSION}")
        try:
            self.spec = ModelSpec.from_dict(m["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightStoreError(f"{mpath}: field 'spec' is invalid ({e})") from e
        if m.get("fingerprint") != self.spec.fingerprint():
            raise WeightStoreError(f"{mpath}: field 'fingerprint' is {m.get('fingerprint')!r} but the spec's "
                                   f"is {self.spec.fingerprint()!r}")
        self.source: str = str(m.get("source", ""))
        self._tensors: dict = m.get("tensors") or {}
        self._validate_entries(mpath)
        if m.get("checksum") != _manifest_checksum(m):
            raise CorruptStoreError(f"{mpath}: its content does not match its checksum (the file changed since "
                                    f"import): delete {self.path} to re-import the weights")
        for name, want in (m.get("files") or {}).items():
            f = self.path / name
            if not f.is_file() or file_checksum(f) != want:
                why = "missing" if not f.is_file() else "its content does not match its checksum"
                raise CorruptStoreError(f"{f}: {why} (listed in {mpath}): delete {self.path} to re-import the weights")
        self._verified: set[str] = set()  # tensor keys whose file matched its checksum in this process

    def _validate_entries(self, mpath: Path) -> None:
        spec = self.spec
        for layer in range(spec.num_graph_layers):
            for slot in spec.layer_layout(layer):
                key = _key(layer, slot.name)
                e = self._tensors.get(key)
                if not isinstance(e, dict) or not isinstance(e.get("file"), str) \
                        or not isinstance(e.get("checksum"), str):
                    raise WeightStoreError(f"{mpath}: tensor {key!r} has no entry (file, checksum) in 'tensors'")
                if tuple(e.get("shape", ())) != slot.shape or e.get("dtype") != spec.dtype \
                        or e.get("nbytes") != slot.nbytes:
                    raise WeightStoreError(
                        f"{mpath}: tensor {key!r} is {e.get('dtype')} {e.get('shape')} ({e.get('nbytes')} bytes), "
                        f"the spec says {spec.dtype} {list(slot.shape)} ({slot.nbytes} bytes)")

    @property
    def hf_dir(self) -> Path:
        """Tokenizer and config files copied at import (absent for dummy stores)."""
        return self.path / "hf"

    def tensor_file(self, layer: int, name: str) -> Path:
        try:
            return self.path / self._tensors[_key(layer, name)]["file"]
        except KeyError:
            raise WeightStoreError(f"{self.path}: no tensor {_key(layer, name)!r} in the manifest") from None

    def _open_sized(self, layer: int, slot: TensorSlot) -> int:
        """An open fd of the tensor's file, refused by name when missing or of the wrong size."""
        path, key = self.tensor_file(layer, slot.name), _key(layer, slot.name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise WeightStoreError(f"tensor {key!r}: file {path} is missing (listed in {self.path / MANIFEST})") \
                from None
        except OSError as e:
            raise WeightStoreError(f"tensor {key!r}: cannot open {path} ({e})") from e
        size = os.fstat(fd).st_size
        if size != slot.nbytes:
            os.close(fd)
            raise WeightStoreError(f"tensor {key!r}: {path} has {size} bytes, expected {slot.nbytes}")
        return fd

    def layer_nbytes(self, layer: int) -> int:
        """Bytes read_layer_into fills (the interface runtime.compressed.CompressedLayers shares)."""
        return self.spec.layer_bytes(layer)

    def read_layer_into(self, layer: int, buf: torch.Tensor, drop_page_cache: bool = False) -> None:
        """Read every tensor file of the layer straight into its offset in buf (a flat uint8 CPU tensor).

        drop_page_cache: evict the files' pages after reading, so every read comes from the disk
        (the honest "model larger than RAM" case for benchmarks)."""
        need = self.spec.layer_bytes(layer)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.device.type != "cpu":
            raise WeightStoreError(f"layer {layer}: buffer must be a flat contiguous uint8 CPU tensor, "
                                   f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}")
        if buf.numel() < need:
            raise WeightStoreError(f"layer {layer}: buffer holds {buf.numel()} bytes, the layer needs {need}")
        for slot in self.spec.layer_layout(layer):
            into = buf[slot.offset:slot.offset + slot.nbytes]
            read_file_into(self._open_sized(layer, slot), into, f"tensor {_key(layer, slot.name)!r}",
                           WeightStoreError, drop_page_cache)
            if _key(layer, slot.name) not in self._verified:  # once per process: re-reads cost nothing more
                self._verify(layer, slot, into)

    def _verify(self, layer: int, slot: TensorSlot, data: torch.Tensor) -> None:
        """data, just read from the tensor's file, against the manifest's checksum; a mismatch re-imports the
        file from the source (and reads it again into data) or is refused by name."""
        key, path = _key(layer, slot.name), self.tensor_file(layer, slot.name)
        want = self._tensors[key]["checksum"]
        if checksum(data.numpy()) != want:
            why = self._reimport(layer, slot, want)
            if why:
                raise CorruptStoreError(f"tensor {key!r}: {path} does not match the checksum recorded at import (its "
                                        f"content changed since) and {why}: delete {self.path} to re-import the "
                                        "weights, then re-run")
            print(f"note: tensor {key!r}: {path} had changed since import; re-imported it from {self.source}",
                  file=sys.stderr)
            read_file_into(self._open_sized(layer, slot), data, f"tensor {key!r}", WeightStoreError)
            if checksum(data.numpy()) != want:
                raise CorruptStoreError(f"tensor {key!r}: {path} still does not match its checksum after a "
                                        f"re-import: the disk under {self.path} may be failing")
        self._verified.add(key)

    def _reimport(self, layer: int, slot: TensorSlot, want: str) -> str | None:
        """Rewrite one tensor file from the store's source, if that gives the imported bytes; else why not."""
        try:
            with source_fetch(self.source, self.spec) as fetch:
                if fetch is None:
                    return f"its source {self.source!r} cannot be read again"
                h = hasher()
                with atomic_file(self.tensor_file(layer, slot.name), slot.nbytes) as f:
                    for part in stored_chunks(self.spec, layer, slot, _keep_embedding(self.spec, fetch), self.source):
                        h.update(part)
                        f.write(part)
                    if digest(h) != want:  # raised inside: the temporary file goes, the bad one stays
                        raise WeightStoreError("changed")
        except (OSError, UserError, KeyError, RuntimeError) as e:
            return f"its source {self.source!r} no longer gives the imported bytes ({e})"[:300]
        return None

    def check(self) -> None:
        """Every tensor file present with its expected size; the first fault is named."""
        for layer in range(self.spec.num_graph_layers):
            for slot in self.spec.layer_layout(layer):
                os.close(self._open_sized(layer, slot))


Chunks = Iterator[torch.Tensor]  # one tensor as row chunks that concatenate (dim 0) to its full shape


def _keep_embedding(spec: ModelSpec, fetch: Callable[[int, str], Chunks | None]) -> Callable[[int, str], Chunks | None]:
    """fetch, except that a tied embedding is fetched once and kept (the head is written from it)."""
    kept: list[torch.Tensor] = []

    def f(layer: int, name: str) -> Chunks | None:
        if not (spec.tie_embeddings and name == "embed_tokens"):
            return fetch(layer, name)
        if not kept:
            chunks = fetch(0, name)
            if chunks is None:
                return None
            kept.append(torch.cat(list(chunks)))
        return iter(kept)
    return f


def stored_chunks(spec: ModelSpec, layer: int, slot: TensorSlot, fetch: Callable[[int, str], Chunks | None],
                  source: str) -> Iterator[np.ndarray]:
    """The bytes of one tensor's file, in row chunks: fetched, checked against the spec, laid out and cast."""
    key = _key(layer, slot.name)
    tied = _is_tied_head(spec, layer, slot.name)
    chunks = fetch(0, "embed_tokens") if tied else fetch(layer, slot.name)  # the head is the embedding
    if chunks is None:
        raise WeightStoreError(f"{spec.name}: tensor {key!r} is missing from {source}")
    if any(t.linear for t in spec.layer_tensors(layer) if t.name == slot.name):  # HF's [out, in]: store [in, out]
        full = torch.cat(list(chunks))
        if full.dim() != 2 or tuple(full.shape[::-1]) != slot.shape:
            raise WeightStoreError(f"{spec.name}: tensor {key!r} has shape {list(full.shape)} in "
                                   f"{source}, the config implies {list(slot.shape[::-1])}")
        chunks = iter([full.t()])
    rows, dtype = 0, TORCH_DTYPES[spec.dtype]
    for c in chunks:
        if tuple(c.shape[1:]) != slot.shape[1:]:
            raise WeightStoreError(f"{spec.name}: tensor {key!r} has shape {list(c.shape)} in "
                                   f"{source}, the config implies {list(slot.shape)}")
        rows += c.shape[0]
        yield c.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
    if rows != slot.shape[0]:
        raise WeightStoreError(f"{spec.name}: tensor {key!r} has {rows} rows in {source}, "
                               f"the config implies {list(slot.shape)}")


def write_store(spec: ModelSpec, dest: str | os.PathLike, source: str,
                fetch: Callable[[int, str], Chunks | None], finish: Callable[[Path], None] | None = None,
                ) -> WeightStore:
    """Write a store one tensor (or row chunk) at a time: fetch(layer, name) gives the tensor's chunks in
    any dtype, or None when the source lacks it. finish(dest) runs before the manifest completes the store.
    Each file is written under a temporary name, hashed as it goes, and renamed when whole."""
    assert sys.byteorder == "little", "weight stores hold little-endian bytes"
    dest = Path(dest)
    (dest / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until the new manifest lands
    (dest / "tensors").mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(dest / "tensors")  # what an import killed mid-file left (kill -9: no clean-up ran)
    layout = [(layer, slot) for layer in range(spec.num_graph_layers) for slot in spec.layer_layout(layer)]
    there = sum(f.stat().st_size for f in (dest / "tensors").glob("*.bin"))  # replaced as we go
    need_space(dest, sum(slot.nbytes for _, slot in layout) - there, f"importing {spec.name} into {dest}")
    fetch = _keep_embedding(spec, fetch)
    entries: dict[str, dict] = {}
    with tqdm(total=len(layout), desc=f"writing {spec.name}", unit="tensor", disable=not sys.stderr.isatty()) as bar:
        for layer, slot in layout:
            key = _key(layer, slot.name)
            entry = entries[key] = {"file": f"tensors/{key}.bin", "shape": list(slot.shape), "dtype": spec.dtype,
                                    "nbytes": slot.nbytes}
            h = hasher()
            with atomic_file(dest / entry["file"], slot.nbytes) as f:
                for part in stored_chunks(spec, layer, slot, fetch, source):
                    h.update(part)
                    f.write(part)
            entry["checksum"] = digest(h)
            bar.update()
    if finish is not None:
        finish(dest)
    files = {str(f.relative_to(dest)): file_checksum(f) for f in sorted((dest / "hf").rglob("*")) if f.is_file()}
    manifest = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "fingerprint": spec.fingerprint(),
                "source": source, "tensors": entries, "files": files}
    manifest["checksum"] = _manifest_checksum(manifest)
    with atomic_file(dest / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return WeightStore(dest)


def _check_complete(spec: ModelSpec, have: set[str], where: Path) -> dict[tuple[int, str], str]:
    """The HF names the spec needs; refuses a source lacking any (a tied lm_head may be absent)."""
    names = hf_names(spec)
    missing = [hf for (layer, local), hf in names.items()
               if hf not in have and not _is_tied_head(spec, layer, local)]
    if missing:
        raise WeightStoreError(f"{where}: checkpoint lacks tensor(s) {', '.join(missing)}")
    return names


@contextmanager
def _hf_fetch(folder: Path, spec: ModelSpec) -> Iterator[Callable[[int, str], Chunks | None]]:
    """fetch over a HF checkpoint folder's safetensors shards, open while in the block."""
    from safetensors import safe_open

    # the shards themselves say which tensors they hold, so an index json is not needed
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightStoreError(f"{folder}: no *.safetensors files (only safetensors checkpoints are supported)")
    with ExitStack() as stack:
        where: dict[str, tuple[object, str]] = {}  # state_dict name -> (open shard, key in the shard)
        for f in files:
            sf = stack.enter_context(safe_open(str(f), framework="pt"))
            where.update({_canonical(k): (sf, k) for k in sf.keys()})
        names = _check_complete(spec, set(where), folder)

        def fetch(layer: int, local: str) -> Chunks | None:
            sf, k = where.get(names[(layer, local)], (None, ""))
            return None if sf is None else iter([sf.get_tensor(k)])

        yield fetch


def import_hf_folder(folder: str | os.PathLike, dest: str | os.PathLike, dtype: str = "float32",
                     name: str | None = None) -> WeightStore:
    """Import a local HF checkpoint folder (config.json + *.safetensors), one tensor in RAM at a time."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightStoreError(f"{folder}: config.json is missing (not a HF checkpoint folder)")
    spec = spec_from_config(AutoConfig.from_pretrained(str(folder)), name or folder.name, dtype)

    def copy_hf_files(dest: Path) -> None:
        (dest / "hf").mkdir(exist_ok=True)
        for fname in TOKENIZER_FILES:
            if (folder / fname).is_file():
                shutil.copyfile(folder / fname, dest / "hf" / fname)

    with _hf_fetch(folder, spec) as fetch:
        return write_store(spec, dest, f"hf:{folder.resolve()}", fetch, copy_hf_files)


def _float32_shortest(x: float) -> float:
    # GGUF stores floats as float32 (1e-5 reads back as 9.999999747e-06): recover the decimal it was
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def gguf_hf_config(path: Path):
    """The transformers config a GGUF file describes (its floats as the decimals they were)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    for field in ("rms_norm_eps", "rope_theta"):
        if isinstance(cfg.get(field), float):
            cfg[field] = _float32_shortest(cfg[field])
    cfg.pop("_model_name_or_path", None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _gguf_fetch(path: Path, spec: ModelSpec, config) -> Callable[[int, str], Chunks | None]:
    """fetch over a GGUF file, dequantized to the spec's dtype (all of it, once: the loader reads whole files)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # the loader needs only parameter names: no memory, no `accelerate`
        meta_model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta_model,
                                   torch_dtype=TORCH_DTYPES[spec.dtype])["tensors"]
    tensors = {_canonical(k): t for k, t in tensors.items()}
    names = _check_complete(spec, set(tensors), path)

    def fetch(layer: int, local: str) -> Chunks | None:
        t = tensors.pop(names[(layer, local)], None)  # pop: written tensors leave RAM
        return None if t is None else iter([t])

    return fetch


def import_gguf(path: str | os.PathLike, dest: str | os.PathLike, dtype: str = "float32",
                name: str | None = None) -> WeightStore:
    """Import a GGUF file through transformers' GGUF loader, dequantized to dtype."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise WeightStoreError(f"GGUF file {path} does not exist")
    config = gguf_hf_config(path)
    spec = spec_from_config(config, name or path.stem, dtype)

    def save_tokenizer(dest: Path) -> None:
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(dest / "hf"))
        config.save_pretrained(str(dest / "hf"))

    return write_store(spec, dest, f"gguf:{path.resolve()}", _gguf_fetch(path, spec, config), save_tokenizer)


def _dummy_fetch(spec: ModelSpec, seed: int) -> Callable[[int, str], Chunks | None]:
    shapes = {(j, t.name): t.shape for j in range(spec.num_graph_layers) for t in spec.hf_layer_tensors(j)}

    def fetch(layer: int, local: str) -> Chunks:
        shape = shapes[(layer, local)]
        if len(shape) == 1:
            yield (torch.ones if local.endswith("_w") else torch.zeros)(shape)
            return
        # one generator per tensor: a tensor's values do not depend on which tensors came before it
        h = hashlib.sha256(f"{seed}/{layer}/{local}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
        rows = max(1, DUMMY_CHUNK_ELEMS // shape[1])
        for r in range(0, shape[0], rows):
            yield torch.randn((min(rows, shape[0] - r), *shape[1:]), generator=g) * 0.02

    return fetch


def make_dummy(spec: ModelSpec, dest: str | os.PathLike, seed: int = 0) -> WeightStore:
    """Seeded random weights for any spec: N(0, 0.02) matrices, ones for norm weights, zeros for biases.
    Matrices stream out in row chunks, so RAM stays small even for opt-13b."""
    return write_store(spec, dest, f"dummy:seed={seed}", _dummy_fetch(spec, seed))


@contextmanager
def source_fetch(source: str, spec: ModelSpec) -> Iterator[Callable[[int, str], Chunks | None] | None]:
    """fetch over a store's recorded source (as write_store got it), or None when it cannot be read again."""
    kind, _, arg = source.partition(":")
    if kind == "hf" and (Path(arg) / "config.json").is_file():
        with _hf_fetch(Path(arg), spec) as fetch:
            yield fetch
    elif kind == "gguf" and Path(arg).is_file():
        yield _gguf_fetch(Path(arg), spec, gguf_hf_config(Path(arg)))
    elif kind == "dummy" and arg.startswith("seed=") and arg[5:].lstrip("-").isdigit():
        yield _dummy_fetch(spec, int(arg[5:]))
    else:
        yield None


def hf_state_dict(store: WeightStore) -> dict[str, torch.Tensor]:
    """HF parameter name -> tensor for every weight of the store (a tied lm_head included), so a
    transformers *ForCausalLM can load_state_dict(strict=True) the same weights."""
    spec = store.spec
    out = {}
    for layer in range(spec.num_graph_layers):
        buf = torch.empty(spec.layer_bytes(layer), dtype=torch.uint8)
        store.read_layer_into(layer, buf)
        views = layer_views(spec, layer, buf)
        out.update({w.hf: views[w.name].t().contiguous() if w.linear else views[w.name]  # back to HF's [out, in]
                    for w in spec.checkpoint_tensors(layer)})
    return out
